"""RemoteExecutor: the executor seam over expert hosts.

`begin` groups a layer's routed (token, expert) pairs by the host chosen for
each expert and issues one call per host at once (every token of the step bound
for a host in one call, calls to different hosts in flight together); the model
computes its shared expert meanwhile; `finish` collects the answers and
combines them in float32 as the single-device executor does. The seam returns
before the next attention, so that is as far as the overlap goes.

The expert map is versioned. `begin` snapshots the current map, so calls in
flight finish on the map they started with while `set_map` switches to a new
one atomically; `drained(version)` tells when no call of an older map remains.
MoE² request classes (cluster/selection.py) are per request: the coordinator
tells the executor, around each forward pass (`rows`), the class of every row
of the batch; each class's rows keep only its served choices (or fall back to
their top one at its fastest replica) and call its replicas, so one batch
mixes classes. Without row classes, `selection` (or nothing) applies to all.

A call that fails (host died, node lost, timed out) marks its host dead, asks
the coordinator's `on_failure` for a repaired map (redundant copies at once,
else experts re-placed on survivors) and re-issues only the failed pairs, up
to `retries` times within `timeout` each. An expert no live host can serve
raises `ExpertLost` in bounded time; other requests keep being served.

Communication (which host, which rows) is kept apart from compute (the host's
LocalExecutor), as vLLM's modular MoE separates prepare/finalize from experts.

Shape legend: T tokens, K active experts, D hidden, M pairs of one call.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cluster.selection import Routed, RowCounts, route_rows
from cluster.types import ExpertLost, ExpertMap
from edgemoe.moe.api import Assignment, ExecutorStats, ExpertExecutor, combine_into, dispatch


class HostFailed(Exception):
    """A host did not answer a call (it died, its node is gone, or it timed out)."""

    def __init__(self, node: str, why: str):
        super().__init__(f"host {node!r}: {why}")
        self.node, self.why = node, why


class HostPool(Protocol):
    """How the executor reaches hosts (Ray actors, or in-process hosts in tests)."""

    def submit(self, node: str, version: int, layer: int, x, pair_row, pair_expert) -> object:
        """Start a host's compute call; returns what `result` takes."""

    def result(self, node: str, call: object, timeout: float) -> torch.Tensor:
        """The call's [M, D] answer; raises HostFailed."""

    def rtt(self, node: str) -> float:
        """The node's link round trip (replica choice prefers near hosts)."""


@dataclass
class _Call:
    node: str
    assigns: list[Assignment]  # in the order of the call's pairs
    rows: torch.Tensor  # [n] rows of x sent
    sels: list = field(default_factory=list)  # each assignment's class Selection (or None)
    call: object = None
    sent_at: float = 0.0


@dataclass
class _Handle:
    layer: int
    x: torch.Tensor  # [T, D]
    emap: ExpertMap
    calls: list[_Call] = field(default_factory=list)


@dataclass(frozen=True)
class Failure:
    """One failed call, for the record (recovery times are measured from these)."""

    node: str
    layer: int
    why: str
    at: float  # time.time() when it was seen
    recovered_s: float = -1.0  # seconds until the pairs were answered elsewhere (-1: lost)


class RemoteExecutor(ExpertExecutor):
    """Args:
    pool: reaches the hosts.
    emap: the first expert map.
    on_failure: (dead nodes) -> the repaired map (already switched to), called on a failure.
    timeout: seconds one call may take before its host counts as failed.
    retries: re-issues of a layer's failed pairs before ExpertLost.
    """

    def __init__(
        self,
        pool: HostPool,
        emap: ExpertMap,
        on_failure: Callable[[set[str]], ExpertMap] | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
    ):
        self.pool, self._map = pool, emap
        self.on_failure = on_failure
        self.timeout, self.retries = timeout, retries
        self.dead: set[str] = set()
        self.failures: list[Failure] = []
        self.selection = None  # a MoE² Selection for rows without a class of their own
        # (klass, map) -> its Selection: how a row's RequestClass becomes a served set
        self.selector: Callable[[object, ExpertMap], object] | None = None
        self._tls = threading.local()  # this thread's forward pass: each row's class
        self.fallbacks = 0  # (token, layer)s with no served choice, given their top one
        self.dropped = 0  # choices a class's selection dropped (no call made for them)
        self._lock = threading.Condition()
        self._inflight: Counter[int] = Counter()  # calls in flight per map version
        self._calls = self._pairs = 0
        self._bytes = 0
        self._wait = 0.0

    # ---- the map
    @property
    def map(self) -> ExpertMap:
        return self._map

    def set_map(self, emap: ExpertMap) -> None:
        """Switch atomically: layers begun from now on use `emap`."""
        with self._lock:
            if emap.version < self._map.version:
                return  # a slower repair or join lost the race to a newer map
            self._map = emap
            self._lock.notify_all()

    def drained(self, version: int, timeout: float = 60.0) -> bool:
        """Wait until no call begun on a map older than `version` is in flight."""
        end = time.monotonic() + timeout
        with self._lock:
            while any(n for v, n in self._inflight.items() if v < version):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    # ---- the seam
    def _choose(self, emap: ExpertMap, key, load: Counter, sel=None) -> str | None:
        """The replica for one expert: the class's (within its latency, least energy; the
        fastest for a fallback), else a host this layer already calls (no extra round trip),
        else the nearest, then the least loaded this step."""
        hosts = [h for h in emap.hosts(key) if h not in self.dead]
        if not hosts:
            return None
        if sel is not None and sel.host(key) in hosts:
            return sel.host(key)
        return min(hosts, key=lambda h: (load[h] == 0, self.pool.rtt(h), load[h], h))

    def _plan_calls(self, emap: ExpertMap, layer: int, routed: list) -> list[_Call]:
        by_node: dict[str, list] = {}
        load: Counter = Counter()
        for r in sorted(routed, key=lambda r: -len(r.assignment.tokens)):  # hot ones first
            a = r.assignment
            node = self._choose(emap, (layer, a.expert), load, r.selection)
            if node is None:
                raise ExpertLost(
                    f"layer {layer} expert {a.expert}: every host that held it is gone "
                    f"(dead: {', '.join(sorted(self.dead)) or 'none'}) and no live host took it"
                )
            by_node.setdefault(node, []).append(r)
            load[node] += len(a.tokens)
        calls = []
        for node, group in by_node.items():
            group.sort(key=lambda r: r.assignment.expert)
            assigns = [r.assignment for r in group]
            rows = torch.unique(torch.cat([a.tokens for a in assigns]))  # [n] sorted
            calls.append(_Call(node, assigns, rows, [r.selection for r in group]))
        return calls

    def _submit(self, emap: ExpertMap, layer: int, x: torch.Tensor, calls: list[_Call]) -> None:
        for c in calls:
            where = torch.searchsorted(c.rows, torch.cat([a.tokens for a in c.assigns]))  # [M]
            experts = torch.cat(
                [torch.full((len(a.tokens),), a.expert, dtype=torch.int64) for a in c.assigns]
            )
            xs = x[c.rows]
            c.sent_at = time.perf_counter()
            c.call = self.pool.submit(c.node, emap.version, layer, xs, where, experts)
            self._calls += 1
            self._pairs += len(experts)
            self._bytes += xs.nbytes + len(experts) * xs.shape[1] * xs.element_size()  # out, back

    def _repair(self, version: int, failed: list[tuple[_Call, str]]) -> ExpertMap:
        """Mark the failed hosts dead and get a repaired map; a call made on an older map
        than the current one is first retried on the current one (its host may have been
        replaced, as a stop-the-world restart does), and marks nothing."""
        with self._lock:
            cur = self._map
            if cur.version > version and all(c.node in cur.nodes() for c, _ in failed):
                return cur
            for c, _ in failed:
                self.dead.add(c.node)
        if self.on_failure is not None:
            return self.on_failure(set(self.dead))
        return self._map

    def begin(self, layer, x, expert_ids, expert_weights):
        self.routed(layer, expert_ids)
        emap = self._map
        with self._lock:
            self._inflight[emap.version] += 1
        try:
            h = _Handle(layer, x, emap)
            routed = self._select(emap, layer, expert_ids, expert_weights)
            h.calls = self._plan_calls(emap, layer, routed)
            self._submit(emap, layer, x, h.calls)
        except BaseException:
            self._done(emap.version)
            raise
        return h

    @contextmanager
    def rows(self, classes: Sequence | None):
        """Within this block (one forward pass on this thread), row i of every layer's batch
        belongs to a request of class classes[i] (a RequestClass, or None: `selection`)."""
        prev = getattr(self._tls, "classes", None)
        self._tls.classes = classes
        try:
            yield
        finally:
            self._tls.classes = prev

    def _groups(self, emap: ExpertMap, t: int) -> list[tuple]:
        """(rows or None, Selection or None) per class present among this pass's t rows."""
        classes = getattr(self._tls, "classes", None)
        if classes is None or self.selector is None or len(classes) != t:
            return [(None, self.selection)]
        kinds = list(dict.fromkeys(classes))
        if len(kinds) == 1:
            k = kinds[0]
            return [(None, self.selection if k is None else self.selector(k, emap))]
        out = []
        for k in kinds:
            rows = torch.tensor([i for i, c in enumerate(classes) if c == k], dtype=torch.int64)
            out.append((rows, self.selection if k is None else self.selector(k, emap)))
        return out

    def _select(self, emap: ExpertMap, layer: int, ids: torch.Tensor, weights: torch.Tensor):
        """The layer's assignments (selection.Routed); under a class's selection only its
        served choices, the gate's weights renormalised over them (a dropped choice gets no
        call at all), or its top choice when none is served (the fallback, counted)."""
        groups = self._groups(emap, len(ids))
        if len(groups) == 1 and groups[0][1] is None:
            return [Routed(a, None) for a in dispatch(ids, weights)]
        counts = RowCounts()
        out = route_rows(layer, ids, weights, groups, counts)
        self.fallbacks += counts.fallbacks
        self.dropped += counts.dropped
        return out

    def _done(self, version: int) -> None:
        with self._lock:
            self._inflight[version] -= 1
            if not self._inflight[version]:
                del self._inflight[version]
            self._lock.notify_all()

    def finish(self, handle: _Handle) -> torch.Tensor:
        h = handle
        out = torch.zeros(h.x.shape, dtype=torch.float32)  # [T, D]
        try:
            pending, tries, first_fail = h.calls, 0, None
            version = h.emap.version  # the map the pending calls were made on
            while pending:
                failed: list[tuple[_Call, str]] = []
                for c in pending:
                    t0 = time.perf_counter()
                    try:
                        y = self.pool.result(c.node, c.call, self.timeout)  # [M, D]
                    except HostFailed as e:
                        failed.append((c, e.why))
                        continue
                    finally:
                        self._wait += time.perf_counter() - t0
                    off = 0
                    for a in c.assigns:
                        n = len(a.tokens)
                        combine_into(out, a.tokens, y[off : off + n], a.weights)
                        off += n
                if not failed:
                    break
                now = time.time()
                first_fail = first_fail or now
                tries += 1
                for c, why in failed:
                    self.failures.append(Failure(c.node, h.layer, why, now))
                if tries > self.retries:
                    raise ExpertLost(
                        f"layer {h.layer}: {len(failed)} call(s) failed {tries} times "
                        f"({failed[0][1]})"
                    )
                emap = self._repair(version, failed)
                version = emap.version
                redo = [Routed(a, s) for c, _ in failed for a, s in zip(c.assigns, c.sels)]
                pending = self._plan_calls(emap, h.layer, redo)
                self._submit(emap, h.layer, h.x, pending)
            if first_fail is not None:
                spent = time.time() - first_fail
                self.failures[-1] = Failure(**{**self.failures[-1].__dict__, "recovered_s": spent})
        finally:
            self._done(h.emap.version)
        return out.to(h.x.dtype)

    def stats(self) -> ExecutorStats:
        # calls count as reads and their payload as bytes moved "over the network"
        return ExecutorStats(
            reads=self._calls, bytes_read=self._bytes, hits=self._pairs, io_wait_s=self._wait
        )


class LocalPool:
    """In-process hosts on threads: the executor's logic without Ray (tests, `--local`)."""

    def __init__(self, hosts: dict, rtts: dict[str, float] | None = None):
        self.hosts = hosts  # name -> ExpertHost (opened)
        self.rtts = rtts or {}
        self.killed: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(hosts)))

    def submit(self, node, version, layer, x, pair_row, pair_expert) -> Future:
        if node in self.killed:
            f: Future = Future()
            f.set_exception(HostFailed(node, "killed"))
            return f
        return self._pool.submit(self.hosts[node].compute, version, layer, x, pair_row, pair_expert)

    def result(self, node, call, timeout):
        try:
            return call.result(timeout)
        except HostFailed:
            raise
        except TimeoutError:
            raise HostFailed(node, f"no answer in {timeout:.1f} s") from None

    def rtt(self, node) -> float:
        return self.rtts.get(node, 0.0)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
