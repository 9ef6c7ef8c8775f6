"""Where time goes: a Chrome / Perfetto trace of a run (`edgemoe run --trace trace.json`).

Lanes: the computing thread (each forward pass, each fused attention half, each
MoE layer from `begin` to `finish` and inside it every stall on a read, each
call of the fused decode chain over cached layers), one lane per reader thread
(each expert read or part of one, with its bytes, and its preparation), and
instants for prefetches and evictions. Open the file in https://ui.perfetto.dev or chrome://tracing.

Recording is off unless a Tracer is installed (`install`); the hooks then
cost one list append per event.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

_TRACER: Tracer | None = None


class Tracer:
    """Collects complete ("X") and instant ("i") events in microseconds since its start."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.events: list[dict] = []
        self._names: dict[int, str] = {}

    def _now(self) -> float:
        return (time.perf_counter() - self.t0) * 1e6

    def _tid(self) -> int:
        t = threading.current_thread()
        if t.ident not in self._names:
            self._names[t.ident] = "compute" if t is threading.main_thread() else t.name
        return t.ident

    @contextmanager
    def span(self, name: str, cat: str, **args):
        start = self._now()
        try:
            yield
        finally:
            self.complete(name, cat, start, self._now() - start, **args)

    def complete(self, name: str, cat: str, start_us: float, dur_us: float, **args) -> None:
        self.events.append(
            {"name": name, "cat": cat, "ph": "X", "ts": start_us, "dur": dur_us,
             "pid": os.getpid(), "tid": self._tid(), "args": args}
        )  # fmt: skip

    def instant(self, name: str, cat: str, **args) -> None:
        self.events.append(
            {"name": name, "cat": cat, "ph": "i", "s": "t", "ts": self._now(),
             "pid": os.getpid(), "tid": self._tid(), "args": args}
        )  # fmt: skip

    def write(self, path: str | os.PathLike) -> Path:
        """The trace as Chrome's JSON trace format, written atomically."""
        meta = [
            {"name": "thread_name", "ph": "M", "pid": os.getpid(), "tid": tid,
             "args": {"name": name}}
            for tid, name in self._names.items()
        ]  # fmt: skip
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"traceEvents": meta + self.events, "displayTimeUnit": "ms"}))
        os.replace(tmp, path)
        return path


def install(tracer: Tracer | None) -> None:
    """Record into `tracer` from now on (None: stop recording)."""
    global _TRACER
    _TRACER = tracer


def current() -> Tracer | None:
    return _TRACER


@contextmanager
def span(name: str, cat: str, **args):
    """A span on the calling thread's lane, if a tracer is installed."""
    t = _TRACER
    if t is None:
        yield
        return
    with t.span(name, cat, **args):
        yield


def instant(name: str, cat: str, **args) -> None:
    t = _TRACER
    if t is not None:
        t.instant(name, cat, **args)


def now() -> float | None:
    """The installed tracer's clock (microseconds), or None when none is installed."""
    t = _TRACER
    return None if t is None else t._now()


def complete(name: str, cat: str, start_us: float, **args) -> None:
    """A span from start_us (`now()`) to now on the calling thread's lane, if a tracer is
    installed."""
    t = _TRACER
    if t is not None:
        t.complete(name, cat, start_us, t._now() - start_us, **args)


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint spans covering the same time."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        elif b > a:
            out.append((a, b))
    return out


def _cut(spans: list[tuple[float, float]], off: list[tuple[float, float]]):
    """(spans less `off`, the length removed): both sorted and disjoint."""
    out, removed, j = [], 0.0, 0
    for a, b in spans:
        at = a
        while j < len(off) and off[j][1] <= at:
            j += 1
        k = j
        while k < len(off) and off[k][0] < b:
            lo, hi = max(at, off[k][0]), min(b, off[k][1])
            if lo > at:
                out.append((at, lo))
            removed += hi - lo
            at = hi
            k += 1
        if at < b:
            out.append((at, b))
    return out, removed


# what the computing thread did while no read was in flight, the innermost first
IDLE_DURING = (("stall", "stall"), ("attention", "attn"), ("chain", "chain"), ("moe", "moe"))


def summarize(path: str | os.PathLike) -> dict:
    """Where a run's decode time went, from its trace: the decode steps (every forward pass
    after the first, the prompt's), per token: their wall time, the stalls on reads in them,
    the MoE layers' spans, the expert reads begun (a read in parts counts once), and the
    share of the time at least one read was in flight (disk busy), and the time no read was
    (disk idle) by what the computing thread did meanwhile: waited on a read being
    checked and prepared (stall), a fused attention half, a chain of cached layers, the rest
    of a MoE layer (before its first read and after its last), anything else (between:
    norms, the head, sampling, Python). Empty when the trace has no decode step."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    steps = sorted((e for e in spans if e["cat"] == "step"), key=lambda e: e["ts"])[1:]
    if not steps:
        return {}
    io = [e for e in spans if e["cat"] == "io"]
    reads = [(e["ts"], e["ts"] + e["dur"]) for e in io]
    firsts = [e["ts"] for e in io if not e.get("args", {}).get("part")]  # a read's first part
    lanes = {
        name: _merge([(e["ts"], e["ts"] + e["dur"]) for e in spans if e["cat"] == cat])
        for name, cat in IDLE_DURING
    }
    idle = dict.fromkeys([*lanes, "between"], 0.0)
    wall = busy = stall = moe = 0.0
    n_reads = 0
    for s in steps:
        a, b = s["ts"], s["ts"] + s["dur"]
        wall += b - a
        inside = [(max(a, x), min(b, y)) for x, y in reads if x < b and y > a]
        merged = _merge(inside)
        busy += sum(y - x for x, y in merged)
        gaps, _ = _cut([(a, b)], merged)
        for name, lane in lanes.items():
            gaps, took = _cut(gaps, lane)
            idle[name] += took
        idle["between"] += sum(y - x for x, y in gaps)
        n_reads += sum(1 for x in firsts if a <= x < b)
        for e in spans:
            if a <= e["ts"] < b and e["cat"] in ("stall", "moe"):
                if e["cat"] == "stall":
                    stall += e["dur"]
                else:
                    moe += e["dur"]
    n = len(steps)
    return {
        "decode_steps": n,
        "ms_per_step": wall / n / 1e3,
        "disk_busy": busy / wall if wall else 0.0,
        "stall_ms_per_step": stall / n / 1e3,
        "moe_ms_per_step": moe / n / 1e3,
        "reads_per_step": n_reads / n,
        "disk_idle_ms_per_step": {k: v / n / 1e3 for k, v in idle.items()},
    }
