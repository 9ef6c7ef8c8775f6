"""MoE² selection: the served set is maximal under the energy budget and meets the latency
budget; per-token restriction renormalises over the kept choices; unlimited budgets change
nothing."""

from __future__ import annotations

import torch

import edgemoe
from cluster.placement import place
from cluster.selection import (
    NodeCost,
    RequestClass,
    SelectingExecutor,
    loads_per_token,
    node_costs,
    restrict,
    select_experts,
)
from cluster.types import ExpertMap, Link, ModelShape, NodeCapacity, NodeSpec
from edgemoe.sampling import Sampling
from edgemoe.units import Bytes

SHAPE = ModelShape((0,), 4, 2, (Bytes(1),))
COSTS = {"fast": NodeCost("fast", 0.001, 2.0), "slow": NodeCost("slow", 0.050, 1.0)}
EMAP = ExpertMap(
    1, {(0, 0): ("fast",), (0, 1): ("slow",), (0, 2): ("fast", "slow"), (0, 3): ("slow",)}
)
LOADS = {(0, 0): 0.8, (0, 1): 0.6, (0, 2): 0.4, (0, 3): 0.2}


def test_restrict_renormalises_over_kept():
    ids = torch.tensor([[0, 1], [2, 3], [1, 3]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    allowed = torch.tensor([True, False, True, False])
    ids2, w2, kept = restrict(ids, w, allowed, keep_top=False)
    assert kept.tolist() == [[True, False], [True, False], [False, False]]
    assert torch.allclose(w2[:2].sum(dim=1), w[:2].sum(dim=1)) and w2[2].sum() == 0
    assert w2[0].tolist() == [1.0, 0.0] and ids2[0].tolist() == [0, 0]
    _, w3, kept3 = restrict(ids, w, allowed)  # the fallback: row 3 keeps its top choice
    assert kept3[2].tolist() == [True, False] and float(w3[2].sum()) == 1.0


def test_bad_request_class_is_named():
    import pytest

    from cluster.types import ClusterError

    with pytest.raises(ClusterError, match="latency budget 0"):
        RequestClass("x", latency_s=0)
    with pytest.raises(ClusterError, match="energy budget -1"):
        RequestClass("x", energy_j=-1)


def test_latency_budget_picks_replicas_and_excludes():
    sel = select_experts(EMAP, COSTS, LOADS, RequestClass("rt", latency_s=0.010), SHAPE)
    assert sel.replica == {(0, 0): "fast", (0, 2): "fast"}  # the slow node misses the budget
    # a fallback (no served choice) goes to the expert's fastest replica
    assert sel.host((0, 1)) == "slow" and sel.host((0, 2)) == "fast"
    sel = select_experts(EMAP, COSTS, LOADS, RequestClass("any"), SHAPE)
    assert sel.replica[(0, 2)] == "slow" and sel.served() == 4  # cheapest energy when no limit


def test_energy_budget_gives_a_maximal_feasible_set():
    klass = RequestClass("eco", energy_j=1.3)
    sel = select_experts(EMAP, COSTS, LOADS, klass, SHAPE)
    spent = sum(LOADS[k] * COSTS[n].joules for k, n in sel.replica.items())
    assert spent <= 1.3 and abs(spent - sel.expected_j) < 1e-9
    for k in set(LOADS) - set(sel.replica):  # maximal: no expert left out would still fit
        assert spent + LOADS[k] * min(COSTS[h].joules for h in EMAP.hosts(k)) > 1.3


def test_energy_falls_and_gate_mass_kept_with_budget():
    prev = None
    for e in (None, 1.5, 1.0, 0.5):
        sel = select_experts(EMAP, COSTS, LOADS, RequestClass("x", energy_j=e), SHAPE)
        mass = sum(LOADS[k] for k in sel.replica)
        if prev is not None:
            assert sel.expected_j <= prev[0] and mass <= prev[1]
        prev = (sel.expected_j, mass)


def test_node_costs_from_profiles():
    specs = [
        NodeSpec(
            "orin", "jetson-orin-nano-8gb", Bytes.parse("1GiB"), Link(0.005, Bytes(12_500_000))
        ),
        NodeSpec("pi", "rpi5-8gb-nvme", Bytes.parse("1GiB"), Link()),
    ]
    c = node_costs(specs, hidden=192, width=384)
    assert c["orin"].call_s > 0.005 and c["pi"].call_s < 0.001  # link dominates on Wi-Fi
    assert c["pi"].joules > 0 and c["orin"].joules > 0


def test_unlimited_budgets_change_nothing_and_tight_ones_cost_less():
    with edgemoe.load(None, None, dtype="f32") as plain:
        want = plain.complete([[5, 6, 7, 8]], 8, Sampling.greedy())[0].token_ids
        f = plain.facts
    from cluster.model import model_info

    info = model_info(edgemoe.engine.DEMO, "f32")
    caps = [NodeCapacity("fast", Bytes.parse("1GiB")), NodeCapacity("slow", Bytes.parse("1GiB"))]
    emap = place(info.shape, caps, info.stats, spare=8)
    loads = loads_per_token(info.shape, info.stats.load)
    got = {}
    for name, klass in (("all", RequestClass("all")), ("rt", RequestClass("rt", latency_s=0.010))):
        sel = select_experts(emap, COSTS, loads, klass, info.shape)
        holder = {}

        def factory(ctx, sel=sel, holder=holder):
            holder["ex"] = SelectingExecutor(ctx.local(), emap, COSTS, "moe2", sel)
            return holder["ex"]

        with edgemoe.load(None, None, dtype="f32", executor=factory) as m:
            got[name] = m.complete([[5, 6, 7, 8]], 8, Sampling.greedy())[0].token_ids
            got[name + "_stats"] = holder["ex"].count.as_dict(len(f.moe_layers))
    assert got["all"] == want and got["all_stats"]["gate_mass_kept"] == 1.0
    assert got["rt_stats"]["gate_mass_kept"] < 1.0
    assert got["rt_stats"]["latency_ms_per_layer"] < got["all_stats"]["latency_ms_per_layer"]


def test_route_rows_fallback_and_strict():
    """Rows of two classes in one layer: a row with no served choice keeps its top choice at
    its fastest replica (counted), unless its class is strict (no routed output at all)."""
    from cluster.selection import RowCounts, route_rows

    ids = torch.tensor([[1, 3], [0, 1], [3, 1]])  # experts 1 and 3 are on the slow node only
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.6, 0.4]])
    for strict in (False, True):
        k = RequestClass("rt", latency_s=0.010, strict=strict)
        sel = select_experts(EMAP, COSTS, LOADS, k, SHAPE)
        counts = RowCounts()
        rows = torch.tensor([0, 2])
        got = route_rows(0, ids, w, [(rows, sel), (torch.tensor([1]), None)], counts)
        pairs = sorted(
            (r.assignment.expert, r.assignment.tokens.tolist(), r.selection is sel) for r in got
        )
        served = [(0, [1], False), (1, [1], False)]  # row 1: no class, every choice
        if strict:
            assert pairs == served and counts.fallbacks == 0 and counts.dropped == 4
        else:  # rows 0 and 2 keep their top choices (1 and 3) at the slow node, whole weight
            assert pairs == sorted([*served, (1, [0], True), (3, [2], True)])
            assert counts.fallbacks == 2 and counts.dropped == 2
            assert all(sel.host((0, e)) == "slow" for e in (1, 3))
