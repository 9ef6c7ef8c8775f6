"""DeepSeek-V2/V3: routers against plain-torch transcriptions of transformers, YaRN, and
variants of the tiny models (yarn, q LoRA, rope layout, correction bias) against transformers."""

from __future__ import annotations

import math

import pytest
import torch

from edgemoe.models import deepseek_v2, deepseek_v3
from edgemoe.moe.router import group_limited_softmax_topk, sigmoid_group_topk
from formats.convert import ConvertOptions, convert, open_source
from tests.factories import make_tiny_hf, tiny_config
from tests.models.harness import greedy_hf, greedy_ours, load_ours
from tests.models.test_oracle import PROMPTS

# -- routers ---------------------------------------------------------------------------


def _mask_groups(scores, group_scores, n_group, topk_group, fill):
    """transformers' group masking, line for line (DeepseekV2/V3TopkRouter.forward)."""
    e = scores.shape[-1]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(-1, e)
    return scores.masked_fill(~score_mask.bool(), fill)


def ref_v2(logits, k, method, n_group, topk_group, scale):
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if method == "group_limited_greedy":
        e = scores.shape[-1]
        group_scores = scores.view(-1, n_group, e // n_group).max(dim=-1).values
        scores = _mask_groups(scores, group_scores, n_group, topk_group, 0.0)
    w, ids = torch.topk(scores, k=k, dim=-1, sorted=False)
    return ids, w * scale


def ref_v3(logits, bias, k, n_group, topk_group, norm, scale):
    scores = logits.sigmoid()
    choice = scores + bias
    e = scores.shape[-1]
    group_scores = choice.view(-1, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    choice = _mask_groups(choice, group_scores, n_group, topk_group, float("-inf"))
    ids = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    if norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, w * scale


def _same_routing(got, want):
    """Equal as sets of (expert, weight) per token: the order of the K slots is free."""
    (gi, gw), (wi, ww) = got, want
    go, wo = gi.argsort(dim=-1), wi.argsort(dim=-1)
    assert torch.equal(gi.gather(1, go), wi.gather(1, wo))
    # renormalising sums the K weights in slot order, so allow an ulp
    torch.testing.assert_close(gw.gather(1, go), ww.gather(1, wo), rtol=1e-6, atol=1e-7)


SHAPES = [  # T, E, G, topk_group, K
    (1, 8, 2, 1, 2),
    (7, 16, 4, 2, 3),
    (33, 64, 8, 3, 6),
    (5, 160, 8, 3, 6),  # DeepSeek-V2's 160 experts in 8 groups
    (4, 256, 8, 4, 8),  # DeepSeek-V3's 256 experts in 8 groups
]


@pytest.mark.parametrize("t,e,g,tg,k", SHAPES)
@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_group_limited_softmax_topk_matches_transformers(t, e, g, tg, k, method):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t * e + k))
    groups = (g, tg) if method == "group_limited_greedy" else (1, 1)
    got = group_limited_softmax_topk(logits, k, *groups, scale=16.0)
    assert got[0].shape == got[1].shape == (t, k) and got[1].dtype == torch.float32
    _same_routing(got, ref_v2(logits, k, method, g, tg, 16.0))


@pytest.mark.parametrize("t,e,g,tg,k", SHAPES)
@pytest.mark.parametrize("norm", [True, False])
def test_sigmoid_group_topk_matches_transformers(t, e, g, tg, k, norm):
    gen = torch.Generator().manual_seed(t * e + k)
    logits = torch.randn(t, e, generator=gen)
    bias = 0.3 * torch.randn(e, generator=gen)  # large enough to change which experts win
    got = sigmoid_group_topk(logits, bias, k, g, tg, normalize=norm, scale=2.5)
    assert got[0].shape == got[1].shape == (t, k) and got[1].dtype == torch.float32
    _same_routing(got, ref_v3(logits, bias, k, g, tg, norm, 2.5))


def test_correction_bias_steers_choice_not_weights():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0])
    ids, w = sigmoid_group_topk(logits, bias, 1, 1, 1, normalize=False)
    assert ids.tolist() == [[0]] and w.item() == pytest.approx(0.5)


def test_routers_refuse_uneven_groups():
    with pytest.raises(ValueError, match="groups"):
        group_limited_softmax_topk(torch.zeros(2, 10), 2, 4, 1)
    with pytest.raises(ValueError, match="groups"):
        sigmoid_group_topk(torch.zeros(2, 10), torch.zeros(10), 2, 4, 1, True)


# -- rope scaling ----------------------------------------------------------------------

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


@pytest.mark.parametrize(
    "family,params",
    [
        ("deepseek_v3", dict(YARN)),
        ("deepseek_v3", dict(YARN, factor=40.0, original_max_position_embeddings=4096)),
        ("deepseek_v2", dict(YARN, factor=40.0, mscale=0.707, mscale_all_dim=0.707)),
        ("deepseek_v2", dict(YARN, mscale=0.707, beta_fast=None, truncate=False)),
    ],
)
def test_yarn_tables_equal_transformers(family, params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tiny_config(family, rope_scaling=dict(params))
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    mod = deepseek_v3 if family == "deepseek_v3" else deepseek_v2
    rope = deepseek_v2.MLARope(mod.ModelArgs.from_dict(cfg.to_dict()), True, True)
    assert torch.equal(rope.inv_freq, want_inv)
    assert rope.cos_sin_scale == pytest.approx(want_factor, rel=1e-12)
    m_all = params["mscale_all_dim"]
    mscale = 0.1 * m_all * math.log(params["factor"]) + 1.0
    assert rope.softmax_scale == pytest.approx(24**-0.5 * mscale**2, rel=1e-12)


def test_classic_rope_scaling_key_is_read():
    """DeepSeek's own config.json says rope_scaling/type; transformers 5 saves rope_parameters."""
    base = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts_per_tok=2,
        vocab_size=256,
        intermediate_size=96,
        max_position_embeddings=163840,
    )
    classic = deepseek_v3.ModelArgs.from_dict(dict(base, rope_scaling=dict(YARN)))
    v5 = deepseek_v3.ModelArgs.from_dict(
        dict(base, rope_parameters=dict(YARN, rope_type="yarn", rope_theta=10000.0))
    )
    assert classic.rope_scaling["factor"] == v5.rope_scaling["factor"] == 4.0
    plain = deepseek_v3.ModelArgs.from_dict(
        dict(base, rope_parameters={"rope_type": "default", "rope_theta": 5e4})
    )
    assert plain.rope_scaling is None and plain.rope_theta == 5e4


@pytest.mark.parametrize("kind", ["linear", "dynamic", "llama3"])
def test_other_rope_scaling_is_refused(kind):
    cfg = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts_per_tok=2,
        vocab_size=256,
        intermediate_size=96,
        rope_scaling={"type": kind, "factor": 2.0},
    )
    with pytest.raises(ValueError, match=kind):
        deepseek_v2.ModelArgs.from_dict(cfg)


# -- whole models against transformers -------------------------------------------------


def _randomise_correction_bias(hf_dir, seed=1):
    """transformers initialises e_score_correction_bias to zeros; make it matter."""
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = 0.2 * torch.randn(t.shape, generator=gen)
    save_file(tensors, path, metadata={"format": "pt"})


VARIANTS = {
    "v3-yarn": ("deepseek_v3", dict(rope_scaling=dict(YARN))),
    "v2-yarn-mscale": (
        "deepseek_v2",
        dict(
            rope_scaling=dict(YARN, factor=8.0, original_max_position_embeddings=64, mscale=0.707)
        ),
    ),
    "v3-rotate-half-bias": (
        "deepseek_v3",
        dict(
            rope_interleave=False,
            n_group=4,
            topk_group=2,
            norm_topk_prob=False,
            routed_scaling_factor=2.5,
        ),
    ),
    "v2-greedy-qlora-bias": (
        "deepseek_v2",
        dict(topk_method="greedy", q_lora_rank=48, attention_bias=True, n_shared_experts=2),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_greedy_equals_transformers(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    hf = make_tiny_hf(family, tmp_path / "hf", **overrides)
    if family == "deepseek_v3":
        _randomise_correction_bias(hf)
    out = tmp_path / "m.emoe"
    with open_source(hf) as src:
        convert(src, out, ConvertOptions(dense="f32", experts="f32", progress=False))
    model = load_ours(out)
    for prompt in PROMPTS:
        want, want_logits = greedy_hf(hf, prompt, 32)
        got, got_logits = greedy_ours(model, [prompt], 32)
        assert got[0] == want, f"{variant}: tokens diverge"
        err = max((a[0] - b).abs().max().item() for a, b in zip(got_logits, want_logits))
        assert err < 1e-4, f"{variant}: max logit error {err:.2e}"


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_cache_holds_latents_not_per_head_keys(tiny_emoe, family):
    """MLA's point: a token costs kv_lora_rank + rope dims in the cache, whatever the heads,
    and the planner counts the same bytes."""

    from edgemoe import budget
    from edgemoe.facts import ModelFacts
    from formats.reader import EmoeReader

    model = load_ours(tiny_emoe(family))
    a = model.args
    cache = model.new_cache(2, 16)
    assert cache.k[1].shape == (2, 1, 16, a.kv_lora_rank + a.qk_rope_head_dim)
    assert cache.v[1].shape[-1] == 0
    expanded = a.num_attention_heads * (a.qk_head_dim + a.v_head_dim)
    assert a.kv_lora_rank + a.qk_rope_head_dim < expanded
    with EmoeReader(tiny_emoe(family)) as r:
        p = budget.plan(ModelFacts(r, a, torch.float32), None, ctx=16, batch=2)
    assert p.kv_cache == sum(t.numel() * t.element_size() for t in cache.k + cache.v)
