"""`edgemoe run --trace` writes a Chrome trace: a compute lane, a lane per reader thread,
reads, stalls, prefetches and evictions, per layer and step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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


def test_summarize_counts_decode_steps_reads_and_idle_disk(tmp_path):
    """The summary skips the prompt's forward pass; a read in parts counts once; the disk is
    busy where any read is in flight (overlaps counted once)."""
    from edgemoe.trace import summarize

    def x(name, cat, ts, dur, **args):
        return {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "args": args}

    events = [
        x("forward", "step", 0, 1000),  # the prompt: not a decode step
        x("read L0 E1", "io", 100, 500, level=1),
        x("forward", "step", 2000, 1000),
        x("read L0 E2", "io", 2000, 400, level=1, part=0),
        x("read L0 E2", "io", 2200, 400, level=1, part=1),  # overlaps the first part
        x("stall", "stall", 2100, 300),
        x("moe L0", "moe", 2050, 800),
        x("forward", "step", 4000, 3000),
        x("read L0 E3", "io", 6500, 1000, level=1),  # half inside the step
        x("chain L0-L2", "chain", 4100, 500, layers=2),
        x("attn L2", "attn", 4600, 100),
        x("stall", "stall", 6400, 200),
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    s = summarize(path)
    assert s["decode_steps"] == 2 and s["ms_per_step"] == 2.0
    assert s["disk_busy"] == (600 + 500) / 4000
    assert s["reads_per_step"] == 1.0 and s["stall_ms_per_step"] == 0.25
    assert s["moe_ms_per_step"] == 0.4
    # disk idle: step 2 (2000-3000) idle from 2600; its MoE span runs to 2850; step 3
    # (4000-7000) idle to 6500, with a chain 4100-4600, an attention 4600-4700 and a stall
    # (a read being prepared) 6400-6600 of which 100 are idle
    idle = s["disk_idle_ms_per_step"]
    assert idle == pytest.approx(
        {"stall": 0.05, "attention": 0.05, "chain": 0.25, "moe": 0.125, "between": 0.975}
    )
    path.write_text(json.dumps({"traceEvents": events[:2]}))
    assert summarize(path) == {}
