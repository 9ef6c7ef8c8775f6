# A flagship Android phone on Snapdragon 8 Gen 3 with 12 GB RAM and UFS 4.0 storage
# (e.g. Galaxy S24 Ultra, OnePlus 12, Xiaomi 14 base models).
# Sources: Qualcomm Snapdragon 8 Gen 3 product brief,
# https://www.qualcomm.com/products/mobile/snapdragon/smartphones/snapdragon-8-series-mobile-platforms/snapdragon-8-gen-3-mobile-platform ;
# edgemoe docs/design/ALGORITHMS.md section 5.
name = Snapdragon 8 Gen 3 phone (12GB, UFS 4.0)  # Qualcomm Snapdragon 8 Gen 3 product brief
memory = 12GiB  # phone makers' spec sheets: 12 GB LPDDR5X in most base models
# Android keeps system_server, SystemUI, Google services and cached apps resident, and its
# low-memory killer acts long before RAM is full; apps rarely get more than ~7 GiB.
os_reserve = 5GiB  # estimate from Android memory reports on 12 GB phones, not a vendor figure
# LPDDR5X at 4800 MHz (9600 MT/s) on a 64-bit bus = 76.8 GB/s.
memory_bandwidth = 76.8GB  # Qualcomm product brief (LPDDR5X up to 4800 MHz); ALGORITHMS.md section 5
flash_seq_read = 4.2GB  # Samsung UFS 4.0 announcement, https://neowin.net/news/samsung-debuts-all-new-ufs-40-to-enable-speeds-of-up-to-4200mbs-or-double-that-of-ufs-31
# Phones measure 3.5-4 GB/s sequential in AndroBench-style reviews; large random reads less.
flash_rand_read = 2GB  # estimate from phone storage reviews, not a vendor figure
cores = 8  # product brief: 1x Cortex-X4 3.3 GHz + 5x A720 + 2x A520
# Geekbench 6 multi-core ~7000 (https://fyss.in/processor-specs/mobile-processor-specs/snapdragon-8-gen-3-specs),
# roughly 2.5x a 2-core Zen 3 server slice; phones throttle under sustained load, so ~2x.
compute_factor = 0.5  # estimate from Geekbench 6 scores, CPU path only (no Adreno/Hexagon)
watts = 8  # estimate: sustained SoC power of flagship phones under CPU load in public reviews (Geekerwan's Snapdragon 8 Gen 3 test, 2023)
