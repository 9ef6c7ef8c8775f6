"""Make this machine behave like a slower device: throttled flash, slowed compute.

`TokenBucket` paces reads to a bandwidth and is shared by all of a store's
reader threads, so N bytes take N / bandwidth however many threads ask.
`ComputeSlowdown` stretches each forward pass's compute (its wall time less
the time spent waiting for flash) by the device's compute factor. Together
with the device's usable memory as the budget, `edgemoe run --device NAME`
shows on a dev box what the device would do. A factor below 1 (a device
faster than this box) cannot be emulated and is clamped to 1.
"""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """Pace byte counts to `rate` bytes/s.

    take(n) returns after the bucket has earned n bytes; concurrent callers
    queue behind each other's debt, so the aggregate rate is `rate`.

    Args:
        rate: bytes per second (> 0).
        burst: bytes that may pass at once after an idle period (default 0:
            no burst, so short tests measure the rate itself).
    """

    def __init__(self, rate: float, burst: int = 0):
        if rate <= 0:
            raise ValueError(f"a token bucket needs a positive rate, got {rate}")
        self.rate, self.burst = float(rate), int(burst)
        self._tokens = float(burst)
        self._t = time.monotonic()
        self._lock = threading.Lock()
        self.waited_s = 0.0

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
            self._t = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self.waited_s += wait
            time.sleep(wait)


class ComputeSlowdown:
    """Sleep (factor - 1) x the compute time of each forward pass."""

    def __init__(self, factor: float):
        self.factor = max(1.0, float(factor))
        self.added_s = 0.0

    def after(self, compute_s: float) -> None:
        extra = (self.factor - 1.0) * max(0.0, compute_s)
        if extra > 0:
            self.added_s += extra
            time.sleep(extra)
