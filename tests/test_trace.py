"""`edgemoe run --trace` writes a Chrome trace: a compute lane, a lane per reader thread,
reads, stalls, prefetches and evictions, per layer and step."""

from __future__ import annotations

import json
import subprocess
import sys


def test_run_writes_a_chrome_trace(tmp_path):
    out = tmp_path / "trace.json"
    p = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "run", "--expert-cache", "25%", "-p", "The",
         "-n", "12", "--temperature", "0", "--trace", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    events = json.loads(out.read_text())["traceEvents"]
    lanes = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert "compute" in lanes and any(n.startswith("edgemoe-io") for n in lanes)
    cats = {e["cat"] for e in events if e["ph"] != "M"}
    assert {"step", "moe", "io", "stall", "evict"} <= cats
    steps = [e for e in events if e.get("cat") == "step"]
    assert len(steps) >= 12 and all(e["dur"] >= 0 for e in steps)
    reads = [e for e in events if e.get("cat") == "io"]
    io_lanes = {e["tid"] for e in reads}
    compute = {e["tid"] for e in steps}
    assert io_lanes.isdisjoint(compute)  # reads happen off the computing thread
    # each MoE layer's span lies inside a forward pass's span, on the same clock
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in steps]
    moes = [e for e in events if e.get("cat") == "moe"]
    assert moes and all(
        any(a <= m["ts"] and m["ts"] + m["dur"] <= b + 1 for a, b in spans) for m in moes
    )
