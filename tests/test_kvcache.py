"""The KV cache's packed passes: how rows are grouped into attention calls, and that a packed
pass (rows back to back, each attending its own keys) gives the padded pass's hidden states."""

from __future__ import annotations

import math

import pytest
import torch

from edgemoe.kvcache import KVCache, Packed, plan_runs
from edgemoe.models.base import attend_runs
from tests.factories import FAMILIES
from tests.models.harness import load_ours


def spans(runs):
    return [(r.t0, r.t1, r.lo, r.hi, r.length) for r in runs]


def test_decode_rows_share_a_call_only_when_it_saves():
    slots, starts, counts = [0, 1, 2, 5], [10, 300, 12, 40], [1, 1, 1, 1]
    # a cheap call: every row alone, each reading its own keys only
    runs = plan_runs(slots, starts, counts, run_cost=50)
    assert spans(runs) == [(0, 1, 0, 1, 11), (1, 2, 1, 2, 301), (2, 3, 2, 3, 13), (3, 4, 5, 6, 41)]
    assert all(r.mask is None for r in runs)
    # a dear call: neighbouring slots share one (padded to the longest, masked); slot 5 is
    # not next to slot 2, so it keeps its own (a view of the cache, never a copy)
    runs = plan_runs(slots, starts, counts, run_cost=1000)
    assert spans(runs) == [(0, 3, 0, 3, 301), (3, 4, 5, 6, 41)]
    assert runs[0].mask[:, 0, 0].sum(dim=1).tolist() == [11, 301, 13]
    # similar lengths: one call, no mask needed
    runs = plan_runs([3, 4], [20, 20], [1, 1], run_cost=50)
    assert spans(runs) == [(0, 2, 3, 5, 21)] and runs[0].mask is None


def test_a_prompt_is_a_call_of_its_own_with_causal_masking():
    runs = plan_runs([0, 1, 2], [7, 0, 9], [1, 5, 1], run_cost=1e9)
    assert spans(runs) == [(0, 1, 0, 1, 8), (1, 6, 1, 2, 5), (6, 7, 2, 3, 10)]
    assert runs[1].causal and runs[1].mask is None
    assert torch.equal(runs[1].bool_mask()[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    # a prompt after kept tokens (prefix reuse): query j sees the 4 kept keys and 0..j
    runs = plan_runs([1], [4], [3], run_cost=1e9)
    assert not runs[0].causal
    assert runs[0].mask[0, 0].sum(dim=1).tolist() == [5, 6, 7]


def reference_attention(q, kc, vc, slots, starts, counts, scale):
    """Each row alone: its queries against its slot's keys 0..start+j (a few lines of torch)."""
    outs, t = [], 0
    g = q.shape[1] // kc.shape[1]
    for slot, a, c in zip(slots, starts, counts):
        qr = q[0, :, t : t + c]  # [H, c, Dh]
        k = kc[slot, :, : a + c].repeat_interleave(g, dim=0)  # [H, L, Dh]
        v = vc[slot, :, : a + c].repeat_interleave(g, dim=0)
        scores = qr @ k.transpose(1, 2) * scale  # [H, c, L]
        seen = torch.arange(a + c)[None, :] <= a + torch.arange(c)[:, None]
        p = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        outs.append((p @ v).transpose(0, 1).reshape(c, -1))  # [c, H * Dv]
        t += c
    return torch.cat(outs)[None]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 48), (8, 8, 16), (6, 1, 64)])
@pytest.mark.parametrize("run_cost", [0, 1e9])
def test_attend_runs_equals_each_row_alone(dtype, tol, heads, kv_heads, dim, run_cost):
    torch.manual_seed(0)
    slots, starts, counts = [0, 1, 2, 3, 5, 6], [3, 40, 0, 17, 9, 60], [1, 1, 6, 1, 4, 1]
    kc = torch.randn(7, kv_heads, 80, dim, dtype=dtype)
    vc = torch.randn(7, kv_heads, 80, dim, dtype=dtype)
    q = torch.randn(1, heads, sum(counts), dim, dtype=dtype)
    runs = plan_runs(slots, starts, counts, run_cost)
    scale = 1 / math.sqrt(dim)
    got = attend_runs(q, kc, vc, runs, scale)
    want = reference_attention(q.float(), kc.float(), vc.float(), slots, starts, counts, scale)
    assert got.shape == want.shape
    assert (got.float() - want).abs().max() < tol


def padded_pass(model, cache, rows):
    """rows: (slot, tokens); one right-padded forward; each row's hidden states."""
    width = max(len(t) for _, t in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.int64)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (_, t) in enumerate(rows):
        tokens[i, : len(t)] = torch.tensor(t)
        valid[i, : len(t)] = True
    h = model.forward(tokens, cache, valid, torch.tensor([s for s, _ in rows]))
    return [h[i, : len(t)] for i, (_, t) in enumerate(rows)]


def packed_pass(model, cache, rows):
    tokens = torch.tensor([[x for _, t in rows for x in t]])
    layout = Packed(tuple(s for s, _ in rows), tuple(len(t) for _, t in rows))
    h = model.forward(tokens, cache, None, layout)[0]
    return list(h.split([len(t) for _, t in rows]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("run_cost", [0, 1e9])
def test_a_packed_pass_equals_the_padded_pass(tiny_emoe, family, run_cost):
    """Prompts, a prompt continuing kept tokens, and decode rows in scattered slots: the packed
    pass gives every real token the padded pass's hidden state."""
    model = load_ours(tiny_emoe(family))
    caches = [model.new_cache(6, 64), model.new_cache(6, 64)]
    caches[1].run_cost = run_cost  # every decode row alone, or neighbours always together
    first = [(0, [5, 17, 42, 99, 3, 150, 77]), (2, [200, 11]), (3, [9, 8, 7, 6]), (5, [1] * 20)]
    later = [(0, [31]), (1, [4, 5, 6, 7, 8]), (2, [64]), (3, [100, 101, 102]), (5, [2])]
    then = [(0, [12]), (1, [13]), (2, [14]), (3, [15]), (5, [16])]
    for rows in (first, later, then):
        want = padded_pass(model, caches[0], rows)
        got = packed_pass(model, caches[1], rows)
        for (slot, _), a, b in zip(rows, want, got):
            assert (a - b).abs().max() < 1e-4, f"{family}: slot {slot}"
    assert torch.equal(caches[0].lengths, caches[1].lengths)
    for layer in range(len(caches[0].k)):
        for slot, n in enumerate(caches[0].lengths.tolist()):  # slot 4 stays empty
            a, b = caches[0].k[layer][slot, :, :n], caches[1].k[layer][slot, :, :n]
            assert torch.allclose(a, b, atol=1e-4)


def test_a_packed_pass_past_the_cache_is_refused():
    cache = KVCache(1, 2, 8, 1, 4, 4, torch.float32)
    cache.lengths[1] = 6
    with pytest.raises(ValueError, match="context of 9 tokens exceeds the cache's 8"):
        cache.begin(torch.ones(1, 4, dtype=torch.bool), Packed((0, 1), (1, 3)))
    with pytest.raises(ValueError, match="packed pass"):
        cache.begin(torch.ones(1, 3, dtype=torch.bool), Packed((0, 1), (1, 3)))
