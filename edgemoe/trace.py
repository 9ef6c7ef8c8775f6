"""Where time goes: a Chrome / Perfetto trace of a run (`edgemoe run --trace trace.json`).

Lanes: the computing thread (each forward pass, each MoE layer from `begin`
to `finish`, and inside it every stall on a read), one lane per reader thread
(each expert read, and its preparation), and instants for prefetches and
evictions. Open the file in https://ui.perfetto.dev or chrome://tracing.

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
