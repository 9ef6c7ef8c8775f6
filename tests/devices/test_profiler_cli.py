"""`edgemoe profile`, `edgemoe devices` and `edgemoe run --device` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import edgemoe
from devices.profile import known_devices, parse_profile
from edgemoe.engine import RunStats

CLI = [sys.executable, "-m", "edgemoe.cli"]


def test_profile_writes_a_valid_profile_and_cleans_up(tmp_path):
    out = tmp_path / "here.profile"
    p = subprocess.run(
        CLI
        + [
            "profile",
            "--name",
            "here",
            "--out",
            str(out),
            "--scratch",
            str(tmp_path),
            "--scratch-size",
            "64MiB",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    prof = parse_profile(out.read_text(), str(out))
    assert (
        prof.name == "here"
        and prof.cores >= 1
        and prof.flash_seq_read > 0
        and prof.compute_factor > 0
    )
    assert "expert_ms.int8" in out.read_text()
    assert sorted(os.listdir(tmp_path)) == ["here.profile"]  # the scratch file is gone


def test_profile_ctrl_c_removes_the_scratch_file(tmp_path):
    proc = subprocess.Popen(
        CLI
        + [
            "profile",
            "--out",
            str(tmp_path / "x.profile"),
            "--scratch",
            str(tmp_path),
            "--scratch-size",
            "1GiB",
            "-q",
        ],
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job ignores SIGINT, and children inherit that: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for _ in range(200):  # wait until the scratch file exists
        if any(n.startswith(".edgemoe-profile") for n in os.listdir(tmp_path)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("case", ["missing", "read-only", "too-small"])
def test_profile_refuses_bad_scratch_before_writing(tmp_path, case, request):
    scratch = tmp_path / "s"
    args = ["--scratch-size", "64MiB"]
    if case != "missing":
        scratch.mkdir()
    if case == "read-only":
        if os.geteuid() == 0:  # root writes through mode bits: use a read-only mount instead
            if subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(scratch)]
            ).returncode:
                pytest.skip("root without a read-only mount to test against")
            request.addfinalizer(lambda: subprocess.run(["umount", str(scratch)]))
        else:
            scratch.chmod(0o500)
    if case == "too-small":
        args = ["--scratch-size", "100TB"]
    p = subprocess.run(
        CLI
        + ["profile", "--out", str(tmp_path / "x.profile"), "--scratch", str(scratch), *args, "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "scratch folder" in p.stderr and "Traceback" not in p.stderr
    assert case != "read-only" or "read-only" in p.stderr
    assert not (tmp_path / "x.profile").exists()
    assert not scratch.exists() or os.listdir(scratch) == []


def test_devices_lists_every_profile():
    p = subprocess.run(CLI + ["devices"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for name in known_devices():
        assert name in p.stdout


def test_unknown_device_lists_the_known_ones():
    p = subprocess.run(
        CLI + ["run", "--device", "toaster", "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "toaster" in p.stderr and "rpi5-8gb-sd" in p.stderr


def test_emulated_device_throttles_reads_and_takes_its_memory(emulated_device):
    dev = emulated_device("rpi5-8gb-sd")
    m = edgemoe.load(ctx=128, **dev.load_kwargs)
    assert m.mem == dev.profile.usable_memory
    m.generate("The function returns", max_tokens=8)
    s = m.summary()
    assert s["device"] == dev.profile.name and s["bytes_read"] > 0
    # every byte read waited for the SD card: at least bytes / bandwidth seconds in the bucket
    assert m.store.throttle.__self__.waited_s >= 0.8 * s["bytes_read"] / dev.profile.flash_rand_read
    p = subprocess.run(
        CLI + ["run", *dev.cli_args, "-p", "The", "-n", "4", "--json", "--ctx", "128"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert json.loads(p.stdout)["summary"]["device"] == dev.profile.name


def _plan(device, mem, *more):
    p = subprocess.run(
        CLI + ["plan", "--device", device, "--mem", str(mem), "--ctx", "256", "--json", *more],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_plan_reports_the_fit_and_a_bound():
    full = _plan("rpi5-8gb-sd", "8GiB")["plan"]
    mem = (
        full["minimum"] + full["all_experts"] // 3
    )  # the floor differs between machines: plan relative to it
    rep = _plan("rpi5-8gb-sd", mem)
    assert rep["device"].startswith("Raspberry Pi 5") and rep["bound_tok_s"] > 0
    assert (
        rep["plan"]["expert_cache"] > 0
        and 1 < rep["slots_per_level"]["1"] < 64
        and rep["hit_rate"] < 1
    )
    nvme = _plan("rpi5-8gb-nvme", mem)  # a faster flash, all else equal, can only raise the bound
    assert nvme["bound_tok_s"] > rep["bound_tok_s"]
    p = subprocess.run(
        CLI + ["plan", "--device", "rpi5-8gb-sd", "--mem", "50MB"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "smallest budget that works" in p.stderr


def test_run_reports_achieved_against_the_bound(emulated_device):
    dev = emulated_device("rpi5-8gb-nvme")
    m = edgemoe.load(ctx=128, mem="8GiB", **dev.load_kwargs)
    st = RunStats()
    m.generate("The function returns", max_tokens=12, stats=st)
    s = m.summary(st)
    assert s["bound_tok_s"] and s["decode_tok_s"] <= s["bound_tok_s"]
    assert "bound" in m.summary_line(st)


def test_a_run_does_not_beat_the_plan_bound(emulated_device):
    """The check of the bound table, once: emulated rpi5 microSD with a third of the experts
    cached, greedy decoding (more locality than the calibration text), under plan's bound."""
    full = _plan("rpi5-8gb-sd", "8GiB", "--batch", "3")["plan"]
    mem = full["minimum"] + full["all_experts"] // 3 + (512 << 10)  # margin: the floor moves
    rep = _plan("rpi5-8gb-sd", mem, "--batch", "3")
    assert rep["routing"] != "uniform" and rep["expected_tok_s"] <= rep["bound_tok_s"]
    dev = emulated_device("rpi5-8gb-sd")
    prompts = ["-p", "The function returns", "-p", "In the beginning", "-p", "The database server"]
    p = subprocess.run(
        CLI
        + ["run", *dev.cli_args, "--mem", str(mem), "--ctx", "256", "-n", "32", "--json"]
        + ["--temperature", "0"]
        + prompts,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)["summary"]
    assert 0 < s["decode_tok_s"] <= min(rep["bound_tok_s"], s["bound_tok_s"])
