"""MoE² on the demo model: held-out perplexity against the latency and the energy budget.

    python tools/heldout_text.py /tmp/heldout.txt
    python tools/moe2_tradeoff.py /tmp/heldout.txt [--segments 16 --tokens 128]

An emulated 4-node edge cluster (below) holds the demo's experts (placement.py, 16 spare
replicas for the hottest). Every run computes the model teacher-forced over the same
held-out segments; what differs is which experts each token gets (cluster/selection.py)
and what that costs on the nodes (their profiles' compute factor and watts, their links).
Baselines: every chosen expert at its nearest replica; at a random replica. Writes the
table to docs/BENCHMARKS.md (section moe2) and the plot to docs/moe2_tradeoff.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from bench_doc import machine  # noqa: E402

import edgemoe  # noqa: E402
from cluster.model import model_info  # noqa: E402
from cluster.nodes import capacities  # noqa: E402
from cluster.placement import place  # noqa: E402
from cluster.selection import (  # noqa: E402
    RequestClass,
    SelectingExecutor,
    loads_per_token,
    node_costs,
    select_experts,
)
from cluster.types import LINKS, NodeSpec  # noqa: E402
from edgemoe.engine import DEMO  # noqa: E402
from edgemoe.units import Bytes  # noqa: E402

NODES = [
    NodeSpec("hub", "laptop-8gb", Bytes.parse("400MiB"), LINKS["ethernet"]),
    NodeSpec("orin", "jetson-orin-nano-8gb", Bytes.parse("400MiB"), LINKS["wifi"]),
    NodeSpec("pi", "rpi5-8gb-nvme", Bytes.parse("400MiB"), LINKS["ethernet"]),
    NodeSpec("phone", "snapdragon-8gen3-phone", Bytes.parse("400MiB"), LINKS["lte"]),
]



def segments(text: str, tok, n: int, length: int) -> list[list[int]]:
    ids = tok.encode(text)
    step = max(length, (len(ids) - length) // n)
    return [ids[i * step : i * step + length] for i in range(n) if len(ids) >= i * step + length]


def perplexity(factory, segs: list[list[int]]) -> tuple[float, object]:
    holder = {}

    def make(ctx):
        holder["ex"] = factory(ctx)
        return holder["ex"]

    nll, count = 0.0, 0
    with edgemoe.load(DEMO, None, dtype="f32", ctx=max(len(s) for s in segs), executor=make) as m:
        cache = m.kv_cache()
        (slot,) = m.take_slots(1)
        for s in segs:
            cache.lengths[slot] = 0
            tokens = torch.tensor([s])
            h = m.forward(tokens, cache, None, torch.tensor([slot]))
            logp = torch.log_softmax(m.logits(h)[0, :-1], dim=-1)
            nll -= float(logp.gather(1, tokens[0, 1:, None]).sum())
            count += len(s) - 1
    return math.exp(nll / count), holder["ex"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("text")
    ap.add_argument("--segments", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    info = model_info(DEMO, "f32")
    caps = capacities(NODES, info.shape)
    emap = place(info.shape, caps, info.stats, spare=16)
    with edgemoe.load(DEMO, None, dtype="f32") as m:
        cfg = m.reader.config
        segs = segments(Path(a.text).read_text(), m.tokenizer, a.segments, a.tokens)
    costs = node_costs(NODES, cfg["hidden_size"], cfg["moe_intermediate_size"], item=4)
    loads = loads_per_token(info.shape, info.stats.load)
    layers = len(info.shape.layers)
    for c in costs.values():
        print(
            f"node {c.name}: {1e3 * c.call_s:.3f} ms a call, {1e6 * c.joules:.3f} uJ an expert token"
        )
    rows = []

    def run(label, budget, policy, sel=None, seed=0):
        t0 = time.perf_counter()
        ppl, ex = perplexity(
            lambda ctx: SelectingExecutor(ctx.local(), emap, costs, policy, sel, seed), segs
        )
        d = ex.count.as_dict(layers)
        rows.append({"policy": label, "budget": budget, "ppl": ppl, **d})
        print(f"{label:<22} {budget:<14} ppl {ppl:7.2f}  kept {d['gate_mass_kept']:.3f}  "
              f"fallback {d['fallback_share']:.3f}  "
              f"{d['latency_ms_per_layer']:6.2f} ms/layer  {d['energy_mj_per_token']:.4f} mJ/token  "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip

    run("nearest replica", "-", "nearest")
    run("random replica", "-", "random")
    full = select_experts(emap, costs, loads, RequestClass("all"), info.shape).expected_j
    for strict in (False, True):  # strict: no fallback, the budgets are never exceeded
        tag = ", strict" if strict else ""
        for ms in (50.0, 10.0, 1.0):
            k = RequestClass("rt", latency_s=ms / 1e3, strict=strict)
            run(
                "MoE² latency" + tag,
                f"{ms:g} ms",
                "moe2",
                select_experts(emap, costs, loads, k, info.shape),
            )
        for share in (1.0, 0.75, 0.5, 0.35, 0.2):
            k = RequestClass("eco", energy_j=full * share, strict=strict)
            run(
                "MoE² energy" + tag,
                f"{share:.0%} of all",
                "moe2",
                select_experts(emap, costs, loads, k, info.shape),
            )
    lines = [
        "## MoE² selection: perplexity against latency and energy budgets",
        "",
        f"Demo model, held-out text ({len(segs)} segments x {a.tokens} tokens, teacher-forced, f32), "
        "experts placed on 4 emulated nodes: hub (laptop-8gb, ethernet), orin (Jetson Orin Nano, "
        "Wi-Fi 5 ms), pi (Raspberry Pi 5, ethernet), phone (Snapdragon 8 Gen 3, LTE 40 ms); 16 "
        "spare replicas of the hottest experts. A call's latency is its link's round trip and "
        "transfer plus the expert's FLOPs at the node's speed; its energy is the node's watts "
        "(profile key `watts`) times that compute time. Latency is the slowest call of a MoE "
        "layer (calls go in parallel), averaged over layers. Budgets: the latency a layer may "
        "wait; the energy a token may spend, as a share of serving every expert at its "
        "cheapest replica. A token none of whose chosen experts is served within the budgets "
        "falls back to its top choice at that expert's fastest replica (column fallback: the "
        "share of (token, layer)s that did; their calls count in the latency and energy, so "
        "the budgets can be exceeded); a strict class has no fallback (such a token gets its "
        "shared expert only) and never exceeds its budgets. "
        f"`python tools/moe2_tradeoff.py {' '.join(sys.argv[1:])}` on {machine(load=False)}.",
        "",
        "| policy | budget | perplexity | gate weight kept | fallback | latency ms/layer "
        "| energy mJ/token |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['policy']} | {r['budget']} | {r['ppl']:.2f} | {r['gate_mass_kept']:.3f} | "
            f"{r['fallback_share']:.3f} | {r['latency_ms_per_layer']:.2f} | "
            f"{r['energy_mj_per_token']:.4f} |"
            for r in rows
        ),
        "",
        "![MoE² trade-off](moe2_tradeoff.png)",
    ]
    if not a.no_doc:
        from bench_doc import write_section

        write_section("moe2", lines)
        plot(rows, Path(__file__).resolve().parents[1] / "docs" / "moe2_tradeoff.png")
    return 0


def plot(rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label, xlab in (
        (a1, "MoE² latency", "latency_ms_per_layer", "latency per MoE layer (ms)"),
        (a2, "MoE² energy", "energy_mj_per_token", "energy per token (mJ)"),
    ):
        for policy, name, style in (
            (key, "MoE² (fallback)", "o-"),
            (key + ", strict", "MoE² strict", "x--"),
        ):
            pts = [r for r in rows if r["policy"] == policy]
            ax.plot([r[label] for r in pts], [r["ppl"] for r in pts], style, label=name)
        for r, mk in ((rows[0], "s"), (rows[1], "^")):
            ax.plot([r[label]], [r["ppl"]], mk, label=r["policy"])
        ax.set_xlabel(xlab)
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    a1.set_title("perplexity vs latency budget")
    a2.set_title("perplexity vs energy budget")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
