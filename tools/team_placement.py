"""Where the kernel team's worker wakes, and what it costs: two cached experts of one layer
through `fastkernels.q8_experts`, each call after the caller waited 30 ms on another thread
(as a decode step waits on a read), with the team placing its worker off the caller's CPU
(EDGEMOE_TEAM_PLACE=1, the default) and with placement left to the scheduler (=0).

    python tools/team_placement.py MODEL.emoe [--mem 50%] [--repeats 3] [--calls 40]

MODEL: an .emoe with INT8 experts (the bench model: `edgemoe bench --make mixtral-2b` keeps
its conversion in the cache). --mem: the budget as `edgemoe run` takes it, or a percent of
the file. Each setting runs in its own process (the team reads its setting once), the two
alternating; medians of the calls, per process and over all. Writes the table to
docs/BENCHMARKS.md (section team-placement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_doc import machine, write_section  # noqa: E402

CHILD = """
import json, sys, time, torch
from concurrent.futures import ThreadPoolExecutor
import edgemoe
from edgemoe import fastkernels
path, mem, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = edgemoe.load(path, mem=None if mem == "none" else mem, ctx=160)
m.generate("The quick brown fox jumps over the lazy dog " * 6, max_tokens=8)
ex, pairs = m.executor, []
for layer in sorted({k[0] for k in m.reader.experts}):
    cached = [u for e in range(64) if (u := ex._cached_q8(layer, e)) is not None]
    if len(cached) >= 2:
        pairs.append([(u.gate, u.up, u.down) for u in cached[:2]])
if not pairs:
    sys.exit("no layer has two cached INT8 experts: a larger --mem, or a file with INT8 experts")
x, out, pool, ms = torch.randn(pairs[0][0][0].in_features), None, ThreadPoolExecutor(1), []
out = torch.zeros_like(x)
for i in range(calls):
    pool.submit(time.sleep, 0.03).result()  # the caller waits, as on a read
    t = time.perf_counter()
    fastkernels.q8_experts(x, pairs[i % len(pairs)], [0.5, 0.5], out)
    ms.append((time.perf_counter() - t) * 1e3)
print(json.dumps(ms))
m.close()
"""


def run(model: str, mem: str, calls: int, place: str) -> list[float]:
    env = dict(os.environ, EDGEMOE_TEAM_PLACE=place, OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run(
        [sys.executable, "-c", CHILD, model, mem, str(calls)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    if p.returncode:
        sys.exit(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--mem", default="50%", help="budget, or a percent of the file (default 50%%)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=40)
    a = ap.parse_args()
    mem = a.mem
    if mem.endswith("%"):
        mem = str(int(Path(a.model).stat().st_size * float(mem[:-1]) / 100))
    got: dict[str, list[float]] = {"1": [], "0": []}
    per: dict[str, list[float]] = {"1": [], "0": []}
    for r in range(a.repeats):
        for place in ("1", "0") if r % 2 == 0 else ("0", "1"):
            ms = run(a.model, mem, a.calls, place)
            got[place] += ms
            per[place].append(statistics.median(ms))
            print(f"repeat {r + 1} place={place}: median {per[place][-1]:.2f} ms", flush=True)
    rows = [
        "### The kernel team's worker: off the caller's CPU or where the scheduler puts it",
        "",
        f"`python tools/team_placement.py {Path(a.model).name} --mem {a.mem} --repeats "
        f"{a.repeats} --calls {a.calls}` on {machine()}. Two cached INT8 experts of a layer "
        "through one `q8_experts` call, each after the caller waited 30 ms on another thread "
        "(as decode waits on a read); one process per setting, alternating.",
        "",
        "| placement | median ms a call | per process |",
        "|---|---|---|",
    ]
    for place, name in (("1", "off the caller's CPU (default)"), ("0", "EDGEMOE_TEAM_PLACE=0")):
        each = " / ".join(f"{v:.2f}" for v in per[place])
        rows.append(f"| {name} | {statistics.median(got[place]):.2f} | {each} |")
    write_section("team-placement", rows)


if __name__ == "__main__":
    main()
