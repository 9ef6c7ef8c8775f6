"""Turn a routed expert's raw level chunks into compute-ready ExpertWeights.

The store hands over chunk payloads (checksummed, decompressed); this module
slices them into each role's level segments and builds the kernels. It is
the one place that knows the per-expert chunk layout of SPEC.md §3.2.
"""

from __future__ import annotations

import torch

from edgemoe.kernels import make_linear
from edgemoe.moe.experts import ExpertWeights
from formats import constants as C
from formats.reader import EmoeReader, ExpertEntry


def prepare_expert(
    reader: EmoeReader, e: ExpertEntry, payloads: list, dtype: torch.dtype, fused: bool = True
) -> ExpertWeights:
    """ExpertWeights at level len(payloads) from the expert's first level chunks' raw bytes."""
    level = len(payloads)
    linears = {}
    for role in C.EXPERT_ROLES:
        t = reader.tensors[e.tensors[role]]
        segs = [
            memoryview(payloads[k])[off : off + n] for k, (_, off, n) in enumerate(t.parts[:level])
        ]
        linears[role] = make_linear(int(t.codec.id), t.shape, t.params, segs, dtype, fused)
    return ExpertWeights(linears["gate"], linears["up"], linears["down"], level)


def load_all_experts(
    reader: EmoeReader, dtype: torch.dtype, level: int | None = None, fused: bool = True
) -> dict[tuple[int, int], ExpertWeights]:
    """Every routed expert in memory at `level` (default: each expert's highest)."""
    out = {}
    for key, e in reader.experts.items():
        n = level or len(e.levels)
        out[key] = prepare_expert(
            reader, e, [reader.read_chunk(ci) for ci in e.levels[:n]], dtype, fused
        )
    return out
