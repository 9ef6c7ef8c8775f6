# Raspberry Pi 5 8GB booting and reading the model from a microSD card.
# Sources: Raspberry Pi 5 product brief, https://www.raspberrypi.com/products/raspberry-pi-5/ ;
# edgemoe docs/design/ALGORITHMS.md section 5.
name = Raspberry Pi 5 8GB (microSD)  # Raspberry Pi 5 product brief
memory = 8GiB  # product brief: 8GB LPDDR4X-4267
# Raspberry Pi OS with the desktop uses ~0.8 GiB after boot; Lite (headless) ~0.3 GiB.
os_reserve = 1GiB  # estimate from a fresh Raspberry Pi OS desktop session, not a vendor figure
# Peak = 32-bit bus x 4267 MT/s = 17 GB/s; sustained copies reach ~11 GB/s (ALGORITHMS.md section 5).
memory_bandwidth = 17GB  # product brief (LPDDR4X-4267, 32-bit), peak
# SDR104 caps the slot at 104 MB/s; good cards read 80-90 MB/s, cheap ones ~40 MB/s.
flash_seq_read = 80MB  # estimate: https://evezone.evetech.co.za/quick-bytes/microsd-vs-nvme-boot-on-the-raspberry-pi-5-what-s-the-difference (40-85 MB/s)
flash_rand_read = 40MB  # estimate: same review; 256 KiB-4 MiB random reads on A1/A2 cards
cores = 4  # product brief: quad-core Arm Cortex-A76 at 2.4 GHz
# 4 cores x 2.4 GHz x 16 FP32 FLOP/cycle (2x128-bit NEON FMA) = 154 GFLOPS peak, like the
# devbox's 2 Zen 3 cores on paper, but A76 GEMM kernels reach a smaller share of peak and
# the memory system is 1.5x slower: ~1.5x slower in practice.
compute_factor = 1.5  # estimate from Cortex-A76 peak FLOPs vs the devbox's measured GEMM
watts = 8  # estimate: Raspberry Pi 5 product brief's 5 V / 5 A supply; ~7-8 W measured at full CPU load in public reviews (Jeff Geerling, 2023)
