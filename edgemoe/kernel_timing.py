"""The expert-kernel timing that `edgemoe profile` hands to devices/profiler.

devices/ measures the machine and never imports the runtime; the CLI passes
`expert_times` in as the profiler's `expert_timer`, so the times are taken on
exactly the kernels the runtime computes with.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from edgemoe.kernels import kernel_for
from edgemoe.moe.experts import ExpertWeights, expert_forward
from edgemoe.prepare import prepare_expert
from formats.codecs import codec_by_name
from formats.reader import EmoeReader

__all__ = ["BATCHES", "DEFAULT_SHAPES", "expert_times"]

DEFAULT_SHAPES = ((1024, 2816), (2048, 1408))  # (hidden, expert width)
BATCHES = (1, 4, 16)


def _file_cases(model: Path) -> list[tuple[str, int, ExpertWeights]]:
    """The file's first expert at each of its levels."""
    r = EmoeReader(model)
    e = next(iter(r.experts.values()))
    codec = r.tensors[e.tensors["gate"]].codec.name
    hidden = r.tensors[e.tensors["gate"]].shape[1]
    cases = []
    for k in range(1, len(e.levels) + 1):
        payloads = [r.read_chunk(ci) for ci in e.levels[:k]]
        cases.append((f"{codec}_l{k}", hidden, prepare_expert(r, e, payloads, torch.bfloat16)))
    return cases


def _default_cases(shapes) -> list[tuple[str, int, ExpertWeights]]:
    """Seeded random experts of each shape in bf16, int8, int4 and mwq (3 levels)."""
    rng = np.random.default_rng(0)
    cases = []
    for d, i in shapes:
        mats = {"gate": (i, d), "up": (i, d), "down": (d, i)}
        ws = {role: (rng.standard_normal(s) * 0.02).astype(np.float32) for role, s in mats.items()}
        for name, levels in (("bf16", 1), ("int8", 1), ("int4", 1), ("mwq", 3)):
            c = codec_by_name(name)
            kernel = kernel_for(c)
            params = {
                role: c.default_params(s) if name != "bf16" else {} for role, s in mats.items()
            }
            segs = {role: c.encode(ws[role], params[role]) for role in mats}
            for k in range(1, levels + 1):
                lin = {
                    role: kernel.build(mats[role], params[role], segs[role][:k], torch.bfloat16)
                    for role in mats
                }
                label = f"{name}_l{k}" if levels > 1 else name
                ew = ExpertWeights(lin["gate"], lin["up"], lin["down"], k)
                cases.append((f"{label}_{d}x{i}", d, ew))
    return cases


def expert_times(model: Path | None, shapes=DEFAULT_SHAPES) -> dict[str, float]:
    """Milliseconds of one expert's SwiGLU at each level and batch, on the runtime's kernels.

    Args:
        model: a .emoe whose first expert is timed at each stored level; None: the default
            set (seeded random experts of `shapes` in bf16, int8, int4 and mwq), the one
            devices/reference_expert_ms.json holds for the devbox.
        shapes: (hidden, expert width) pairs for the default set.
    Returns:
        {"expert_ms.<codec>[_l<level>][_<hidden>x<width>].b<batch>": milliseconds}.
    """
    cases = _file_cases(Path(model)) if model is not None else _default_cases(shapes)
    out = {}
    for label, hidden, ew in cases:
        for b in BATCHES:
            x = torch.randn(b, hidden, dtype=torch.bfloat16)
            expert_forward(x, ew)
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.15:
                expert_forward(x, ew)
                n += 1
            out[f"expert_ms.{label}.b{b}"] = 1e3 * (time.perf_counter() - t0) / n
    return out
