"""Every family against transformers on the same weights: greedy tokens equal, logits within 1e-4 (f32)."""

from __future__ import annotations

import importlib.util

import pytest

from formats.convert import ConvertOptions, convert, open_source
from tests.models.harness import greedy_hf, greedy_ours, load_ours

FAMILIES = [
    f
    for f in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
    if importlib.util.find_spec(f"edgemoe.models.{f}") is not None
]
N_NEW = 64
PROMPTS = [[5, 17, 42, 99, 3, 150, 77], [200, 11], [9, 8, 7, 6, 5, 4, 3, 2, 1, 250, 31, 64]]


@pytest.fixture(scope="module")
def exact_emoe(tmp_path_factory):
    cache = {}

    def get(hf_dir, experts="f32"):
        key = (str(hf_dir), experts)
        if key not in cache:
            out = tmp_path_factory.mktemp("emoe") / "m.emoe"
            with open_source(hf_dir) as src:
                convert(src, out, ConvertOptions(dense="f32", experts=experts, progress=False))
            cache[key] = out
        return cache[key]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers(tiny_hf, exact_emoe, family):
    hf = tiny_hf(family)
    model = load_ours(exact_emoe(hf))
    for prompt in PROMPTS:
        want, want_logits = greedy_hf(hf, prompt, N_NEW)
        got, got_logits = greedy_ours(model, [prompt], N_NEW)
        assert got[0] == want, (
            f"{family}: tokens diverge at {next(i for i, (a, b) in enumerate(zip(got[0], want)) if a != b)}"
        )
        err = max((a[0] - b).abs().max().item() for a, b in zip(got_logits, want_logits))
        assert err < 1e-4, f"{family}: max logit error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_prompt_alone(tiny_hf, exact_emoe, family):
    model = load_ours(exact_emoe(tiny_hf(family)))
    batched, _ = greedy_ours(model, PROMPTS, 24)
    for prompt, got in zip(PROMPTS, batched):
        alone, _ = greedy_ours(model, [prompt], 24)
        assert got == alone[0]
