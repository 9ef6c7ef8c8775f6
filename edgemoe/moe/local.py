"""LocalExecutor: routed experts from this machine's flash, through the cache.

One layer runs moe/schedule.py's plan: `begin` acquires the cached experts and
issues the first wave of reads for the missing ones (they fly while the model
computes the shared expert), `finish` computes the hits, then each read as it
lands, then the later waves. Reads are prepared (sliced, kernels built) on the
reader threads, so a payload never waits in memory for the computing thread.
Each expert a layer needs is read at most once per forward pass, however many
tokens (a long prompt, a batch) route to it and however small the cache.

`hint(layer, ids)` reserves room for experts a later layer will probably use
and reads them in the background; the reservation holds them until that
layer's `begin`, so the layers in between cannot evict them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from edgemoe import trace
from edgemoe.bits import BitPolicy
from edgemoe.cache import Entry, ExpertCache, Key
from edgemoe.moe.combine import combine_into
from edgemoe.moe.dispatch import Assignment, dispatch
from edgemoe.moe.executor import ExecutorStats, ExpertExecutor
from edgemoe.moe.experts import ExpertWeights, expert_forward
from edgemoe.moe.schedule import LayerSchedule, Wave, schedule
from edgemoe.store import ExpertStore


@dataclass
class _Handle:
    layer: int
    x: torch.Tensor  # [T, D]
    by_key: dict[Key, Assignment]
    plan: LayerSchedule
    first: list[Future]
    held: list[Key] = field(default_factory=list)  # released when the layer is done
    t0: float = 0.0  # when begin was called (the trace's MoE span)


class LocalExecutor(ExpertExecutor):
    """Args:
    store: reads expert slices.
    cache: holds prepared experts.
    prepare: (layer, expert, payloads) -> ExpertWeights (runs on a reader thread).
    level: (layer, expert) -> the level to compute that expert at.
    expert_nbytes: (layer) -> prepared bytes of one expert of that layer (for wave sizes).
    borrow: (layer, expert, level) -> whether the expert computes on its read buffer in place
        (reads then land in a slab the expert keeps until the cache evicts it).
    bits: the bit policy giving each (token, expert) pair its level (edgemoe/bits.py) when
        begin is given none; None: every pair at level(layer, expert).
    weight_bits: (layer, expert, level) -> bits per expert weight (bits.weight_bits), for
        the stats' average; None: not counted.
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
    ):
        self.store, self.cache, self.prepare = store, cache, prepare
        self.bits, self.weight_bits = bits, weight_bits
        self._pairs, self._pair_bits = 0, 0.0
        self.level, self.expert_nbytes = level, expert_nbytes
        self.borrow = borrow or (lambda layer, expert, level: False)
        cache.on_evict = self._recycle
        self._reads = self._uncached = 0
        self._io_wait = 0.0
        self._prefetched: dict[int, set[Key]] = {}  # held for a later layer, by that layer
        self._hinted: dict[int, set[Key]] = {}  # the last prediction for each layer
        self._issued: set[Key] = set()  # reads started by hints, not yet used or dropped
        self._pf_issued = self._pf_used = self._pf_wasted = 0
        self._predicted = self._routed_hinted = 0

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
            predicted=self._predicted,
            routed_hinted=self._routed_hinted,
            pairs=self._pairs,
            pair_bits=self._pair_bits,
        )

    def _fetch(self, key: Key) -> Future:
        layer, expert, level = key
        self._reads += 1
        own = self.borrow(layer, expert, level)
        return self.store.fetch(
            layer, expert, level, then=lambda p: self.prepare(layer, expert, p), own=own
        )

    def _recycle(self, ew) -> None:
        """An expert left memory: its read buffer serves the next read."""
        trace.instant("evict", "evict")
        slab = getattr(ew, "slab", None)
        if slab is not None:
            ew.slab = None
            self.store.recycle(slab)

    def _wait(self, fut: Future) -> ExpertWeights:
        t0 = time.perf_counter()
        with trace.span("stall", "stall"):
            ew = fut.result()
        self._io_wait += time.perf_counter() - t0
        return ew

    # ---- prefetch
    def hint(self, layer, predicted_ids):
        size = max(1, self.expert_nbytes(layer))
        held = self._prefetched.setdefault(layer, set())
        keys = [(layer, e, self.level(layer, e)) for e in torch.unique(predicted_ids).tolist()]
        self._hinted[layer] = set(keys)
        for key in keys:
            if key in held:
                continue
            if self.cache.hold(key):  # cached: kept until its layer comes
                held.add(key)
                continue
            if self.cache.reserve(key, size) is None:
                continue  # no room that is not held
            self.cache.fill(key, self._fetch(key))
            trace.instant(f"prefetch L{key[0]} E{key[1]}", "prefetch")
            held.add(key)
            self._issued.add(key)
            self._pf_issued += 1

    # ---- one layer
    def begin(self, layer, x, expert_ids, expert_weights, levels=None):
        self.routed(layer, expert_ids)
        if levels is None and self.bits is not None:
            levels = self.bits.levels(layer, expert_ids, expert_weights, x)  # [T, K]
        by_key = {
            (layer, a.expert, a.level or self.level(layer, a.expert)): a
            for a in dispatch(expert_ids, expert_weights, levels)
        }
        if self.weight_bits is not None:
            for (_, e, level), a in by_key.items():
                self._pairs += len(a.tokens)
                self._pair_bits += len(a.tokens) * self.weight_bits(layer, e, level)
        plan = schedule(self.cache, list(by_key), self.expert_nbytes(layer))
        # this layer now holds what it uses; the holds its prediction took end here
        for key in self._prefetched.pop(layer, set()):
            self.cache.release(key)
        guess = self._hinted.pop(layer, None)
        if guess is not None:
            self._predicted += len(guess & by_key.keys())
            self._routed_hinted += len(by_key)
            read = {k for k in guess if k in self._issued}
            self._issued -= read
            self._pf_used += len(read & by_key.keys())
            self._pf_wasted += len(read - by_key.keys())
        first = [self._fetch(key) for key in plan.first.keys]
        held = [key for key, _ in plan.hits] + [
            k for k, e in zip(plan.first.keys, plan.first.entries) if e is not None
        ]
        return _Handle(layer, x, by_key, plan, first, held, time.perf_counter())

    def finish(self, handle: _Handle) -> torch.Tensor:
        h, cache = handle, self.cache
        out = torch.zeros(h.x.shape, dtype=torch.float32)  # [T, D]

        def compute(key: Key, ew: ExpertWeights) -> None:
            a = h.by_key[key]
            combine_into(out, a.tokens, expert_forward(h.x[a.tokens], ew), a.weights)

        try:
            for key, entry in h.plan.hits:
                compute(key, self._value(key, entry))
                cache.release(key)
                h.held.remove(key)
            reads = h.first
            for wave in itertools.chain([h.plan.first], h.plan.rest):
                if wave is not h.plan.first:
                    reads = [self._fetch(key) for key in wave.keys]
                    h.held += [k for k, e in zip(wave.keys, wave.entries) if e is not None]
                self._serve(h, wave, reads, compute)
        except BaseException:
            self._abandon(h)
            raise
        t = trace.current()
        if t is not None:
            start = (h.t0 - t.t0) * 1e6
            t.complete(f"moe L{h.layer}", "moe", start, (time.perf_counter() - h.t0) * 1e6,
                       experts=len(h.by_key), hits=len(h.plan.hits))  # fmt: skip
        return out.to(h.x.dtype)

    def _serve(self, h: _Handle, wave: Wave, reads: list[Future], compute) -> None:
        """Compute each read of a wave as it lands, cache it, release its slot."""
        for key, entry, fut in zip(wave.keys, wave.entries, reads):
            ew = self._wait(fut)
            if entry is None:
                self._uncached += 1
            else:
                self.cache.fill(key, ew, ew.nbytes)
            compute(key, ew)
            if entry is not None:
                self.cache.release(key)
                h.held.remove(key)
            else:
                self._recycle(ew)
            del ew

    def _value(self, key: Key, entry: Entry) -> ExpertWeights:
        """A hit's prepared expert, waiting for it if a prefetch is still reading it."""
        if entry.in_flight:
            ew = self._wait(entry.value)
            self.cache.fill(key, ew, ew.nbytes)
            return ew
        return entry.value

    def _abandon(self, h: _Handle) -> None:
        """A read failed: drop this layer's holds and the slots that never got a value."""
        for key in h.held:
            self.cache.release(key)
            if key in self.cache and self.cache.peek(key).value is None:
                self.cache.evict(key)
