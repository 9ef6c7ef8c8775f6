"""Device emulation: a throttled read of N bytes takes N / bandwidth (within 15%)."""

from __future__ import annotations

import threading
import time

import pytest

from devices.emulate import ComputeSlowdown, TokenBucket
from edgemoe.engine import DEMO
from edgemoe.store import ExpertStore
from formats.reader import EmoeReader

RATE = 4e6  # bytes/s: slow enough that the real read time is noise


@pytest.mark.parametrize("threads", [1, 4])
def test_token_bucket_paces_all_threads_together(threads):
    bucket = TokenBucket(RATE)
    chunk, per_thread = 50_000, 40 // threads

    def work():
        for _ in range(per_thread):
            bucket.take(chunk)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    want = threads * per_thread * chunk / RATE
    assert abs(elapsed - want) <= 0.15 * want, (elapsed, want)


@pytest.mark.parametrize("threads", [1, 3])
def test_throttled_store_reads_at_the_device_bandwidth(threads):
    with EmoeReader(DEMO) as r:
        store = ExpertStore(r, threads=threads, throttle=TokenBucket(RATE).take)
        keys = list(r.experts)[:24]
        t0 = time.perf_counter()
        for f in [store.fetch(layer, e, 1) for layer, e in keys]:
            f.result()
        elapsed = time.perf_counter() - t0
        want = store.bytes_read / RATE
        store.close()
    assert want > 0.5 and abs(elapsed - want) <= 0.15 * want, (elapsed, want)


def test_compute_slowdown_and_refusals():
    s = ComputeSlowdown(3.0)
    t0 = time.perf_counter()
    s.after(0.1)
    assert 0.17 <= time.perf_counter() - t0 <= 0.3 and s.added_s == pytest.approx(0.2)
    assert ComputeSlowdown(0.5).factor == 1.0  # a faster device cannot be emulated: clamped
    with pytest.raises(ValueError):
        TokenBucket(0)
