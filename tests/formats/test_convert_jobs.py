"""Experts encoded in worker processes give the same file, and their errors surface."""

from __future__ import annotations

import pytest

from formats.convert import ConvertOptions, convert, open_source
from formats.errors import CodecError


def test_parallel_conversion_writes_the_same_bytes(tiny_hf, tmp_path):
    hf = tiny_hf("qwen2_moe")
    files = []
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}.emoe"
        with open_source(hf) as src:
            convert(src, out, ConvertOptions(experts="mwq:2,3,4@16", progress=False, jobs=jobs))
        files.append(out.read_bytes())
    assert files[0] == files[1]


def test_a_worker_error_names_the_tensor_and_leaves_nothing(tiny_hf, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    hf = tiny_hf("mixtral")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf.iterdir():
        if f.suffix == ".safetensors":
            t = load_file(f)
            name = next(n for n in t if "experts.3" in n and "layers.1." in n)
            t[name] = t[name].copy()
            t[name][0, 0] = np.nan
            save_file(t, bad / f.name, metadata={"format": "pt"})
        else:
            (bad / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out" / "bad.emoe"
    with open_source(bad) as src, pytest.raises(CodecError, match="NaN") as e:
        convert(src, out, ConvertOptions(experts="int8", progress=False, jobs=2))
    assert "experts.3" in str(e.value) or "NaN" in str(e.value)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
