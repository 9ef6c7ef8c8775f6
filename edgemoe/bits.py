"""Bit policies: the level each (token, chosen expert) pair computes at (D²MoE's dual routing).

A .emoe stores experts bit-nested: level k of an expert is a prefix of level
k+1, so a pair can compute at any stored level and an upgrade reads only the
missing chunks. A policy is asked once per MoE layer per forward pass, after
the router chose the experts and before any expert is read:

    levels = policy.levels(layer, expert_ids, weights, hidden)

expert_ids, weights: [T, k] from the router (weights as the model combines
them); hidden: [T, D], the layer's MoE input. The answer is an int64 [T, k]
tensor, each entry in 1..top(layer, expert), top being the highest level the
file stores for that expert. `average_bits` of a run is measured by the
runtime (bits per expert weight actually computed), never assumed.

Policies are named by a spec string (`--bits-policy`, `edgemoe.load(bits=)`):
"fixed:L" (every pair at level L; "fixed" alone: the top level), plus the kinds
registered in KINDS. `make(spec, reader)` builds one for an open file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from formats.reader import EmoeReader


class BitPolicy(Protocol):
    name: str

    def levels(
        self, layer: int, expert_ids: torch.Tensor, weights: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """int64 [T, k]: the level of each (token, chosen expert), 1..top(layer, expert)."""
        ...


def top_levels(reader: EmoeReader) -> Callable[[int, int], int]:
    """(layer, expert) -> the highest level the file stores for that expert."""
    tops = {key: len(e.levels) for key, e in reader.experts.items()}
    return lambda layer, expert: tops[(layer, expert)]


class Fixed:
    """Every pair at one level (capped at what each expert stores): today's behaviour."""

    def __init__(self, reader: EmoeReader, level: int | None = None):
        self.top = top_levels(reader)
        self.level = level
        self.name = "fixed" if level is None else f"fixed:{level}"

    def levels(self, layer, expert_ids, weights, hidden):
        out = torch.empty_like(expert_ids, dtype=torch.int64)
        for e in torch.unique(expert_ids).tolist():
            top = self.top(layer, e)
            out[expert_ids == e] = top if self.level is None else min(self.level, top)
        return out


def _fixed(arg: str | None, reader: EmoeReader) -> BitPolicy:
    return Fixed(reader, None if arg is None else int(arg))


# kind -> (argument after the colon or None, reader) -> policy; other modules' kinds are
# added here by name, so `make` stays the one place a spec is parsed.
KINDS: dict[str, Callable[[str | None, EmoeReader], BitPolicy]] = {"fixed": _fixed}


def make(spec: str, reader: EmoeReader) -> BitPolicy:
    """The policy a spec names, for this file; ValueError naming the spec and the kinds."""
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(
            f"unknown bit policy {spec!r}; use one of: {', '.join(sorted(KINDS))} (e.g. fixed:2)"
        )
    try:
        return KINDS[kind](arg or None, reader)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bit policy {spec!r}: {e}") from e
