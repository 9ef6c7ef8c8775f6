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
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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

    why = memcap.available()
    cap = None if why else a.mem
    if why:
        print(f"serve_load: no memory cgroup ({why}); running uncapped", file=sys.stderr)

    print(f"1/3 load: {a.requests} requests, {a.clients} clients", file=sys.stderr)
    load = loaded(a, a.max_batch, mixed_requests(a.requests, ctx=a.ctx), a.clients, cap)
    print(json.dumps(load, indent=1), file=sys.stderr)

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
    print(json.dumps({"continuous": conts, "static": statics}, indent=1), file=sys.stderr)

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
    lines = report(a, cap, why, load, cont, static, reuse)
    if a.no_doc:
        print("\n".join(lines))
    else:
        write_section("serve-load", lines)
    ok = load["failed"] == 0 and not load.get("oom_killed") and cont["failed"] == 0
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
    cmd = "python tools/serve_load.py" + (
        f" --requests {a.requests} --clients {a.clients} --bench-requests {a.bench_requests}"
        if (a.requests, a.clients, a.bench_requests) != (200, 16, 64)
        else ""
    )
    cmd += f" --repeats {a.repeats}" if a.repeats != 2 else ""
    cmd += f" --compute-threads {a.compute_threads}" if a.compute_threads else ""
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


if __name__ == "__main__":
    sys.exit(main())
