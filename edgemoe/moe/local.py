"""LocalExecutor: routed experts from this machine's flash, through the cache.

One layer runs moe/schedule.py's plan. `begin` takes each (token, expert) pair's
level (the bit policy's, edgemoe/bits.py), acquires the cached experts and issues
the first wave of level-slice reads (they fly while the model computes the
shared expert); `finish` computes the groups the cached levels serve, then each
(expert, level) group as soon as its slice lands, then the later waves. A cache
entry is one expert holding the levels it has: a missing level is read alone
(`store.fetch(have=)`) and appended to the expert, never re-read from level 1;
a token at a lower level computes on a prefix of the expert's levels.

Reads are prepared (sliced, kernels built, or a level appended to a copy that
shares the built ones) on the reader threads, so a payload never waits in memory
for the computing thread. Each level of an expert a layer needs is read at most
once per forward pass, however many tokens route to it and however small the cache.

`hint(layer, ids)` reserves room for experts a later layer will probably use and
reads them (at the top level) in the background; the reservation holds them until
that layer's `begin`, so the layers in between cannot evict them.

With `ahead` set (the engine's prefetch="idle", where the cache cannot hold every
expert), `hint` instead reads the likeliest uncached one of them into a slab of its own,
only while no demanded read is queued or in flight (store.ahead): the disk's idle time
between a layer's last read and the next layer's first. Its room is the cache's: the
cache sets it aside (evicting its next victim) rather than the plan keeping a slot of
its own, which cost the 25% cap 7% of its decode speed (one slot of about five). Where
the next layer's guessed experts are all cached, it reads one of a later layer's (the
chain of cached layers would leave the disk idle). A layer's output guesses again
(RoutedMoE.refine: 77% of the next layer's experts right against 61% from its input on
the bench model) and the read re-aims if the guess changed. If that layer then misses
on it, its read takes over the parts already landed (store.take) and the room becomes
its entry; if not, it is dropped and only idle disk time and the evicted expert were
spent.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from edgemoe import fastkernels, trace
from edgemoe.bits import BitPolicy
from edgemoe.cache import Entry, ExpertCache, Key
from edgemoe.moe.combine import combine_into
from edgemoe.moe.dispatch import Assignment, dispatch
from edgemoe.moe.executor import ExecutorStats, ExpertExecutor
from edgemoe.moe.experts import (
    ExpertWeights,
    expert_forward,
    mwq_expert,
    q8_expert,
    swiglu_head,
    swiglu_tail,
)
from edgemoe.moe.schedule import LayerSchedule, Slice, Wave, schedule
from edgemoe.prepare import downgrade_expert, expert_at
from edgemoe.store import Ahead, ExpertStore

# A read ahead looks this many MoE layers on for an expert not in memory, where the guess is
# that the next layer's are all cached (the layers after it are guessed from the same
# hidden state, less well: on the bench model 61% of the next layer's experts, 50% of the
# one after; docs/BENCHMARKS.md "prefetch-idle"). EDGEMOE_AHEAD_LAYERS sets it.
AHEAD_LAYERS = int(os.environ.get("EDGEMOE_AHEAD_LAYERS", "3"))


@dataclass
class _Handle:
    layer: int
    x: torch.Tensor  # [T, D]
    groups: dict[Key, list[Assignment]]  # each expert's (level) groups, ascending level
    plan: LayerSchedule
    first: list[Future]
    held: set[Key] = field(default_factory=set)  # released when the layer is done with them
    latest: dict = field(default_factory=dict)  # key -> its newest value, or that read's future
    t0: float = 0.0  # when begin was called (the trace's MoE span)


@dataclass
class _Hits:
    """One token whose experts are all in memory as Q8 INT8 experts: begin's fast lane, no
    schedule, one kernel call (fastkernels.q8_experts) in finish."""

    layer: int
    x: torch.Tensor  # [1, D]
    keys: list[Key]  # ascending expert, as dispatch orders them (the sum's order)
    experts: list[ExpertWeights]
    coef: list[float]
    t0: float


class LocalExecutor(ExpertExecutor):
    """Args:
    store: reads expert slices.
    cache: holds prepared experts.
    prepare: (layer, expert, payloads) -> ExpertWeights (runs on a reader thread).
    level: (layer, expert) -> the level to compute that expert at.
    expert_nbytes: (layer) -> prepared bytes of one expert of that layer at level() (hints).
    borrow: (layer, expert, level) -> whether the expert computes on its read buffer in place
        (reads then land in a slab the expert keeps until the cache evicts it).
    bits: the bit policy giving each (token, expert) pair its level (edgemoe/bits.py) when
        begin is given none; None: every pair at level(layer, expert).
    weight_bits: (layer, expert, level) -> bits per expert weight (bits.weight_bits), for
        the stats' average; None: not counted.
    upgrade: (layer, expert, ew, payloads) -> ew raised by the payloads' levels, ew itself
        untouched (prepare.upgraded_expert; runs on a reader thread); None: a missing level
        is read with all below it and prepared afresh.
    level_nbytes: (layer, level) -> prepared bytes of one expert of that layer at that level;
        None: expert_nbytes(layer) at every level.
    order: the read order, "hebf" or "fifo" (moe/schedule.py).
    worth: whether an upgrade slice is worth its read (schedule.UpgradeCost); None: always.
    head: (layer, expert, level) -> (byte ranges, builder) of the gate and up a whole read
        into a slab lands first (ExecutorContext.head), or None: given, the expert's gate and
        up are computed as soon as they land, its down once the rest has (store.fetch's head).
    """

    def __init__(
        self,
        store: ExpertStore,
        cache: ExpertCache,
        prepare: Callable,
        level: Callable[[int, int], int],
        expert_nbytes: Callable[[int], int],
        borrow: Callable[[int, int, int], bool] | None = None,
        bits: BitPolicy | None = None,
        weight_bits: Callable[[int, int, int], float] | None = None,
        upgrade: Callable | None = None,
        level_nbytes: Callable[[int, int], int] | None = None,
        order: str = "hebf",
        worth: Callable[[Slice], bool] | None = None,
        head: Callable[[int, int, int], tuple[list, Callable] | None] | None = None,
    ):
        self.store, self.cache, self.prepare = store, cache, prepare
        self.level, self.expert_nbytes = level, expert_nbytes
        self.borrow = borrow or (lambda layer, expert, level: False)
        self.bits, self.weight_bits, self.upgrade = bits, weight_bits, upgrade
        self.level_nbytes = level_nbytes or (lambda layer, level: expert_nbytes(layer))
        self.order, self.worth = order, worth
        self.head = head or (lambda layer, expert, level: None)
        cache.on_evict = self._recycle
        cache.shrink = self._shrink
        self._reads = self._uncached = self._upgrades = 0
        self._pairs, self._pair_bits = 0, 0.0
        self._io_wait = 0.0
        self._prefetched: dict[int, set[Key]] = {}  # held for a later layer, by that layer
        self._hinted: dict[int, set[Key]] = {}  # the last prediction for each layer
        self._issued: set[Key] = set()  # reads started by hints, not yet used or dropped
        self._pf_issued = self._pf_used = self._pf_wasted = 0
        self._predicted = self._routed_hinted = 0
        self.ahead = False  # hints read one expert ahead in idle disk time (module doc)
        self._next: Ahead | None = None  # that read, until its layer takes or drops it
        self._aside = 0  # the cache's room it holds (ExpertCache.set_aside)
        self._limbo: list[tuple[Ahead, int]] = []  # dropped, a part still landing: its room
        self._guess: tuple[int, set[int]] | None = None  # its layer's hinted experts
        self._pf_bytes_wasted = 0

    def stats(self) -> ExecutorStats:
        return ExecutorStats(
            reads=self._reads,
            bytes_read=int(self.store.bytes_read),
            hits=self.cache.hits,
            misses=self.cache.misses,
            uncached=self._uncached,
            io_wait_s=self._io_wait,
            prefetch_issued=self._pf_issued,
            prefetch_used=self._pf_used,
            prefetch_wasted=self._pf_wasted,
            prefetch_bytes_wasted=self._pf_bytes_wasted,
            predicted=self._predicted,
            routed_hinted=self._routed_hinted,
            pairs=self._pairs,
            pair_bits=self._pair_bits,
            upgrades=self._upgrades,
            downgrades=self.cache.downgrades,
        )

    def _size(self, key: Key, level: int) -> int:
        return self.level_nbytes(key[0], level) if level else 0

    def _fetch(self, s: Slice, base: ExpertWeights | Future | None) -> Future:
        """Read a slice; prepare it on the reader thread, on top of `base` (the expert's value
        below s.have: a cached value, or the future of its previous slice) when s.have > 0."""
        (layer, expert), have = s.key, s.have
        self._reads += 1
        if have and (self.upgrade is None or base is None):
            have = 0  # read it whole
        if have == 0:
            own = self.borrow(layer, expert, s.level)
            a = self._next
            if own and a is not None and a.key == s.key and a.level == s.level:
                self._next = None
                fut = self.store.take(
                    a,
                    then=lambda p: self.prepare(layer, expert, p),
                    head=self.head(layer, expert, s.level),
                )
                if fut is not None:
                    self._pf_used += 1
                    return fut
            return self.store.fetch(
                layer,
                expert,
                s.level,
                then=lambda p: self.prepare(layer, expert, p),
                own=own,
                head=self.head(layer, expert, s.level) if own else None,
            )
        self._upgrades += 1
        if not isinstance(base, Future):  # the levels below are in memory: upgrade as it lands
            return self.store.fetch(
                layer,
                expert,
                s.level,
                have=have,
                then=lambda p: self.upgrade(layer, expert, base, p),
            )
        # the levels below are still being read: read this one meanwhile, and upgrade once both
        # have landed, on whichever thread lands last (a reader thread never blocks on another)
        raw = self.store.fetch(layer, expert, s.level, have=have)
        out: Future = Future()
        # `go` reaches the two futures through `both` only, emptied once both landed: each
        # future's callbacks hold `go`, and a cycle kept them, the payloads and both experts
        # (dead or evicted) alive until the cyclic collector ran (193 MiB of tensors by then)
        lock, both = threading.Lock(), [base, raw]

        def go(_):
            with lock:
                if not both or not all(f.done() for f in both):
                    return
                below, new = both
                both.clear()
            if not out.set_running_or_notify_cancel():
                return
            try:
                out.set_result(self.upgrade(layer, expert, below.result(), new.result()))
            except BaseException as e:
                out.set_exception(e)

        base.add_done_callback(go)
        raw.add_done_callback(go)
        return out

    def _recycle(self, ew) -> None:
        """An expert left memory: its read buffer serves the next read."""
        trace.instant("evict", "evict")
        slab = getattr(ew, "slab", None)
        if slab is not None:
            ew.slab = None
            self.store.recycle(slab)

    def _shrink(self, key: Key, entry: Entry, level: int) -> int | None:
        """The budget rule cuts a cached expert to `level` (no I/O): its bytes after, or None."""
        return downgrade_expert(entry.value, level)

    def _wait(self, fut: Future) -> ExpertWeights:
        t0 = time.perf_counter()
        with trace.span("stall", "stall"):
            ew = fut.result()
        self._io_wait += time.perf_counter() - t0
        return ew

    # ---- prefetch
    @property
    def refines(self) -> bool:
        return self.ahead

    def hint(self, layer, predicted_ids, later=None):
        if self.ahead:
            self._read_ahead(layer, predicted_ids, later)
            return
        held = self._prefetched.setdefault(layer, set())
        keys = [(layer, e) for e in torch.unique(predicted_ids).tolist()]
        self._hinted[layer] = set(keys)
        for key in keys:
            if key in held:
                continue
            if self.cache.hold(key):  # cached: kept until its layer comes
                held.add(key)
                continue
            level = self.level(*key)
            if self.cache.reserve(key, max(1, self._size(key, level)), level=level) is None:
                continue  # no room that is not held
            self.cache.fill(key, self._fetch(Slice(key, 0, level, 0), None))
            trace.instant(f"prefetch L{key[0]} E{key[1]}", "prefetch")
            held.add(key)
            self._issued.add(key)
            self._pf_issued += 1

    def _uncached_guess(self, layer: int, predicted_ids: torch.Tensor) -> int | None:
        """The likeliest predicted expert of `layer` not in memory (the most tokens' choice,
        then the router's order), or None."""
        ids = predicted_ids.reshape(-1).tolist()
        for e in sorted(set(ids), key=lambda e: (-ids.count(e), ids.index(e))):
            if self.cache.peek((layer, e)) is None:
                return e
        return None

    def _read_ahead(self, layer: int, predicted_ids: torch.Tensor, later=None) -> None:
        """Read ahead the likeliest predicted expert of `layer` that is not in memory; where
        the guess is that all of them are, the likeliest of the layers after it (`later`, up
        to AHEAD_LAYERS in all). A read ahead of the same expert goes on; another is dropped."""
        self._guess = (layer, set(predicted_ids.reshape(-1).tolist()))
        want, e = layer, self._uncached_guess(layer, predicted_ids)
        if e is None and later is not None:
            for n, (want, ids) in enumerate(later(), start=1):
                if n >= AHEAD_LAYERS:
                    break
                e = self._uncached_guess(want, ids)
                if e is not None:
                    break
        a = self._next
        if e is not None and a is not None and a.key == (want, e):
            return  # already reading it
        self._drop_ahead()
        if e is None:
            return
        level = self.level(want, e)
        if not self.borrow(want, e, level):
            return  # its read would not land in a slab of its own
        n = max(1, self._size((want, e), level))
        self._reclaim()
        if not self.cache.set_aside(n):  # its room is the cache's: the next victim goes now
            return
        self._next = self.store.ahead(want, e, level, self.head(want, e, level))
        if self._next is None:
            self.cache.give_back(n)
            return
        self._aside = n
        self._pf_issued += 1
        trace.instant(f"ahead L{want} E{e}", "prefetch")

    def _drop_ahead(self) -> None:
        if self._next is not None:
            self._pf_bytes_wasted += self.store.drop(self._next)
            self._pf_wasted += 1
            self._limbo.append((self._next, self._aside))
            self._next, self._aside = None, 0
        self._reclaim()

    def _reclaim(self) -> None:
        """Give the cache back the room of dropped reads ahead whose slab is free again (a
        part in flight when it was dropped lands first)."""
        keep = []
        for a, n in self._limbo:
            if a.freed:
                self.cache.give_back(n)
            else:
                keep.append((a, n))
        self._limbo = keep

    def _settle_ahead(self, layer: int, expert_ids: torch.Tensor) -> None:
        """A layer begins: its hint's accuracy; the read ahead it will not take is dropped."""
        routed = set(expert_ids.reshape(-1).tolist())
        if self._guess is not None and self._guess[0] == layer:
            self._predicted += len(self._guess[1] & routed)
            self._routed_hinted += len(routed)
            self._guess = None
        a = self._next
        if a is not None and (a.key[0] < layer or (a.key[0] == layer and a.key[1] not in routed)):
            self._drop_ahead()  # a read ahead for a later layer goes on
        elif a is not None and a.key[0] == layer:
            # taken by this layer's read of it (_fetch): the room it held becomes that
            # expert's cache entry, reserved next without evicting anyone
            self.cache.give_back(self._aside)
            self._aside = 0
        self._reclaim()

    def close(self) -> None:
        self._drop_ahead()

    # ---- the fused decode chain (fused.FusedChain)
    def chain_ready(self) -> bool:
        """Whether a decode step may run its layers in one kernel call: no bit policy and no
        prefetch bookkeeping (each wants the per-layer path)."""
        return self._plain()

    def _plain(self) -> bool:
        """No bit policy and no prefetch bookkeeping: a layer's levels are fixed and nothing
        is held for it (the fast lane and the chain need nothing else of the schedule)."""
        return self.bits is None and not self._prefetched and not self._hinted

    def _cached_q8(self, layer: int, e: int) -> ExpertWeights | None:
        """The expert, if it is cached whole (not in flight, at its level) as a Q8 expert."""
        entry = self.cache.peek((layer, e))
        level = self.level(layer, e)
        if entry is None or entry.in_flight or entry.level < level:
            return None
        use = expert_at(entry.value, level)
        return use if q8_expert(use) else None

    def q8_tables(self, layer: int, experts: int) -> tuple[int, list[list[int]]]:
        """(expert width, [gate q, up q, down q, gate scales, up scales, down scales] pointers
        per expert, 0 where it is not cached whole as a Q8 expert) of one layer."""
        tables: list[list[int]] = [[0] * experts for _ in range(6)]
        width = 0
        for e in range(experts):
            use = self._cached_q8(layer, e)
            if use is None:
                continue
            width = use.gate.out_features
            ptrs = (use.gate.q, use.up.q, use.down.q, use.gate.scales, use.up.scales)
            for t, p in zip(tables, (*ptrs, use.down.scales)):
                t[e] = p.data_ptr()
        return width, tables

    def account_hits(self, layer: int, ids: list[int]) -> None:
        """A layer the chain computed on cached experts: observers, hits, the policy's uses."""
        if self._observers:
            self.routed(layer, torch.tensor([ids]))
        if self.ahead:
            self._settle_ahead(layer, torch.tensor(ids))
        self.cache.now = layer
        for e in ids:
            self.cache.acquire((layer, e))
            self.cache.release((layer, e))
        if self.weight_bits is not None:
            self._pairs += len(ids)
            self._pair_bits += sum(self.weight_bits(layer, e, self.level(layer, e)) for e in ids)

    # ---- one layer
    def _all_hits(self, layer, x, expert_ids, expert_weights) -> _Hits | None:
        """The fast lane's handle when one token's experts are all cached, whole and Q8, no
        bit policy and no prefetch bookkeeping is in play; else None (nothing is touched)."""
        if x.shape[0] != 1 or not self._plain():
            return None
        pairs = sorted(zip(expert_ids[0].tolist(), expert_weights[0].tolist()))
        keys, experts = [], []
        for e, _ in pairs:
            use = self._cached_q8(layer, e)
            if use is None:
                return None
            keys.append((layer, e))
            experts.append(use)
        return _Hits(layer, x, keys, experts, [w for _, w in pairs], time.perf_counter())

    def begin(self, layer, x, expert_ids, expert_weights, levels=None):
        if self.ahead:
            self._settle_ahead(layer, expert_ids)
        fast = None if levels is not None else self._all_hits(layer, x, expert_ids, expert_weights)
        self.routed(layer, expert_ids)
        if fast is not None:
            self.cache.now = layer
            for key in fast.keys:
                self.cache.acquire(key)  # counted and held, as schedule() holds its hits
            return fast
        if levels is None and self.bits is not None:
            levels = self.bits.levels(layer, expert_ids, expert_weights, x)  # [T, K]
        groups: dict[Key, list[Assignment]] = {}
        need: dict[Key, dict[int, int]] = {}  # expert -> {level: its pairs at that level}
        for a in dispatch(expert_ids, expert_weights, levels):  # ascending expert, then level
            key = (layer, a.expert)
            if not a.level:
                a = Assignment(a.expert, a.tokens, a.weights, self.level(layer, a.expert))
            groups.setdefault(key, []).append(a)
            need.setdefault(key, {})[a.level] = len(a.tokens)
        self.cache.now = layer
        plan = schedule(self.cache, need, self._size, self.order, self.worth)
        # this layer now holds what it uses; the holds its prediction took end here
        for key in self._prefetched.pop(layer, set()):
            self.cache.release(key)
        guess = self._hinted.pop(layer, None)
        if guess is not None:
            self._predicted += len(guess & groups.keys())
            self._routed_hinted += len(groups)
            read = {k for k in guess if k in self._issued}
            self._issued -= read
            self._pf_used += len(read & groups.keys())
            self._pf_wasted += len(read - groups.keys())
        h = _Handle(layer, x, groups, plan, [], {k for k, _ in plan.hits}, t0=time.perf_counter())
        h.latest = {key: entry.value for key, entry in plan.hits}
        h.first = self._issue(h, plan.first)
        return h

    def _issue(self, h: _Handle, wave: Wave) -> list[Future]:
        futs = []
        for s, entry in zip(wave.slices, wave.entries):
            fut = self._fetch(s, h.latest.get(s.key))
            h.latest[s.key] = fut
            futs.append(fut)
            if entry is not None:
                h.held.add(s.key)
        return futs

    def _finish_hits(self, h: _Hits) -> torch.Tensor:
        out = torch.zeros(h.x.shape, dtype=torch.float32)  # [1, D]
        try:
            fastkernels.q8_experts(
                h.x[0], [(u.gate, u.up, u.down) for u in h.experts], h.coef, out[0]
            )
        finally:
            for key in h.keys:
                self.cache.release(key)
        if self.weight_bits is not None:
            self._pairs += len(h.keys)
            self._pair_bits += sum(
                self.weight_bits(h.layer, key[1], u.level) for key, u in zip(h.keys, h.experts)
            )
        t = trace.current()
        if t is not None:
            start = (h.t0 - t.t0) * 1e6
            t.complete(f"moe L{h.layer}", "moe", start, (time.perf_counter() - h.t0) * 1e6,
                       experts=len(h.keys), hits=len(h.keys))  # fmt: skip
        return out.to(h.x.dtype)

    def finish(self, handle: _Handle) -> torch.Tensor:
        if isinstance(handle, _Hits):
            return self._finish_hits(handle)
        h, cache = handle, self.cache
        out = torch.zeros(h.x.shape, dtype=torch.float32)  # [T, D]
        pending = h.plan.pending  # the schedule lowers it as it merges slices
        done: dict[Key, int] = {}  # the highest level computed of each expert

        def compute(key: Key, ew: ExpertWeights, upto: int, early=None) -> None:
            """Compute the groups of `key` at levels done[key]+1 .. upto on ew (all that are
            left once no read of it is pending: those above what is read compute at ew's).
            early: the one group's silu(gate) * up, computed as the read's head landed."""
            if not pending.get(key):
                upto = h.groups[key][-1].level
            for a in h.groups[key]:
                if done.get(key, 0) < a.level <= upto:
                    use = expert_at(ew, a.level)
                    if early is None:
                        y = expert_forward(h.x[a.tokens], use)
                    else:  # as expert_forward computes it, bit for bit
                        y = swiglu_tail(early, use)
                    combine_into(out, a.tokens, y.to(h.x.dtype), a.weights)
                    if self.weight_bits is not None:
                        self._pairs += len(a.tokens)
                        self._pair_bits += len(a.tokens) * self.weight_bits(
                            h.layer, key[1], use.level
                        )
            done[key] = max(done.get(key, 0), upto)
            if not pending.get(key):
                # no read builds on it now: once released the cache may evict it, and nothing
                # here may keep it alive beside what takes its room
                h.latest.pop(key, None)
                if key in h.held:
                    cache.release(key)
                    h.held.discard(key)

        def compute_hits() -> None:
            """The hits in memory: a single token's INT8 experts that read nothing more in
            one kernel call (fused.py), its mwq ones in another, the others as compute()
            does."""
            q8, mwq = [], []
            for key, entry in h.plan.hits:
                ew = self._value(h, key, entry)
                if h.x.shape[0] == 1 and not pending.get(key):
                    a = h.groups[key][-1]
                    use = expert_at(ew, a.level)
                    if q8_expert(use):
                        q8.append((key, a, use))
                        continue
                    if mwq_expert(use):
                        mwq.append((key, a, use))
                        continue
                compute(key, ew, h.plan.have[key])
            if q8:
                fused(fastkernels.q8_experts, q8)
            if mwq and fastkernels.mwq_fusable([(u.gate, u.up, u.down) for _, _, u in mwq]):
                fused(fastkernels.mwq_experts, mwq)
            else:
                for key, a, use in mwq:
                    compute(key, use, a.level)

        def fused(call, hits) -> None:
            """One token's experts `hits` [(key, its assignment, the expert at its level)]
            through one kernel call."""
            triples = [(u.gate, u.up, u.down) for _, _, u in hits]
            call(h.x[0], triples, [float(a.weights[0]) for _, a, _ in hits], out[0])
            for key, a, use in hits:
                if self.weight_bits is not None:
                    self._pairs += 1
                    self._pair_bits += self.weight_bits(h.layer, key[1], use.level)
                done[key] = a.level
                h.latest.pop(key, None)
                if key in h.held:
                    cache.release(key)
                    h.held.discard(key)

        try:
            compute_hits()
            reads, wave, h.first = h.first, h.plan.first, []
            while True:
                self._serve(h, wave, reads, compute, pending)
                reads = None  # the next wave may evict what these read: free before it reads
                wave = next(h.plan.rest, None)
                if wave is None:
                    break
                reads = self._issue(h, wave)
        except BaseException:
            self._abandon(h)
            raise
        t = trace.current()
        if t is not None:
            start = (h.t0 - t.t0) * 1e6
            t.complete(f"moe L{h.layer}", "moe", start, (time.perf_counter() - h.t0) * 1e6,
                       experts=len(h.groups), hits=len(h.plan.hits))  # fmt: skip
        return out.to(h.x.dtype)

    def _serve(self, h: _Handle, wave: Wave, reads: list[Future], compute, pending) -> None:
        """Compute each slice's groups as it lands, cache it, release what is done."""
        for s, entry, fut in zip(wave.slices, wave.entries, reads):
            early = self._early(h, s, fut)
            ew = self._wait(fut)
            pending[s.key] -= 1
            if entry is None:
                self._uncached += 1
            else:  # its size once no level is in flight: room for those stays taken till then
                self.cache.fill(s.key, ew, None if pending[s.key] else ew.nbytes)
            compute(s.key, ew, s.level, early)
            if entry is None and s.have == 0 and not pending[s.key]:
                self._recycle(ew)  # a whole read no one keeps
            del ew

    def _early(self, h: _Handle, s: Slice, fut: Future) -> torch.Tensor | None:
        """silu(gate x) * up x of the slice's one group, computed on the read's head (its gate
        and up) as soon as that lands, while the rest of the read is in flight; None where
        the read has no head or the expert serves more than this slice's one group."""
        head = getattr(fut, "head", None)
        groups = h.groups[s.key]
        if head is None or len(groups) != 1 or groups[0].level != s.level:
            return None
        gate, up = self._wait(head)
        return swiglu_head(h.x[groups[0].tokens], gate, up)

    def _value(self, h: _Handle, key: Key, entry: Entry) -> ExpertWeights:
        """A hit's prepared expert, waiting for it if a prefetch is still reading it."""
        if entry.in_flight:
            ew = self._wait(entry.value)
            if self.cache.peek(key) is entry and entry.in_flight:  # not yet raised by a slice
                self.cache.fill(key, ew, ew.nbytes)
            return ew
        return entry.value

    def _abandon(self, h: _Handle) -> None:
        """A read failed: drop this layer's holds, the slots that never got a value and those
        grown for levels that never landed."""
        for key in h.held:
            self.cache.release(key)
            e = self.cache.peek(key)
            if e is None:
                continue
            if e.value is None or (
                e.pins == 0 and not e.in_flight and getattr(e.value, "level", e.level) != e.level
            ):
                self.cache.evict(key)
