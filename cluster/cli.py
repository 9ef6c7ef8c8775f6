"""`edgemoe cluster ...`: plan, up, status, down, generate.

edgemoe/cli.py calls `add_parser(sub)`; every command sets `fn`, and errors are
`EmoeError`s, which the main CLI prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def _pos_int(text: str) -> int:
    v = _nonneg_int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 10.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 10")
    return v


def _placement_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", required=True, help="the nodes file (TOML, [[node]] tables)")
    p.add_argument(
        "--copies",
        type=_pos_int,
        default=1,
        help="replicas of every expert (2 survives a node loss)",
    )
    p.add_argument(
        "--spare", type=_nonneg_int, default=0, help="extra replicas of the hottest experts (EPLB)"
    )
    p.add_argument(
        "--affinity", type=_fraction, default=0.0, help="weight of inter-layer co-location (0 off)"
    )
    p.add_argument(
        "--level", type=_pos_int, help="expert precision level (default: the highest stored)"
    )
    p.add_argument("--dtype", default="auto", help="auto, f32 or bf16")


def _cmd_plan(args) -> int:
    from cluster.model import model_info
    from cluster.nodes import capacities, load_nodes
    from cluster.placement import cross_host_hops, node_loads, place
    from edgemoe.engine import DEMO

    specs = load_nodes(args.nodes)
    info = model_info(args.model or DEMO, args.dtype, args.level)
    caps = capacities(specs, info.shape)
    emap = place(
        info.shape, caps, info.stats, copies=args.copies, spare=args.spare, affinity=args.affinity
    )
    loads = node_loads(emap, caps, info.shape, info.stats)
    hops = cross_host_hops(emap, info.stats, info.shape)
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(info.path),
                    "nodes": [
                        {**nl.as_dict(), "profile": s.profile, "budget": int(s.budget)}
                        for s, nl in zip(specs, loads)
                    ],
                    "cross_host_hops": round(hops, 4),
                    "map": emap.as_dict(),
                },
                indent=2,
            )
        )
        return 0
    shape = info.shape
    print(
        f"{info.path.name}: {info.family}, {len(shape.layers)} MoE layers x {shape.experts} experts "
        f"(top-{shape.top_k}), level {info.level}, {shape.expert_bytes[0]} an expert; routing "
        f"{'from the file' if info.stats.load else 'uniform (no statistics in the file)'}"
    )
    print(
        f"{'node':<12} {'profile':<24} {'budget':>10} {'room':>10} {'experts':>8} {'bytes':>10} {'load':>6}  paged"
    )
    for s, nl in zip(specs, loads):
        print(
            f"{s.name:<12} {s.profile:<24} {str(s.budget):>10} {str(nl.room):>10} {nl.experts:>8} "
            f"{str(nl.nbytes):>10} {100 * nl.load:>5.1f}%  {'yes' if nl.paged else 'no'}"
        )
    print(f"consecutive-layer expert pairs split across hosts: {100 * hops:.1f}%")
    names = {s.name: i for i, s in enumerate(specs)}
    for layer in shape.layers:
        row = " ".join(
            "+".join(str(names[h]) for h in emap.hosts((layer, e))) for e in range(shape.experts)
        )
        print(f"layer {layer:>3}: {row}")
    print("(each layer lists, per expert, the index of its hosts in the table above)")
    return 0


def add_parser(sub) -> None:
    """Add `cluster` and its subcommands to the main CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    c = sub.add_parser("cluster", parents=[common], help="run a model across expert hosts (Ray)")
    cs = c.add_subparsers(dest="cluster_cmd", required=True)

    p = cs.add_parser("plan", parents=[common], help="print the expert placement for a nodes file")
    p.add_argument("model", nargs="?", help="the .emoe (default: the bundled demo model)")
    _placement_flags(p)
    p.add_argument("--json", action="store_true", help="print a JSON record")
    p.set_defaults(fn=_cmd_plan)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `python -m cluster.cli`
    from edgemoe.cli import main as edgemoe_main

    return edgemoe_main(["cluster", *(argv if argv is not None else sys.argv[1:])])
