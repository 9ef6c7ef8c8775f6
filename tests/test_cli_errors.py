"""Bad input to the `edgemoe` CLI: one line naming the problem and the fix, exit 2, no traceback.

Every case runs the real command in a subprocess, with real files (FIFOs, devices,
inconsistent models made by amending a converted one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from formats import constants as C
from formats.amend import amend
from formats.reader import EmoeReader
from formats.writer import EmoeWriter

CLI = [sys.executable, "-m", "edgemoe.cli"]


def _cli(*args, timeout=300, **kw):
    return subprocess.run(
        [*CLI, *(a if isinstance(a, bytes) else str(a) for a in args)],
        capture_output=True,
        text=not any(isinstance(a, bytes) for a in args),
        timeout=timeout,
        **kw,
    )


def _run(*args, **kw):
    return _cli("run", *args, **kw)


def _one_line_error(p, *needles):
    err = p.stderr if isinstance(p.stderr, str) else p.stderr.decode()
    assert p.returncode == 2, (p.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgemoe: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def model(tiny_emoe):
    return tiny_emoe("mixtral")


def _amended(model, tmp_path, name, config=None, **kw):
    """A copy of the model with config keys changed (None deletes) and blobs replaced."""
    p = tmp_path / name
    shutil.copy(model, p)
    meta = {}
    if config is not None:
        with EmoeReader(p) as r:
            cfg = dict(r.config)
        for k, v in config.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        meta[C.M_CONFIG] = cfg
    amend(p, metadata={**meta, **kw.pop("metadata", {})}, **kw)
    return p


# ---- the file


def test_missing_file(tmp_path):
    _one_line_error(_run(tmp_path / "nope.emoe", "-p", "hi"), "no such file", "edgemoe convert")


def test_truncated_file(model, tmp_path):
    bad = tmp_path / "cut.emoe"
    bad.write_bytes(model.read_bytes()[: os.path.getsize(model) // 2])
    _one_line_error(_run(bad, "-p", "hi"), "cut.emoe", "incomplete")


def test_corrupt_expert(model, tmp_path):
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


@pytest.mark.parametrize("command", ["run", "inspect", "verify"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder"])
def test_not_a_regular_file_is_refused_not_read(tmp_path, command, kind):
    if kind == "fifo":
        path = tmp_path / "pipe.emoe"
        os.mkfifo(path)
    elif kind == "folder":
        path = tmp_path
    else:
        path = kind
    args = [command, path] + (["-p", "hi"] if command == "run" else [])
    t = time.monotonic()
    line = _one_line_error(_cli(*args, timeout=120), str(path), "not a .emoe file")
    assert time.monotonic() - t < 120
    assert {"fifo": "FIFO", "/dev/zero": "character device", "folder": "folder"}[kind] in line


def test_convert_refuses_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "ckpt")
    _one_line_error(
        _cli("convert", tmp_path / "ckpt", tmp_path / "o.emoe", timeout=120),
        "neither a model folder nor a regular file",
    )


def test_unknown_family(tmp_path):
    p = tmp_path / "odd.emoe"
    with EmoeWriter(p, {C.M_FAMILY: "gpt_oss", C.M_CONFIG: {"model_type": "gpt_oss"}}) as w:
        w.add_tensor("x", np.zeros(4, np.float32), C.CodecId.F32)
    _one_line_error(_run(p, "-p", "hi"), "'gpt_oss' is not one the runtime knows", "mixtral")


# ---- a file whose checksums are fine but whose model is not: refused at open, named


@pytest.mark.parametrize(
    "config,needles",
    [
        ({"num_experts_per_tok": 9}, ["'num_experts_per_tok' is 9", "'num_local_experts' is 8"]),
        ({"hidden_size": 96}, ["model.embed_tokens.weight", "hidden_size=96", "re-convert"]),
        ({"num_local_experts": 6}, ["'num_local_experts' = 6", "layer 0 has 8 routed experts"]),
        ({"num_local_experts": "8"}, ["'num_local_experts' is '8'", "expected an integer"]),
        ({"num_attention_heads": None}, ["'num_attention_heads' is missing"]),
        ({"num_key_value_heads": 3}, ["not a multiple of 'num_key_value_heads' 3"]),
        ({"num_key_value_heads": 4}, ["self_attn.k_proj.weight", "num_key_value_heads=4"]),
        ({"num_hidden_layers": 10**12}, ["'num_hidden_layers' is 1000000000000"]),
        ({"rms_norm_eps": -1.0}, ["'rms_norm_eps' is -1.0"]),
    ],
)
def test_inconsistent_model_is_one_line_at_run(model, tmp_path, config, needles):
    bad = _amended(model, tmp_path, "bad.emoe", config)
    line = _one_line_error(_run(bad, "-p", "hi", "-n", "2"), *needles)
    assert "config" in line or "tensor" in line


def test_tokenizer_that_does_not_parse(model, tmp_path):
    bad = _amended(model, tmp_path, "tok.emoe", blobs={C.BLOB_TOKENIZER: b'{"model": "x"}'})
    _one_line_error(_run(bad, "-p", "hi", "-n", "2"), "tokenizer.json", "does not load")


def test_chat_template_that_does_not_compile(model, tmp_path):
    bad = _amended(model, tmp_path, "tpl.emoe", metadata={C.M_CHAT_TEMPLATE: "{% for m in %}"})
    _one_line_error(_run(bad, "--chat", "-p", "hi", "-n", "2"), "does not compile", "line 1")
    assert _run(bad, "-p", "hi", "-n", "2", "--seed", "1").returncode == 0  # plain prompts run


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(10**12) %}x{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    ],
)
def test_chat_template_that_never_ends(model, tmp_path, template):
    bad = _amended(model, tmp_path, "loop.emoe", metadata={C.M_CHAT_TEMPLATE: template})
    t = time.monotonic()
    line = _one_line_error(_run(bad, "--chat", "-p", "hi", "-n", "2", timeout=120), "chat template")
    assert time.monotonic() - t < 100
    assert "limit" in line
    # interactive chat too: the line is refused, nothing hangs
    p = _run(bad, "--chat", "-n", "2", input="hello\n", timeout=120)
    assert p.returncode == 2 and "chat template" in p.stderr and "Traceback" not in p.stderr


def test_the_same_checkpoint_does_not_convert(tiny_hf, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(tiny_hf("olmoe"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_experts_per_tok"] = 12
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.emoe"
    _one_line_error(_cli("convert", src, out, "-q"), "config.json", "'num_experts_per_tok' is 12")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_verify_names_a_model_problem(model, tmp_path):
    bad = _amended(model, tmp_path, "v.emoe", {"hidden_size": 96})
    p = _cli("verify", bad, "-q")
    assert p.returncode == 1 and "model.embed_tokens.weight" in p.stderr, p.stderr
    ok = _cli("verify", model, "-q")
    assert ok.returncode == 0 and "consistent" in ok.stdout


# ---- flags: argparse refuses them before anything loads


@pytest.mark.parametrize(
    "args,flag",
    [
        (["run", "--temperature", "nan"], "--temperature"),
        (["run", "--temperature", "inf"], "--temperature"),
        (["run", "--temperature", "-0.5"], "--temperature"),
        (["run", "--mem", "1" * 400], "--mem"),
        (["run", "--mem", "0"], "--mem"),
        (["run", "--ctx", "0"], "--ctx"),
        (["run", "--batch", "0"], "--batch"),
        (["run", "--max-tokens", "0"], "--max-tokens"),
        (["run", "--max-tokens", "-1"], "--max-tokens"),
        (["run", "--top-p", "0"], "--top-p"),
        (["run", "--top-p", "1.5"], "--top-p"),
        (["run", "--min-p", "-0.1"], "--min-p"),
        (["run", "--repeat-penalty", "0"], "--repeat-penalty"),
        (["run", "--top-k", "-3"], "--top-k"),
        (["run", "--seed", "-1"], "--seed"),
        (["run", "--threads", "0"], "--threads"),
        (["run", "--level", "0"], "--level"),
        (["convert", "x", "--jobs", "0"], "--jobs"),
        (["plan", "--device", "devbox", "--ctx", "0"], "--ctx"),
        (["plan", "--device", "devbox", "--mem", "1" * 400], "--mem"),
        (["calibrate", "m.emoe", "--text", "t", "--segments", "0"], "--segments"),
        (["profile", "--scratch-size", "nan"], "--scratch-size"),
    ],
)
def test_bad_flag_values(args, flag):
    t = time.monotonic()
    line = _one_line_error(_cli(*args, "-p", "hi") if args[0] == "run" else _cli(*args), flag)
    assert "--help" in line
    assert time.monotonic() - t < 60  # refused by argparse, before torch or a model loads


@pytest.mark.parametrize(
    "mem,needle", [("lots", "cannot read 'lots' as a size"), ("20MB", "smallest budget")]
)
def test_bad_budgets(model, mem, needle):
    _one_line_error(_run(model, "--mem", mem, "-p", "hi"), needle, "--mem")


def test_context_too_long(model):
    _one_line_error(_run(model, "--ctx", "100000", "-p", "hi"), "--ctx 100000", "512 positions")
    line = _one_line_error(
        _run(model, "--ctx", "64", "-n", "80", "-p", "hi"), "exceed the context of 64", "--ctx"
    )
    assert "max_tokens" not in line and "--max-tokens 80" in line  # the API's names, as flags


def test_empty_prompt(model):
    _one_line_error(_run(model, "-p", "   "), "prompt is empty")


def test_batch_larger_than_planned(model):
    _one_line_error(_run(model, "--batch", "1", "-p", "a", "-p", "b"), "--batch 2")


# ---- text that is not UTF-8: replaced, with a warning


def test_prompt_bytes_that_are_not_utf8(model):
    p = _run(model, "-p", b"caf\xe9 \xff\xfe", "-n", "2", "--seed", "1")
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "--prompt is not valid UTF-8" in err
    assert p.stdout.startswith("caf\ufffd \ufffd\ufffd".encode())


def test_stdin_bytes_that_are_not_utf8(model):
    p = subprocess.run(
        [*CLI, "run", str(model), "-n", "2", "--seed", "1"],
        input=b"hi \xff there\n",
        capture_output=True,
        timeout=300,
    )
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "input line is not valid UTF-8" in err
    assert err.count("decode") == 1  # the line was generated from


# ---- polish


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_anywhere(tmp_path, where):
    rest = ["run", str(tmp_path / "x.emoe"), "-p", "x"]
    args = ["--debug", *rest] if where == "before" else [*rest, "--debug"]
    p = _cli(*args)
    assert p.returncode != 0 and "Traceback" in p.stderr and "no such file" in p.stderr


def test_version():
    import edgemoe

    p = _cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"edgemoe {edgemoe.__version__}"


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "MODEL"],
        ["inspect", "MODEL", "--json"],
        ["verify", "MODEL", "-q"],
        ["devices"],
        ["run", "MODEL", "-p", "hi", "-n", "2"],
        ["--help"],
    ],
)
def test_a_closed_pipe_ends_quietly(model, args):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as `| head -1` after one line
    try:
        p = subprocess.run(
            [*CLI, *(str(model) if a == "MODEL" else a for a in args)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)
    assert p.stderr.strip() == "", p.stderr
    # 128 + SIGPIPE, as a shell reports it; argparse's --help ignores the closed pipe itself
    assert p.returncode == (0 if args == ["--help"] else 141)


def test_inspect_into_head(model):
    p = subprocess.run(
        f"{sys.executable} -m edgemoe.cli inspect {model} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 1 and p.stderr == "", p.stderr


def test_api_names_become_flags_once_for_every_error():
    from edgemoe.cli_args import FLAGS, flag_message
    from formats.errors import EmoeError

    class Bad(EmoeError):
        pass

    e = Bad("ctx=9000 and max_tokens=5 exceed mem=1GB", "raise mem or lower max_tokens")
    e.param = "mem"
    assert flag_message(e) == (
        "--ctx 9000 and --max-tokens 5 exceed --mem 1GB; raise --mem or lower --max-tokens"
    )
    e = Bad("the prompt is empty", "give a non-empty prompt")
    e.param = "prompt"
    assert flag_message(e) == "the prompt is empty; give a non-empty --prompt"
    # no param (or a foreign one): the message as it is, still one line
    assert flag_message(ValueError("mem=3\nctx")) == "mem=3 ctx"
    e = Bad("top_k=3 is odd", "see help(edgemoe.load)")
    e.param = 7
    assert flag_message(e) == "top_k=3 is odd; see help(edgemoe.load)"
    assert all(f.startswith("--") for f in FLAGS.values())
