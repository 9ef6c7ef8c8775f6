# Raspberry Pi 5 8GB with an NVMe SSD on the M.2 HAT+, PCIe at its certified Gen 2 speed.
# Sources: Raspberry Pi 5 product brief, https://www.raspberrypi.com/products/raspberry-pi-5/ ;
# edgemoe docs/design/ALGORITHMS.md section 5.
name = Raspberry Pi 5 8GB (NVMe)  # Raspberry Pi 5 product brief
memory = 8GiB  # product brief: 8GB LPDDR4X-4267
os_reserve = 1GiB  # estimate, as rpi5-8gb-sd: Raspberry Pi OS desktop uses ~0.8 GiB after boot
memory_bandwidth = 17GB  # product brief (LPDDR4X-4267, 32-bit), peak; ~11 GB/s sustained
# PCIe 2.0 x1 = 500 MB/s link, ~450 MB/s after overhead. Forcing Gen 3 (dtparam=pciex1_gen=3,
# not certified) doubles this to ~0.8 GB/s.
flash_seq_read = 450MB  # https://iambillmeyer.com/posts/2025-01-02-raspberrypi5-pcie-performance (Gen 2 baseline); ALGORITHMS.md section 5
flash_rand_read = 400MB  # estimate: the x1 Gen 2 link, not the SSD, limits 256 KiB-4 MiB reads
cores = 4  # product brief: quad-core Arm Cortex-A76 at 2.4 GHz
compute_factor = 1.5  # estimate, as rpi5-8gb-sd (same SoC)
watts = 8  # estimate: Raspberry Pi 5 product brief's 5 V / 5 A supply; ~7-8 W measured at full CPU load in public reviews (Jeff Geerling, 2023)
