"""Bit policies (edgemoe/bits.py) on the runtime: a level per (token, expert), dispatch by
(expert, level), the average bits a run computed, and `level=` as fixed."""

from __future__ import annotations

import pytest
import torch

import edgemoe
from edgemoe.bits import KINDS, Gate, make
from edgemoe.engine import BadRequest
from edgemoe.moe.api import ResidentExecutor, load_all_experts
from edgemoe.moe.dispatch import dispatch
from edgemoe.sampling import Sampling

GREEDY = Sampling(temperature=0)
PROMPT = "The quick brown fox jumps over the lazy dog. Then it"


def test_dispatch_groups_by_expert_then_level():
    ids = torch.tensor([[0, 1], [1, 0], [1, 2]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    lv = torch.tensor([[3, 1], [3, 1], [1, 3]])
    got = [(a.expert, a.level, a.tokens.tolist()) for a in dispatch(ids, w, lv)]
    assert got == [(0, 1, [1]), (0, 3, [0]), (1, 1, [0, 2]), (1, 3, [1]), (2, 3, [2])]
    assert [(a.expert, a.level) for a in dispatch(ids, w)] == [(0, 0), (1, 0), (2, 0)]


def test_gate_policy_follows_the_weight(tiny_emoe):
    from formats.reader import EmoeReader

    with EmoeReader(tiny_emoe("mixtral", experts="mwq:2,3,4")) as r:
        assert "gate" in KINDS and make("gate", r).name == "gate:q=0.5"
        ids = torch.tensor([[0, 1], [2, 3], [1, 0]])
        w = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]])
        lv = Gate(r, 0.5).levels(0, ids, w, None)
        # best expert at the top; 0.1/0.9 at the base; 0.4/0.6 >= q: top; equals: top
        assert lv.tolist() == [[3, 1], [3, 3], [3, 3]]
        assert Gate(r, 0.0).levels(0, ids, w, None).eq(3).all()
        assert make("gate:q=1", r).levels(0, ids, w, None).tolist() == [[3, 1], [3, 2], [3, 3]]
        with pytest.raises(ValueError, match="gate"):
            make("gate:z=1", r)


def test_levels_reach_the_executor_and_the_stats(tiny_emoe):
    path = tiny_emoe("mixtral", experts="mwq:2,3,4")
    with edgemoe.load(path, ctx=64, level=1) as m:
        low = m.generate(PROMPT, max_tokens=6, sampling=GREEDY)
        s = m.summary()
        assert s["average_bits"] == pytest.approx(2.0) and s["bits_policy"] == "fixed:1"
    with edgemoe.load(path, ctx=64, bits="fixed:1") as m:
        assert m.generate(PROMPT, max_tokens=6, sampling=GREEDY) == low
    with edgemoe.load(path, ctx=64, bits="gate:q=1") as m:
        st = edgemoe.engine.RunStats()
        m.generate(PROMPT, max_tokens=6, sampling=GREEDY, stats=st)
        avg = st.executor.average_bits
        assert 2.0 < avg < 4.0 and "bits/weight (gate:q=1)" in m.summary_line(st)
        # explicit levels through the seam: all at level 1 is the resident level-1 oracle
        ex = m.executor
        ref = ResidentExecutor(load_all_experts(m.reader, m.dtype, level=1))
        x = torch.randn(3, m.facts.args.hidden_size).to(m.dtype)
        ids = torch.tensor([[0, 1], [1, 2], [3, 0]])
        w = torch.full(ids.shape, 0.5)
        got = ex.run(0, x, ids, w, torch.ones_like(ids))
        torch.testing.assert_close(got, ref.run(0, x, ids, w))
    with pytest.raises(BadRequest) as e:
        edgemoe.load(path, ctx=64, level=2, bits="gate")
    assert e.value.param == "bits"
    with pytest.raises(BadRequest, match="unknown bit policy"):
        edgemoe.load(path, ctx=64, bits="nope")


def test_hebf_issues_the_hottest_slice_first_and_fifo_whole_experts():
    from edgemoe.moe.schedule import order_slices

    need = {(0, 0): {3: 1}, (0, 1): {1: 3}, (0, 2): {2: 2}}
    have = {(0, 0): 0, (0, 1): 0, (0, 2): 1}
    got = [(s.key[1], s.have, s.level, s.waiting) for s in order_slices(need, have, "hebf")]
    # B[1,1]=3 first; then B[2,2]=2; then expert 0's levels, adjacent: read as one
    assert got == [(1, 0, 1, 3), (2, 1, 2, 2), (0, 0, 3, 1)]
    fifo = [(s.key[1], s.have, s.level) for s in order_slices(need, have, "fifo")]
    assert fifo == [(0, 0, 3), (1, 0, 1), (2, 1, 2)]
    # equal counts: the slice that completes pairs first; one expert's levels run on
    need = {(0, 0): {1: 1, 3: 1}, (0, 1): {1: 1}, (0, 2): {3: 1}}
    have = {(0, 0): 0, (0, 1): 0, (0, 2): 0}
    got = [(s.key[1], s.have, s.level) for s in order_slices(need, have, "hebf")]
    assert got == [(0, 0, 1), (1, 0, 1), (0, 1, 3), (2, 0, 3)]


def test_budget_rule_cuts_the_previous_layers_high_levels_before_anyones_base():
    from edgemoe.cache import POLICIES, ExpertCache
    from edgemoe.moe.schedule import simulate

    size = lambda key, level: 10 * level  # noqa: E731
    for name, want_downgrades in (("lfu", 0), ("d2", 2)):
        cache = ExpertCache(60, POLICIES[name]())
        cache.shrink = lambda key, entry, level: size(key, level)
        simulate(cache, {(0, 0): {3: 1}, (0, 1): {3: 1}}, size)  # level 3 fills the cache
        cache.now = 1
        simulate(cache, {(1, 0): {2: 1}, (1, 1): {1: 1, 2: 1}}, size)  # needs 40 more
        assert cache.downgrades == want_downgrades, name
        levels = {(k[0], k[1]): k[2] for k in cache.keys()}
        if name == "d2":  # layer 0 kept at its base; nothing whole was evicted
            assert levels == {(0, 0): 1, (0, 1): 1, (1, 0): 2, (1, 1): 2}
            assert cache.evictions == 0
        else:
            assert (1, 0) in levels and cache.evictions > 0


def test_an_upgrade_reads_only_the_missing_levels(tiny_emoe):
    path = tiny_emoe("mixtral", experts="mwq:2,3,4")
    with edgemoe.load(path, ctx=64) as m:
        ex, d = m.executor, m.facts.args.hidden_size
        x = torch.randn(2, d, generator=torch.Generator().manual_seed(0)).to(m.dtype)
        ids = torch.tensor([[0, 1], [1, 0]])
        w = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
        ref = {k: ResidentExecutor(load_all_experts(m.reader, m.dtype, level=k)) for k in (1, 3)}
        one, top = torch.ones_like(ids), torch.full_like(ids, 3)
        torch.testing.assert_close(ex.run(0, x, ids, w, one), ref[1].run(0, x, ids, w))
        s0, b0 = ex.stats(), ex.store.bytes_read
        torch.testing.assert_close(ex.run(0, x, ids, w, top), ref[3].run(0, x, ids, w))
        s1 = ex.stats() - s0
        # one read per expert of levels 2-3 (adjacent in HEBF's order)
        span = sum(ex.store._span(0, e, 1, 3)[1] for e in (0, 1))
        assert s1.upgrades == s1.reads == 2 and s1.hits == 2 and s1.misses == 0
        assert ex.store.bytes_read - b0 == span  # levels 2-3 only, never level 1 again
        assert all(k[2] == 3 for k in ex.cache.keys() if k[0] == 0)
        # level 1 again: computed on the cached experts' first level, no read
        torch.testing.assert_close(ex.run(0, x, ids, w, one), ref[1].run(0, x, ids, w))
        assert ex.stats().reads == s1.reads + s0.reads and ex.stats().average_bits < 4


@pytest.mark.parametrize("order,policy", [("hebf", "d2"), ("fifo", "lfu")])
def test_gate_policy_tokens_do_not_depend_on_the_cache(tiny_emoe, order, policy):
    import dataclasses

    path = tiny_emoe("mixtral", experts="mwq:2,3,4")
    with edgemoe.load(path, ctx=64, bits="gate:q=1", batch=2) as m:
        want = m.generate([PROMPT, "Once upon a time"], max_tokens=6, sampling=GREEDY)
        size = m.facts.expert_nbytes(0, 3)

    def factory(ctx):
        return dataclasses.replace(ctx, order=order).local()

    with edgemoe.load(
        path, ctx=64, bits="gate:q=1", batch=2, expert_cache=int(2.5 * size),
        policy=policy, executor=factory,
    ) as m:  # fmt: skip
        st = edgemoe.engine.RunStats()
        got = m.generate([PROMPT, "Once upon a time"], max_tokens=6, sampling=GREEDY, stats=st)
        assert got == want and st.executor.misses > 0
        if policy == "d2":  # cut to their base, raised again in place when needed
            assert st.executor.downgrades > 0 and st.executor.upgrades > 0


def test_reachable_counts_the_base_of_many_and_the_top_of_a_few():
    from edgemoe.planning import reachable

    assert reachable(1000, 8, 100, 300) == {"base": 8, "top": 1, "experts": 8}
    assert reachable(500, 8, 100, 300) == {"base": 5, "top": 1, "experts": 8}
    assert reachable(3000, 8, 100, 300) == {"base": 8, "top": 8, "experts": 8}


def test_an_upgrade_not_worth_its_read_computes_at_the_level_in_memory(tiny_emoe):
    import dataclasses

    from edgemoe.moe.schedule import Slice, UpgradeCost

    slow = UpgradeCost(lambda key, have, level: 10**6, 1e6, lambda level, n: 1.0 * n)
    assert not slow(Slice((0, 0), 1, 2, 1)) and slow(Slice((0, 0), 1, 2, 1001))
    path = tiny_emoe("mixtral", experts="mwq:2,3,4")

    def factory(ctx):
        return dataclasses.replace(ctx, worth=lambda s: False).local()

    with edgemoe.load(path, ctx=64, executor=factory) as m:
        ex, d = m.executor, m.facts.args.hidden_size
        x = torch.randn(2, d, generator=torch.Generator().manual_seed(0)).to(m.dtype)
        ids = torch.tensor([[0, 1], [1, 0]])
        w = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
        ref1 = ResidentExecutor(load_all_experts(m.reader, m.dtype, level=1))
        ref3 = ResidentExecutor(load_all_experts(m.reader, m.dtype, level=3))
        one, top = torch.ones_like(ids), torch.full_like(ids, 3)
        # misses are read to the level they need
        torch.testing.assert_close(ex.run(0, x, ids, w, top), ref3.run(0, x, ids, w))
        assert ex.stats().reads == 2
        # in memory at level 1 only (layer 1's experts), level 3 wanted: not worth it here
        torch.testing.assert_close(ex.run(1, x, ids, w, one), ref1.run(1, x, ids, w))
        s0 = ex.stats()
        torch.testing.assert_close(ex.run(1, x, ids, w, top), ref1.run(1, x, ids, w))
        st = ex.stats() - s0
        assert st.reads == 0 and st.upgrades == 0 and st.average_bits == pytest.approx(2.0)
