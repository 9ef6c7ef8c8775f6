"""The model validator: config against tensors for every family, on files and checkpoints.

Each family's converted tiny model must pass; each way its config or tensors can
contradict each other must be a named error naming the key or tensor. Tensor-level
cases run on the header's shape table (what check_file sees); a few go through
real files (EmoeReader(check_model=True)) and real conversions.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats.errors as E
from formats import constants as C
from formats.amend import amend
from formats.convert import ConvertOptions, convert, open_source
from formats.reader import EmoeReader
from formats.validate import RULES, check_file, check_model, check_tokenizer

FAMILIES = tuple(RULES)


def _parts(path):
    with EmoeReader(path) as r:
        shapes = {n: t.shape for n, t in r.tensors.items()}
        experts = {k: dict(e.tensors) for k, e in r.experts.items()}
        return r.family, dict(r.config), shapes, experts


@pytest.fixture(scope="module", params=FAMILIES)
def parts(request, tiny_emoe):
    return _parts(tiny_emoe(request.param))


DEL = "<deleted>"  # a config change that removes the key (None sets it to null)


def _check(parts, config=None, drop=(), reshape=None, experts=None):
    family, cfg, shapes, table = copy.deepcopy(parts)
    for k, v in (config or {}).items():
        if v is DEL:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    for name in drop:
        del shapes[name]
    shapes.update(reshape or {})
    return check_model(family, cfg, shapes, table if experts is None else experts)


def test_every_family_passes(parts):
    d = _check(parts)
    assert d.E == 8 and d.K == 2 and d.D == 64


def test_the_demo_passes_without_reading_a_chunk():
    from pathlib import Path

    import edgemoe

    demo = Path(edgemoe.__file__).parent / "demo" / "demo.emoe"
    r = EmoeReader(demo)
    r.read_chunk = None  # the check is header-only: any chunk read would fail
    t = time.perf_counter()
    check_file(r)
    assert time.perf_counter() - t < 0.05
    r.close()


# (config change, error, words the message must have), for every family
COMMON = [
    ({"num_experts_per_tok": 9}, E.BadConfig, ["'num_experts_per_tok' is 9"]),
    ({"num_experts_per_tok": 0}, E.BadConfig, ["'num_experts_per_tok' is 0", "at least 1"]),
    ({"hidden_size": 96}, E.ShapeMismatch, ["model.embed_tokens.weight", "hidden_size=96"]),
    ({"vocab_size": 385}, E.ShapeMismatch, ["model.embed_tokens.weight", "vocab_size=385"]),
    ({"num_hidden_layers": 4}, E.BadConfig, ["'num_hidden_layers' is 4", "layer 3"]),
    ({"num_hidden_layers": 10**15}, E.BadConfig, ["'num_hidden_layers' is"]),
    ({"num_hidden_layers": DEL}, E.BadConfig, ["'num_hidden_layers' is missing"]),
    ({"num_attention_heads": "4"}, E.BadConfig, ["'num_attention_heads' is '4'", "integer"]),
    ({"num_attention_heads": True}, E.BadConfig, ["'num_attention_heads' is True"]),
    ({"rms_norm_eps": float("nan")}, E.BadConfig, ["'rms_norm_eps'", "finite"]),
    ({"rope_theta": 0}, E.BadConfig, ["'rope_theta' is 0"]),
    ({"tie_word_embeddings": "no"}, E.BadConfig, ["'tie_word_embeddings'"]),
    ({"eos_token_id": {"a": 1}}, E.BadConfig, ["'eos_token_id'"]),
    ({"max_position_embeddings": 0}, E.BadConfig, ["'max_position_embeddings' is 0"]),
]
EXPERTS_KEY = {f: r.experts_keys[0] for f, r in RULES.items()}
WIDTH_KEY = {f: r.width_key for f, r in RULES.items()}
PER_FAMILY = {
    "mixtral": [
        ({"num_key_value_heads": 3}, E.BadConfig, ["not a multiple of 'num_key_value_heads' 3"]),
        ({"num_key_value_heads": 4}, E.ShapeMismatch, ["k_proj.weight", "num_key_value_heads=4"]),
        ({"num_key_value_heads": DEL}, E.BadConfig, ["'num_key_value_heads' is missing"]),
        ({"head_dim": 8}, E.ShapeMismatch, ["self_attn.q_proj.weight", "head_dim=8"]),
        ({"num_attention_heads": 128}, E.BadConfig, ["exceeds 'hidden_size'"]),
    ],
    "qwen2_moe": [
        ({"decoder_sparse_step": 2}, E.ExpertTableMismatch, ["layer 0", "dense layer"]),
        ({"decoder_sparse_step": 0}, E.BadConfig, ["'decoder_sparse_step' is 0"]),
        ({"mlp_only_layers": ["1"]}, E.BadConfig, ["'mlp_only_layers'", "list of integers"]),
        ({"shared_expert_intermediate_size": 40}, E.ShapeMismatch, ["shared_expert.gate_proj"]),
        ({"num_key_value_heads": 8}, E.BadConfig, ["not a multiple"]),
    ],
    "qwen3_moe": [
        ({"head_dim": 32}, E.ShapeMismatch, ["self_attn.q_proj.weight", "head_dim=32"]),
        ({"num_experts": 4}, E.ExpertTableMismatch, ["'num_experts' = 4", "8 routed experts"]),
        ({"num_local_experts": DEL, "num_experts": DEL}, E.BadConfig, ["'num_experts'"]),
        ({"mlp_only_layers": [1]}, E.ExpertTableMismatch, ["layer 1", "dense layer"]),
        ({"head_dim": 15}, E.BadConfig, ["head dimension 15 is odd"]),
    ],
    "olmoe": [
        ({"clip_qkv": -1}, E.BadConfig, ["'clip_qkv' is -1"]),
        ({"num_key_value_heads": 2}, E.ShapeMismatch, ["k_proj.weight"]),
        ({"intermediate_size": 16}, E.ShapeMismatch, ["experts.0", "intermediate_size=16"]),
    ],
    "deepseek_v2": [
        ({"first_k_dense_replace": 0}, E.ExpertTableMismatch, ["layer 0 has 0 routed experts"]),
        ({"kv_lora_rank": 16}, E.ShapeMismatch, ["kv_a_proj_with_mqa", "kv_lora_rank=16"]),
        ({"n_group": 3}, E.BadConfig, ["do not split into 'n_group' 3"]),
        ({"topk_group": 4}, E.BadConfig, ["'topk_group' 4 exceeds 'n_group' 2"]),
        ({"topk_method": "bogus"}, E.BadConfig, ["'topk_method' is 'bogus'"]),
        ({"mlp_bias": True}, E.BadConfig, ["'mlp_bias' is True"]),
        ({"qk_rope_head_dim": 7}, E.BadConfig, ["'qk_rope_head_dim' is 7"]),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, E.BadConfig, ["'dynamic'"]),
        ({"q_lora_rank": 48}, E.MissingTensor, ["self_attn.q_a_proj.weight"]),
        ({"n_shared_experts": 2}, E.ShapeMismatch, ["shared_experts.gate_proj"]),
        ({"n_routed_experts": DEL}, E.ExpertTableMismatch, ["= 64"]),  # the model's default
    ],
    "deepseek_v3": [
        ({"q_lora_rank": None}, E.MissingTensor, ["self_attn.q_proj.weight"]),
        ({"first_k_dense_replace": DEL}, E.ExpertTableMismatch, ["dense layer"]),  # default 3
        ({"n_group": 16}, E.BadConfig, ["'n_group' 16"]),
        ({"rope_scaling": {"type": "yarn", "factor": "x"}}, E.BadConfig, ["'factor' is 'x'"]),
        ({"v_head_dim": 8}, E.ShapeMismatch, ["kv_b_proj", "v_head_dim=8"]),
    ],
}


def _cases():
    for fam in FAMILIES:
        width = WIDTH_KEY[fam]
        fam_cases = COMMON + [
            ({EXPERTS_KEY[fam]: 6}, E.ExpertTableMismatch, [f"{EXPERTS_KEY[fam]!r} = 6"]),
            ({EXPERTS_KEY[fam]: "8"}, E.BadConfig, [f"{EXPERTS_KEY[fam]!r} is '8'"]),
            ({width: 0}, (E.BadConfig, E.ShapeMismatch), [width]),
        ]
        for change, err, needles in fam_cases + PER_FAMILY[fam]:
            yield pytest.param(fam, change, err, needles, id=f"{fam}-{change}")


@pytest.mark.parametrize("family,change,err,needles", list(_cases()))
def test_config_contradictions_are_named(tiny_emoe, family, change, err, needles):
    with pytest.raises(err) as info:
        _check(_parts(tiny_emoe(family)), config=change)
    msg = str(info.value)
    for n in needles:
        assert n in msg, (n, msg)
    assert ";" in msg and "convert" in msg.split(";")[-1]  # the fix


@pytest.mark.parametrize(
    "family,name",
    [
        ("mixtral", "model.layers.1.block_sparse_moe.gate.weight"),
        ("qwen2_moe", "model.layers.2.mlp.shared_expert_gate.weight"),
        ("qwen3_moe", "model.layers.0.self_attn.k_norm.weight"),
        ("olmoe", "model.norm.weight"),
        ("deepseek_v2", "model.layers.0.mlp.down_proj.weight"),
        ("deepseek_v3", "model.layers.2.mlp.gate.e_score_correction_bias"),
    ],
)
def test_a_missing_tensor_is_named(tiny_emoe, family, name):
    parts = _parts(tiny_emoe(family))
    with pytest.raises(E.MissingTensor, match=name.replace(".", r"\.")):
        _check(parts, drop=[name])
    shape = list(parts[2][name])
    shape[-1] += 1
    with pytest.raises(E.ShapeMismatch, match=name.replace(".", r"\.")):
        _check(parts, reshape={name: tuple(shape)})


def test_optional_tensors_are_checked_when_present(tiny_emoe):
    parts = _parts(tiny_emoe("qwen2_moe"))
    _check(parts, drop=["lm_head.weight"])  # tied to the embedding then
    with pytest.raises(E.ShapeMismatch, match="lm_head"):
        _check(parts, reshape={"lm_head.weight": (384, 32)})
    with pytest.raises(E.ShapeMismatch, match="q_proj.bias"):
        _check(parts, reshape={"model.layers.0.self_attn.q_proj.bias": (32,)})


def test_expert_tables_that_disagree(tiny_emoe):
    fam, cfg, shapes, table = _parts(tiny_emoe("olmoe"))
    fewer = {k: v for k, v in table.items() if k != (1, 5)}
    with pytest.raises(E.ExpertTableMismatch, match="layer 1 has 7 routed experts, expert 5"):
        check_model(fam, cfg, shapes, fewer)
    extra = {**table, (7, 0): table[(0, 0)]}
    with pytest.raises(E.ExpertTableMismatch, match="layer 7 .* beyond 'num_hidden_layers'"):
        check_model(fam, cfg, shapes, extra)
    gate = table[(0, 3)]["gate"]
    with pytest.raises(E.ShapeMismatch, match="expert 3 of layer 0, gate"):
        check_model(fam, cfg, {**shapes, gate: (16, 64)}, table)


# ---- real files: the runtime's open


def _amended(src, tmp_path, config=None, **kw):
    p = tmp_path / "m.emoe"
    shutil.copy(src, p)
    meta = kw.pop("metadata", {})
    if config:
        with EmoeReader(p) as r:
            meta[C.M_CONFIG] = {**r.config, **config}
    amend(p, metadata=meta, **kw)
    return p


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_reader_checks_the_model_on_request(tiny_emoe, tmp_path):
    bad = _amended(tiny_emoe("mixtral"), tmp_path, {"num_experts_per_tok": 9})
    EmoeReader(bad).close()  # the container is fine: tools (inspect) still open it
    before = _open_fds()
    with pytest.raises(E.BadConfig, match="num_experts_per_tok"):
        EmoeReader(bad, check_model=True)
    assert _open_fds() == before  # the descriptor is closed on refusal
    with EmoeReader(tiny_emoe("mixtral"), check_model=True) as r:
        assert r.family == "mixtral"


@pytest.mark.parametrize(
    "metadata,needle",
    [
        ({C.M_GENERATION_CONFIG: [1, 2]}, "generation config is a list"),
        ({C.M_GENERATION_CONFIG: {"eos_token_id": "x"}}, "'eos_token_id' is 'x'"),
        ({C.M_CHAT_TEMPLATE: 7}, "chat template is a int"),
    ],
)
def test_metadata_types(tiny_emoe, tmp_path, metadata, needle):
    bad = _amended(tiny_emoe("olmoe"), tmp_path, metadata=metadata)
    with pytest.raises(E.BadConfig, match=needle):
        EmoeReader(bad, check_model=True)


# ---- checkpoints: refused before anything is written


def _checkpoint(tiny_hf, tmp_path, family="qwen3_moe"):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_hf(family), d)
    return d


def _convert_refused(d, tmp_path, err, needle):
    out = tmp_path / "out" / "m.emoe"
    out.parent.mkdir()
    with open_source(d) as src, pytest.raises(err, match=needle):
        convert(src, out, ConvertOptions(progress=False))
    assert os.listdir(out.parent) == []


def test_convert_refuses_a_config_that_contradicts_the_tensors(tiny_hf, tmp_path):
    d = _checkpoint(tiny_hf, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    _convert_refused(d, tmp_path, E.ShapeMismatch, "k_proj.weight.*config.json implies")


def test_convert_refuses_a_tokenizer_that_does_not_parse(tiny_hf, tmp_path):
    d = _checkpoint(tiny_hf, tmp_path)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nope"}}')
    _convert_refused(d, tmp_path, E.BadTokenizer, "does not load")


def test_convert_refuses_a_chat_template_that_does_not_compile(tiny_hf, tmp_path):
    d = _checkpoint(tiny_hf, tmp_path)
    (d / "chat_template.jinja").write_text("{% if messages %}no endif")
    _convert_refused(d, tmp_path, E.BadChatTemplate, "does not compile")


def test_tokenizer_ids_must_fit_the_vocabulary(tmp_path):
    from tests.formats.gguf_fixtures import train_tiny_bpe_tokenizer

    train_tiny_bpe_tokenizer(tmp_path, 384)
    blob = (tmp_path / "tokenizer.json").read_bytes()
    assert check_tokenizer(blob, 384).get_vocab_size() <= 384
    with pytest.raises(E.BadTokenizer, match="'vocab_size' is 100"):
        check_tokenizer(blob, 100)
    with pytest.raises(E.BadTokenizer, match="not UTF-8"):
        check_tokenizer(b"\xff\xfe{}", 384)


# ---- fuzz: any config value gives a named error or passes, never a crash or a hang

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-3, 300), max_size=4),
    st.dictionaries(st.sampled_from(["type", "factor", "rope_type"]), st.integers(), max_size=2),
)


@settings(
    max_examples=int(os.environ.get("EDGEMOE_FUZZ_EXAMPLES", "300")),
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_config_values(tiny_emoe, data):
    family = data.draw(st.sampled_from(FAMILIES))
    parts = _parts(tiny_emoe(family))
    keys = sorted(set(parts[1]) | set(RULES[family].keys))
    change = {k: data.draw(_values) for k in data.draw(st.lists(st.sampled_from(keys), max_size=3))}
    try:
        _check(parts, config=change)
    except E.EmoeError:
        pass
