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
