"""Budgets are hard limits on a model of the size users run: `edgemoe run` inside a memory
cgroup equal to its own --mem, on a bench model (`edgemoe bench --make mixtral-2b`), at half
of the file with the default context and with --ctx 64, and at the smallest budget the planner
accepts. Prints peak against cap for each and exits non-zero on an OOM kill or a peak above
the cap. (tests/test_memory_budget.py proves the same on the demo in CI; this model is 2.3 GB.)

    python tools/budget_check.py MODEL.emoe [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from edgemoe import memcap
from edgemoe.units import Bytes

NEEDS = re.compile(r"smallest budget that works is ([0-9.]+ ?[KMGT]?i?B)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--new-tokens", type=int, default=16)
    a = ap.parse_args(argv)
    run = [sys.executable, "-m", "edgemoe.cli", "run", str(a.model), "--json", "-q"]
    run += ["-n", str(a.new_tokens), "--temperature", "0", "-p", "The function returns a list of"]
    half = Bytes(a.model.stat().st_size // 2)
    refused = subprocess.run(run + ["--mem", "1MiB"], capture_output=True, text=True)
    m = NEEDS.search(refused.stderr)
    if not m:
        print(f"the planner did not name its minimum: {refused.stderr[-500:]}", file=sys.stderr)
        return 1
    smallest = Bytes.parse(m.group(1).replace(" ", ""))
    cases = [
        ("half the file, default ctx", half, []),
        ("half the file, --ctx 64", half, ["--ctx", "64"]),
        ("the smallest accepted budget", smallest, []),
    ]
    bad = 0
    for name, mem, extra in cases:
        r = memcap.run_capped(run + ["--mem", str(int(mem))] + extra, mem, evict=[a.model])
        ok = r.returncode == 0 and not r.oom_killed and r.peak <= mem
        s = json.loads(r.stdout)["summary"] if r.returncode == 0 else {}
        bad += not ok
        print(
            f"{name}: cap {mem}, peak {Bytes(r.peak)} ({100 * r.peak / mem:.1f}%), "
            f"{'OOM-killed' if r.oom_killed else f'exit {r.returncode}'}"
            + (f", decode {s['decode_tok_s']:.2f} tok/s, {s['expert_slots']:.0f} expert slots" if s else "")
            + ("" if ok else "  <- FAILED"),
            flush=True,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
