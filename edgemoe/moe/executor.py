"""The executor seam: how a MoE layer gets its routed experts computed.

A model hands an executor the layer index, the tokens' hidden states and
their (expert, weight) choices, and gets the combined output back. Where the
experts live (in memory, on flash behind a cache, on another node) and in
what order they are fetched is the executor's business; model files know
nothing of files, caches or threads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from edgemoe.moe.combine import combine_into
from edgemoe.moe.dispatch import dispatch
from edgemoe.moe.experts import ExpertWeights, expert_forward


class ExpertExecutor(ABC):
    """Computes routed experts for one layer at a time.

    Observers (`observe`) are told every routing decision before it is served:
    `edgemoe calibrate` records them, and a prefetch predictor will learn from them.
    """

    _observers: tuple[Callable[[int, torch.Tensor], None], ...] = ()

    def observe(self, fn: Callable[[int, torch.Tensor], None]) -> Callable[[], None]:
        """Call fn(layer, expert_ids [T, K]) on every run; returns the function that stops it."""
        self._observers = (*self._observers, fn)
        return lambda: setattr(self, "_observers", tuple(f for f in self._observers if f is not fn))

    def routed(self, layer: int, expert_ids: torch.Tensor) -> None:
        """Implementations call this first in run()."""
        for fn in self._observers:
            fn(layer, expert_ids)

    @abstractmethod
    def run(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """Combined routed-expert output.

        Args:
            layer: decoder layer index.
            x: [T, D] hidden states of the layer's tokens.
            expert_ids: [T, K] int64 chosen experts.
            expert_weights: [T, K] float32 combine weights.
        Returns:
            [T, D] in x's dtype: sum_k weight[t, k] * expert_{ids[t, k]}(x[t]).
        """


class ResidentExecutor(ExpertExecutor):
    """All experts in memory (tests, and runs whose budget holds every expert)."""

    def __init__(self, experts: dict[tuple[int, int], ExpertWeights]):
        self.experts = experts

    def run(self, layer, x, expert_ids, expert_weights):
        self.routed(layer, expert_ids)
        out = torch.zeros(x.shape, dtype=torch.float32)  # [T, D]
        for a in dispatch(expert_ids, expert_weights):
            y = expert_forward(x[a.tokens], self.experts[(layer, a.expert)])  # [N, D]
            combine_into(out, a.tokens, y, a.weights)
        return out.to(x.dtype)
