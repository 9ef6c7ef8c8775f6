"""Hugging Face folder -> .emoe for every family, exactness, codecs, and refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from formats import constants as C
from formats.convert import ConvertOptions, convert, open_source
from formats.convert.families import family_of
from formats.errors import (
    CheckpointError,
    CodecError,
    MissingTensor,
    ShapeMismatch,
    UnsupportedArchitecture,
)
from formats.reader import EmoeReader

EXACT = ConvertOptions(dense="f32", experts="f32", progress=False)


def _convert(src_dir, out, opts=EXACT):
    with open_source(src_dir) as src:
        return convert(src, out, opts)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".emoe", ".move")))


def test_f32_is_exact(tiny_hf, family, tmp_path):
    d = tiny_hf(family)
    out = _convert(d, tmp_path / "m.emoe")
    ref = load_file(str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    with EmoeReader(out) as r:
        assert r.family == family and r.config == cfg
        assert set(r.tensors) == set(ref)
        for name, arr in ref.items():
            np.testing.assert_array_equal(r.tensor(name), arr, err_msg=name)
        fam = family_of(cfg)
        assert len(r.experts) == len(fam.moe_layers(cfg)) * fam.num_experts(cfg)
        e = r.expert(fam.moe_layers(cfg)[-1], 3)
        np.testing.assert_array_equal(
            r.tensor(e.tensors["down"]), ref[fam.expert_name(e.layer, 3, "down")]
        )
        assert all(err is None for _, err in r.verify())


def test_default_codecs_nest_and_route_small_tensors_f32(tiny_hf, family, tmp_path):
    d = tiny_hf(family)
    out = _convert(d, tmp_path / "m.emoe", ConvertOptions(progress=False))
    ref = load_file(str(d / "model.safetensors"))
    with EmoeReader(out) as r:
        for name, t in r.tensors.items():
            if len(t.shape) == 1 or name.endswith((".gate.weight", "e_score_correction_bias")):
                assert t.codec.name == "f32", name
                np.testing.assert_array_equal(r.tensor(name), ref[name])
        e = next(iter(r.experts.values()))
        for role, name in e.tensors.items():
            t = r.tensors[name]
            assert t.codec.name == "mwq" and t.levels == 3 and t.params["bits"] == [2, 3, 4]
            errs = [np.linalg.norm(r.tensor(name, k) - ref[name]) for k in (1, 2, 3)]
            assert errs[0] > errs[1] > errs[2], (role, errs)
        # level k of an expert is one contiguous read, and a prefix of level k+1
        off1, n1 = r.expert_span(e.layer, e.expert, 1)
        off3, n3 = r.expert_span(e.layer, e.expert, 3)
        assert off1 == off3 and n1 < n3 and off1 % C.ALIGNMENT == 0
        assert r.tensors["model.embed_tokens.weight"].codec.name == "int8"  # the default dense


@pytest.mark.parametrize("experts", ["bitplane:2,4,8", "int4@32", "int8", "bf16", "mwq:5,6,7,8"])
def test_expert_codec_choices(tiny_hf, tmp_path, experts):
    d = tiny_hf("qwen2_moe")
    out = _convert(
        d, tmp_path / "m.emoe", ConvertOptions(dense="int8", experts=experts, progress=False)
    )
    ref = load_file(str(d / "model.safetensors"))
    with EmoeReader(out) as r:
        name = "model.layers.1.mlp.experts.5.up_proj.weight"
        t = r.tensors[name]
        assert t.codec.name == experts.split(":")[0].split("@")[0]
        rel = np.linalg.norm(r.tensor(name) - ref[name]) / np.linalg.norm(ref[name])
        assert rel < 0.1, rel
        assert r.tensors["model.layers.0.self_attn.q_proj.weight"].codec.name == "int8"


def test_sharded_bf16_checkpoint(tiny_hf, tmp_path):
    import torch
    import transformers

    src = tiny_hf("mixtral")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    out = _convert(
        sharded, tmp_path / "m.emoe", ConvertOptions(dense="bf16", experts="bf16", progress=False)
    )
    from safetensors.torch import load_file as load_pt

    saved = {}
    for shard in sharded.glob("*.safetensors"):
        saved.update(load_pt(shard))
    with EmoeReader(out) as r:
        assert set(r.tensors) == set(saved)
        for name, p in saved.items():
            assert p.dtype == torch.bfloat16
            np.testing.assert_array_equal(r.tensor(name), p.float().numpy(), err_msg=name)
            assert r.tensors[name].src_dtype == "BF16"


def _copy(d, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(d, dst)
    return dst


def test_unsupported_architecture(tiny_hf, tmp_path):
    d = _copy(tiny_hf("mixtral"), tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="'llama'"):
        _convert(d, tmp_path / "m.emoe")
    assert _leftovers(tmp_path) == []


def test_missing_expert_tensor_names_it(tiny_hf, tmp_path):
    d = _copy(tiny_hf("olmoe"), tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.6.gate_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MissingTensor, match="expert 6 of layer 2"):
        _convert(d, tmp_path / "m.emoe")
    assert _leftovers(tmp_path) == []


def test_missing_shard(tiny_hf, tmp_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf("qwen3_moe"))
    d = tmp_path / "sharded"
    model.save_pretrained(d, max_shard_size="100KB")
    victim = sorted(d.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MissingTensor, match=victim.name):
        _convert(d, tmp_path / "m.emoe")


def test_shape_mismatch(tiny_hf, tmp_path):
    d = _copy(tiny_hf("deepseek_v3"), tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] = 40
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatch, match="experts.0.gate_proj"):
        _convert(d, tmp_path / "m.emoe")


def test_truncated_safetensors(tiny_hf, tmp_path):
    d = _copy(tiny_hf("mixtral"), tmp_path)
    p = d / "model.safetensors"
    os.truncate(p, p.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="safetensors"):
        _convert(d, tmp_path / "m.emoe")


def test_failed_conversion_keeps_existing_file(tiny_hf, tmp_path):
    out = _convert(tiny_hf("mixtral"), tmp_path / "m.emoe")
    before = out.read_bytes()
    with pytest.raises(CodecError):
        _convert(tiny_hf("mixtral"), out, ConvertOptions(experts="mwq:9,10", progress=False))
    assert out.read_bytes() == before
    assert _leftovers(tmp_path) == ["m.emoe"]


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", *map(str, args)], capture_output=True, text=True, **kw
    )


@pytest.mark.slow
def test_cli_convert_inspect_verify(tiny_hf, tmp_path):
    d = tiny_hf("qwen2_moe")
    out = tmp_path / "q.emoe"
    p = _cli("convert", d, out, "-q")
    assert p.returncode == 0, p.stderr
    p = _cli("convert", d, out, "-q")
    assert p.returncode == 2 and "already exists" in p.stderr and "--force" in p.stderr
    p = _cli("convert", d, tmp_path / "x.emoe", "--experts", "zip4")
    assert p.returncode == 2 and "unknown codec 'zip4'" in p.stderr and "mwq" in p.stderr
    p = _cli("inspect", out)
    assert p.returncode == 0 and "qwen2_moe" in p.stdout and "mwq (experts)" in p.stdout
    s = json.loads(_cli("inspect", out, "--json").stdout)
    assert s["experts"] == 3 * 8 and s["codecs"]["mwq (experts)"]["bits"] == [2, 3, 4]
    assert _cli("verify", out, "-q").returncode == 0

    with EmoeReader(out) as r:
        e = r.expert(2, 5)
        chunk = r.chunks[e.levels[1]]
        pos = r.data_offset + chunk.offset + chunk.length // 2
    with open(out, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
    p = _cli("verify", out, "-q")
    assert p.returncode == 1
    assert "checksum mismatch in expert 5 of layer 2, level 2" in p.stderr
    assert "Traceback" not in p.stderr
