"""The executor seam: how a MoE layer gets its routed experts computed.

A model hands an executor the layer index, the tokens' hidden states and
their (expert, weight) choices, and gets the combined output back. Where the
experts live (in memory, on flash behind a cache, on another node) and in
what order they are fetched is the executor's business; model files know
nothing of files, caches or threads.

The call is split so that reads (or remote calls) overlap other work:
`begin` issues what it must fetch and returns a handle, the model computes
its shared expert, then `finish` waits and combines; `run` is the two in a
row. `hint` tells the executor which experts a later layer will probably
want, so it can start reading them early.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgemoe.moe.combine import combine_into
from edgemoe.moe.dispatch import dispatch
from edgemoe.moe.experts import ExpertWeights, expert_forward


@dataclass(frozen=True)
class ExecutorStats:
    """What an executor did since it was made; subtract two to get an interval's figures."""

    reads: int = 0  # expert reads issued (prefetches included)
    bytes_read: int = 0  # bytes they moved from flash (or over the network)
    hits: int = 0  # expert uses served from memory (a prefetch in flight counts)
    misses: int = 0  # expert uses that had to be read
    uncached: int = 0  # experts computed without a cache slot (the cache holds less than one)
    io_wait_s: float = 0.0  # time the computing thread blocked on reads
    prefetch_issued: int = 0  # reads started by hints
    prefetch_used: int = 0  # prefetched experts their layer then used
    prefetch_wasted: int = 0  # prefetched experts their layer did not use (their bytes wasted)
    prefetch_bytes_wasted: int = 0  # bytes read ahead and dropped (reads ahead only)
    predicted: int = 0  # expert uses in hinted layers that the hint had named
    routed_hinted: int = 0  # expert uses in hinted layers (predicted / this: the accuracy)
    upgrades: int = 0  # reads of levels an expert in memory lacked (only those levels)
    downgrades: int = 0  # experts cut to their base level to make room (no I/O)
    pairs: int = 0  # (token, expert) pairs computed at a known level
    pair_bits: float = 0.0  # their bits per expert weight, summed (/ pairs: the average)

    def __sub__(self, other: ExecutorStats) -> ExecutorStats:
        return ExecutorStats(
            **{
                f.name: getattr(self, f.name) - getattr(other, f.name)
                for f in dataclasses.fields(self)
            }
        )

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    @property
    def average_bits(self) -> float | None:
        """Bits per expert weight actually computed, averaged over (token, expert) pairs."""
        return self.pair_bits / self.pairs if self.pairs else None

    @property
    def prediction_accuracy(self) -> float | None:
        return self.predicted / self.routed_hinted if self.routed_hinted else None

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "hit_rate": self.hit_rate,
            "prediction_accuracy": self.prediction_accuracy,
            "average_bits": self.average_bits,
        }


class ExpertExecutor(ABC):
    """Computes routed experts for one layer at a time.

    Observers (`observe`) are told every routing decision before it is served:
    `edgemoe calibrate` records them, and a prefetch predictor learns from them.
    """

    _observers: tuple[Callable[[int, torch.Tensor], None], ...] = ()

    def observe(self, fn: Callable[[int, torch.Tensor], None]) -> Callable[[], None]:
        """Call fn(layer, expert_ids [T, K]) on every call; returns the function that stops it."""
        self._observers = (*self._observers, fn)
        return lambda: setattr(self, "_observers", tuple(f for f in self._observers if f is not fn))

    def routed(self, layer: int, expert_ids: torch.Tensor) -> None:
        """Implementations call this first in begin()."""
        for fn in self._observers:
            fn(layer, expert_ids)

    # whether hint() wants a second, better guess from a layer's output (RoutedMoE.refine)
    refines = False

    def hint(self, layer: int, predicted_ids: torch.Tensor, later=None) -> None:
        """Layer `layer` will probably route to these experts ([T, K] or [N] int64): an
        executor may start fetching them. `later`, if given, is a function that yields
        (layer, predicted_ids) for the MoE layers after it, guessed from the same hidden
        state. The default ignores hints."""
        return None

    @abstractmethod
    def begin(
        self,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        expert_weights: torch.Tensor,
        levels: torch.Tensor | None = None,
    ) -> object:
        """Start one layer's routed experts; returns the handle `finish` takes.

        Args:
            layer: decoder layer index.
            x: [T, D] hidden states of the layer's tokens.
            expert_ids: [T, K] int64 chosen experts.
            expert_weights: [T, K] float32 combine weights.
            levels: [T, K] int64 precision level of each pair (edgemoe/bits.py), or None: the
                executor's own bit policy decides (an executor that stores one level ignores it).
        """

    @abstractmethod
    def finish(self, handle: object) -> torch.Tensor:
        """[T, D] in x's dtype: sum_k weight[t, k] * expert_{ids[t, k]}(x[t])."""

    def run(
        self,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        expert_weights: torch.Tensor,
        levels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """begin + finish (levels passed on only when given: executors that predate them
        take four arguments)."""
        if levels is None:
            return self.finish(self.begin(layer, x, expert_ids, expert_weights))
        return self.finish(self.begin(layer, x, expert_ids, expert_weights, levels))

    def stats(self) -> ExecutorStats:
        """Cumulative figures since the executor was made."""
        return ExecutorStats()

    def close(self) -> None:
        """Stop background work and free what the executor holds."""
        return None


class ResidentExecutor(ExpertExecutor):
    """All experts in memory (tests, and runs whose budget holds every expert)."""

    def __init__(self, experts: dict[tuple[int, int], ExpertWeights]):
        self.experts = experts
        self._uses = 0

    def begin(self, layer, x, expert_ids, expert_weights, levels=None):
        self.routed(layer, expert_ids)
        out = torch.zeros(x.shape, dtype=torch.float32)  # [T, D]
        for a in dispatch(expert_ids, expert_weights):
            y = expert_forward(x[a.tokens], self.experts[(layer, a.expert)])  # [N, D]
            combine_into(out, a.tokens, y, a.weights)
            self._uses += 1
        return out.to(x.dtype)

    def finish(self, handle):
        return handle

    def stats(self) -> ExecutorStats:
        return ExecutorStats(hits=self._uses)
