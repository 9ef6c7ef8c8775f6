"""LocalExecutor: routed experts from this machine's flash, through the cache.

For one layer: experts already cached are computed first; the missing ones
are read in waves that fit the cache's free space, each wave's reads issued
at once so I/O overlaps with computing the experts that already arrived.
Each expert a layer needs is read at most once per forward pass, however
many tokens (a long prompt, a batch) route to it and however small the
cache: a prompt costs one read per touched expert, not one per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from edgemoe.cache import ExpertCache
from edgemoe.moe.combine import combine_into
from edgemoe.moe.dispatch import dispatch
from edgemoe.moe.executor import ExpertExecutor
from edgemoe.moe.experts import ExpertWeights, expert_forward
from edgemoe.store import ExpertStore


def wave_size(cache: ExpertCache, waiting: int, size: int) -> int:
    """Evict for the next wave of `waiting` missed experts of `size` bytes; how many to read now.

    At least one: an expert bigger than the free room is computed without a cache slot.
    """
    cache.make_room(min(size * waiting, cache.capacity))
    return max(1, min(waiting, cache.free // size))


class LocalExecutor(ExpertExecutor):
    """Args:
    store: reads expert slices.
    cache: holds prepared experts.
    prepare: (layer, expert, payloads) -> ExpertWeights.
    level: the level to compute every expert at.
    expert_nbytes: (layer) -> prepared bytes of one expert of that layer (for wave sizes).
    """

    def __init__(
        self,
        store: ExpertStore,
        cache: ExpertCache,
        prepare: Callable,
        level: Callable[[int, int], int],
        expert_nbytes: Callable[[int], int],
    ):
        self.store, self.cache, self.prepare = store, cache, prepare
        self.level, self.expert_nbytes = level, expert_nbytes
        self.expert_reads = 0
        self.io_wait_s = 0.0  # time blocked on reads: what device emulation must not slow down
        self.uncached = 0  # experts computed without a cache slot (the cache holds less than one)

    def run(self, layer, x, expert_ids, expert_weights):
        self.routed(layer, expert_ids)
        out = torch.zeros(x.shape, dtype=torch.float32)  # [T, D]
        todo = []
        for a in dispatch(expert_ids, expert_weights):
            key = (layer, a.expert, self.level(layer, a.expert))
            ew = self.cache.get(key)
            if ew is None:
                todo.append((a, key))
                continue
            self.cache.pin(key)
            combine_into(out, a.tokens, expert_forward(x[a.tokens], ew), a.weights)
        self.cache.unpin_all()
        size = max(1, self.expert_nbytes(layer))
        while todo:
            n = wave_size(self.cache, len(todo), size)
            wave, todo = todo[:n], todo[n:]
            futures = [self.store.fetch(layer, a.expert, key[2]) for a, key in wave]
            self.expert_reads += len(wave)
            for (a, key), fut in zip(wave, futures):
                t0 = time.perf_counter()
                payloads = fut.result()
                self.io_wait_s += time.perf_counter() - t0
                ew: ExpertWeights = self.prepare(layer, a.expert, payloads)
                if self.cache.put(key, ew, ew.nbytes):
                    self.cache.pin(key)
                else:
                    self.uncached += 1
                combine_into(out, a.tokens, expert_forward(x[a.tokens], ew), a.weights)
                del ew
            self.cache.unpin_all()
        return out.to(x.dtype)
