# NVIDIA Jetson Orin Nano 8GB developer kit, default (non-Super) power mode.
# Sources: NVIDIA Jetson Orin Nano series datasheet (DS-11105-001) and
# https://developer.nvidia.com/embedded/jetson-modules ; edgemoe docs/design/ALGORITHMS.md section 5.
name = Jetson Orin Nano 8GB  # NVIDIA Jetson Orin Nano series datasheet
memory = 8GiB  # datasheet: 8GB 128-bit LPDDR5, shared by CPU and GPU
# ~0.5 GiB goes to firmware/GPU carveouts (the kernel reports ~7.4 GiB) plus ~1 GiB for
# JetPack's Ubuntu with a desktop session; a headless install could use 1GiB.
os_reserve = 1.5GiB  # estimate from JetPack memory reports, not a vendor figure
# 68 GB/s at the default clocks; JetPack 6.1 "Super" mode raises it to 102 GB/s.
memory_bandwidth = 68GB  # datasheet (Super: NVIDIA Jetson Orin Nano Super Developer Kit datasheet, Dec 2024)
# The M.2 Key M slot is PCIe Gen3 x4 (3.9 GB/s link); a typical Gen3 NVMe SSD reads ~2.5 GB/s there.
flash_seq_read = 2.5GB  # estimate: datasheet link width + typical Gen3 NVMe reviews
flash_rand_read = 1.2GB  # estimate: QD1 reads of 256 KiB-4 MiB on Gen3 NVMe reviews
cores = 6  # datasheet: 6-core Arm Cortex-A78AE
# GPU: 1024 CUDA cores at 625 MHz = 1.28 TFLOPS FP32, ~20 TFLOPS dense FP16 tensor (datasheet:
# 40 sparse INT8 TOPS); the devbox reaches ~70 GFLOPS FP32. Small decode-time matmuls use a
# fraction of that, so we credit ~4x rather than the 18x peak ratio.
compute_factor = 0.25  # estimate from datasheet peak figures vs the devbox's measured GEMM
watts = 15  # NVIDIA Jetson Orin Nano series datasheet: module power 7 W to 15 W; the default mode is 15 W
