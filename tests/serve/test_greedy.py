"""Greedy output through the server equals `edgemoe run` for the same prompt."""

from __future__ import annotations

import json
import subprocess
import sys


def run_json(*args: str) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "run", "--json", "--temperature", "0", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["outputs"][0]


def test_greedy_through_the_server_equals_edgemoe_run(client):
    prompt = "The function returns"
    want = run_json("-p", prompt, "-n", "32")
    got = client.completions.create(model="demo", prompt=prompt, max_tokens=32, temperature=0)
    assert got.choices[0].text == want

    want = run_json("--chat", "-p", "Where is the kingdom?", "-n", "24")
    got = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Where is the kingdom?"}],
        max_tokens=24,
        temperature=0,
    )
    assert got.choices[0].message.content == want
