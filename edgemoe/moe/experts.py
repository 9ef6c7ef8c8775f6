"""Experts: one routed expert's SwiGLU MLP over the tokens dispatched to it.

Shape legend: N tokens of this expert, D hidden, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgemoe import fastkernels
from edgemoe.kernels import Linear, MwqLinear, on_q8_kernel


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


def _q8(gate: Linear, up: Linear, down: Linear) -> bool:
    return all(on_q8_kernel(p) for p in (gate, up, down))


def q8_expert(ew: ExpertWeights) -> bool:
    """Whether the expert runs on the Q8 kernel (fastkernels.q8_swiglu, q8_experts)."""
    return _q8(ew.gate, ew.up, ew.down)


def mwq_expert(ew: ExpertWeights) -> bool:
    """Whether the expert's three weights are mwq ones computed as stored (fastkernels.mwq_experts
    takes a token's such experts in one call)."""
    return all(type(p) is MwqLinear for p in (ew.gate, ew.up, ew.down))


def swiglu(x: torch.Tensor, gate: Linear, up: Linear, down: Linear) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); x [N, D] -> [N, D].

    Three INT8 Linears on the Q8 kernel run as one kernel call (fastkernels.q8_swiglu:
    activations quantized once, one thread wake-up); anything else, Linear by Linear."""
    if _q8(gate, up, down):
        return fastkernels.q8_swiglu(x, gate, up, down).to(down.dtype)
    return down(F.silu(gate(x)) * up(x))


def swiglu_head(x: torch.Tensor, gate: Linear, up: Linear) -> torch.Tensor:
    """swiglu's first half, silu(gate(x)) * up(x), for an expert whose down has not landed
    yet; swiglu_tail finishes it, the two giving swiglu's result bit for bit."""
    if on_q8_kernel(gate) and on_q8_kernel(up):
        return fastkernels.q8_gate_up(x, gate, up)
    return F.silu(gate(x)) * up(x)


def swiglu_tail(h: torch.Tensor, ew: ExpertWeights) -> torch.Tensor:
    """swiglu's second half, down(h), from swiglu_head's h on the same gate and up."""
    if q8_expert(ew):
        return fastkernels.q8_down(h, ew.down).to(ew.down.dtype)
    return ew.down(h)


def expert_forward(x: torch.Tensor, ew: ExpertWeights) -> torch.Tensor:
    """[N, D] -> [N, D] in x's dtype."""
    return swiglu(x, ew.gate, ew.up, ew.down).to(x.dtype)
