"""`edgemoe cluster up / status / down` as real subprocesses on 127.0.0.1: a local emulated
cluster starts with a raylet per node (its profile, budget and custom resource), the status
shows every node, its address (loopback), its planned placement; every process of the
cluster listens on loopback only; down stops them all. Bad nodes files start nothing."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.raynet import ray_env
from edgemoe.cli import main
from edgemoe.units import Bytes

NODES = """
[[node]]
name = "orin"
profile = "jetson-orin-nano-8gb"
budget = "1GiB"
link = "wifi"

[[node]]
name = "pi"
profile = "rpi5-8gb-nvme"
budget = "900MiB"
link = "ethernet"
"""


def _edgemoe() -> list[str]:
    exe = shutil.which("edgemoe", path=str(Path(sys.executable).parent))
    return (
        [exe]
        if exe
        else [sys.executable, "-c", "import sys; from edgemoe.cli import main; sys.exit(main())"]
    )


def _run(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, **ray_env()}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [*_edgemoe(), "cluster", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip)
    return (getattr(a, "ipv4_mapped", None) or a).is_loopback  # ::ffff:127.0.0.1 too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "text, match",
    [
        ('[[node]]\nname = "a"\nprofile = "nosuch"\n', "no device profile named 'nosuch'"),
        ('[[node]]\nname = "a"\nprofile = "devbox"\nbudget = "1TB"\n', "exceeds"),
        ("[[node]\n", "not valid TOML"),
    ],
)
def test_up_bad_nodes_file_starts_nothing(tmp_path, capsys, text, match):
    f = tmp_path / "nodes.toml"
    f.write_text(text)
    state = tmp_path / "up.json"
    assert main(["cluster", "up", "--nodes", str(f), "--state", str(state)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and str(f) in err and "fix the nodes file" in err
    assert not state.exists() and not state.with_suffix(".log").exists()


def test_up_bad_nodes_file_subprocess(tmp_path):
    """The same through the installed command: one line, exit status 2, nothing started."""
    f = tmp_path / "nodes.toml"
    f.write_text('[[node]]\nname = "a"\nprofile = "nosuch"\n')
    state = tmp_path / "up.json"
    r = _run("up", "--nodes", str(f), "--state", str(state), timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nosuch" in r.stderr
    assert not state.exists() and not state.with_suffix(".log").exists()


def test_down_when_nothing_is_up(tmp_path):
    r = _run("down", "--state", str(tmp_path / "up.json"), timeout=120)
    assert r.returncode == 0 and "no cluster is up" in r.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_up_status_down(tmp_path, capsys):
    from tests.cluster.conftest import need_ray

    need_ray()
    import psutil

    nodes, state = tmp_path / "nodes.toml", tmp_path / "up.json"
    nodes.write_text(NODES)
    port = _free_port()
    pid = None
    t0 = time.perf_counter()
    try:
        r = _run("up", "--nodes", str(nodes), "--state", str(state), "--dashboard-port", str(port))
        assert r.returncode == 0, r.stderr[-2000:] + state.with_suffix(".log").read_text()[-2000:]
        assert "2 nodes (orin, pi)" in r.stdout and f"http://127.0.0.1:{port}" in r.stdout
        pid = json.loads(state.read_text())["pid"]
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        print(f"up: {time.perf_counter() - t0:.1f} s")

        r = _run("status", "--state", str(state), "--json")
        print(f"status: {time.perf_counter() - t0:.1f} s")
        assert r.returncode == 0, r.stderr[-2000:]
        st = json.loads(r.stdout)
        rows = {n["node"]: n for n in st["nodes"]}
        assert set(rows) == {"head", "orin", "pi"} and all(n["alive"] for n in rows.values())
        assert {n["address"] for n in rows.values()} == {"127.0.0.1"}
        assert rows["orin"]["profile"] == "jetson-orin-nano-8gb"
        assert rows["pi"]["budget"] == int(Bytes.parse("900MiB"))
        planned = {p["name"]: p for p in st["placement"]}
        assert set(planned) == {"orin", "pi"} and all(p["experts"] > 0 for p in planned.values())
        assert sum(p["experts"] for p in planned.values()) == 64  # the demo: 4 x 16 experts
        # nothing listens beyond the loopback (every Ray process binds to 127.0.0.1)
        listening = [
            (p.name(), c.laddr)
            for p in procs
            if p.is_running()
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening and all(_loopback(a.ip) for _, a in listening), listening

        # one cluster per state file: a second `up` is refused before it starts anything
        assert main(["cluster", "up", "--nodes", str(nodes), "--state", str(state)]) == 2
        assert "already up" in capsys.readouterr().err

        r = _run("down", "--state", str(state), timeout=120)
        print(f"down: {time.perf_counter() - t0:.1f} s")
        assert r.returncode == 0 and "stopped" in r.stdout
        assert not state.exists()
        end = time.monotonic() + 30
        while time.monotonic() < end and any(
            p.is_running() and p.status() != "zombie" for p in procs
        ):
            time.sleep(0.5)
        left = [p.name() for p in procs if p.is_running() and p.status() != "zombie"]
        assert not left, f"still running after down: {left}"
    finally:  # a failed test leaves nothing running either: the supervisor's group, by pid
        if pid is not None and psutil.pid_exists(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
