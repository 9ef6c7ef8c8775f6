"""`edgemoe eval`: its perplexity is the one transformers computes on the same weights, its bits
per weight are the codec's, and bad inputs are named errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from edgemoe.cli import main
from edgemoe.engine import BadRequest
from edgemoe.eval import EvalError, NoText, evaluate_file, perplexity
from edgemoe.tokenizer import Tokenizer
from formats.reader import EmoeReader

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.\n\n"
    "In the beginning was the word, and the function returns a string of the name.\n"
) * 3


def _hf_perplexity(folder, ids: list[int], ctx: int) -> tuple[float, int]:
    """The same windows as edgemoe eval (ctx + 1 tokens, overlapping by one), in transformers."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    hf.eval()
    stream = torch.tensor(ids)
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, ctx):
        w = stream[s : s + ctx + 1]
        with torch.no_grad():
            logits = hf(w[None, :-1]).logits[0].float()
        nll += float(F.cross_entropy(logits, w[1:], reduction="sum"))
        n += len(w) - 1
    return math.exp(nll / n), n


def test_perplexity_is_what_transformers_computes(tiny_hf, tiny_emoe):
    """f32 weights: edgemoe's windows (one partial, batched with padding) give transformers'
    perplexity, and f32 experts are 32 bits per weight."""
    path = tiny_emoe("qwen3_moe")
    with EmoeReader(path) as r:
        ids = Tokenizer(r).encode(TEXT)
    ctx = 24
    assert (len(ids) - 1) % ctx, "the test wants a partial last window"
    got = perplexity(path, TEXT, ctx=ctx, dtype="f32")
    want, n = _hf_perplexity(tiny_hf("qwen3_moe", vocab_size=384), ids, ctx)
    assert got.tokens == n == len(ids) - 1
    assert got.windows == math.ceil(n / ctx)
    assert got.perplexity == pytest.approx(want, rel=1e-4)
    assert got.avg_bits == 32.0
    assert got.expert_codecs == ("f32",)


def test_max_tokens_scores_the_first_tokens(tiny_emoe):
    path = tiny_emoe("qwen3_moe")
    r = perplexity(path, TEXT, ctx=16, max_tokens=20, dtype="f32")
    assert r.tokens == 20 and r.windows == 2


def test_bits_follow_the_level(tiny_emoe):
    """mwq 2->3->4: each level costs one more bit plane plus its scales (a 16-bit scale per
    group of 64 or fewer weights in this tiny model: over a quarter of a bit)."""
    path = tiny_emoe("qwen3_moe", experts="mwq:2,3,4")
    runs = [perplexity(path, TEXT, ctx=32, level=lv, dtype="f32") for lv in (1, 2, 3)]
    bits = [r.avg_bits for r in runs]
    assert 2.0 < bits[0] < 3.0
    assert all(1.0 < b - a < 1.5 for a, b in zip(bits, bits[1:]))
    assert all(r.expert_codecs == ("mwq",) for r in runs)
    dequantized = perplexity(path, TEXT, ctx=32, level=1, dtype="f32", fused=False)
    # the stored-planes mwq kernel (AVX-512 VNNI) rounds activations to INT8 per 32 values, as
    # llama.cpp's Q8_0 matmul does: 0.016% of perplexity here; torch's int4 path is exact
    assert dequantized.perplexity == pytest.approx(runs[0].perplexity, rel=1e-3)
    assert dequantized.avg_bits == runs[0].avg_bits
    full = perplexity(tiny_emoe("qwen3_moe"), TEXT, ctx=32, dtype="f32").perplexity
    gaps = [abs(r.perplexity - full) for r in runs]
    assert gaps[2] < gaps[0]  # more bits, closer to the full-precision model


def test_bit_policy_levels_are_counted(tiny_emoe):
    """A policy's own answers give the bits: fixed:1 is level 1, gate mixes the levels."""
    path = tiny_emoe("qwen3_moe", experts="mwq:2,3,4")
    one = perplexity(path, TEXT, ctx=32, level=1, dtype="f32")
    fixed = perplexity(path, TEXT, ctx=32, bits="fixed:1", dtype="f32")
    assert fixed.perplexity == pytest.approx(one.perplexity, rel=1e-6)
    assert fixed.avg_bits == one.avg_bits and fixed.level_share == {1: 1.0}
    assert fixed.nominal_bits == 2.0
    top = perplexity(path, TEXT, ctx=32, dtype="f32")
    gate = perplexity(path, TEXT, ctx=32, bits="gate", dtype="f32")
    assert one.avg_bits < gate.avg_bits < top.avg_bits
    assert len(gate.level_share) > 1 and sum(gate.level_share.values()) == pytest.approx(1.0)


def test_cli_prints_a_json_record(tiny_emoe, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    rc = main(
        ["eval", str(tiny_emoe("qwen3_moe")), "--text", str(text), "--ctx", "32", "--json", "-q"]
    )
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["tokens"] > 0 and rec["perplexity"] > 1.0 and rec["avg_bits"] == 32.0


@pytest.mark.parametrize(
    "make, args, msg",
    [
        (None, [], "no such file"),
        ("", [], "is empty"),
        ("   \n\n", [], "is empty"),
        (TEXT, ["--level", "2"], "--level"),
        (TEXT, ["--ctx", "100000"], "--ctx"),
        (TEXT, ["--bits-policy", "nosuch"], "unknown bit policy"),
        (TEXT, ["--bits-policy", "fixed:1", "--level", "1"], "--bits-policy"),
    ],
    ids=["missing", "empty", "blank", "level", "ctx", "policy", "both"],
)
def test_cli_bad_inputs_are_named(tiny_emoe, tmp_path, capsys, make, args, msg):
    text = tmp_path / "t.txt"
    if make is not None:
        text.write_text(make)
    rc = main(["eval", str(tiny_emoe("qwen3_moe")), "--text", str(text), "-q", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("edgemoe: error:") and msg in err


def test_python_errors_are_named(tiny_emoe, tmp_path):
    path = tiny_emoe("qwen3_moe")
    with pytest.raises(NoText, match="no such file"):
        evaluate_file(path, tmp_path / "missing.txt")
    with pytest.raises(NoText, match="at least 2"):
        perplexity(path, "a")
    with pytest.raises(BadRequest, match="levels 1..1") as e:
        perplexity(path, TEXT, level=3)
    assert e.value.param == "level"
    with pytest.raises(EvalError, match="ctx=0"):
        perplexity(path, TEXT, ctx=0)
    with pytest.raises(EvalError, match="max_tokens=0"):
        perplexity(path, TEXT, max_tokens=0)
