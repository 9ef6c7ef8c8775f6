"""Experts: one routed expert's SwiGLU MLP over the tokens dispatched to it.

Shape legend: N tokens of this expert, D hidden, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgemoe.kernels import Linear


@dataclass
class ExpertWeights:
    """A prepared expert: three Linears (fused kernels where possible)."""

    gate: Linear  # [I, D]
    up: Linear  # [I, D]
    down: Linear  # [D, I]
    level: int = 0
    slab: object = None  # the read buffer its kernels compute on in place (edgemoe/store.py)

    @property
    def nbytes(self) -> int:
        """Memory it holds: its kernels' own tensors, and the slab they borrow."""
        own = self.gate.nbytes + self.up.nbytes + self.down.nbytes
        return own + (len(self.slab) if self.slab is not None else 0)


def swiglu(x: torch.Tensor, gate: Linear, up: Linear, down: Linear) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); x [N, D] -> [N, D]."""
    return down(F.silu(gate(x)) * up(x))


def expert_forward(x: torch.Tensor, ew: ExpertWeights) -> torch.Tensor:
    """[N, D] -> [N, D] in x's dtype."""
    return swiglu(x, ew.gate, ew.up, ew.down).to(x.dtype)
