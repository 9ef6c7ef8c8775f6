"""Check the decode bound against reality: `edgemoe plan`'s bound, the run's own bound and the
measured decode speed, for the demo model on this machine at three budgets and emulated as two
shipped devices. Appends the table to docs/BENCHMARKS.md.

    python tools/bound_table.py
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The function returns a list of", "In the beginning God created", "The database server"]
# budgets relative to the planner's minimum, which moves with the machine's floor:
# every expert, a third of them, one expert
SHARES = {"all experts": 1.0, "a third": 1 / 3, "one expert": 0.0}
CASES = [("devbox", s) for s in SHARES] + [("rpi5-8gb-sd", "a third"), ("rpi5-8gb-nvme", "a third")]


def run(*args) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", *args], capture_output=True, text=True, cwd=REPO
    )
    if p.returncode:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout)


def main() -> None:
    full = run(
        "plan", "--device", "devbox", "--mem", "8GiB", "--ctx", "256", "--batch", "3", "--json"
    )["plan"]
    rows = []
    for device, share in CASES:
        mem = str(int(full["minimum"] + SHARES[share] * full["all_experts"]) + (512 << 10))
        plan = run(
            "plan", "--device", device, "--mem", mem, "--ctx", "256", "--batch", "3", "--json"
        )
        args = ["run", "--device", device, "--mem", mem, "--ctx", "256", "-n", "64", "--json"]
        s = run(*args, *[a for p in PROMPTS for a in ("-p", p)])["summary"]
        rows.append(
            (
                device,
                f"{int(mem) / 2**20:.0f} MiB ({share})",
                plan["bound_tok_s"],
                s["bound_tok_s"],
                s["decode_tok_s"],
                s["hit_rate"],
            )
        )
        print(rows[-1], flush=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "",
        "### The decode bound against measured speed (demo model, batch of 3, 64 tokens)",
        "",
        f"`python tools/bound_table.py`, {when}, on the 2-core devbox; rpi5 rows emulated (flash "
        "throttled to the profile's random-read rate, compute slowed by its factor). 'plan bound' is "
        "`edgemoe plan` before the run (uniform routing); 'run bound' uses the run's measured misses.",
        "",
        "| device | budget | plan bound tok/s | run bound tok/s | measured tok/s | measured / run bound | hits |",
        "|---|---|---|---|---|---|---|",
    ]
    for dev, mem, pb, rb, got, hit in rows:
        lines.append(
            f"| {dev} | {mem} | {pb:.0f} | {rb:.0f} | {got:.1f} | {got / rb:.2f} | {100 * hit:.0f}% |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(REPO / "docs" / "BENCHMARKS.md", "a") as f:
        f.write(text)
    if any(got > rb for *_, rb, got, _ in rows):
        raise SystemExit("a measured speed is above its bound: the bound is wrong")


if __name__ == "__main__":
    main()
