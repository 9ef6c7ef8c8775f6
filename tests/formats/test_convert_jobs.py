"""Experts encoded in worker processes give the same file, and their errors surface."""

from __future__ import annotations

from pathlib import Path

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


def _dead_pid() -> int:
    import os

    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tiny_hf, tmp_path):
    import subprocess

    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = tmp_path / f".m.emoe.{_dead_pid()}.tmp"
        busy = tmp_path / f".m.emoe.{live.pid}.tmp"
        other = tmp_path / f".n.emoe.{_dead_pid()}.tmp"
        for f in (stale, busy, other):
            f.write_bytes(b"x")
        with open_source(tiny_hf("olmoe")) as src:
            convert(src, tmp_path / "m.emoe", ConvertOptions(experts="int8", progress=False))
        assert not stale.exists() and busy.exists() and other.exists()
    finally:
        live.kill()


def test_workers_die_with_a_killed_converter(tmp_path):
    """An OOM kill of the converter must not leave its workers blocked forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
    from make_checkpoint import mixtral_config, write_checkpoint

    ckpt = tmp_path / "ckpt"
    cfg = mixtral_config(hidden=256, intermediate=512, layers=4, experts=8, vocab=512)
    write_checkpoint(ckpt, cfg, shard_bytes=64 << 20)
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgemoe.cli",
            "convert",
            str(ckpt),
            str(tmp_path / "o.emoe"),
            "--jobs",
            "2",
            "-q",
            "--experts",
            "mwq:2,3,4",
        ]
    )
    workers: list = []
    for _ in range(300):
        workers = psutil.Process(p.pid).children()
        if len([w for w in workers if "spawn_main" in " ".join(w.cmdline())]) == 2:
            break
        time.sleep(0.05)
    assert workers, "the converter started no workers"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    _, alive = psutil.wait_procs(
        [w for w in workers if "spawn_main" in " ".join(w.cmdline())], timeout=10
    )
    assert not alive
