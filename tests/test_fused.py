"""The batch-1 decode fast path (edgemoe/fused.py: a layer's attention half and its routed
experts in one kernel call each) against the layer-by-layer path it replaces, on the same
INT8 file: the same logits (to float rounding; bfloat16 rounded where torch rounds) and the
same greedy tokens, through the real engine (cache, executor, reads)."""

from __future__ import annotations

import pytest
import torch

import edgemoe
from edgemoe import fastkernels

pytestmark = pytest.mark.skipif(
    not fastkernels.available(), reason="the Q8 kernel library is not available on this CPU"
)

PROMPT = "The quick brown fox jumps over the lazy dog because"


def _teacher_forced(m, ids: list[int], follow: list[int]) -> torch.Tensor:
    """Logits [len(follow) + 1, V]: the prompt as one pass, then `follow` a token a step."""
    model = m.model
    cache = model.new_cache(1, len(ids) + len(follow) + 1)
    out = []
    with torch.inference_mode():
        h = model.forward(torch.tensor([ids]), cache)
        out.append(model.logits(h[:, -1]))
        for t in follow:
            h = model.forward(torch.tensor([[t]]), cache)
            out.append(model.logits(h[:, -1]))
    return torch.cat(out)


@pytest.mark.parametrize("chain", [False, True], ids=["layer-calls", "chain"])
@pytest.mark.parametrize("dtype,tol", [("f32", 1e-4), ("bf16", 2e-2)])
def test_fused_step_follows_the_layer_path(tiny_emoe, monkeypatch, dtype, tol, chain):
    path = tiny_emoe("mixtral", experts="int8", dense="int8")
    monkeypatch.setenv("EDGEMOE_FUSED", "0")
    ref = edgemoe.load(path, ctx=128, dtype=dtype)
    monkeypatch.setenv("EDGEMOE_FUSED", "1")
    fast = edgemoe.load(path, ctx=128, dtype=dtype)
    assert ref.model.chain is None and all(layer.fused is None for layer in ref.model.layers)
    assert all(layer.fused is not None for layer in fast.model.layers)
    assert fast.model.chain is not None
    calls = []
    if chain:  # every layer of a decode step in one kernel call (FusedChain)
        real_chain = type(fast.model.chain).__call__
        monkeypatch.setattr(
            type(fast.model.chain),
            "__call__",
            lambda self, *a: (calls.append(1), real_chain(self, *a))[1],
        )
    else:  # a kernel call a layer: the chain off
        fast.model.chain = None
        real = fastkernels.q8_experts
        monkeypatch.setattr(
            fastkernels, "q8_experts", lambda *a: (calls.append(len(a[1])), real(*a))[1]
        )
    ids = fast.tokenizer.encode(PROMPT)
    want = _teacher_forced(ref, ids, [])[-1:]
    follow = []
    for _ in range(12):  # the reference's greedy continuation
        follow.append(int(want[-1].argmax()))
        want = _teacher_forced(ref, ids, follow)
    hits = fast.executor.cache.hits
    got = _teacher_forced(fast, ids, follow)
    if chain:
        assert len(calls) == len(follow), "every decode step through the chain"
        assert fast.executor.cache.hits > hits, "the chain's hits are counted"
    else:
        assert calls and all(n == 2 for n in calls), "a decode step's two experts in one call"
    scale = want.abs().max()
    err = (got - want).abs().max() / scale
    assert err < tol, f"fused logits differ by {err:.2e} of their scale"
    if dtype == "f32":
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    ref.close()
    fast.close()


def test_fused_path_applies_to_standard_layers_only(tiny_emoe):
    # Qwen3's per-head q/k norms are not in the fused kernel: its layers keep the layer path
    m = edgemoe.load(tiny_emoe("qwen3_moe", experts="int8", dense="int8"), ctx=64)
    assert all(layer.fused is None for layer in m.model.layers)
    m.close()
    # float dense weights (the exactness tests' files) keep it too
    m = edgemoe.load(tiny_emoe("mixtral"), ctx=64)
    assert all(layer.fused is None for layer in m.model.layers)
    m.close()


def _greedy_reference(m, ids, steps):
    """(logits, tokens) of `steps` greedy tokens after ids, each step teacher-forced."""
    want = _teacher_forced(m, ids, [])
    follow = []
    for _ in range(steps):
        follow.append(int(want[-1].argmax()))
        want = _teacher_forced(m, ids, follow)
    return want, follow


def test_chain_under_a_small_expert_cache_gives_the_same_tokens(tiny_emoe):
    # experts are read, evicted and read again inside a step: the chain stops at each layer
    # whose expert is not cached, the executor serves it, and the tables follow the cache
    path = tiny_emoe("mixtral", experts="int8", dense="int8")
    big = edgemoe.load(path, ctx=128)
    small = edgemoe.load(path, ctx=128, expert_cache=big.plan.largest_expert * 3)
    assert small.model.chain is not None
    ids = big.tokenizer.encode(PROMPT)
    want, follow = _greedy_reference(big, ids, 10)
    got = _teacher_forced(small, ids, follow)
    assert small.executor.cache.evictions > 0
    assert (got - want).abs().max() / want.abs().max() < 1e-4
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    big.close()
    small.close()


def test_chain_reads_ahead_and_keeps_its_tokens(tiny_emoe):
    """With --prefetch idle the chain still runs (the layers it hands back hint the next
    one): reads ahead are issued and taken, and the logits are those of a run with every
    expert cached."""
    path = tiny_emoe("mixtral", experts="int8", dense="int8")
    big = edgemoe.load(path, ctx=128)
    small = edgemoe.load(path, ctx=128, expert_cache=big.plan.largest_expert * 3, prefetch="idle")
    assert small.prefetch == "idle" and small.model.chain is not None
    ids = big.tokenizer.encode(PROMPT)
    want, follow = _greedy_reference(big, ids, 10)
    got = _teacher_forced(small, ids, follow)
    s = small.executor.stats()
    assert s.prefetch_issued > 0 and s.prefetch_used > 0, s
    assert (got - want).abs().max() / want.abs().max() < 1e-4
    big.close()
    small.close()


def _traced_events(m) -> list[dict]:
    """The trace events of 4 tokens generated by m (closed after)."""
    from edgemoe import trace

    t = trace.Tracer()
    trace.install(t)
    try:
        m.generate(PROMPT, max_tokens=4)
    finally:
        trace.install(None)
        m.close()
    return t.events


def test_the_fused_attention_is_a_span_of_the_compute_lane(tiny_emoe):
    # prefetch hints want the per-layer path (no chain): each layer's attention is a call
    path = tiny_emoe("mixtral", experts="int8", dense="int8")
    m = edgemoe.load(path, ctx=128, prefetch="eager")
    events = _traced_events(m)
    assert not [e for e in events if e.get("cat") == "chain"]
    attn = [e for e in events if e.get("cat") == "attn"]
    moes = [e for e in events if e.get("cat") == "moe"]
    layers = len(m.model.layers)
    assert len(attn) >= 3 * layers  # each decode step's layers
    assert {e["tid"] for e in attn} == {e["tid"] for e in moes}
    # a layer's attention ends before its MoE begins
    for a in attn:
        layer = a["name"].split("L")[1]
        after = [x for x in moes if x["name"] == f"moe L{layer}" and x["ts"] >= a["ts"]]
        assert after and a["ts"] + a["dur"] <= min(x["ts"] for x in after) + 1


def test_a_traced_decode_step_runs_the_chain_and_shows_it(tiny_emoe):
    """A trace does not change the path a step takes: with every expert cached, each decode
    step is one chain call over every layer, a span on the compute lane."""
    m = edgemoe.load(tiny_emoe("mixtral", experts="int8", dense="int8"), ctx=128)
    events = _traced_events(m)
    chain = [e for e in events if e.get("cat") == "chain"]
    steps = [e for e in events if e.get("cat") == "step"][1:]  # after the prompt's
    layers = len(m.model.layers)
    assert len(chain) == len(steps) >= 3
    assert all(e["args"]["layers"] == layers for e in chain)
    assert not [e for e in events if e.get("cat") == "attn"]
