"""`edgemoe serve` under load, on loopback, in one run; writes its section of docs/BENCHMARKS.md.

1. Load: CLIENTS concurrent streaming clients send REQUESTS requests of mixed prompt and
   reply lengths to the demo served inside a real memory cgroup equal to --mem: failed
   requests, OOM kills, the cgroup's peak against the cap, p50/p99 TTFT, tokens/s.
2. Continuous against static batching (one request at a time, --max-batch 1) at 8 clients,
   the same requests, the same cap: aggregate tokens/s and TTFT.
3. Prompt-prefix reuse: multi-turn chats, one request at a time, with and without
   (--no-prefix-reuse): TTFT per turn as the conversation grows.

    python tools/serve_load.py                    # the full run (a few minutes on 2 cores)
    python tools/serve_load.py --requests 30 --bench-requests 16 --no-doc   # a quick look
    python tools/serve_load.py --parts bench --repeats 1 --no-doc          # part 2 alone

Each server's shutdown line gives its worker thread's CPU time (prefill, decode): on cores
other work shares, wall-clock tokens/s move with the machine's load, the CPU a run took
much less, so the report gives the continuous/static ratio both ways.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_doc import write_section  # noqa: E402

from edgemoe import memcap  # noqa: E402
from edgemoe.serve.loadgen import (  # noqa: E402
    ServerProcess,
    converse,
    mixed_requests,
    run_load,
    summarize,
)
from edgemoe.units import Bytes  # noqa: E402


def serve_args(a, batch: int, *extra: str, ctx: int | None = None) -> list[str]:
    return [
        "--mem",
        a.mem,
        "--ctx",
        str(ctx or a.ctx),
        "--max-batch",
        str(batch),
        "--max-queue",
        str(a.requests),
        *(["--expert-cache", a.expert_cache] if a.expert_cache else []),
        *(["--compute-threads", str(a.compute_threads)] if a.compute_threads else []),
        *(["--dtype", a.dtype] if a.dtype else []),
        *extra,
    ]


def loaded(a, batch: int, bodies: list[dict], clients: int, cap, *extra: str) -> dict:
    with ServerProcess(serve_args(a, batch, *extra), cap=cap) as srv:
        before = os.getloadavg()[0]
        results, wall = run_load(srv.url, bodies, clients, timeout=a.timeout)
        after = os.getloadavg()[0]
    s = summarize(results, wall)
    s["load_average"] = [round(before, 2), round(after, 2)]  # the machine is shared
    s["returncode"] = srv.returncode
    if srv.cap is not None:
        s.update(peak=int(srv.cap.peak), oom_killed=srv.cap.oom_killed, cap=int(srv.cap.limit))
    s["server"] = next(
        (x for x in srv.stderr.splitlines() if "stopped:" in x), srv.stderr.strip()[-300:]
    )
    steps = re.search(r"in (\d+) steps \(prefill ([\d.]+) s, decode ([\d.]+) s", s["server"])
    if steps:
        s["steps"], s["prefill_s"], s["decode_s"] = int(steps[1]), float(steps[2]), float(steps[3])
    cpu = re.search(r"worker CPU ([\d.]+) s: prefill ([\d.]+) s, decode ([\d.]+) s", s["server"])
    if cpu:
        s["worker_cpu_s"], s["prefill_cpu_s"], s["decode_cpu_s"] = map(float, cpu.groups())
    return s


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (a real run, not a mix of runs), with all of them."""
    ranked = sorted(runs, key=lambda s: s["tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "all_tokens_per_s": [s["tokens_per_s"] for s in runs]}


def fmt_s(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mem", default="448MiB", help="--mem of the server and the cgroup's cap")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument(
        "--expert-cache", default=None, help="pass --expert-cache to the server (e.g. 50%%)"
    )
    p.add_argument(
        "--compute-threads",
        type=int,
        help="pass --compute-threads to every server (1 on cores other work keeps busy)",
    )
    p.add_argument("--dtype", help="pass --dtype to every server (auto, f32, bf16)")
    p.add_argument(
        "--parts",
        default="load,bench,reuse",
        help="which parts to run: load, bench (continuous vs static), reuse (default all)",
    )
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--bench-requests", type=int, default=64)
    p.add_argument("--bench-clients", type=int, default=8)
    p.add_argument(
        "--repeats", type=int, default=2, help="continuous/static pairs, alternating (default 2)"
    )
    p.add_argument("--conversations", type=int, default=3)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--no-doc", action="store_true", help="print, do not write docs/BENCHMARKS.md")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args()

    parts = set(a.parts.split(","))
    if not parts <= {"load", "bench", "reuse"}:
        p.error(f"--parts {a.parts}: use load, bench and reuse, comma-separated")
    if parts != {"load", "bench", "reuse"} and not a.no_doc:
        p.error("a partial run writes no doc: add --no-doc (and --json to keep its figures)")
    why = memcap.available()
    cap = None if why else a.mem
    if why:
        print(f"serve_load: no memory cgroup ({why}); running uncapped", file=sys.stderr)

    load = cont = static = reuse = None
    if "load" in parts:
        print(f"1/3 load: {a.requests} requests, {a.clients} clients", file=sys.stderr)
        load = loaded(a, a.max_batch, mixed_requests(a.requests, ctx=a.ctx), a.clients, cap)
        print(json.dumps(load, indent=1), file=sys.stderr)

    if "bench" in parts:
        print(f"2/3 continuous vs static, {a.bench_clients} clients", file=sys.stderr)
        bench = mixed_requests(a.bench_requests, seed=1, ctx=a.ctx)
        conts, statics = [], []
        for i in range(a.repeats):  # alternating order: a machine that slows down hurts both
            for kind in ("continuous", "static") if i % 2 == 0 else ("static", "continuous"):
                if kind == "continuous":
                    conts.append(loaded(a, a.max_batch, bench, a.bench_clients, cap))
                else:
                    statics.append(loaded(a, 1, bench, a.bench_clients, cap))
        cont, static = median_run(conts), median_run(statics)
        cont["all_worker_cpu_s"] = [s.get("worker_cpu_s") for s in conts]
        static["all_worker_cpu_s"] = [s.get("worker_cpu_s") for s in statics]
        print(json.dumps({"continuous": conts, "static": statics}, indent=1), file=sys.stderr)

    if "reuse" in parts:
        print(f"3/3 prefix reuse: {a.conversations} chats x {a.turns} turns", file=sys.stderr)
        reuse = {}
        for on in (True, False):
            extra = () if on else ("--no-prefix-reuse",)
            # a longer context: the chats grow by ~100 tokens a turn
            with ServerProcess(serve_args(a, 4, *extra, ctx=1024), cap=cap) as srv:
                chats = converse(srv.url, a.conversations, a.turns)
            bad = [r.error for c in chats for r in c if not r.ok]
            if bad:
                print(f"serve_load: chat turns failed: {bad[:3]}", file=sys.stderr)
                return 1
            reuse[on] = [
                {
                    "ttft": statistics.median(c[t].ttft_s for c in chats),
                    "prompt": statistics.median(c[t].prompt_tokens for c in chats),
                    "cached": statistics.median(c[t].cached_tokens for c in chats),
                    "ok": all(c[t].ok for c in chats),
                }
                for t in range(a.turns)
            ]
        print(json.dumps(reuse, indent=1), file=sys.stderr)

    figures = {"load": load, "continuous": cont, "static": static, "reuse": reuse}
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1))
    if parts != {"load", "bench", "reuse"}:
        print(json.dumps(figures, indent=1))
    else:
        lines = report(a, cap, why, load, cont, static, reuse)
        if a.no_doc:
            print("\n".join(lines))
        else:
            write_section("serve-load", lines)
    ok = all(
        r is None or (r["failed"] == 0 and not r.get("oom_killed")) for r in (load, cont, static)
    )
    return 0 if ok else 1


def report(a, cap, why, load, cont, static, reuse) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    when = datetime.date.today().isoformat()
    cap_text = f"a memory cgroup of {a.mem} (= `--mem`)" if cap else f"no cgroup ({why})"
    cache = f" --expert-cache {a.expert_cache}" if a.expert_cache else ""
    cache += f" --compute-threads {a.compute_threads}" if a.compute_threads else ""
    cache += f" --dtype {a.dtype}" if a.dtype else ""
    cmd = "python tools/serve_load.py" + (
        f" --requests {a.requests} --clients {a.clients} --bench-requests {a.bench_requests}"
        if (a.requests, a.clients, a.bench_requests) != (200, 16, 64)
        else ""
    )
    cmd += f" --repeats {a.repeats}" if a.repeats != 2 else ""
    cmd += f" --compute-threads {a.compute_threads}" if a.compute_threads else ""
    cmd += f" --dtype {a.dtype}" if a.dtype else ""
    ratio = cont["tokens_per_s"] / static["tokens_per_s"] if static["tokens_per_s"] else 0
    loads = [x for s in (load, cont, static) for x in s.get("load_average", ())]
    out = [
        f"### edgemoe serve under load (demo model, {when})",
        "",
        f"`{cmd}` on {cpu}, {os.cpu_count()} cores shared with other work, loopback only. "
        f"The server: `edgemoe serve --mem {a.mem} --ctx {a.ctx} --max-batch {a.max_batch}{cache}` "
        f"inside {cap_text}; greedy requests of mixed lengths (prompts of 4-240 words, "
        "8-128 new tokens, `ignore_eos`), streamed; TTFT is measured at the client, queueing "
        "included."
        + (f" Load average {min(loads):.1f}-{max(loads):.1f} during the runs." if loads else ""),
        "",
        "| run | requests | failed | OOM kills | peak / cap | TTFT p50 | TTFT p99 | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(name, s, clients):
        peak = f"{Bytes(s['peak'])} / {Bytes(s['cap'])}" if "peak" in s else "– (uncapped)"
        oom = ("yes" if s["oom_killed"] else "0") if "oom_killed" in s else "–"
        out.append(
            f"| {name}, {clients} clients | {s['requests']} | {s['failed']} | {oom} | {peak} | "
            f"{fmt_s(s['ttft_p50_s'])} s | {fmt_s(s['ttft_p99_s'])} s | {s['tokens_per_s']:.1f} |"
        )

    row(f"load, continuous batching (max batch {a.max_batch})", load, a.clients)
    row(f"continuous batching (max batch {a.max_batch})", cont, a.bench_clients)
    row("static: one request at a time (max batch 1)", static, a.bench_clients)
    runs = ", ".join(f"{x:.1f}" for x in cont["all_tokens_per_s"])
    runs_s = ", ".join(f"{x:.1f}" for x in static["all_tokens_per_s"])
    out += [
        "",
        f"Continuous batching: {ratio:.2f}x the aggregate tokens/s of one request at a time at "
        f"{a.bench_clients} clients ({a.bench_requests} requests; the median of {a.repeats} "
        f"alternating runs each: {runs} against {runs_s} tokens/s), p99 TTFT "
        f"{fmt_s(cont['ttft_p99_s'])} s against {fmt_s(static['ttft_p99_s'])} s.",
        "",
        *where_time_went(cont, static),
        f"Prompt-prefix reuse: {a.conversations} chats of {a.turns} turns (each turn ~40 words "
        "of user text and a reply of up to 32 tokens), one request at a time, `--max-batch 4 "
        "--ctx 1024`; "
        "medians "
        "over the chats:",
        "",
        "| turn | prompt tokens | reused | TTFT with reuse | TTFT without |",
        "|---|---|---|---|---|",
    ]
    for t, (w, wo) in enumerate(zip(reuse[True], reuse[False]), 1):
        out.append(
            f"| {t} | {w['prompt']:.0f} | {w['cached']:.0f} | {w['ttft']:.3f} s | {wo['ttft']:.3f} s |"
        )
    return out


def where_time_went(cont: dict, static: dict) -> list[str]:
    """The median runs' own split (their servers' shutdown lines): passes, wall and CPU."""
    if "worker_cpu_s" not in cont or "worker_cpu_s" not in static:
        return []
    c, s = cont, static
    cpu = c["worker_cpu_s"], s["worker_cpu_s"]
    return [
        f"Where the time went (the median runs' servers): continuous {c['prefill_s']:.1f} s of "
        f"prefill and {c['decode_s']:.1f} s of decode in {c['steps']} steps "
        f"({1e3 * c['decode_s'] / c['steps']:.1f} ms a step for ~{c['tokens'] / c['steps']:.1f} "
        f"tokens); one at a time {s['prefill_s']:.1f} s of prefill and {s['decode_s']:.1f} s of "
        f"decode in {s['steps']} steps ({1e3 * s['decode_s'] / s['steps']:.1f} ms a token). The "
        f"worker thread's CPU time for the same requests: {cpu[0]:.1f} s (prefill "
        f"{c['prefill_cpu_s']:.1f}, decode {c['decode_cpu_s']:.1f}) against {cpu[1]:.1f} s "
        f"(prefill {s['prefill_cpu_s']:.1f}, decode {s['decode_cpu_s']:.1f}): "
        f"{cpu[1] / cpu[0]:.2f}x less CPU for continuous batching; of all runs, "
        + ", ".join(f"{x:.1f}" for x in c["all_worker_cpu_s"] if x is not None)
        + " against "
        + ", ".join(f"{x:.1f}" for x in s["all_worker_cpu_s"] if x is not None)
        + " s.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
