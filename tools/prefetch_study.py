"""Prefetch modes against each other: cold decode inside a memory cgroup equal to each cap.

    python tools/prefetch_study.py MODEL.emoe --caps 50,25 [--modes off,idle,eager]
        [--repeats 5] [--tokens 96]

Each run is `edgemoe run --json` on one prompt of 128 tokens, greedy, the model's file
evicted from the page cache first, in a cgroup equal to the cap (a share of the file's
size, as `edgemoe bench` sets it). The modes run in turn, their order reversed every other
repeat. It reports median decode and prefill tok/s per mode and cap, the read-ahead's
guesses (issued, taken, bytes dropped), the prediction accuracy and bytes read per decoded
token, and writes docs/BENCHMARKS.md (section prefetch-idle).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_doc import machine, write_section  # noqa: E402
from cold_pairs import one as run_cold  # noqa: E402

from edgemoe import memcap  # noqa: E402
from edgemoe.bench.runners import prompts_of  # noqa: E402


def one(model: Path, cap: int, mode: str, prompt: str, tokens: int) -> dict:
    return run_cold(model, cap, {}, ["--prefetch", mode], prompt, tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--caps", default="50,25", help="shares of the file's size, in percent")
    ap.add_argument("--modes", default="off,idle,eager")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96)
    a = ap.parse_args()
    why = memcap.available()
    if why is not None:
        raise SystemExit(f"{why}: the caps cannot be enforced")
    modes = a.modes.split(",")
    size = a.model.stat().st_size
    prompt = prompts_of(a.model, 128, 1)[0]
    rows = [
        f"Command: `python tools/prefetch_study.py {a.model.name} --caps {a.caps} "
        f"--modes {a.modes} --repeats {a.repeats} --tokens {a.tokens}`  ",
        f"Machine: {machine()}. Cold runs in a memory cgroup equal to the cap, modes "
        "alternating; medians over the repeats.",
        "",
        "| cap | prefetch | decode tok/s | vs off | prefill tok/s | issued / taken per token "
        "| dropped MB per token | accuracy | MB read per token | expert slots | cgroup peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cap_pct in a.caps.split(","):
        cap = int(size * float(cap_pct) / 100)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(a.repeats):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                s = one(a.model, cap, mode, prompt, a.tokens)
                runs[mode].append(s)
                print(f"{cap_pct}% {mode:6s} decode {s['decode_tok_s']:.2f} "
                      f"prefill {s['prefill_tok_s']:.1f}", flush=True)  # fmt: skip
        base = statistics.median(s["decode_tok_s"] for s in runs[modes[0]])
        for mode in modes:
            v = runs[mode]

            def med(key, v=v):
                return statistics.median(s[key] or 0 for s in v)

            steps = max(1, a.tokens - 1)
            dec = med("decode_tok_s")
            acc = f"{med('prediction_accuracy'):.0%}" if mode != "off" else "-"
            rows.append(
                f"| {cap_pct}% | {mode} | {dec:.2f} | {dec / base:.2f}x | {med('prefill_tok_s'):.1f} "
                f"| {med('prefetch_issued') / steps:.2f} / {med('prefetch_used') / steps:.2f} "
                f"| {med('prefetch_bytes_wasted') / steps / 1e6:.1f} "
                f"| {acc} | {med('bytes_read') / a.tokens / 1e6:.0f} "
                f"| {med('expert_slots'):.1f} | {med('cgroup_peak') / 2**20:.0f} |"
            )
    rows += [
        "",
        "MB read per token counts the prompt's reads too (the whole run over its new tokens). "
        "`idle` reads the likeliest uncached expert of the next layer (or of up to two after "
        "it, where the next one's are cached; guessed again from each layer's output) into a "
        "slab whose room the cache gives up (its next victim), only while no demanded read "
        "waits, and a layer that misses on it takes the parts already read; `eager` reads "
        "every predicted expert into the cache at once.",
    ]
    write_section("prefetch-idle", rows)


if __name__ == "__main__":
    main()
