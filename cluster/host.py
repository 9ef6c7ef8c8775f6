"""An expert host: one node's executor over its own copy of the .emoe.

The host is a plain class (tests drive it in-process); the coordinator runs it
as a Ray actor pinned to its node by the node's custom resource. It pages
experts exactly as a single device does: `ExecutorContext.local()` over its own
file, with a cache sized from its own budget less its measured process floor,
reads throttled to its profile's flash bandwidth, compute stretched by the
profile's compute factor, and every call delayed by its link (half the RTT plus
the bytes over the bandwidth, each way), so a run shows what an edge network costs.

A call carries the rows of x its experts need and one (row, expert) pair per
routed choice; it returns each pair's expert output unweighted, in x's dtype.
The coordinator weights and sums them in float32 exactly as the single-device
combine does, so greedy output is the same token for token.

Shape legend: n rows sent, M (row, expert) pairs, D hidden.
"""

from __future__ import annotations

import os
import threading
import time

import psutil
import torch

from cluster.model import check_same_model
from cluster.placement import host_room
from cluster.types import BudgetBelowFloor, ExpertKey, HostStatus, NodeSpec
from devices.emulate import ComputeSlowdown, TokenBucket
from devices.profile import load_profile
from edgemoe.facts import DTYPES
from edgemoe.moe.api import ExecutorContext, ExpertStore, Plan
from edgemoe.units import Bytes
from formats.reader import EmoeReader


class ExpertHost:
    """Args:
    spec: this node's spec (profile, budget, link).
    path: this host's copy of the .emoe.
    dtype: "f32" or "bf16", the coordinator's compute dtype.
    level: the precision level to compute at.
    crc: the coordinator's header CRC (a different file is refused on open).
    threads: reader threads.
    """

    def __init__(
        self, spec: NodeSpec, path: str, dtype: str, level: int, crc: int, threads: int = 2
    ):
        # the constructor never fails: open() raises the named error the coordinator reports
        self.spec, self.path, self.dtype_name, self.level, self.crc = spec, path, dtype, level, crc
        self.threads = threads
        self.executor = None
        self._lock = threading.Lock()  # the executor serves one call at a time
        self._calls = 0

    # ---- life
    def open(self) -> HostStatus:
        """Check the file and the budget, then build the executor.

        Raises:
            ModelMismatch: this host's file is not the coordinator's.
            BudgetBelowFloor: the budget cannot hold this process, its I/O buffers and one expert.
        """
        spec = self.spec
        check_same_model(self.path, self.crc, f"node {spec.name!r}")
        profile = load_profile(spec.profile)
        self.reader = r = EmoeReader(self.path)
        dtype = DTYPES[self.dtype_name]
        from edgemoe.facts import ModelFacts

        facts = ModelFacts(r, None, dtype)
        floor = Bytes(psutil.Process().memory_info().rss)
        io = Bytes(self.threads * (facts.largest_span() + 4096) * 2)
        room = host_room(spec.budget, floor, io)
        sizes = {layer: facts.expert_nbytes(layer, self.level) for layer in facts.moe_layers}
        largest = Bytes(max(sizes.values()))
        if room < largest:
            need = Bytes(int(spec.budget) - int(room) + int(largest))
            r.close()
            raise BudgetBelowFloor(
                f"node {spec.name!r}: a budget of {spec.budget} leaves {room} for experts after "
                f"this host's measured floor {floor} and I/O buffers {io}; one expert needs "
                f"{largest}, so the smallest budget is {need}"
            )
        self.floor, self.room = floor, room
        store = ExpertStore(
            r, threads=self.threads, throttle=TokenBucket(profile.flash_rand_read).take
        )
        everything = Bytes(sum(sizes[e.layer] for e in r.experts.values()))
        plan = Plan(spec.budget, floor, Bytes(0), Bytes(0), io, Bytes(0), room, largest, everything)
        ctx = ExecutorContext(
            r, plan, store, dtype, lambda layer, e: self.level, lambda layer: sizes[layer]
        )
        self.executor = ctx.local()
        self.store = store
        self.slowdown = ComputeSlowdown(profile.compute_factor)
        self.hidden = int(r.config["hidden_size"])
        self.torch_dtype = dtype
        return self.status()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.store.close()
            self.reader.close()
            self.executor = None

    # ---- serving
    def _link(self, nbytes: int) -> None:
        delay = self.spec.link.seconds(nbytes)
        if delay > 0:
            time.sleep(delay)

    def compute(
        self,
        version: int,
        layer: int,
        x: torch.Tensor,
        pair_row: torch.Tensor,
        pair_expert: torch.Tensor,
    ) -> torch.Tensor:
        """Each pair's expert output: [M, D] in x's dtype.

        Args:
            version: the expert map the coordinator chose this host under (for the record).
            layer: the MoE layer.
            x: [n, D] the rows the pairs refer to.
            pair_row: [M] int64 row of x of each pair, grouped by expert (ascending rows).
            pair_expert: [M] int64 expert of each pair.
        """
        self._link(x.nbytes + pair_row.nbytes + pair_expert.nbytes)
        with self._lock:
            self._calls += 1
            ex = self.executor
            t0, io0 = time.perf_counter(), ex.stats().io_wait_s
            ones = torch.ones(len(pair_row), 1, dtype=torch.float32)
            with torch.inference_mode():
                y = ex.run(layer, x[pair_row], pair_expert[:, None], ones)  # [M, D]
            self.slowdown.after(time.perf_counter() - t0 - (ex.stats().io_wait_s - io0))
        self._link(y.nbytes)
        return y

    def warm(self, keys: list[ExpertKey]) -> float:
        """Read these experts into the cache (from this host's flash); returns the seconds.
        Runs them on a zero row through the executor, so they take the path serving does."""
        t0 = time.perf_counter()
        by_layer: dict[int, list[int]] = {}
        for layer, e in keys:
            by_layer.setdefault(layer, []).append(e)
        for layer, es in sorted(by_layer.items()):
            for i in range(0, len(es), 8):  # a few at a time: the cache's waves stay small
                ids = torch.tensor(es[i : i + 8], dtype=torch.int64)[:, None]
                x = torch.zeros(len(ids), self.hidden, dtype=self.torch_dtype)
                with self._lock, torch.inference_mode():
                    self.executor.run(layer, x, ids, torch.ones(len(ids), 1))
        return time.perf_counter() - t0

    def export(self, keys: list[ExpertKey]) -> dict:
        """The prepared weights of those of these experts this host has cached (a joining
        peer adopts them through the object store instead of reading its flash)."""
        out = {}
        with self._lock:
            cache = self.executor.cache
            for layer, e in keys:
                entry = cache.peek((layer, e, self.level))
                if entry is not None and entry.value is not None and not entry.in_flight:
                    out[(layer, e)] = entry.value
        return out

    def adopt(self, weights: dict) -> int:
        """Cache experts a peer exported; returns how many fitted."""
        n = 0
        with self._lock:
            for (layer, e), ew in weights.items():
                n += bool(self.executor.cache.put((layer, e, self.level), ew, ew.nbytes))
        return n

    def drop(self, keys: list[ExpertKey]) -> int:
        """Free the cached copies of these experts (no longer this host's after a new map)."""
        n = 0
        with self._lock:
            cache = self.executor.cache
            for layer, e in keys:
                key = (layer, e, self.level)
                entry = cache.peek(key)
                if entry is not None and entry.pins == 0:
                    cache.evict(key)
                    n += 1
        return n

    def cached(self) -> list[ExpertKey]:
        with self._lock:
            return sorted((k[0], k[1]) for k in self.executor.cache.keys())

    def status(self) -> HostStatus:
        ex = self.executor
        if ex is None:
            return HostStatus(
                self.spec.name, False, os.getpid(), self.spec.profile, self.spec.budget
            )
        st = ex.stats()
        return HostStatus(
            self.spec.name,
            True,
            os.getpid(),
            self.spec.profile,
            self.spec.budget,
            self.floor,
            self.room,
            len(ex.cache),
            Bytes(ex.cache.used),
            self._calls,
            st.reads,
            Bytes(st.bytes_read),
        )

    def pid(self) -> int:
        return os.getpid()
