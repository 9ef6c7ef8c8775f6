"""The public API of the executor seam, in one place.

Everything an executor of one's own needs (a remote executor on other nodes,
a test double, a study's instrumented executor): the seam itself, its stats
record, the context `edgemoe.load(..., executor=factory)` hands a factory,
and the pieces that compute experts (dispatch by expert, one expert's
forward on prepared weights, the weighted combine, preparing an expert from
its stored level chunks). Code outside the runtime (cluster/) imports from
here, never from the modules behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgemoe.bits import BitPolicy, weight_bits
from edgemoe.budget import Plan
from edgemoe.cache import DEFAULT_POLICY, POLICIES, ExpertCache
from edgemoe.moe.combine import combine_into
from edgemoe.moe.dispatch import Assignment, dispatch
from edgemoe.moe.executor import ExecutorStats, ExpertExecutor, ResidentExecutor
from edgemoe.moe.experts import ExpertWeights, expert_forward
from edgemoe.moe.local import LocalExecutor
from edgemoe.prepare import head_of, load_all_experts, prepare_expert, upgraded_expert
from edgemoe.routing import RoutingTrace
from edgemoe.store import ExpertStore
from formats.reader import EmoeReader


@dataclass(frozen=True)
class ExecutorContext:
    """What `edgemoe.load(..., executor=factory)` gives the factory.

    reader: the open .emoe; plan: the memory plan (its expert_cache is the room for experts);
    store: the file's O_DIRECT expert reader; dtype: the compute dtype; level(layer, expert):
    the level to compute at; expert_nbytes(layer): prepared bytes of one expert; bits: the
    bit policy (edgemoe/bits.py) giving each (token, expert) its level, overriding level().
    """

    reader: EmoeReader
    plan: Plan
    store: ExpertStore
    dtype: torch.dtype
    level: Callable[[int, int], int]
    expert_nbytes: Callable[[int], int]
    fused: bool = True
    borrow: Callable[[int, int, int], bool] | None = None  # (layer, expert, level): in place?
    policy: str = DEFAULT_POLICY  # the expert cache's eviction policy (cache.POLICIES)
    bits: BitPolicy | None = None  # each (token, expert) pair's level; None: level() for all
    level_nbytes: Callable[[int, int], int] | None = None  # (layer, level): one expert's bytes
    order: str = "hebf"  # the order level slices are read in (moe/schedule.py: hebf, fifo)
    worth: Callable | None = None  # (slice) -> whether an upgrade is worth its read; None: all

    def prepare(self, layer: int, expert: int, payloads: list) -> ExpertWeights:
        """Compute-ready weights of one expert from its level chunks' payloads."""
        e = self.reader.expert(layer, expert)
        slab = getattr(payloads, "slab", None)
        return prepare_expert(self.reader, e, payloads, self.dtype, self.fused, slab=slab)

    def head(self, layer: int, expert: int, level: int) -> tuple[list, Callable] | None:
        """Where a whole read of the expert's levels 1..level may be computed on before it
        has landed: (the byte ranges that hold its gate and up, their builder) for an expert
        computed in place on its read (prepare.head_of), else None."""
        if self.borrow is None or not self.fused or not self.borrow(layer, expert, level):
            return None
        return head_of(self.reader, self.reader.expert(layer, expert), level, self.dtype)

    def upgrade(self, layer: int, expert: int, ew: ExpertWeights, payloads: list) -> ExpertWeights:
        """ew raised by the next level chunks' payloads (a copy sharing its built levels)."""
        return upgraded_expert(
            self.reader, self.reader.expert(layer, expert), ew, payloads, self.dtype
        )

    def local(self) -> LocalExecutor:
        """The default executor: this file, this plan's cache, this machine's flash."""
        return LocalExecutor(
            self.store,
            ExpertCache(self.plan.expert_cache, POLICIES[self.policy]()),
            self.prepare,
            self.level,
            self.expert_nbytes,
            self.borrow,
            self.bits,
            weight_bits(self.reader),
            self.upgrade,
            self.level_nbytes,
            self.order,
            self.worth,
            self.head,
        )


__all__ = [
    "Assignment",
    "BitPolicy",
    "ExecutorContext",
    "ExecutorStats",
    "ExpertCache",
    "ExpertExecutor",
    "ExpertStore",
    "ExpertWeights",
    "LocalExecutor",
    "Plan",
    "ResidentExecutor",
    "RoutingTrace",
    "combine_into",
    "dispatch",
    "expert_forward",
    "load_all_experts",
    "prepare_expert",
]
