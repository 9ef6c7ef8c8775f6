"""`edgemoe run` as a user drives it: the demo, streaming, --json, chat, interactive."""

from __future__ import annotations

import json
import subprocess
import sys

import edgemoe

CMD = [sys.executable, "-m", "edgemoe.cli", "run"]


def test_demo_streams_and_summarises():
    p = subprocess.run(
        CMD + ["-p", "The function returns", "-n", "24"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("The function returns") and len(p.stdout.split()) > 6
    line = p.stderr.strip().splitlines()[-1]
    for part in ("prefill", "decode", "TTFT", "expert hits", "from flash", "peak", "floor"):
        assert part in line, line


def test_json_record_matches_the_api():
    p = subprocess.run(
        CMD + ["-p", "In the beginning", "-n", "16", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    rec = json.loads(p.stdout)
    m = edgemoe.load()
    assert rec["outputs"] == [m.generate("In the beginning", max_tokens=16)]
    assert rec["summary"]["new_tokens"] == 16 and rec["summary"]["family"] == "qwen3_moe"


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
    args = [
        "-p",
        "The",
        "-n",
        "16",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "7",
        "--json",
    ]
    outs = [
        json.loads(subprocess.run(CMD + args, capture_output=True, text=True, timeout=300).stdout)[
            "outputs"
        ]
        for _ in range(2)
    ]
    assert outs[0] == outs[1]
