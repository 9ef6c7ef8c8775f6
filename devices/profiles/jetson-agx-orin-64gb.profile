# NVIDIA Jetson AGX Orin 64GB (developer kit / module), MAXN power mode.
# Sources: NVIDIA Jetson AGX Orin Series Technical Brief v1.2 and
# https://developer.nvidia.com/embedded/jetson-modules ; edgemoe docs/design/ALGORITHMS.md section 5.
name = Jetson AGX Orin 64GB  # NVIDIA Jetson AGX Orin Series Technical Brief
memory = 64GiB  # technical brief: 64GB 256-bit LPDDR5
# Carveouts (~1 GiB) plus JetPack's Ubuntu desktop and the CUDA context; generous because
# such boxes usually run other services next to the model.
os_reserve = 4GiB  # estimate, not a vendor figure
memory_bandwidth = 204.8GB  # technical brief: 204.8 GB/s
# The dev kit's M.2 Key M slot is PCIe Gen4 x4; the internal 64GB eMMC 5.1 is far slower
# (~0.3 GB/s) and is not what this profile describes.
flash_seq_read = 3.5GB  # estimate: ALGORITHMS.md section 5 (NVMe ~3.5 GB/s), Gen3/Gen4 NVMe reviews
flash_rand_read = 1.8GB  # estimate: QD1 reads of 256 KiB-4 MiB on NVMe reviews
cores = 12  # technical brief: 12-core Arm Cortex-A78AE
# GPU: 2048 CUDA cores, 5.3 TFLOPS FP32, 64 tensor cores (~85 TFLOPS dense FP16), 4x the
# Orin Nano; credited ~12x the devbox's ~70 GFLOPS for small decode matmuls.
compute_factor = 0.08  # estimate from technical brief peak figures vs the devbox's measured GEMM
watts = 60  # NVIDIA Jetson AGX Orin Series Technical Brief v1.2: 15 W to 60 W; MAXN is 60 W
