"""RemoteExecutor over in-process hosts (no Ray): greedy output equals the single device's,
failed calls are retried on another copy, an expert with no copy left is a named error."""

from __future__ import annotations

import pytest
import torch

import edgemoe
from cluster.host import ExpertHost
from cluster.model import model_info
from cluster.placement import place, repair
from cluster.remote import LocalPool, RemoteExecutor
from cluster.types import ExpertLost, Link, NodeCapacity, NodeSpec
from edgemoe.sampling import Sampling
from edgemoe.units import Bytes

PROMPTS = [[5, 17, 42, 99, 7], [3, 3, 8]]


def _hosts(path, info, n, **kw):
    hosts = {}
    for i in range(n):
        spec = NodeSpec(f"h{i}", "devbox", Bytes.parse("16GiB"), Link(), **kw)
        h = ExpertHost(spec, str(path), info.dtype, info.level, info.crc)
        h.open()
        hosts[spec.name] = h
    return hosts


def _single(path, info):
    with edgemoe.load(path, None, dtype=info.dtype, batch=len(PROMPTS)) as m:
        return [c.token_ids for c in m.complete(PROMPTS, 12, Sampling.greedy())]


def _remote(path, info, ex):
    with edgemoe.load(path, None, dtype=info.dtype, batch=len(PROMPTS), executor=lambda c: ex) as m:
        return [c.token_ids for c in m.complete(PROMPTS, 12, Sampling.greedy())]


@pytest.mark.parametrize(
    "family, experts, dense",
    [("qwen3_moe", "int8", "bf16"), ("deepseek_v3", "f32", "f32"), ("mixtral", "f32", "f32")],
)
def test_greedy_equals_single_device(tiny_emoe, family, experts, dense):
    path = tiny_emoe(family, experts=experts, dense=dense)
    info = model_info(path)
    hosts = _hosts(path, info, 3)
    caps = [NodeCapacity(n, h.room) for n, h in hosts.items()]
    pool = LocalPool(hosts)
    ex = RemoteExecutor(pool, place(info.shape, caps, info.stats))
    try:
        assert _remote(path, info, ex) == _single(path, info)
        assert ex.stats().reads > 0 and all(h.status().calls > 0 for h in hosts.values())
    finally:
        pool.close()
        for h in hosts.values():
            h.close()


def test_failed_host_retried_on_survivors(tiny_emoe):
    path = tiny_emoe("qwen3_moe")
    info = model_info(path)
    hosts = _hosts(path, info, 3)
    caps = [NodeCapacity(n, h.room) for n, h in hosts.items()]
    pool = LocalPool(hosts)
    ex = RemoteExecutor(pool, place(info.shape, caps, info.stats))

    def on_failure(dead):
        new, lost = repair(ex.map, dead, caps, info.shape, info.stats)
        ex.set_map(new)
        return new

    ex.on_failure = on_failure
    calls = {"n": 0}
    real = pool.submit

    def flaky(node, *a):  # h1 dies after its 5th call
        if node == "h1":
            calls["n"] += 1
            if calls["n"] > 5:
                pool.killed.add("h1")
        return real(node, *a)

    pool.submit = flaky
    try:
        assert _remote(path, info, ex) == _single(path, info)
        assert ex.dead == {"h1"} and ex.failures and ex.failures[-1].recovered_s >= 0
        assert ex.map.version > 1 and "h1" not in ex.map.nodes()
    finally:
        pool.close()
        for h in hosts.values():
            h.close()


def test_no_copy_left_is_named_and_bounded(tiny_emoe):
    path = tiny_emoe("qwen3_moe")
    info = model_info(path)
    hosts = _hosts(path, info, 2)
    pool = LocalPool(hosts)
    caps = [NodeCapacity(n, h.room) for n, h in hosts.items()]
    ex = RemoteExecutor(pool, place(info.shape, caps, info.stats), retries=1)
    pool.killed.update(hosts)  # every host gone; nobody repairs
    x = torch.zeros(2, 64)  # the tiny models are 64 wide
    try:
        h = ex.begin(info.shape.layers[0], x, torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2))
        with pytest.raises(ExpertLost, match="every host that held it is gone"):
            ex.finish(h)
        assert ex.drained(ex.map.version + 1, timeout=1)
    finally:
        pool.close()
        for h in hosts.values():
            h.close()


def test_selection_in_the_remote_executor_matches_selecting_executor(tiny_emoe):
    """A MoE² selection applied by the RemoteExecutor (no call for a dropped choice) gives the
    tokens the SelectingExecutor gives over the local executor."""
    from cluster.selection import NodeCost, RequestClass, SelectingExecutor, select_experts

    path = tiny_emoe("qwen3_moe")
    info = model_info(path)
    hosts = _hosts(path, info, 2)
    caps = [NodeCapacity(n, h.room) for n, h in hosts.items()]
    emap = place(info.shape, caps, info.stats)
    costs = {"h0": NodeCost("h0", 0.001, 1.0), "h1": NodeCost("h1", 0.050, 1.0)}
    loads = {k: 1.0 for k in info.shape.keys()}
    sel = select_experts(emap, costs, loads, RequestClass("rt", latency_s=0.01), info.shape)
    assert 0 < sel.served() < len(loads)
    pool = LocalPool(hosts)
    ex = RemoteExecutor(pool, emap)
    ex.selection = sel
    try:
        got = _remote(path, info, ex)
        with edgemoe.load(
            path,
            None,
            dtype=info.dtype,
            batch=len(PROMPTS),
            executor=lambda c: SelectingExecutor(c.local(), emap, costs, "moe2", sel),
        ) as m:
            want = [c.token_ids for c in m.complete(PROMPTS, 12, Sampling.greedy())]
        assert got == want
        # the slow node is outside the budget: it is called only for fallbacks (tokens none of
        # whose choices is served keep their top one, at its fastest replica)
        assert ex.fallbacks > 0 and hosts["h1"].status().calls <= ex.fallbacks
    finally:
        pool.close()
        for h in hosts.values():
            h.close()


def _two_speed(path, info):
    """Hosts h0 (fast, 1 ms a call) and h1 (slow, 50 ms): the first half of every layer's
    experts on h0, the rest on h1; a 10 ms class is served by h0's experts only."""
    from cluster.selection import NodeCost, RequestClass, select_experts
    from cluster.types import ExpertMap

    hosts = _hosts(path, info, 2)
    half = info.shape.experts // 2
    emap = ExpertMap(1, {k: ("h0",) if k[1] < half else ("h1",) for k in info.shape.keys()})
    costs = {"h0": NodeCost("h0", 0.001, 1.0), "h1": NodeCost("h1", 0.050, 1.0)}
    loads = {k: 1.0 for k in info.shape.keys()}
    pool = LocalPool(hosts)
    ex = RemoteExecutor(pool, emap)
    ex.selector = lambda klass, m: select_experts(m, costs, loads, klass, info.shape)
    return hosts, pool, ex, RequestClass("rt", latency_s=0.010), half


def test_request_classes_mix_in_one_layer(tiny_emoe):
    """Row classes in one layer: an unlimited row calls every choice, a 10 ms row keeps only
    its fast choices (renormalised), a 10 ms row with no fast choice falls back to its top
    choice at its fastest replica, counted."""
    path = tiny_emoe("qwen3_moe")
    info = model_info(path)
    hosts, pool, ex, rt, half = _two_speed(path, info)
    layer = info.shape.layers[0]
    fast, slow, slow2 = 0, half, half + 1
    ids = torch.tensor([[fast, slow], [fast, slow], [slow2, slow]])  # [T=3, K=2]
    w = torch.tensor([[0.6, 0.4], [0.7, 0.1], [0.3, 0.5]])
    try:
        with ex.rows([None, rt, rt]):
            h = ex.begin(layer, torch.randn(3, 64), ids, w)
        got = sorted(
            (c.node, a.expert, a.tokens.tolist(), [round(x, 4) for x in a.weights.tolist()])
            for c in h.calls
            for a in c.assigns
        )  # each class's rows are dispatched apart: one expert may appear once per class
        assert got == [
            ("h0", fast, [0], [0.6]),  # row 0 (unlimited): both choices, as the gate gave them
            ("h0", fast, [1], [0.8]),  # row 1 (10 ms): its fast choice, with 0.7 + 0.1
            ("h1", slow, [0], [0.4]),
            ("h1", slow, [2], [0.8]),  # row 2 (10 ms, no fast choice): its top, whole weight
        ]
        assert ex.fallbacks == 1 and ex.dropped == 2
        ex.finish(h)
    finally:
        pool.close()
        for x in hosts.values():
            x.close()


def test_request_classes_per_request_in_a_batch(tiny_emoe):
    """A batch mixing an unlimited class and a 10 ms class: each request gets the tokens it
    gets in a batch of its own class, and the 10 ms requests cost fewer slow calls."""
    from cluster.requests import RequestClasses

    path = tiny_emoe("qwen3_moe", experts="f32", dense="f32")
    info = model_info(path)
    hosts, pool, ex, rt, _ = _two_speed(path, info)
    try:
        with edgemoe.load(
            path, None, dtype=info.dtype, batch=len(PROMPTS) * 2, executor=lambda c: ex
        ) as m:
            rc = RequestClasses(m, ex)
            prompts = PROMPTS * 2  # [a, b, a, b]
            greedy = Sampling.greedy()
            mixed = rc.complete(prompts, 12, greedy, classes=[None, None, rt, rt])
            slow0 = hosts["h1"].status().calls
            every = rc.complete(prompts, 12, greedy)
            slow_all = hosts["h1"].status().calls - slow0
            tight = rc.complete(prompts, 12, greedy, classes=[rt] * 4)
            slow_rt = hosts["h1"].status().calls - slow0 - slow_all
        toks = [c.token_ids for c in mixed]
        assert toks[:2] == [c.token_ids for c in every][:2]
        assert toks[2:] == [c.token_ids for c in tight][2:]
        assert toks[2:] != toks[:2]  # the budget changed the 10 ms requests' output
        assert slow_rt < slow_all
        with pytest.raises(Exception, match="2 request classes for 4 prompts"):
            rc.complete(prompts, 4, greedy, classes=[rt, None])
    finally:
        pool.close()
        for x in hosts.values():
            x.close()
