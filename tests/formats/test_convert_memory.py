"""Conversion streams: a checkpoint more than twice the memory cap converts under it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgemoe.units import Bytes
from formats.reader import EmoeReader

sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
from make_checkpoint import mixtral_config, write_checkpoint  # noqa: E402

CAP = Bytes.parse("448MiB")


@pytest.mark.slow
@pytest.mark.cgroup
def test_convert_checkpoint_larger_than_the_cap(memory_cap, tmp_path):
    ckpt = tmp_path / "big"
    cfg = mixtral_config(hidden=1024, intermediate=2048, layers=8, experts=8, vocab=32000)
    total = Bytes(write_checkpoint(ckpt, cfg, shard_bytes=200 << 20))
    assert total > 2 * CAP, "the checkpoint must not fit in the cap"
    out = tmp_path / "big.emoe"
    shards = sorted(ckpt.glob("*.safetensors"))
    r = memory_cap(
        [
            sys.executable,
            "-m",
            "edgemoe.cli",
            "convert",
            str(ckpt),
            str(out),
            "-q",
            "--experts",
            "int4",
            "--dense",
            "bf16",  # the dense weights kept exactly (bf16 source): checked below
        ],
        CAP,
        evict=shards,
        timeout=900,
    )
    assert r.ok, f"rc={r.returncode} oom={r.oom_killed} peak={r.peak}\n{r.stderr[-2000:]}"
    assert r.peak <= CAP and r.bytes_read >= total // 2
    print(
        f"\nconverted {total} under a {CAP} cap: peak {r.peak}, read {r.bytes_read}, {r.wall_s:.1f} s"
    )

    from safetensors import safe_open

    with EmoeReader(out) as rd, safe_open(str(shards[-1]), "pt") as f:
        assert len(rd.experts) == 8 * 8
        name = "lm_head.weight"
        if name in f.keys():
            np.testing.assert_array_equal(rd.tensor(name), f.get_tensor(name).float().numpy())
        for name in list(f.keys())[:6]:
            ref = f.get_tensor(name).float().numpy()
            got = rd.tensor(name)
            assert np.linalg.norm(got - ref) <= 0.12 * np.linalg.norm(ref), name
        assert all(err is None for _, err in rd.verify())
