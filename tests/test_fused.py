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


@pytest.mark.parametrize("dtype,tol", [("f32", 1e-4), ("bf16", 2e-2)])
def test_fused_step_follows_the_layer_path(tiny_emoe, monkeypatch, dtype, tol):
    path = tiny_emoe("mixtral", experts="int8", dense="int8")
    monkeypatch.setenv("EDGEMOE_FUSED", "0")
    ref = edgemoe.load(path, ctx=128, dtype=dtype)
    monkeypatch.setenv("EDGEMOE_FUSED", "1")
    fast = edgemoe.load(path, ctx=128, dtype=dtype)
    assert all(layer.fused is None for layer in ref.model.layers)
    assert all(layer.fused is not None for layer in fast.model.layers)
    calls = []
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
    got = _teacher_forced(fast, ids, follow)
    assert calls and all(n == 2 for n in calls), "every decode step's two experts in one call"
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
