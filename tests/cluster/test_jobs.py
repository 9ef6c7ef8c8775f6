"""Batch jobs: a bad prompts file is one named line before anything starts; a job resumes
without redoing or duplicating prompts; a real `ray start --head` runs a job submitted
with the `ray job submit` CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.jobs import generate_job, label_specs, read_prompts, spec_labels
from cluster.types import BadPromptsFile, Link, NodeSpec
from edgemoe.cli import main
from edgemoe.units import Bytes


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "no prompts"),
        ("{not json}\n", "line 1: not JSON"),
        ("[1, 2]\n", "line 1: not a JSON object"),
        ('{"prompt": ""}\n', "non-empty text or token ids"),
        ('{"prompt": [1, -2]}\n', "non-empty text or token ids"),
        (
            '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n',
            "line 2: id 'x' was used on line 1",
        ),
        ('{"prompt": "a", "max_tokens": 0}\n', "max_tokens"),
        ('{"prompt": "a", "temp": 1}\n', "unknown key"),
        ('{"prompt": "a", "latency_ms": 0}\n', "'latency_ms' must be a number > 0"),
        ('{"prompt": "a", "energy_mj": "low"}\n', "'energy_mj' must be a number > 0"),
    ],
)
def test_bad_prompts_named(tmp_path, text, match):
    f = tmp_path / "in.jsonl"
    f.write_text(text)
    with pytest.raises(BadPromptsFile, match=match):
        read_prompts(f)


def test_bad_prompts_cli_one_line_nothing_started(tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    out = tmp_path / "out.jsonl"
    rc = main(["cluster", "generate", "--prompts", str(f), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "line 2" in err
    assert not out.exists() and not (tmp_path / "out.jsonl.parts").exists()


def test_prompt_classes(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(
        '{"prompt": "a", "latency_ms": 10}\n{"prompt": "b"}\n{"prompt": "c", "energy_mj": 2}\n'
    )
    a, b, c = read_prompts(f)
    assert a.klass.latency_s == 0.01 and a.klass.energy_j is None and b.klass is None
    assert c.klass.energy_j == 0.002 and c.klass.latency_s == float("inf")


def test_labels_round_trip():
    s = NodeSpec("pi", "rpi5-8gb-nvme", Bytes.parse("1GiB"), Link(0.002, Bytes(37_500_000)), False)
    assert label_specs([{"Alive": True, "Labels": spec_labels(s)}]) == [s]
    assert label_specs([{"Alive": False, "Labels": spec_labels(s)}]) == []


@pytest.mark.ray
@pytest.mark.slow
def test_job_resumes_without_redoing(ray_nodes, tiny_emoe, tmp_path):
    ray_nodes.ensure("a", "b")
    path = tiny_emoe("qwen3_moe")
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": [3 + i, 9, 4]}) + "\n" for i in range(4))
    )
    out = tmp_path / "out.jsonl"
    specs = [NodeSpec(n, "devbox", Bytes.parse("1GiB")) for n in ("a", "b")]
    lines = []

    def interrupt_after_two(line):
        lines.append(line)
        if "[2/4]" in line:
            raise KeyboardInterrupt  # the job is killed after its second prompt

    with pytest.raises(KeyboardInterrupt):
        generate_job(path, prompts, out, specs=specs, max_tokens=5, log=interrupt_after_two)
    assert not out.exists() and len(list((tmp_path / "out.jsonl.parts").glob("*.json"))) == 2
    counts = generate_job(path, prompts, out, specs=specs, max_tokens=5, log=lines.append)
    assert counts == {"prompts": 4, "skipped": 2, "generated": 2}
    first = out.read_text()
    assert [json.loads(x)["id"] for x in first.splitlines()] == ["p0", "p1", "p2", "p3"]
    assert generate_job(path, prompts, out, specs=specs, log=lines.append)["generated"] == 0
    assert out.read_text() == first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_start_head_and_job_submit_cli(tmp_path):
    """A real `ray start --head` (one node, its own expert host), a job submitted with the
    `ray job submit` CLI, its log and its output read back; the head stopped by its pid."""
    from tests.cluster.conftest import need_ray

    need_ray()
    from cluster.raynet import ray_env

    bin_dir = Path(sys.executable).parent
    ray_bin = shutil.which("ray", path=str(bin_dir)) or shutil.which("ray")
    env = {**os.environ, **ray_env(), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    s = NodeSpec("solo", "devbox", Bytes.parse("1GiB"))
    labels = ",".join(f"{k}={v}" for k, v in spec_labels(s).items())
    tmpdir = tempfile.mkdtemp(
        prefix="rt", dir="/tmp"
    )  # short: Ray's socket paths must fit 107 bytes
    log = open(tmp_path / "ray-start.log", "wb")  # noqa: SIM115 - closed in finally
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "2", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--resources", json.dumps({s.resource: 1}),
         "--labels", labels, "--temp-dir", tmpdir, "--object-store-memory", str(80 * 2**20),
         "--disable-usage-stats",
         # its own agent ports: another cluster on this machine (the session's) holds the defaults
         "--dashboard-agent-listen-port", str(_free_port()),
         "--dashboard-agent-grpc-port", str(_free_port()),
         "--metrics-export-port", str(_free_port()),
         "--runtime-env-agent-port", str(_free_port())],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        work = tmp_path / "work"
        work.mkdir()
        (work / "in.jsonl").write_text('{"id": "q", "prompt": "The function returns"}\n')
        out = tmp_path / "out.jsonl"
        submit = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                  "--working-dir", str(work), "--", "edgemoe", "cluster", "generate",
                  "--prompts", "in.jsonl", "--out", str(out), "--max-tokens", "6"]  # fmt: skip
        end, r = time.monotonic() + 300, None
        while time.monotonic() < end:  # the job server and its agent take a while to come up
            r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            said = r.stdout + r.stderr
            # the job server and its agent come up late on a loaded machine: retry until they do
            if r.returncode == 0 or not ("connect" in said.lower() or "No available agent" in said):
                break
            time.sleep(2)
        started = (tmp_path / "ray-start.log").read_text(errors="replace")[-1500:]
        assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:] + started
        assert "edgemoe job: [1/1] id q: 6 tokens" in r.stdout
        rec = json.loads(out.read_text())
        assert rec["id"] == "q" and len(rec["token_ids"]) == 6
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        log.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
