"""Collaborative edge-expert selection (MoE², docs/design/ALGORITHMS.md §4.1).

Requests carry a class: a latency budget (the slowest expert call of one MoE
layer, round trip and compute included) and an energy budget (joules per token
over all its routed expert calls). Nodes carry costs from their profile and
link: one token's call to a node takes rtt + transfer + the expert's FLOPs at
the node's speed, and costs the node's watts times its busy time.

Two levels:
1. Slowly (`select_experts`): each expert is served from its cheapest replica
   that meets the class's latency budget; the served set S takes experts in
   order of cost per unit of gate mass until the expected energy per token
   reaches the budget, then every remaining expert that still fits. Since loss
   falls as S grows, only maximal feasible sets are worth searching, and this
   is one (the fractional-knapsack order, made maximal).
2. Per token (`restrict`): keep the gate's choices that are in S, renormalise
   their weights to the gate's total over the kept set (no retraining: a gate
   trained over all experts stays right on any subset).

Fallback: a token none of whose choices is in S (no chosen expert has a replica
within the latency budget, or within the energy budget) keeps its single
highest-weight choice, at that expert's fastest replica, with the gate's whole
weight; it is counted (`fallbacks`), since that token's layer may exceed the
budget. A strict class (`RequestClass(strict=True)`) never exceeds its budgets:
such a token gets no routed output (its shared expert and residual remain),
which costs far more perplexity on the demo model (docs/BENCHMARKS.md, moe2).

Classes are per request: each row of a layer's batch carries its request's
class (`route_rows`), so one batch mixes a latency-tight class with an
unlimited one; each class's rows are restricted by its own Selection and served
at its own replicas.

`SelectingExecutor` applies a selection in front of any executor and counts
the gate mass kept, the per-layer latency and the energy per token, so the
trade-off can be measured (tools/moe2_tradeoff.py).

Shape legend: T tokens, K active experts, E experts per layer.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from cluster.types import ExpertKey, ExpertMap, ModelShape, NodeSpec
from devices.profile import load_profile
from edgemoe.moe.api import Assignment, ExecutorStats, ExpertExecutor, dispatch

DEVBOX_GFLOPS = 70.0  # devices/README.md: the devbox's measured FP32 GEMM, compute_factor 1.0
DEFAULT_WATTS = 10.0  # a profile without `watts`


@dataclass(frozen=True)
class RequestClass:
    """latency_s: the slowest expert call a MoE layer may wait for; energy_j: expected joules
    per token over its routed experts (None: unlimited); strict: a token with no served choice
    gets no routed output instead of the fallback (the budgets are never exceeded)."""

    name: str
    latency_s: float = float("inf")
    energy_j: float | None = None
    strict: bool = False

    def __post_init__(self):
        from cluster.types import ClusterError

        if not self.latency_s > 0:
            raise ClusterError(
                f"request class {self.name!r}: latency budget {self.latency_s!r} s",
                "give a latency budget > 0 (or none: unlimited)",
            )
        if self.energy_j is not None and not self.energy_j >= 0:
            raise ClusterError(
                f"request class {self.name!r}: energy budget {self.energy_j!r} J",
                "give an energy budget >= 0 (or none: unlimited)",
            )


@dataclass(frozen=True)
class NodeCost:
    """One token's call to one expert on a node."""

    name: str
    call_s: float
    joules: float


def node_costs(
    specs: Sequence[NodeSpec], hidden: int, width: int, item: int = 2
) -> dict[str, NodeCost]:
    """Costs from each node's profile (compute_factor, watts) and link.

    Args:
        hidden, width: the expert's D and I (3 matmuls of D x I: 6*D*I FLOPs a token).
        item: bytes of one activation element on the wire.
    """
    out = {}
    flops = 6.0 * hidden * width
    for s in specs:
        p = load_profile(s.profile)
        busy = flops / (DEVBOX_GFLOPS * 1e9 / p.compute_factor)
        wire = 2 * hidden * item
        # the hidden state goes out and the expert's output comes back: two one-way trips
        call = 2 * s.link.seconds(wire) + busy
        out[s.name] = NodeCost(s.name, call, (p.watts or DEFAULT_WATTS) * busy)
    return out


@dataclass(frozen=True)
class Selection:
    """The served set S and each served expert's replica."""

    allowed: Mapping[int, torch.Tensor]  # layer -> [E] bool
    replica: Mapping[ExpertKey, str]
    expected_j: float  # energy per token if tokens route as the statistics say
    fastest: Mapping[ExpertKey, str] = dataclasses.field(default_factory=dict)  # for fallbacks
    fallback: bool = True  # a token with no served choice keeps its top one (not strict)

    def host(self, key: ExpertKey) -> str | None:
        """The replica this class calls for an expert: its served one, else (a fallback)
        the fastest."""
        return self.replica.get(key) or self.fastest.get(key)

    def served(self) -> int:
        return len(self.replica)


def loads_per_token(
    shape: ModelShape, stats_load: Mapping[ExpertKey, float]
) -> dict[ExpertKey, float]:
    """Expected uses of each expert per token (each layer's sum is top_k)."""
    out = {}
    for layer in shape.layers:
        raw = [float(stats_load.get((layer, e), 0.0)) for e in range(shape.experts)]
        total = sum(raw)
        for e, v in enumerate(raw):
            out[(layer, e)] = shape.top_k * (v / total if total else 1.0 / shape.experts)
    return out


def select_experts(
    emap: ExpertMap,
    costs: Mapping[str, NodeCost],
    loads: Mapping[ExpertKey, float],
    klass: RequestClass,
    shape: ModelShape,
) -> Selection:
    """Level 1 (see the module docstring)."""
    best: dict[ExpertKey, NodeCost] = {}
    fastest: dict[ExpertKey, str] = {}
    for key, hosts in emap.replicas.items():
        known = [costs[h] for h in hosts if h in costs]
        if known:
            fastest[key] = min(known, key=lambda c: (c.call_s, c.joules, c.name)).name
        ok = [c for c in known if c.call_s <= klass.latency_s]
        if ok:
            best[key] = min(ok, key=lambda c: (c.joules, c.call_s, c.name))
    order = sorted(best, key=lambda k: (best[k].joules, -loads.get(k, 0.0), k))
    budget = float("inf") if klass.energy_j is None else klass.energy_j
    chosen, spent = [], 0.0
    for k in order:  # cheapest energy per unit of gate mass first, then any that still fit
        c = loads.get(k, 0.0) * best[k].joules
        if spent + c <= budget:
            chosen.append(k)
            spent += c
    allowed = {layer: torch.zeros(shape.experts, dtype=torch.bool) for layer in shape.layers}
    for layer, e in chosen:
        allowed[layer][e] = True
    replica = {k: best[k].name for k in chosen}
    return Selection(allowed, replica, spent, fastest, not klass.strict)


def restrict(
    ids: torch.Tensor, weights: torch.Tensor, allowed: torch.Tensor, keep_top: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Level 2: keep the choices in S, renormalised; returns (ids, weights, kept [T, K] bool).

    Dropped choices become the token's first kept expert with weight 0 (the [T, K] shape
    stays), so an executor adds nothing for them. A token none of whose choices is served
    keeps its top choice (the fallback, outside the budgets); with keep_top False it gets
    no routed output (its shared expert and residual remain).
    """
    kept = allowed[ids]  # [T, K]
    none = ~kept.any(dim=1)
    if keep_top and none.any():
        top = weights.argmax(dim=1)
        kept[none, top[none]] = True
    w = torch.where(kept, weights, torch.zeros_like(weights))
    total, left = weights.sum(dim=1, keepdim=True), w.sum(dim=1, keepdim=True)
    w = w * (total / left.clamp_min(1e-30))
    first = kept.float().argmax(dim=1, keepdim=True)  # [T, 1]
    fill = torch.gather(ids, 1, first).expand_as(ids)
    return torch.where(kept, ids, fill), w, kept


@dataclass(frozen=True)
class Routed:
    """One assignment of a layer (tokens are rows of the layer's x) and the Selection of the
    class its rows belong to (None: every choice, at any replica)."""

    assignment: Assignment
    selection: Selection | None


@dataclass
class RowCounts:
    """What a layer's restriction did: tokens routed, gate mass kept (summed over tokens),
    choices dropped, tokens that fell back to their top choice."""

    tokens: int = 0
    mass: float = 0.0
    dropped: int = 0
    fallbacks: int = 0


def route_rows(
    layer: int,
    ids: torch.Tensor,
    weights: torch.Tensor,
    groups: Sequence[tuple[torch.Tensor | None, Selection | None]],
    counts: RowCounts | None = None,
) -> list[Routed]:
    """A layer's assignments when its rows belong to requests of different classes.

    Args:
        ids, weights: [T, K] the gate's choices and weights.
        groups: (rows [n] int64, or None for every row; the class's Selection or None); the
            groups' rows are disjoint and cover [0, T).
        counts: added to (tokens, kept gate mass, dropped choices, fallbacks).
    Returns:
        The assignments, each with its class's Selection; a class's dropped choices get none.
    """
    out: list[Routed] = []
    for rows, sel in groups:
        i, w = (ids, weights) if rows is None else (ids[rows], weights[rows])  # [n, K]
        if sel is None:
            kept = torch.ones_like(i, dtype=torch.bool)
            assigns = dispatch(i, w)
        else:
            fell = ~sel.allowed[layer][i].any(dim=1)  # [n] tokens with no served choice
            i2, w2, kept = restrict(i, w, sel.allowed[layer], sel.fallback)
            assigns = [a for a in dispatch(torch.where(kept, i2, -1), w2) if a.expert >= 0]
            if counts is not None:
                counts.dropped += int((~kept).sum())
                counts.fallbacks += int(fell.sum()) if sel.fallback else 0
        if counts is not None:
            counts.tokens += len(i)
            mass = (w * kept).sum(dim=1) / w.sum(dim=1).clamp_min(1e-30)
            counts.mass += float(mass.sum())
        for a in assigns:
            if rows is not None:
                a = dataclasses.replace(a, tokens=rows[a.tokens])
            out.append(Routed(a, sel))
    return out


@dataclass
class SelectionStats:
    tokens: int = 0
    gate_mass: float = 0.0  # sum over tokens and layers of the kept share of the gate's weight
    layer_calls: int = 0
    latency_s: float = 0.0  # sum over (token batch, layer) of the slowest call
    energy_j: float = 0.0
    per_layer_tokens: int = 0  # tokens summed over MoE layers
    fallbacks: int = 0  # (token, layer)s with no served choice, given their top one

    def as_dict(self, moe_layers: int) -> dict:
        n = max(1, self.per_layer_tokens)
        return {
            "gate_mass_kept": self.gate_mass / n,
            "fallback_share": self.fallbacks / n,
            "latency_ms_per_layer": 1e3 * self.latency_s / max(1, self.layer_calls),
            "energy_mj_per_token": 1e3 * self.energy_j / max(1.0, n / moe_layers),
        }


class SelectingExecutor(ExpertExecutor):
    """A selection policy in front of another executor, with its costs counted.

    policy: "moe2" (a Selection restricts the gate), "nearest" (every choice, each at its
    fastest replica), "random" (every choice, each at a random replica).
    """

    def __init__(
        self,
        inner: ExpertExecutor,
        emap: ExpertMap,
        costs: Mapping[str, NodeCost],
        policy: str = "moe2",
        selection: Selection | None = None,
        seed: int = 0,
    ):
        self.inner, self.emap, self.costs = inner, emap, costs
        self.policy, self.selection = policy, selection
        self.rng = random.Random(seed)
        self.count = SelectionStats()

    def _where(self, layer: int, e: int) -> NodeCost:
        hosts = self.emap.hosts((layer, e))
        if self.policy == "moe2" and self.selection and (layer, e) in self.selection.replica:
            return self.costs[self.selection.replica[(layer, e)]]
        if self.policy == "random":
            return self.costs[self.rng.choice(hosts)]
        return min((self.costs[h] for h in hosts), key=lambda c: c.call_s)

    def begin(self, layer, x, expert_ids, expert_weights):
        self.routed(layer, expert_ids)
        ids, w = expert_ids, expert_weights
        if self.policy == "moe2" and self.selection is not None:
            allowed, top = self.selection.allowed[layer], self.selection.fallback
            self.count.fallbacks += int((~allowed[ids].any(dim=1)).sum()) if top else 0
            ids, w, kept = restrict(ids, w, allowed, top)  # a fallback is served at its fastest
            mass = (expert_weights * kept).sum(dim=1) / expert_weights.sum(dim=1).clamp_min(1e-30)
        else:
            kept = torch.ones_like(ids, dtype=torch.bool)
            mass = torch.ones(len(ids))
        c = self.count
        c.gate_mass += float(mass.sum())
        c.per_layer_tokens += len(ids)
        used = {int(e) for e in ids[kept].tolist()}
        where = {e: self._where(layer, e) for e in used}
        c.layer_calls += 1
        c.latency_s += max((n.call_s for n in where.values()), default=0.0)
        for e_ in ids[kept].tolist():
            c.energy_j += where[int(e_)].joules
        return self.inner.begin(layer, x, ids, w)

    def finish(self, handle):
        return self.inner.finish(handle)

    def stats(self) -> ExecutorStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()
