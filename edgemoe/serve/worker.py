"""The model worker: one thread owns the model and steps a running batch.

Continuous batching: between two steps, waiting requests join the batch, and
one packed pass (generate.step) computes the newcomers' prompts beside the
running sequences' next tokens; finished or abandoned ones leave and give
their KV slot back. A short request therefore never waits for a long one to
finish, only for the step in progress; a long prompt takes PREFILL_BUDGET
tokens a step while others run, so it never stalls their tokens for its
whole length.

Admission: the KV cache for `batch` slots x `ctx` positions was planned into
the memory budget at load (EdgeModel.kv_cache), so a request needs a free
slot and nothing else; one that finds none waits in a bounded queue, and
one that finds the queue full is refused (the HTTP layer answers 503).
Nothing a request asks for can allocate past the plan.

Prompt-prefix reuse: an idle slot keeps the KV of the tokens its last
sequence left there (prompt and reply). A new request takes the idle slot
that saves the most (the longest shared prefix, less what it would throw away
of another conversation) and computes only the rest, so the next turn of a
conversation prefills its new message, not the whole history. Slots that
match nothing go least recently used first, so the budget (the planned
slots) bounds what is kept.

Everything here runs on the worker thread except `submit`, `cancel` (a flag
the next step reads) and the read-only `panel` / `load_figures`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import psutil

from edgemoe.generate import Record, Request, Sequence, step
from edgemoe.moe.executor import ExecutorStats

LOADING, SERVING, FAILED, STOPPED = "loading", "serving", "failed", "stopped"

# Prompt tokens a step computes beside running sequences (none running: every prompt whole).
# A pass is packed (no padding), so newcomers cost only their own tokens in the running rows'
# pass; the budget bounds how long one pass holds those rows' next token. Measured on the
# demo (f32, 1 thread), a 311-token prompt beside 7 decoding rows: whole, one pass of 27.2 ms
# CPU; 256, passes of 21.3 + 9.4 ms; 128, 13.4 + 13.6 + 9.2 ms (a decode step alone ~5 ms).
PREFILL_BUDGET = 256


class QueueFull(Exception):
    """Admission refused: every slot busy and the waiting queue at its bound."""


class NotServing(Exception):
    """The worker is loading, failed or stopped."""


@dataclass(frozen=True)
class Done:
    """A job's last event: its sequence (text, tokens, stats) and the prompt tokens reused."""

    seq: Sequence
    cached: int


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass
class Job:
    """One request on its way through the worker.

    emit: called on the worker thread with each event: a list[Record] (one step's records
    for this job), then Done or Failed. The HTTP layer passes one that hands events to its
    event loop.
    """

    request: Request
    emit: Callable[[object], None]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    seq: Sequence | None = None
    cached: int = 0
    last_token_at: float | None = None
    ignore_eos: bool = False  # run to max_tokens (load tests, benchmarks)

    def cancel(self) -> None:
        """Leave at the next step (a client that disconnected)."""
        self.cancelled = True


class Slots:
    """The KV slots and the tokens each idle slot's cache still holds.

    take(ids) gives an idle slot for ids (None if all are busy) and how many of its kept
    tokens are reusable; give(slot, tokens) returns a slot with the tokens its KV holds.
    """

    def __init__(self, slots: list[int], reuse: bool):
        self.idle: list[int] = list(slots)
        self.reuse = reuse
        self.kept: dict[int, tuple[int, ...]] = {}
        self.freed_at: dict[int, float] = dict.fromkeys(slots, 0.0)

    def take(self, ids: tuple[int, ...]) -> tuple[int, int] | None:
        """The slot to run ids in and how many of its kept tokens they reuse.

        A slot scores what it saves now (the shared prefix) less what taking it throws away
        (its kept tokens past that prefix: the next turn of another conversation would have
        reused them): the continuation of a kept conversation wins, a long shared system
        prompt is worth taking over, and a shared chat-template header alone never costs
        another conversation its prefix. Ties go to the slot idle longest.
        """
        if not self.idle:
            return None
        best, best_score, best_n = None, None, 0
        for slot in sorted(self.idle, key=self.freed_at.__getitem__):  # oldest first
            kept = self.kept.get(slot, ()) if self.reuse else ()
            n = _common_prefix(kept, ids)
            score = 2 * n - len(kept)
            if best_score is None or score > best_score:
                best, best_score, best_n = slot, score, n
        self.idle.remove(best)
        self.kept.pop(best, None)
        return best, best_n

    def give(self, slot: int, tokens: tuple[int, ...]) -> None:
        self.idle.append(slot)
        self.freed_at[slot] = time.perf_counter()
        if self.reuse and tokens:
            self.kept[slot] = tokens

    @property
    def kept_tokens(self) -> int:
        return sum(len(t) for t in self.kept.values())


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Worker:
    """Owns an EdgeModel on its own thread and serves Jobs by continuous batching.

    Args:
        load: makes the model (called on the worker thread, so loading does not hold up
            the HTTP server, which answers /health with 503 meanwhile).
        max_queue: requests that may wait for a slot; one more is refused (QueueFull).
        prefix_reuse: keep idle slots' KV for prompts that start the same way.
        static: admit only into an empty batch (the baseline: a batch runs to its end).
        metrics: an object with on_first_token(s), on_token(s), on_finish(job, seq) (or None).
    """

    def __init__(
        self,
        load: Callable[[], object],
        max_queue: int = 32,
        prefix_reuse: bool = True,
        static: bool = False,
        metrics=None,
    ):
        self._load, self.max_queue = load, max_queue
        self.prefix_reuse, self.static, self.metrics = prefix_reuse, static, metrics
        self.state, self.error = LOADING, None
        self.model = None
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self._stop = False
        self._thread = threading.Thread(target=self._main, name="edgemoe-worker", daemon=True)
        self.on_failed: Callable[[BaseException], None] | None = None
        self.on_ready: Callable[[], None] | None = None
        self.steps = 0
        self.served = 0
        self.generated = 0
        self.prefill_s = self.decode_s = 0.0  # time in the model's prefill and decode passes
        # the worker thread's CPU time in them, and in all (wall time is not CPU on shared cores)
        self.prefill_cpu = self.decode_cpu = self.cpu_s = 0.0
        self._series: deque[list] = deque(maxlen=180)  # [t, tokens, hits, misses, bytes] per second
        self._series_lock = threading.Lock()
        self._last_use: np.ndarray | None = None  # [layers, experts] step of last use, -1 never

    # ---- front end side
    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue a job for the next step.

        Raises:
            NotServing: the model is loading, failed or the worker stopped.
            QueueFull: max_queue jobs already wait.
        """
        with self._cond:
            if self.state != SERVING:
                raise NotServing(self.state)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for a slot")
            self._waiting.append(job)
            self._cond.notify()

    def kept_prefixes(self) -> list[tuple[int, ...]]:
        """The tokens idle slots keep, longest first (a snapshot; any thread)."""
        slots = getattr(self, "slots", None)
        return sorted(list(slots.kept.values()), key=len, reverse=True) if slots else []

    def stop(self, timeout: float = 30) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- worker thread
    def _main(self) -> None:
        try:
            self.model = m = self._load()
            m.tokenizer  # noqa: B018 (load it here, not on the first request)
            self.cache = m.kv_cache()
            self._all_slots = m.take_slots(m.batch)
            self.slots = Slots(self._all_slots, self.prefix_reuse)
            f = m.facts
            self._rows = {layer: i for i, layer in enumerate(f.moe_layers)}
            self._last_use = np.full((len(f.moe_layers), f.experts_per_layer), -1, np.int64)
            m.executor.observe(self._routed)
        except BaseException as e:  # noqa: BLE001 (reported to the front end, which exits)
            self.state, self.error = FAILED, e
            if self.on_failed:
                self.on_failed(e)
            return
        self._prev = m.executor_stats()
        with self._cond:
            self.state = SERVING
        if self.on_ready:
            self.on_ready()
        cpu0 = time.thread_time()
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 (a bug in a step: stop serving, say why)
            self.state, self.error = FAILED, e
            for job in self.running + list(self._waiting):
                job.emit(Failed(f"the model worker stopped: {e}"))
            if self.on_failed:
                self.on_failed(e)
            return
        finally:
            with self._cond:
                for job in self._waiting:
                    job.emit(Failed("the server is shutting down"))
                self._waiting.clear()
            m.free_slots(self._all_slots)  # the model outlives its worker (tests, embedding)
            self.cpu_s = time.thread_time() - cpu0
        self.state = STOPPED

    def _loop(self) -> None:
        m, cache = self.model, self.cache
        while True:
            with self._cond:
                while not self._stop and not self.running and not self._waiting:
                    self._cond.wait()
                if self._stop:
                    for job in self.running:
                        job.emit(Failed("the server is shutting down"))
                    return
                self._admit()
            self._drop_cancelled()
            tokens = 0
            try:
                if self.running:
                    # newcomers in arrival order (the budget goes to the oldest first)
                    new = [j.seq for j in self.running if j.seq.prefilling]
                    rest = [j.seq for j in self.running if not j.seq.prefilling]
                    t0, c0 = time.perf_counter(), time.thread_time()
                    records = step(m, cache, new, rest, budget=PREFILL_BUDGET if rest else None)
                    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
                    if rest:  # a decode pass, newcomers' prompt tokens beside
                        self.decode_s, self.decode_cpu = self.decode_s + wall, self.decode_cpu + cpu
                    else:
                        self.prefill_s += wall
                        self.prefill_cpu += cpu
                    tokens += self._deliver(records)
                    self._retire()
            except Exception as e:  # noqa: BLE001 (fail this batch's requests, keep serving)
                for job in list(self.running):
                    self.running.remove(job)
                    self.slots.give(job.seq.slot, ())
                    job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            self.steps += 1
            self._account(tokens)

    def _admit(self) -> list[Job]:
        """Waiting jobs that get a slot now (called holding the lock)."""
        if self.static and self.running:
            return []
        new = []
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                job.emit(Failed("cancelled"))
                continue
            got = self.slots.take(job.request.ids)
            if got is None:
                break
            self._waiting.popleft()
            slot, cached = got
            tok = self.model.tokenizer
            eos = () if job.ignore_eos else tok.eos_ids
            job.seq = Sequence(job.request, slot, tok, eos, cached=cached)
            job.seq.stats.queued_at = job.arrived  # TTFT from arrival, queueing included
            job.cached = job.seq.cached
            new.append(job)
        self.running += new
        return new

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.running if j.cancelled]:
            job.seq.finish_reason = job.seq.finish_reason or "cancelled"
            self._release(job)
            if self.metrics:
                self.metrics.on_finish(job, job.seq)
            job.emit(Failed("cancelled"))

    def _deliver(self, records: list[Record]) -> int:
        """Hand each job its records; the number of new tokens."""
        now = time.perf_counter()
        by_seq: dict[int, list[Record]] = {}
        for r in records:
            by_seq.setdefault(id(r.seq), []).append(r)
        for job in self.running:
            recs = by_seq.get(id(job.seq))
            if not recs:
                continue
            if self.metrics:
                if job.last_token_at is None:
                    self.metrics.on_first_token(now - job.arrived)
                else:
                    self.metrics.on_token(now - job.last_token_at)
            job.last_token_at = now
            job.emit(recs)
        return sum(r.token is not None for r in records)

    def _retire(self) -> None:
        for job in [j for j in self.running if j.seq.done]:
            self._release(job)
            self.served += 1
            if self.metrics:
                self.metrics.on_finish(job, job.seq)
            job.emit(Done(job.seq, job.cached))

    def _release(self, job: Job) -> None:
        seq = job.seq
        held = int(self.cache.lengths[seq.slot])  # tokens the slot's KV holds now
        self.slots.give(seq.slot, (seq.request.ids + tuple(seq.out))[:held])
        self.running.remove(job)

    # ---- what the live page and the metrics read
    def _routed(self, layer: int, expert_ids) -> None:
        row = self._rows.get(layer)
        if row is not None:
            # numpy's fancy assignment: 7x cheaper than unique() each layer of each pass
            self._last_use[row, expert_ids.reshape(-1).numpy()] = self.steps

    def _account(self, tokens: int) -> None:
        """Add a step's new tokens and expert traffic to the current second of the series."""
        self.generated += tokens
        now = self.model.executor_stats()
        d: ExecutorStats = now - self._prev
        self._prev = now
        t = int(time.time())
        with self._series_lock:
            if self._series and self._series[-1][0] == t:
                b = self._series[-1]
                b[1] += tokens
                b[2] += d.hits
                b[3] += d.misses
                b[4] += d.bytes_read
            else:
                self._series.append([t, tokens, d.hits, d.misses, d.bytes_read])

    def summary_line(self) -> str:
        """Requests served, tokens, expert traffic and peak memory since start."""
        from edgemoe import memcap
        from edgemoe.units import Bytes

        m = self.model
        ex = m.executor_stats()
        peak = memcap.own_rss_peak()
        budget = "unlimited" if m.mem is None else str(m.mem)
        return (
            f"{self.served} requests, {self.generated} tokens in {self.steps} steps (prefill "
            f"{self.prefill_s:.1f} s, decode {self.decode_s:.1f} s; worker CPU {self.cpu_s:.1f} s: "
            f"prefill {self.prefill_cpu:.1f} s, decode {self.decode_cpu:.1f} s) | expert hits "
            f"{100 * ex.hit_rate:.0f}% | read "
            f"{Bytes(ex.bytes_read)} from flash | peak {peak} of {budget}"
        )

    def kv_used(self) -> int:
        """Bytes of KV cache filled: running sequences and the prefixes idle slots keep."""
        if self.model is None:
            return 0
        f = self.model.facts
        tokens = int(self.cache.lengths.sum())
        return f.kv_bytes(1, tokens)

    def panel(self) -> dict:
        """The live page's state: budget, expert cache heatmap, hit rate and flash bytes over time."""
        out = {"state": self.state, "running": len(self.running), "waiting": self.waiting}
        m = self.model
        if m is None or self.state == LOADING:
            return out
        p = m.plan
        ex = m.executor_stats()
        cache = getattr(m.executor, "cache", None)
        f = m.facts
        cached = np.zeros(self._last_use.shape, np.int64)
        if cache is not None:
            for layer, e, level in cache.keys():
                row = self._rows.get(layer)
                if row is not None and e < cached.shape[1]:
                    cached[row, e] = max(cached[row, e], level)
        last = self._last_use.copy()
        age = np.where(last >= 0, self.steps - last, -1)
        with self._series_lock:
            series = [list(b) for b in self._series]
        out.update(
            budget=None if m.mem is None else int(m.mem),
            plan={
                k: int(getattr(p, k))
                for k in (
                    "floor",
                    "resident",
                    "kv_cache",
                    "io_buffers",
                    "workspace",
                    "expert_cache",
                    "all_experts",
                )
            },
            rss=psutil.Process().memory_info().rss,
            kv_used=self.kv_used(),
            kv_kept_tokens=self.slots.kept_tokens,
            expert_cache_used=int(cache.used) if cache is not None else 0,
            expert_cache_capacity=int(cache.capacity) if cache is not None else 0,
            layers=list(self._rows),
            experts=f.experts_per_layer,
            levels=f.levels,
            cached=cached.tolist(),
            age=age.tolist(),
            step=self.steps,
            served=self.served,
            totals={
                "hits": ex.hits,
                "misses": ex.misses,
                "hit_rate": ex.hit_rate,
                "bytes_read": ex.bytes_read,
                "reads": ex.reads,
            },
            series=[
                {
                    "t": t,
                    "tokens": n,
                    "hit_rate": h / (h + mi) if h + mi else None,
                    "bytes_per_token": b / n if n else None,
                }
                for t, n, h, mi, b in series
            ],
        )
        return out
