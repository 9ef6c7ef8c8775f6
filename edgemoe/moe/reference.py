"""The plain-torch reference MoE layer: a loop over tokens and their experts.

Slow on purpose and obviously right; tests compare dispatch/experts/combine
and every executor against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_moe(
    x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, dense: dict
) -> torch.Tensor:
    """x [T, D], ids/weights [T, K], dense[e] = (gate [I, D], up [I, D], down [D, I]) -> [T, D] float32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for e, w in zip(expert_ids[t].tolist(), expert_weights[t].tolist(), strict=True):
            g, u, d = (m.float() for m in dense[e])
            xt = x[t].float()
            out[t] += w * (d @ (F.silu(g @ xt) * (u @ xt)))
    return out
