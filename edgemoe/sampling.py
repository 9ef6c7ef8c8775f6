"""Next-token choice with llama.cpp's defaults: repetition penalty, top-k, top-p, min-p, temperature.

The default `Sampling()` samples as llama.cpp and Ollama do out of the box
(temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repetition penalty 1.1
over the last 64 tokens); `Sampling.greedy()` (temperature 0) is pure argmax,
with no penalty, so greedy output stays exactly transformers' greedy output.
The order is llama.cpp's: the penalty, then top-k, top-p and min-p on the
untempered distribution, then temperature, then a draw.

Shape legend: B sequences, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on the first draw: the CLI reads the defaults without it
    import torch


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    temperature: 0 is greedy (argmax; every other setting is then ignored).
    top_k: keep the k most likely tokens; 0 keeps all.
    top_p: keep the smallest set of tokens whose probability reaches top_p; 1 keeps all.
    min_p: drop tokens less likely than min_p x the most likely one; 0 keeps all.
    repetition_penalty: divide the positive logits of tokens seen in the last
        repeat_last_n tokens (prompt included) by it, multiply the negative ones; 1 is off.
    repeat_last_n: the penalty's window in tokens; 0 turns the penalty off.
    seed: seeds the draws (same seed, same prompt, same output); None draws from torch's
        global generator.
    Raises:
        ValueError: a value is NaN, infinite or out of range; the message names it.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        def number(name: str, ok, rule: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"sampling {name}={v!r}: it must be a finite number, {rule}")
            if not ok(v):
                raise ValueError(f"sampling {name}={v!r}: it must be {rule}")

        def integer(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi and v >= hi):
                limit = f"{lo} or more" + (" and below 2**64" if hi else "")
                raise ValueError(f"sampling {name}={v!r}: it must be an integer, {limit}")

        number("temperature", lambda v: v >= 0, "0 (greedy) or more")
        integer("top_k", 0)
        number("top_p", lambda v: 0 < v <= 1, "more than 0 and at most 1")
        number("min_p", lambda v: 0 <= v <= 1, "from 0 to 1")
        number("repetition_penalty", lambda v: v > 0, "more than 0 (1 is off)")
        integer("repeat_last_n", 0)
        if self.seed is not None:
            integer("seed", 0, 2**64)

    @classmethod
    def greedy(cls) -> Sampling:
        """Always the most likely token (argmax), as transformers' greedy decoding."""
        return cls(temperature=0.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def sample(
    logits: torch.Tensor,
    s: Sampling,
    gen: torch.Generator | None,
    history: list[list[int]] | None = None,
) -> torch.Tensor:
    """Choose the next token of each sequence.

    Args:
        logits: [B, V] float32.
        s: the settings.
        gen: the generator of the draws (None: torch's global one).
        history: each sequence's tokens so far, prompt included, for the repetition
            penalty (None: no penalty).
    Returns:
        [B] int64 token ids.
    """
    import torch

    if s.is_greedy:
        return logits.argmax(dim=-1)
    z = logits.float()
    if history is not None and s.repetition_penalty != 1.0 and s.repeat_last_n > 0:
        z = _penalize(z, history, s.repetition_penalty, s.repeat_last_n)
    if s.top_k and s.top_k < z.shape[-1]:
        kth = torch.topk(z, s.top_k, dim=-1).values[:, -1:]  # [B, 1]
        z = z.masked_fill(z < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_z, idx = torch.sort(z, descending=True, dim=-1)
        probs = torch.softmax(sorted_z, dim=-1)  # [B, V]
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
        sorted_z = sorted_z.masked_fill(drop, float("-inf"))
        z = torch.full_like(z, float("-inf")).scatter(-1, idx, sorted_z)
    if s.min_p > 0:
        probs = torch.softmax(z, dim=-1)  # [B, V]
        z = z.masked_fill(probs < s.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    probs = torch.softmax(z / s.temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _penalize(z: torch.Tensor, history: list[list[int]], penalty: float, window: int):
    """llama.cpp's repetition penalty over each sequence's last `window` tokens."""
    import torch

    b, v = z.shape
    seen = torch.zeros(b, v, dtype=torch.bool)  # [B, V]
    for i, h in enumerate(history[:b]):
        ids = torch.tensor(h[-window:], dtype=torch.int64)
        ids = ids[(ids >= 0) & (ids < v)]
        seen[i, ids] = True
    penalized = torch.where(z > 0, z / penalty, z * penalty)
    return torch.where(seen, penalized, z)
