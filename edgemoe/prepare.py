"""Turn a routed expert's raw level chunks into compute-ready ExpertWeights.

The store hands over chunk payloads (checksummed, decompressed); this module
slices them into each role's level segments and builds the kernels, or raises
an expert already built to a higher level in place. It is the one place that
knows the per-expert chunk layout of SPEC.md §3.2.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from edgemoe.kernels import Int4Linear, Linear, NotUpgradable, kernel_for
from edgemoe.moe.experts import ExpertWeights
from formats import constants as C
from formats.reader import EmoeReader, ExpertEntry


def _segments(t, payloads: list, first: int) -> list[memoryview]:
    """Tensor t's segments of levels first+1 .. first+len(payloads), cut from those chunks."""
    parts = t.parts[first : first + len(payloads)]
    return [memoryview(p)[off : off + n] for p, (_, off, n) in zip(payloads, parts, strict=True)]


def can_borrow(reader: EmoeReader, e: ExpertEntry, level: int, fused: bool = True) -> bool:
    """Whether expert e at `level` can compute on its read buffer in place: its chunks are
    stored raw and every role's kernel computes on the stored bytes (INT8; mwq where it is
    computed as stored)."""
    if not fused or any(reader.chunks[ci].compression for ci in e.levels[:level]):
        return False
    for role in C.EXPERT_ROLES:
        t = reader.tensors[e.tensors[role]]
        if not kernel_for(t.codec).can_borrow(t.shape, t.params):
            return False
    return True


def borrowed_bytes(reader: EmoeReader, e: ExpertEntry, level: int = 1) -> int:
    """Bytes of the expert's prepared size at `level` that a borrowing build leaves in the
    read buffer."""
    total = 0
    for role in C.EXPERT_ROLES:
        t = reader.tensors[e.tensors[role]]
        total += kernel_for(t.codec).borrowed_bytes(t.shape, t.params, level)
    return total


def prepare_expert(
    reader: EmoeReader,
    e: ExpertEntry,
    payloads: list,
    dtype: torch.dtype,
    fused: bool = True,
    slab=None,
) -> ExpertWeights:
    """ExpertWeights at level len(payloads) from the expert's first level chunks' raw bytes.

    slab: the buffer the payloads are views of, if the expert may keep it (an owned read,
    edgemoe/store.py): kernels that can compute on stored bytes use them in place, and the
    expert holds the slab (its bytes count in nbytes) until it is given back.
    """
    linears = {}
    for role in C.EXPERT_ROLES:
        t = reader.tensors[e.tensors[role]]
        linears[role] = kernel_for(t.codec).build(
            t.shape, t.params, _segments(t, payloads, 0), dtype, fused, borrow=slab is not None
        )
    ew = ExpertWeights(linears["gate"], linears["up"], linears["down"], len(payloads))
    ew.slab = slab
    return ew


def head_of(
    reader: EmoeReader, e: ExpertEntry, level: int, dtype: torch.dtype
) -> tuple[list[tuple[int, int]], Callable] | None:
    """(ranges, build) for a whole read of expert e's levels 1..level (one span of its level
    chunks, computed in place): ranges are the byte ranges of the span that hold its gate and
    up at every level, and build(the span's bytes, a view into the read's slab, once those
    ranges have landed) gives the (gate, up) Linears at `level` on them. The store reads
    those ranges first (store.fetch's head), so silu(gate) * up is computed while down is
    still being read (moe/experts.py swiglu_head). None where the expert is not computed on
    its read in place."""
    if not can_borrow(reader, e, level):
        return None
    ts = [reader.tensors[e.tensors[role]] for role in C.EXPERT_ROLES]
    chunks = e.levels[:level]
    if any(tuple(ci for ci, _, _ in t.parts[:level]) != tuple(chunks) for t in ts):
        return None
    base = reader.data_offset + reader.chunks[chunks[0]].offset
    rel = [reader.data_offset + reader.chunks[ci].offset - base for ci in chunks]
    lengths = [reader.chunks[ci].length for ci in chunks]
    ranges = [
        (r + off, r + off + size) for t in ts[:2] for r, (_, off, size) in zip(rel, t.parts[:level])
    ]

    def build(span) -> tuple[Linear, Linear]:
        payloads = [memoryview(span)[r : r + n] for r, n in zip(rel, lengths)]
        return tuple(
            kernel_for(t.codec).build(t.shape, t.params, _segments(t, payloads, 0), dtype, True,
                                      borrow=True)
            for t in ts[:2]
        )  # fmt: skip

    return ranges, build


def upgrade_expert(
    reader: EmoeReader, e: ExpertEntry, ew: ExpertWeights, payloads: list, dtype: torch.dtype
) -> ExpertWeights:
    """Raise ew from level k to k + len(payloads) in place, from the next level chunks' bytes.

    Args:
        reader, e: the file and the expert ew was prepared from.
        ew: the prepared expert, at level k; its nbytes grows by what the new levels add.
        payloads: raw bytes of the expert's level chunks k+1 .. k+j.
        dtype: the compute dtype ew was prepared with.
    Returns:
        ew itself, computing exactly what prepare_expert at level k + j computes.
    Raises:
        NotUpgradable: a codec with one level, or levels past the expert's last.
    """
    if ew.level + len(payloads) > len(e.levels):  # refused before any role changes
        raise NotUpgradable(
            f"expert {e.expert} of layer {e.layer}: level {ew.level} + {len(payloads)} new "
            f"levels runs past its last level ({len(e.levels)})"
        )
    for role in C.EXPERT_ROLES:
        t = reader.tensors[e.tensors[role]]
        segs = _segments(t, payloads, ew.level)
        kernel_for(t.codec).upgrade(getattr(ew, role), t.shape, t.params, segs, dtype)
    ew.level += len(payloads)
    return ew


def _copy(lin: Linear) -> Linear:
    """A Linear sharing lin's built tensors that can be upgraded without touching lin."""
    new = copy.copy(lin)
    if isinstance(lin, Int4Linear):
        new.parts, new.ends = list(lin.parts), list(lin.ends)
    return new


def upgraded_expert(
    reader: EmoeReader, e: ExpertEntry, ew: ExpertWeights, payloads: list, dtype: torch.dtype
) -> ExpertWeights:
    """ew raised by the payloads' levels, as upgrade_expert does, but on a copy that shares
    ew's built levels (the new levels are appended to it, nothing is rebuilt): ew stays as it
    is, so tokens computing at its levels meanwhile are unaffected; the copy replaces it."""
    new = ExpertWeights(_copy(ew.gate), _copy(ew.up), _copy(ew.down), ew.level)
    new.slab = ew.slab
    return upgrade_expert(reader, e, new, payloads, dtype)


def expert_at(ew: ExpertWeights, level: int) -> ExpertWeights:
    """ew computing at `level` (a view on a prefix of its parts) if every role can; else ew
    itself, at its own level (a dense fallback keeps only its top level)."""
    if level >= ew.level:
        return ew
    views = [getattr(lin, "at", lambda _: None)(level) for lin in (ew.gate, ew.up, ew.down)]
    if any(v is None for v in views):
        return ew
    return ExpertWeights(*views, level)


def downgrade_expert(ew: ExpertWeights, level: int) -> int | None:
    """Cut ew to `level` in place, freeing its higher levels' parts without I/O; its bytes
    after, or None (nothing changed) if some role cannot be cut (a dense fallback, a borrowed
    read buffer)."""
    lins = (ew.gate, ew.up, ew.down)
    if ew.slab is not None or not all(
        isinstance(lin, Int4Linear) and lin.level == ew.level and lin.ends[level - 1] is not None
        for lin in lins
    ):
        return None
    for lin in lins:
        lin.truncate(level)
    ew.level = level
    return ew.nbytes


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
