"""`edgemoe run` as a user drives it: the demo, streaming, --json, chat, interactive, sampling;
`calibrate`'s progress and `profile`'s default folder."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

import edgemoe
from edgemoe.sampling import Sampling

CLI = [sys.executable, "-m", "edgemoe.cli"]
CMD = [*CLI, "run"]


def _json_outputs(*args) -> list[str]:
    p = subprocess.run(CMD + [*args, "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["outputs"]


def test_demo_streams_and_summarises():
    p = subprocess.run(
        CMD + ["-p", "The function returns", "-n", "24"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    # 24 sampled tokens streamed after the prompt (their words vary with the kernel's rounding)
    assert p.stdout.startswith("The function returns") and len(p.stdout.strip()) > 30
    line = p.stderr.strip().splitlines()[-1]
    for part in ("prefill", "decode", "TTFT", "expert hits", "from flash", "peak", "floor"):
        assert part in line, line


def test_greedy_json_record_matches_the_api():
    outs = _json_outputs("-p", "In the beginning", "-n", "16", "--temperature", "0")
    m = edgemoe.load()
    try:
        assert outs == [m.generate("In the beginning", max_tokens=16, sampling=Sampling.greedy())]
    finally:
        m.close()


def test_chat_and_interactive_modes():
    p = subprocess.run(
        CMD + ["--chat", "-p", "Hello", "-n", "8"], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr
    p = subprocess.run(
        CMD + ["-n", "8"],
        input="The server\nThe table\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("decode") == 2  # one summary per prompt typed
    p = subprocess.run(
        CMD + ["--chat", "-n", "8"],
        input="Hi\nAgain\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and p.stderr.count("decode") == 2, p.stderr


def test_sampling_is_seeded():
    args = ["-p", "The", "-n", "16", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "50"]
    args += ["--min-p", "0.02", "--repeat-penalty", "1.2", "--repeat-last-n", "32", "--seed", "7"]
    assert _json_outputs(*args) == _json_outputs(*args)


def test_default_is_llama_cpp_sampling_not_greedy():
    """No sampling flags: llama.cpp's defaults, seeded draws repeat, other seeds differ."""
    base = ["-p", "The function returns", "-n", "24"]
    first = _json_outputs(*base, "--seed", "1")
    assert first == _json_outputs(*base, "--seed", "1")
    others = [_json_outputs(*base, "--seed", str(s)) for s in (2, 3)]
    assert any(o != first for o in others)
    greedy = _json_outputs(*base, "--temperature", "0")
    assert greedy == _json_outputs(*base, "--temperature", "0", "--seed", "5")  # seed unused


def test_calibrate_shows_progress_per_segment(tmp_path):
    model = tmp_path / "demo.emoe"
    shutil.copy(Path(edgemoe.__file__).parent / "demo" / "demo.emoe", model)
    text = tmp_path / "t.txt"
    text.write_text("The function returns a list of the values in the table. " * 40)
    controller, terminal = pty.openpty()  # tqdm draws its bar on a terminal only
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    try:
        p = subprocess.run(
            CLI
            + ["calibrate", str(model), "--text", str(text), "--segments", "3"]
            + ["--tokens", "16"],
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            timeout=300,
        )
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert p.returncode == 0, shown.decode(errors="replace")
    bar = shown.decode(errors="replace")
    assert "calibrate" in bar and "3/3" in bar, bar
    assert "stored the routing of 3 x 16 tokens" in p.stdout


def test_profile_writes_to_the_user_config_folder(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    p = subprocess.run(
        CLI
        + ["profile", "--name", "mybox", "--scratch", str(scratch), "--scratch-size", "16MiB"]
        + ["-q"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    written = tmp_path / "config" / "edgemoe" / "profiles" / "mybox.profile"
    assert written.is_file() and f"wrote {written}" in p.stderr
    shipped = Path(edgemoe.__file__).parent.parent / "devices" / "profiles"
    assert not (shipped / "mybox.profile").exists()  # never into the installed package
    d = subprocess.run(CLI + ["devices"], capture_output=True, text=True, timeout=120, env=env)
    assert d.returncode == 0 and any(ln.startswith("mybox ") for ln in d.stdout.splitlines())
    pl = subprocess.run(
        CLI + ["plan", "--device", "mybox", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert pl.returncode == 0, pl.stderr
    assert json.loads(pl.stdout)["device"] == "mybox"


def test_bound_on_a_profile_without_emulating_it():
    """--bound PROFILE: the summary carries the decode bound for the bytes the run moved on
    that profile, and the speed is not throttled to it (nothing is emulated)."""
    args = ["-p", "The function returns", "-n", "16", "--temperature", "0", "--json", "-q"]
    runs = {}
    for extra in ([], ["--bound", "rpi5-8gb-sd"], ["--device", "rpi5-8gb-sd"]):
        p = subprocess.run(CMD + args + extra, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        runs[" ".join(extra)] = json.loads(p.stdout)["summary"]
    assert runs[""]["bound_tok_s"] is None and runs[""]["bound_device"] is None
    bound = runs["--bound rpi5-8gb-sd"]
    emulated = runs["--device rpi5-8gb-sd"]
    name = emulated["device"]
    assert name and emulated["bound_device"] == name and emulated["bound_tok_s"] > 0
    assert bound["bound_device"] == name and bound["device"] is None
    assert bound["bound_tok_s"] > 0
    # the bytes it moved, re-rated on the profile's own rates, give the same bound; on a
    # disk twice as fast the flash part of its time halves (the bench's before/after rates)
    from devices.profile import load_profile
    from edgemoe.bound import rerated

    prof = load_profile("rpi5-8gb-sd")
    rates = dict(
        memory_bandwidth=prof.memory_bandwidth,
        flash_rand_read=prof.flash_rand_read,
        flash_seq_read=prof.flash_seq_read,
        read_bytes=bound["plan"]["largest_expert"],
    )
    mem, flash = bound["bound_memory_bytes_per_step"], bound["bound_flash_bytes_per_step"]
    assert mem > 0 and flash > 0
    assert rerated(mem, flash, **rates) == pytest.approx(bound["bound_tok_s"], rel=1e-9)
    fast = dict(rates, flash_rand_read=2 * rates["flash_rand_read"])
    fast["flash_seq_read"] = 2 * rates["flash_seq_read"]
    t = mem / rates["memory_bandwidth"]
    want = 1 / (t + (1 / bound["bound_tok_s"] - t) / 2)
    assert rerated(mem, flash, **fast) == pytest.approx(want, rel=1e-9)
