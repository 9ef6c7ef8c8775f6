"""Elastic scale-up against stop-the-world re-placement, on one workload.

    python tools/elastic_bench.py [--seconds 40 --join-at 12 --streams 8]

A local Ray cluster (ray.cluster_utils.Cluster on loopback: a head and three
emulated nodes). The demo model is served by two hosts; 8 streams generate
greedy requests of 24 tokens back to back. At --join-at seconds a third node
joins: once with `Coordinator.join` (warm, switch the map by version, drain,
drop), once stop-the-world (`Coordinator.restart_with`: drain, stop every
host, re-place, reload, resume). Every token's time is recorded; the tool
reports failed requests, time from join to serving on the new map, the
unavailability window (the longest time no stream got a token), per-token
latency p50/p99 before, during and after, and throughput over the
stop-the-world window; writes the table to docs/BENCHMARKS.md (section
elastic) and the timeline to docs/elastic_timeline.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from cluster.raynet import LOOPBACK, ray_env  # noqa: E402

for _k, _v in ray_env().items():
    os.environ.setdefault(_k, _v)

from bench_doc import machine  # noqa: E402

from cluster.coordinator import Coordinator  # noqa: E402
from cluster.types import LINKS, NodeSpec  # noqa: E402
from edgemoe.engine import DEMO  # noqa: E402
from edgemoe.sampling import Sampling  # noqa: E402
from edgemoe.units import Bytes  # noqa: E402

NODES = [
    NodeSpec("a", "devbox", Bytes.parse("1GiB"), LINKS["ethernet"]),
    NodeSpec("b", "rpi5-8gb-nvme", Bytes.parse("1GiB"), LINKS["ethernet"]),
    NodeSpec("c", "jetson-orin-nano-8gb", Bytes.parse("1GiB"), LINKS["ethernet"]),
]
PROMPTS = [[5 + i, 17, 42 + i, 99] for i in range(8)]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


class Gate:
    """Stop-the-world's drain: streams park here between steps; `close` returns once every
    running stream is parked (no forward pass in flight)."""

    def __init__(self, streams: int):
        self.cv = threading.Condition()
        self.open, self.parked, self.running = True, 0, streams

    def wait(self) -> None:
        with self.cv:
            if self.open:
                return
            self.parked += 1
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.open)
            self.parked -= 1

    def close(self) -> None:
        with self.cv:
            self.open = False
            self.cv.wait_for(lambda: self.parked >= self.running)

    def reopen(self) -> None:
        with self.cv:
            self.open = True
            self.cv.notify_all()

    def leave(self) -> None:
        with self.cv:
            self.running -= 1
            self.cv.notify_all()


def workload(co, streams: int, seconds: float, join_at: float, scale, gate: Gate):
    """Run streams until `seconds`; call scale() at join_at. Returns (token times per stream,
    failures, events, requests completed)."""
    t0 = time.perf_counter()
    times: list[list[float]] = [[] for _ in range(streams)]
    failures: list[str] = []
    done = {"n": 0}

    def stream(i: int) -> None:
        try:
            while time.perf_counter() - t0 < seconds:
                gate.wait()
                try:
                    for recs in co.model.records(
                        [PROMPTS[i % len(PROMPTS)]], 24, Sampling.greedy()
                    ):
                        times[i].extend(
                            time.perf_counter() - t0 for r in recs if r.token is not None
                        )
                        gate.wait()  # stop-the-world holds every stream between steps
                    done["n"] += 1
                except Exception as e:  # noqa: BLE001 - counted and reported
                    failures.append(f"{type(e).__name__}: {e}")
        finally:
            gate.leave()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(join_at)
    events = scale(t0)
    for t in threads:
        t.join()
    return times, failures, events, done["n"]


def summarize(name, times, failures, events, requests, window):
    flat = sorted(t for ts in times for t in ts)
    gaps = [(b - a, a) for ts in times for a, b in zip(ts, ts[1:])]
    start, end = events["join"], events["serving"]
    phases = {
        "before": [g for g, a in gaps if a + g < start],
        "during": [g for g, a in gaps if start <= a < end],
        "after": [g for g, a in gaps if a >= end],
    }
    idle = max((b - a for a, b in zip(flat, flat[1:]) if a >= start - 1), default=0.0)
    in_window = sum(1 for t in flat if start <= t < start + window)
    return {
        "name": name,
        "failed": len(failures),
        "requests": requests,
        "to_new_map_s": events["serving"] - events["join"],
        "unavailable_s": idle,
        **{f"p50_{k}": 1e3 * percentile(v, 0.5) for k, v in phases.items()},
        **{f"p99_{k}": 1e3 * percentile(v, 0.99) for k, v in phases.items()},
        "tok_s_window": in_window / window,
        "events": events,
        "times": flat,
        "gaps": gaps,
    }


def run(mode: str, args) -> dict:
    gate = Gate(args.streams)
    with Coordinator(DEMO, NODES[:2], batch=args.streams, timeout=30) as co:

        def scale(t0):
            ev = {"join": time.perf_counter() - t0}
            if mode == "elastic":
                rep = co.join(NODES[2])
                ev.update(
                    opened=ev["join"] + rep.opened_s,
                    warmed=ev["join"] + rep.warmed_s,
                    serving=ev["join"] + rep.switched_s,
                    drained=ev["join"] + rep.drained_s,
                    moved=rep.moved,  # experts warmed (minimal-move re-placement)
                    fresh_moved=rep.fresh_moved,  # what a from-scratch placement would move
                    share=next(x["load"] for x in co.status()["loads"] if x["name"] == rep.node),
                )
            else:
                gate.close()  # drain: every stream stops after its current step
                ev["drained"] = time.perf_counter() - t0
                co.restart_with(NODES)
                ev["serving"] = time.perf_counter() - t0
                gate.reopen()
            return ev

        times, failures, events, requests = workload(
            co, args.streams, args.seconds, args.join_at, scale, gate
        )
    return {"times": times, "failures": failures, "events": events, "requests": requests}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--join-at", type=float, default=12.0)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"node_ip_address": LOOPBACK, "num_cpus": 1, "include_dashboard": False},
    )
    for s in NODES:
        c.add_node(node_ip_address=LOOPBACK, num_cpus=1, resources={s.resource: 1})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        raw = {m: run(m, a) for m in ("stop-the-world", "elastic")}
    finally:
        ray.shutdown()
        c.shutdown()
    stw = raw["stop-the-world"]
    window = stw["events"]["serving"] - stw["events"]["join"]
    res = [summarize(m, **r, window=window) for m, r in raw.items()]
    for m, x in raw.items():
        print(m, "failures:", sorted({f[:200] for f in x["failures"]})[:5])
    for r in res:
        print(
            {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in r.items()
                if k not in ("times", "gaps", "events")
            }
        )
        print("  events:", {k: round(v, 2) for k, v in r["events"].items()})
    if not a.no_doc:
        write_doc(res, a, window)
    return 0



def write_doc(res, a, window) -> None:
    from bench_doc import write_section

    ev = next(r["events"] for r in res if r["name"] == "elastic")

    lines = [
        "## Elastic scale-up vs stop-the-world",
        "",
        f"The demo model on a local Ray cluster (loopback raylets, ethernet links emulated): two "
        f"hosts, then a third joins {a.join_at:g} s into a {a.seconds:g} s run of {a.streams} "
        "concurrent streams (greedy requests of 24 tokens back to back, one forward pass at a "
        "time on the coordinator). Elastic: the new host opens, every host warms what the new "
        "map gives it (the join re-places moving as few experts as it can: "
        f"{ev['moved']} warmed, where a from-scratch placement would have moved "
        f"{ev['fresh_moved']}: the joining {NODES[2].profile} is the fastest profile and takes "
        f"{100 * ev['share']:.0f}% of the load), the map switches by version, the old one "
        "drains, old copies are dropped. "
        "Stop-the-world: drain, stop every host, start three, re-place, warm, resume. Per-token "
        "latency is the gap between a stream's tokens; the unavailability window is the longest "
        "time no stream got a token from the join on; throughput is over the stop-the-world "
        f"window ({window:.1f} s from the join). "
        f"`{' '.join(['python tools/elastic_bench.py', *sys.argv[1:]])}` on {machine()}.",
        "",
        "| | failed requests | join to new map (s) | unavailable (s) | p50 / p99 before (ms) | p50 / p99 during (ms) | p50 / p99 after (ms) | tokens/s in the window |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        lines.append(
            f"| {r['name']} | {r['failed']} of {r['requests']} | {r['to_new_map_s']:.2f} | "
            f"{r['unavailable_s']:.2f} | {r['p50_before']:.0f} / {r['p99_before']:.0f} | "
            f"{r['p50_during']:.0f} / {r['p99_during']:.0f} | {r['p50_after']:.0f} / "
            f"{r['p99_after']:.0f} | {r['tok_s_window']:.1f} |"
        )
    lines += ["", "![elastic timeline](elastic_timeline.png)"]
    write_section("elastic", lines)
    plot(res, Path(__file__).resolve().parents[1] / "docs" / "elastic_timeline.png")


def plot(res, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for r, color in zip(res, ("tab:red", "tab:blue")):
        ts = r["times"]
        end = int(max(ts)) + 1 if ts else 1
        bins = [0] * end
        for t in ts:
            bins[int(t)] += 1
        axes[0].plot(range(end), bins, color=color, label=r["name"])
        p99 = []
        for s in range(end):
            g = [x for x, a in r["gaps"] if s - 2 <= a < s + 1]
            p99.append(1e3 * percentile(g, 0.99) if g else float("nan"))
        axes[1].plot(range(end), p99, color=color, label=r["name"])
        for k, style in (("join", "-"), ("warmed", "--"), ("serving", ":")):
            if k in r["events"]:
                for ax in axes:
                    ax.axvline(r["events"][k], color=color, linestyle=style, alpha=0.6)
    axes[0].set_ylabel("tokens/s (1 s bins)")
    axes[1].set_ylabel("p99 token gap (ms, 3 s window)")
    axes[1].set_xlabel("seconds (lines: join -, warmed --, serving on the new map :)")
    axes[0].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
