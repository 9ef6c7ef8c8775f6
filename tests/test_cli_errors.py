"""Bad input to `edgemoe run`: one line naming the problem and the fix, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from formats import constants as C
from formats.writer import EmoeWriter


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "run", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgemoe: error: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def model(tiny_emoe):
    return tiny_emoe("mixtral")


def test_missing_file(tmp_path):
    _one_line_error(_run(tmp_path / "nope.emoe", "-p", "hi"), "no such file", "edgemoe convert")


def test_truncated_file(model, tmp_path):
    bad = tmp_path / "cut.emoe"
    bad.write_bytes(model.read_bytes()[: os.path.getsize(model) // 2])
    _one_line_error(_run(bad, "-p", "hi"), "cut.emoe", "incomplete")


def test_corrupt_expert(model, tmp_path):
    from formats.reader import EmoeReader

    bad = tmp_path / "rot.emoe"
    data = bytearray(model.read_bytes())
    with EmoeReader(model) as r:
        for e in r.experts.values():  # rot every expert: whichever the prompt routes to is bad
            c = r.chunks[e.levels[0]]
            data[r.data_offset + c.offset + 7] ^= 0xFF
    bad.write_bytes(bytes(data))
    _one_line_error(
        _run(bad, "-p", "hello there", "-n", "2"), "checksum mismatch in expert", "corrupt"
    )


@pytest.mark.parametrize(
    "mem,needle", [("lots", "cannot read 'lots' as a size"), ("20MB", "smallest budget")]
)
def test_bad_budgets(model, mem, needle):
    _one_line_error(_run(model, "--mem", mem, "-p", "hi"), needle, "--mem")


def test_context_too_long(model):
    _one_line_error(_run(model, "--ctx", "100000", "-p", "hi"), "exceeds the model's 512 positions")
    _one_line_error(
        _run(model, "--ctx", "64", "-n", "80", "-p", "hi"), "exceed the context of 64", "--ctx"
    )


def test_empty_prompt(model):
    _one_line_error(_run(model, "-p", "   "), "prompt is empty")


def test_batch_larger_than_planned(model):
    _one_line_error(_run(model, "--batch", "1", "-p", "a", "-p", "b"), "batch of 1", "--batch 2")


def test_unknown_family(tmp_path):
    p = tmp_path / "odd.emoe"
    with EmoeWriter(p, {C.M_FAMILY: "gpt_oss", C.M_CONFIG: {"model_type": "gpt_oss"}}) as w:
        w.add_tensor("x", np.zeros(4, np.float32), C.CodecId.F32)
    _one_line_error(_run(p, "-p", "hi"), "'gpt_oss' is not one the runtime knows", "mixtral")


def test_debug_shows_the_traceback(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgemoe.cli",
            "--debug",
            "run",
            str(tmp_path / "x.emoe"),
            "-p",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode != 0 and "Traceback" in p.stderr
