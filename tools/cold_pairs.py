"""Variants of `edgemoe run` against each other, cold, inside a memory cgroup equal to each cap.

    python tools/cold_pairs.py MODEL.emoe --caps 50,25 --section arena \\
        --variant "no arena=EDGEMOE_ARENA=0" --variant "arena=EDGEMOE_ARENA=1" \\
        [--repeats 4] [--tokens 64]

A variant is NAME=SETTING[,SETTING...], each setting an environment variable (KEY=VALUE)
or an `edgemoe run` flag (--flag or --flag=value). Each run is `edgemoe run --json` on one
prompt of 128 tokens, greedy, the model's file evicted from the page cache first, in a
cgroup equal to the cap (a share of the file's size). The variants run in turn, their order
reversed every other repeat. Medians of decode and prefill tok/s, load time and the
cgroup's peak per variant and cap, the first variant as the baseline, go to
docs/BENCHMARKS.md (the section named).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_doc import machine, write_section  # noqa: E402

from edgemoe import memcap  # noqa: E402
from edgemoe.bench.runners import prompts_of  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict, list[str]]:
    """'NAME=K=V,--flag=x' -> (name, env, flags)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: use NAME=SETTING[,SETTING...]")
    env, flags = {}, []
    for item in filter(None, rest.split(",")):
        if item.startswith("--"):
            flag, _, value = item.partition("=")
            flags += [flag] + ([value] if value else [])
        else:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--variant {text!r}: {item!r} is neither KEY=VALUE nor --flag")
            env[key] = value
    return name, env, flags


def one(model: Path, cap: int, env: dict, flags: list[str], prompt: str, tokens: int) -> dict:
    memcap.evict_page_cache(model)
    cmd = [
        sys.executable, "-m", "edgemoe.cli", "run", str(model), "--json", "-q",
        "-n", str(tokens), "--temperature", "0", "--ctx", str(128 + tokens + 32),
        "-p", prompt, "--mem", str(cap), *flags,
    ]  # fmt: skip
    out = memcap.run_capped(
        cmd, cap, timeout=1200, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **env)
    )
    if out.returncode:
        raise SystemExit(f"{cmd} at {cap} bytes failed ({out.returncode}): {out.stderr[-600:]}")
    s = json.loads(out.stdout)["summary"]
    s["cgroup_peak"] = int(out.peak)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--caps", default="50,25", help="shares of the file's size, in percent")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--section", required=True, help="docs/BENCHMARKS.md section to write")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    why = memcap.available()
    if why is not None:
        raise SystemExit(f"{why}: the caps cannot be enforced")
    variants = [parse_variant(v) for v in a.variant]
    size = a.model.stat().st_size
    prompt = prompts_of(a.model, 128, 1)[0]
    quoted = " ".join(f'--variant "{v}"' for v in a.variant)
    rows = [
        f"Command: `python tools/cold_pairs.py {a.model.name} --caps {a.caps} --section "
        f"{a.section} {quoted} --repeats {a.repeats} --tokens {a.tokens}`  ",
        f"Machine: {machine()}. Cold runs in a memory cgroup equal to the cap, variants "
        "alternating; medians over the repeats.",
        "",
        "| cap | variant | decode tok/s | vs first | prefill tok/s | load s | cgroup peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for cap_pct in a.caps.split(","):
        cap = int(size * float(cap_pct) / 100)
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
        for r in range(a.repeats):
            for name, env, flags in variants if r % 2 == 0 else variants[::-1]:
                s = one(a.model, cap, env, flags, prompt, a.tokens)
                runs[name].append(s)
                print(f"{cap_pct}% {name}: decode {s['decode_tok_s']:.2f} prefill "
                      f"{s['prefill_tok_s']:.1f} load {s['load_s']:.2f}", flush=True)  # fmt: skip
        base = statistics.median(s["decode_tok_s"] for s in runs[variants[0][0]])
        for name, v in runs.items():

            def med(key, v=v):
                return statistics.median(s[key] for s in v)

            dec = med("decode_tok_s")
            rows.append(
                f"| {cap_pct}% | {name} | {dec:.2f} | {dec / base:.2f}x | "
                f"{med('prefill_tok_s'):.1f} | {med('load_s'):.2f} | "
                f"{med('cgroup_peak') / 2**20:.0f} |"
            )
    write_section(a.section, rows)


if __name__ == "__main__":
    main()
