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


def weight_bits(reader: EmoeReader) -> Callable[[int, int, int], float]:
    """(layer, expert, level) -> nominal bits per expert weight at that level (the codecs'
    `level_bits`, weighted by each role's size; scales and zero points not counted)."""
    memo: dict[tuple[int, int, int], float] = {}

    def bits(layer: int, expert: int, level: int) -> float:
        key = (layer, expert, level)
        if key not in memo:
            n = b = 0
            for name in reader.expert(layer, expert).tensors.values():
                t = reader.tensors[name]
                size = 1
                for d in t.shape:
                    size *= int(d)
                lb = t.codec.level_bits(t.params)
                n, b = n + size, b + size * lb[min(level, len(lb)) - 1]
            memo[key] = b / max(1, n)
        return memo[key]

    return bits


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


GATE_Q = 0.5  # the default: a top-2 second expert at half its token's best weight keeps the top


class Gate:
    """The level follows the gate weight, no training (D²MoE's default, as HOBBIT does for
    misses): a pair whose weight is at least q times its token's highest weight computes at
    the expert's top level; below that the level falls linearly with the weight, to level 1
    at weight 0. So a token's best expert is always at the top, and a second expert of a
    top-2 with little weight is read and computed at the base level.

    q is the one knob (`gate:q=0.7`, or `gate:0.7`): 0 puts every pair at the top level
    (fixed), higher q saves more bits. Default 0.5. A top-1 model has no second weight to
    compare: every pair stays at the top.
    """

    def __init__(self, reader: EmoeReader, q: float = GATE_Q):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q={q} is outside 0..1")
        self.q = q
        self.name = f"gate:q={q:g}"
        tops: dict[int, dict[int, int]] = {}
        for (layer, expert), e in reader.experts.items():
            tops.setdefault(layer, {})[expert] = len(e.levels)
        self._tops: dict[int, torch.Tensor] = {}  # layer -> [E] int64 top level per expert
        for layer, m in tops.items():
            t = torch.ones(max(m) + 1, dtype=torch.int64)
            t[list(m)] = torch.tensor(list(m.values()), dtype=torch.int64)
            self._tops[layer] = t

    def levels(self, layer, expert_ids, weights, hidden):
        # T tokens, K chosen experts
        top = self._tops[layer][expert_ids]  # [T, K]
        w = weights.float()
        r = w / w.amax(dim=1, keepdim=True).clamp_min(1e-30)  # [T, K] in 0..1
        share = torch.ones_like(r) if self.q == 0 else (r / self.q).clamp(max=1.0)
        return (1 + torch.floor((top - 1) * share + 1e-6)).to(torch.int64)  # [T, K]


def _fixed(arg: str | None, reader: EmoeReader) -> BitPolicy:
    return Fixed(reader, None if arg is None else int(arg))


def _gate(arg: str | None, reader: EmoeReader) -> BitPolicy:
    if arg is None:
        return Gate(reader)
    key, eq, value = arg.partition("=")
    if eq and key != "q":
        raise ValueError(f"gate takes q=VALUE (0..1), not {key!r}")
    return Gate(reader, float(value if eq else key))


# kind -> (argument after the colon or None, reader) -> policy; other modules' kinds are
# added here by name, so `make` stays the one place a spec is parsed.
KINDS: dict[str, Callable[[str | None, EmoeReader], BitPolicy]] = {"fixed": _fixed, "gate": _gate}


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


from edgemoe.bitstored import calibrated, trained  # noqa: E402

KINDS.update(calibrated=calibrated, trained=trained)  # fitted and stored by edgemoe calibrate
