# A typical 8 GB laptop: 4-core x86 CPU with AVX2, dual-channel DDR4-3200, PCIe Gen3 x4 NVMe SSD.
# Sources: JEDEC DDR4-3200 data rate (3200 MT/s x 8 bytes x 2 channels) and NVMe SSD
# vendor spec sheets (e.g. Samsung 970 EVO Plus: 3,500 MB/s sequential read).
name = Laptop, 8GB, NVMe  # generic class, no single vendor
memory = 8GiB  # the class's defining figure
# Windows 11 or a Linux desktop plus a browser keep ~3 GiB resident.
os_reserve = 3GiB  # estimate from typical desktop memory use, not a vendor figure
# Dual channel = 51.2 GB/s; many 8 GB laptops have one SO-DIMM (single channel, 25.6 GB/s).
memory_bandwidth = 51.2GB  # JEDEC DDR4-3200, dual channel, peak
flash_seq_read = 3.5GB  # Samsung 970 EVO Plus spec sheet, https://www.samsung.com/semiconductor/minisite/ssd/product/consumer/970evoplus/
flash_rand_read = 1.5GB  # estimate: QD1 reads of 256 KiB-4 MiB on Gen3 NVMe reviews
cores = 4  # typical mobile Core i5 / Ryzen 5 class (physical cores)
# 4 cores with AVX2 FMA at ~3-4 GHz boost vs the devbox's 2 Zen 3 cores at 2.45 GHz:
# ~2-3x on paper, less once laptop power limits kick in.
compute_factor = 0.5  # estimate from core count and clock, not a benchmark
watts = 15  # Intel Core i5-8250U TDP 15 W (ark.intel.com), a typical 8 GB laptop's U-series CPU
