"""Next-token choice: greedy, temperature, top-k, top-p, with a seeded generator.

Shape legend: B sequences, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("sampling needs temperature >= 0, top-k >= 0 and 0 < top-p <= 1")


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> next tokens [B] int64."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    z = logits / s.temperature
    if s.top_k:
        kth = torch.topk(z, min(s.top_k, z.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        z = z.masked_fill(z < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_z, idx = torch.sort(z, descending=True, dim=-1)
        probs = torch.softmax(sorted_z, dim=-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
        sorted_z = sorted_z.masked_fill(drop, float("-inf"))
        z = torch.full_like(z, float("-inf")).scatter(-1, idx, sorted_z)
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=gen)[:, 0]
