"""GGUFSource against llama.cpp-layout GGUFs of tiny seeded models, all six families.

The oracle is the HF folder the GGUF was written from: its safetensors, its
config as transformers builds it, and its tokenizer.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file

from formats.convert.gguf import GGUFSource
from formats.errors import CheckpointError, MissingTensor, UnsupportedArchitecture
from tests.formats.gguf_fixtures import (
    CHAT_TEMPLATE,
    train_tiny_bpe_tokenizer,
    train_tiny_spm_tokenizer,
    write_gguf_like_llamacpp,
)

VOCAB = 384  # byte-level BPE needs 256 byte tokens + specials + merges
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=0,
)
MLA = dict(
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=4,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=8,
    v_head_dim=8,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    num_key_value_heads=4,
)  # DeepSeek configs have kv heads == heads; llama.cpp needs it
FAMILIES = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=4,
        shared_expert_intermediate_size=24,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    ),  # llama.cpp hard-codes it
    "olmoe": dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(MLA, q_lora_rank=None, topk_method="group_limited_greedy"),
    "deepseek_v3": dict(MLA, q_lora_rank=24),
}
# tokenizer.ggml.pre each family's real tokenizer gets from llama.cpp (byte-level GPT-2
# regex for olmo and, here, deepseek_v2)
PRE = {
    "mixtral": "llama-bpe",
    "qwen2_moe": "qwen2",
    "qwen3_moe": "qwen2",
    "olmoe": "gpt-2",
    "deepseek_v2": "gpt-2",
    "deepseek_v3": "deepseek-v3",
}
SHARED_KEYS = [
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "num_experts_per_tok",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "num_key_value_heads",
]
CONFIG_KEYS = {
    "mixtral": ["intermediate_size", "num_local_experts"],
    "qwen2_moe": [
        "intermediate_size",
        "num_experts",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "qkv_bias",
        "norm_topk_prob",
    ],
    "qwen3_moe": [
        "intermediate_size",
        "num_experts",
        "moe_intermediate_size",
        "norm_topk_prob",
        "attention_bias",
    ],
    "olmoe": ["intermediate_size", "num_experts", "norm_topk_prob"],
    "deepseek_v2": [
        "intermediate_size",
        "n_routed_experts",
        "n_shared_experts",
        "moe_intermediate_size",
        "first_k_dense_replace",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_rope_head_dim",
        "qk_nope_head_dim",
        "v_head_dim",
        "n_group",
        "topk_group",
        "routed_scaling_factor",
        "norm_topk_prob",
        "topk_method",
    ],
}
CONFIG_KEYS["deepseek_v3"] = CONFIG_KEYS["deepseek_v2"][:-1]
SENTENCES = [
    "Hello world, it's 2024!",
    "  many   spaces\n\nnew lines\tand tabs",
    "<|im_start|>user\nThe Software is provided as is.<|im_end|>",
    "Ünïcödé 日本語 テスト 1234567 ---=== I've 'RE",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """build(family, spm=False) -> saved HF folder with a tokenizer; built once per module."""
    cache: dict[tuple[str, bool], Path] = {}

    def build(family: str, spm: bool = False) -> Path:
        if (family, spm) not in cache:
            d = tmp_path_factory.mktemp(family + ("_spm" if spm else ""))
            if spm:
                train_tiny_spm_tokenizer(d, VOCAB)
            else:
                train_tiny_bpe_tokenizer(d, VOCAB, PRE[family])
            ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0} if spm else {}
            cfg = transformers.AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **ids})
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
            cache[(family, spm)] = d
        return cache[(family, spm)]

    return build


def _gguf(tiny, family, tmp_path, **kw) -> Path:
    return write_gguf_like_llamacpp(
        tiny(family, kw.pop("spm", False)), tmp_path / f"{family}.gguf", **kw
    )


def _saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _assert_same_tensors(src: GGUFSource, hf_dir: Path, atol_frac: float = 0.0) -> None:
    ref = load_file(str(hf_dir / "model.safetensors"))
    infos = src.tensors()
    assert set(infos) == set(ref)
    for name, want in ref.items():
        got = src.load(name)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        assert infos[name].shape == got.shape == want.shape, name
        if atol_frac == 0.0:
            assert np.array_equal(got, want), name
        else:
            assert np.abs(got - want).max() <= atol_frac * np.abs(want).max() + 1e-7, name


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_gives_the_hf_tensors_bit_exact(tiny, tmp_path, family):
    with GGUFSource(_gguf(tiny, family, tmp_path)) as src:
        assert src.kind == "gguf" and src.config["model_type"] == family
        _assert_same_tensors(src, tiny(family))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("experts", ["f32", "mwq:2,3,4"])
def test_emoe_from_gguf_equals_emoe_from_safetensors(tiny, tmp_path, family, experts):
    """The same weights through either converter give identical .emoe tensors and expert bytes."""
    from formats.convert import ConvertOptions, convert, open_source
    from formats.reader import EmoeReader

    opts = ConvertOptions(dense="f32", experts=experts, progress=False)
    outs = []
    for src_path in (tiny(family), _gguf(tiny, family, tmp_path)):
        with open_source(src_path) as src:
            outs.append(convert(src, tmp_path / f"{src.kind}.emoe", opts))
    with EmoeReader(outs[0]) as a, EmoeReader(outs[1]) as b:
        assert (
            a.metadata["edgemoe.source"] == "safetensors" and b.metadata["edgemoe.source"] == "gguf"
        )
        assert set(a.tensors) == set(b.tensors) and set(a.experts) == set(b.experts)
        for name in a.tensors:
            assert np.array_equal(a.tensor(name), b.tensor(name)), name
        for key, e in a.experts.items():
            for ca, cb in zip(e.levels, b.experts[key].levels, strict=True):
                assert a.read_chunk(ca) == b.read_chunk(cb), key


@pytest.mark.parametrize("family", FAMILIES)
def test_rebuilt_config_builds_the_same_model(tiny, tmp_path, family):
    with GGUFSource(_gguf(tiny, family, tmp_path)) as src:
        cfg = {k: v for k, v in src.config.items() if k != "model_type"}
    new = transformers.AutoConfig.for_model(family, **cfg)
    orig = transformers.AutoConfig.from_pretrained(tiny(family))
    for key in SHARED_KEYS + CONFIG_KEYS[family]:
        assert getattr(new, key) == getattr(orig, key), key
    assert new.rope_parameters["rope_theta"] == orig.rope_parameters["rope_theta"]
    # transformers keeps experts fused in memory; compare what save_pretrained writes
    transformers.AutoModelForCausalLM.from_config(new).save_pretrained(tmp_path / "re")
    assert _saved_shapes(tmp_path / "re") == _saved_shapes(tiny(family))


def test_yarn_rope_scaling_round_trips(tiny, tmp_path):
    hf_dir = tmp_path / "yarn"
    shutil.copytree(tiny("deepseek_v3"), hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    }
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    path = write_gguf_like_llamacpp(hf_dir, tmp_path / "yarn.gguf")
    with GGUFSource(path) as src:
        cfg = {k: v for k, v in src.config.items() if k != "model_type"}
    new = transformers.AutoConfig.for_model("deepseek_v3", **cfg)
    orig = transformers.AutoConfig.from_pretrained(hf_dir)
    for key, want in orig.rope_parameters.items():
        assert new.rope_parameters[key] == pytest.approx(want), key


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_and_chat_template_round_trip(tiny, tmp_path, family):
    with GGUFSource(_gguf(tiny, family, tmp_path)) as src:
        assert src.tokenizer_warning is None
        assert src.chat_template == CHAT_TEMPLATE
        rebuilt = tokenizers.Tokenizer.from_str(src.tokenizer_json.decode())
    orig = tokenizers.Tokenizer.from_file(str(tiny(family) / "tokenizer.json"))
    for text in SENTENCES:
        assert rebuilt.encode(text).ids == orig.encode(text).ids, text
        ids = orig.encode(text).ids
        assert rebuilt.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize(
    "pre,digits",
    [
        ("deepseek-llm", ["12345678"]),
        ("deepseek-coder", list("12345678")),
        ("deepseek-v3", ["123", "456", "78"]),
        ("llama-bpe", ["123", "456", "78"]),
        ("qwen2", list("12345678")),
        ("default", [" 12345678"]),
        ("kimi-k2", None),
    ],
)
def test_every_known_pre_tokenizer_builds(tiny, tmp_path, pre, digits):
    with GGUFSource(_gguf(tiny, "olmoe", tmp_path, pre=pre)) as src:
        rebuilt = tokenizers.Tokenizer.from_str(src.tokenizer_json.decode())
        assert (src.tokenizer_warning is None) == (digits is not None)
    rebuilt.encode(SENTENCES[3])
    if digits is not None:  # how llama.cpp's regex list for this name splits digits
        pieces = [p for p, _ in rebuilt.pre_tokenizer.pre_tokenize_str("ab 12345678")]
        assert [p.replace("\u0120", " ") for p in pieces if p.strip("\u0120").isdigit()] == digits


def test_sentencepiece_vocabulary_is_rebuilt(tiny, tmp_path):
    with GGUFSource(_gguf(tiny, "mixtral", tmp_path, spm=True)) as src:
        rebuilt = tokenizers.Tokenizer.from_str(src.tokenizer_json.decode())
        assert src.config["bos_token_id"] == 1
    orig = tokenizers.Tokenizer.from_file(str(tiny("mixtral", spm=True) / "tokenizer.json"))
    for text in SENTENCES[:2] + SENTENCES[3:]:  # byte fallback covers the Unicode line
        assert rebuilt.encode(text).ids == orig.encode(text).ids, text
        assert rebuilt.encode(text).ids[0] == 1  # BOS, as tokenizer.ggml.add_bos_token says


@pytest.mark.parametrize(
    "family,dtype", [(f, "Q8_0") for f in FAMILIES] + [("mixtral", "BF16"), ("deepseek_v3", "F16")]
)
def test_quantized_gguf_loads_within_tolerance(tiny, tmp_path, family, dtype):
    with GGUFSource(_gguf(tiny, family, tmp_path, dtype=dtype)) as src:
        assert dtype in {t.dtype for t in src.tensors().values()}
        # Q8_0: 8-bit blocks; BF16: 8-bit mantissa; both well within 1% of max |w|
        _assert_same_tensors(src, tiny(family), atol_frac=0.01)


@pytest.mark.parametrize(
    "family,kw",
    [("mixtral", {"fuse": True}), ("qwen2_moe", {"fuse": True}), ("mixtral", {"per_expert": True})],
)
def test_fused_and_per_expert_layouts(tiny, tmp_path, family, kw):
    path = _gguf(tiny, family, tmp_path, **kw)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("blk.0.attn_qkv.weight" in names) == ("fuse" in kw)
    assert ("blk.0.ffn_gate.3.weight" in names) == ("per_expert" in kw)
    with GGUFSource(path) as src:
        _assert_same_tensors(src, tiny(family))


def test_split_gguf_is_read_from_any_shard(tiny, tmp_path):
    first = _gguf(tiny, "deepseek_v3", tmp_path, split_max_tensors=10)
    shards = sorted(tmp_path.glob("deepseek_v3-0*-of-*.gguf"))
    assert first == shards[0] and len(shards) > 2
    with GGUFSource(shards[1]) as src:
        _assert_same_tensors(src, tiny("deepseek_v3"))
        assert src.config["model_type"] == "deepseek_v3"
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[-1].name} .* is missing"):
        GGUFSource(first)


def test_loading_one_expert_reads_only_its_slice(tiny, tmp_path, monkeypatch):
    seen = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda d, q: seen.append(d.nbytes) or real(d, q))
    with GGUFSource(_gguf(tiny, "qwen3_moe", tmp_path)) as src:
        src.load("model.layers.1.mlp.experts.2.up_proj.weight")
    assert seen == [16 * 32 * 4]  # one [16, 32] F32 expert, not the [4, 16, 32] stack


@pytest.mark.parametrize("dtype", ["F32", "Q8_0"])
def test_load_rows_matches_load(tiny, tmp_path, monkeypatch, dtype):
    seen = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda d, q: seen.append(d.shape) or real(d, q))
    with GGUFSource(_gguf(tiny, "mixtral", tmp_path, dtype=dtype, fuse=True)) as src:
        for name, (a, b) in {
            "model.embed_tokens.weight": (5, 37),
            "model.layers.0.self_attn.v_proj.weight": (3, 9),  # fused qkv
            "model.layers.0.self_attn.q_proj.weight": (4, 20),  # permuted
            "model.layers.1.block_sparse_moe.experts.2.w3.weight": (0, 7),
            "model.norm.weight": (2, 30),
        }.items():
            seen.clear()
            rows = src.load_rows(name, a, b)
            assert np.array_equal(rows, src.load(name)[a:b]), name
            if name == "model.embed_tokens.weight":
                assert seen[0][0] == b - a  # only the asked rows were dequantized


def test_unknown_architecture_is_refused(tiny, tmp_path):
    with pytest.raises(UnsupportedArchitecture, match="'gpt2'"):
        GGUFSource(_gguf(tiny, "qwen2_moe", tmp_path, arch="gpt2"))


def test_dense_llama_is_refused(tiny, tmp_path):
    with pytest.raises(UnsupportedArchitecture, match="without experts"):
        GGUFSource(_gguf(tiny, "mixtral", tmp_path, drop_keys=("llama.expert_count",)))


def test_missing_metadata_is_named(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="'qwen2moe.embedding_length' is missing"):
        GGUFSource(_gguf(tiny, "qwen2_moe", tmp_path, drop_keys=("qwen2moe.embedding_length",)))


@pytest.mark.parametrize("keep", [0.5, 0.999, 40 / 1e6, 3 / 1e6])
def test_truncated_gguf_is_refused(tiny, tmp_path, keep):
    data = _gguf(tiny, "olmoe", tmp_path).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(3, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="truncated|not a GGUF"):
        GGUFSource(cut)


def test_not_a_gguf_is_refused(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF"):
        GGUFSource(tmp_path / "x.gguf")


@pytest.mark.parametrize(
    "family,drop,hf_name",
    [
        ("qwen2_moe", "blk.1.ffn_down_exps.weight", "model.layers.1.mlp.experts.0.down_proj"),
        ("deepseek_v3", "blk.1.ffn_up_shexp.weight", "model.layers.1.mlp.shared_experts.up_proj"),
        ("deepseek_v2", "blk.0.attn_v_b.weight", "kv_b_proj"),
        ("mixtral", "blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj"),
    ],
)
def test_missing_tensor_is_named(tiny, tmp_path, family, drop, hf_name):
    with pytest.raises(MissingTensor, match=hf_name):
        GGUFSource(_gguf(tiny, family, tmp_path, drop=(drop,)))


def test_loading_an_unknown_name_is_missing_tensor(tiny, tmp_path):
    with GGUFSource(_gguf(tiny, "olmoe", tmp_path)) as src:
        with pytest.raises(MissingTensor, match="no tensor 'model.layers.9"):
            src.load("model.layers.9.mlp.gate.weight")


def test_unknown_gguf_tensor_is_refused(tiny, tmp_path):
    extra = {"blk.0.mystery.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(CheckpointError, match="blk.0.mystery.weight"):
        GGUFSource(_gguf(tiny, "olmoe", tmp_path, extra=extra))


# -- llama.cpp's own converter (opt-in) ---------------------------------------------------

# Runs convert_hf_to_gguf.py unchanged but for two functions: the tiny tokenizer has
# no known pre-tokenizer hash, so the family's pre name is given; the folders have no
# tokenizer.model, so the SentencePiece path is skipped (test_gguf_spm_tokenizer.py covers it).
RUNNER = """
import os, runpy, sys
script, pre = sys.argv[1], sys.argv[2]
here = os.path.dirname(os.path.abspath(script))
sys.argv = [script] + sys.argv[3:]
sys.path[:0] = [here, os.path.join(here, "gguf-py")]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
def no_sentencepiece(self, *args, **kwargs):
    raise FileNotFoundError("no tokenizer.model")
base.TextModel._set_vocab_sentencepiece = no_sentencepiece
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", list(FAMILIES) + ["mixtral_spm"])
def test_real_llamacpp_converter_output_loads(tiny, tmp_path, family):
    script = os.environ.get("EDGEMOE_LLAMACPP_CONVERT")
    if not script:
        pytest.skip(
            "set EDGEMOE_LLAMACPP_CONVERT to llama.cpp's convert_hf_to_gguf.py "
            "(tools/llamacpp_convert.sh CACHE_DIR prints it)"
        )
    spm = family == "mixtral_spm"
    family = family.removesuffix("_spm")
    hf_dir, out = tiny(family, spm), tmp_path / f"{family}.gguf"
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            RUNNER,
            script,
            PRE[family],
            str(hf_dir),
            "--outtype",
            "f32",
            "--outfile",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with GGUFSource(out) as src:
        assert src.config["model_type"] == family
        _assert_same_tensors(src, hf_dir)
        rebuilt = tokenizers.Tokenizer.from_str(src.tokenizer_json.decode())
        assert json.loads(src.tokenizer_json)["model"]["type"] == "BPE"
    orig = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in SENTENCES[:2]:
        assert rebuilt.encode(text).ids == orig.encode(text).ids, text
