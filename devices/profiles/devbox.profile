# The development machine edgemoe is built and tested on: a 2-core AMD EPYC (Zen 3) KVM guest.
# All figures measured on 2026-11-23 by the device-profiles helper session with a Python
# script (see devices/README.md, "How the devbox was measured"); medians of 3 runs.
name = devbox (2-core EPYC VM)  # measured on 2026-11-23
memory = 23.5GiB  # measured on 2026-11-23: /proc/meminfo MemTotal 24682416 kB
# The VM runs no desktop; MemTotal - MemAvailable was ~0.6 GiB. 2 GiB leaves room for the
# shell, editors and test runners next to edgemoe.
os_reserve = 2GiB  # chosen on 2026-11-23 from /proc/meminfo, with headroom
# numpy copy of a 256 MiB float64 array: 26.6 GB/s counting read + write traffic (the
# STREAM copy convention), i.e. 13.3 GB/s each way. Best of 5.
memory_bandwidth = 26GB  # measured on 2026-11-23, numpy copyto of 256 MiB
# O_DIRECT preadv on a 512 MiB scratch file in /work (virtio disk), 4 MiB sequential reads:
# 2035, 2713, 2586 MB/s; at 256 KiB sequential 1571-1680 MB/s.
flash_seq_read = 2.5GB  # measured on 2026-11-23, O_DIRECT 4 MiB sequential reads
# 4 KiB-aligned random offsets, O_DIRECT: 256 KiB reads 1349-1493 MB/s, 4 MiB reads 2006-2349 MB/s;
# the profile keeps the smaller-read figure because experts can be that small.
flash_rand_read = 1.4GB  # measured on 2026-11-23, O_DIRECT 256 KiB random reads
cores = 2  # measured on 2026-11-23: nproc
compute_factor = 1.0  # the reference by definition; numpy FP32 2048x2048 GEMM ran at ~70 GFLOPS
watts = 9  # estimate: AMD EPYC 7763 (Zen 3) TDP 280 W / 64 cores = 4.4 W a core, x 2 vCPUs (amd.com EPYC 7763 product page)
