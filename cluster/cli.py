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


def _cmd_generate(args) -> int:
    from cluster.jobs import generate_job, read_prompts
    from cluster.nodes import load_nodes
    from cluster.raynet import connect
    from edgemoe.engine import DEMO
    from edgemoe.sampling import Sampling

    read_prompts(args.prompts)  # a bad file is refused before anything starts
    specs = list(load_nodes(args.nodes)) if args.nodes else None
    if args.address:
        connect(args.address)
    sampling = (
        Sampling.greedy()
        if args.temperature == 0
        else Sampling(temperature=args.temperature, seed=args.seed)
    )
    generate_job(
        args.model or DEMO,
        args.prompts,
        args.out,
        specs=specs,
        max_tokens=args.max_tokens,
        sampling=sampling,
        copies=args.copies,
        log=lambda line: print(line, flush=True),
    )
    return 0


def _cmd_up(args) -> int:
    import os
    import subprocess
    import time
    from pathlib import Path

    from cluster.nodes import load_nodes
    from cluster.raynet import ray_env
    from cluster.types import ClusterError
    from cluster.up import read_state, state_path

    specs = load_nodes(args.nodes)  # every bad input refused before anything starts
    for s in specs:
        if "/" in s.profile or s.model:
            raise ClusterError(
                f"node {s.name!r}: `cluster up` nodes name a shipped or user profile and use "
                "the coordinator's model",
                "use a profile name (`edgemoe devices`) and drop the node's model key",
            )
    state = Path(args.state) if args.state else state_path()
    if read_state(state):
        raise ClusterError(
            f"a cluster is already up ({state})", "stop it with `edgemoe cluster down`"
        )
    state.parent.mkdir(parents=True, exist_ok=True)
    log = state.with_suffix(".log")
    env = {**os.environ, **ray_env()}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.up", args.nodes, str(state), str(args.dashboard_port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    end = time.monotonic() + args.timeout
    while time.monotonic() < end:
        st = read_state(state)
        if st:
            print(f"edgemoe cluster up: {len(st['nodes'])} nodes ({', '.join(st['nodes'])})")
            print(f"  ray address  {st['address']}   (ray.init(address=...); RAY_ADDRESS)")
            print(f"  job server   {st['dashboard']}   (ray job submit --address ...)")
            print("  stop with    edgemoe cluster down")
            return 0
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ClusterError(f"the cluster did not start: {tail[0][:300]}", f"see {log}")
        time.sleep(0.5)
    proc.terminate()
    proc.wait(60)
    raise ClusterError(f"the cluster was not up after {args.timeout} s", f"see {log}")


def _cmd_down(args) -> int:
    import os
    import signal
    import time
    from pathlib import Path

    from cluster.up import read_state, state_path

    state = Path(args.state) if args.state else state_path()
    st = read_state(state)
    if not st:
        print("edgemoe cluster down: no cluster is up")
        return 0
    os.kill(int(st["pid"]), signal.SIGTERM)
    end = time.monotonic() + 60
    while time.monotonic() < end and read_state(state):
        time.sleep(0.3)
    print("edgemoe cluster down: stopped")
    return 0


def _cmd_status(args) -> int:
    from pathlib import Path

    from cluster.jobs import label_specs
    from cluster.raynet import connect
    from cluster.up import read_state, state_path

    st = read_state(Path(args.state) if args.state else state_path())
    ray = connect(args.address or (st or {}).get("address"))
    nodes = ray.nodes()
    specs = {s.name: s for s in label_specs(nodes)}
    hosts = {}
    for name in ray.util.list_named_actors():
        if name.startswith("edgemoe-host-"):
            try:
                hosts[name[13:]] = ray.get(ray.get_actor(name).status.remote(), timeout=5).as_dict()
            except Exception as e:  # a host that does not answer is reported as such
                hosts[name[13:]] = {"alive": False, "error": type(e).__name__}
    rows = []
    for n in nodes:
        lab = n.get("Labels") or {}
        name = lab.get("edgemoe-node")
        rows.append(
            {
                "node": name
                or ("head" if n.get("Resources", {}).get("node:__internal_head__") else "-"),
                "alive": bool(n.get("Alive")),
                "address": n.get("NodeManagerAddress", ""),  # 127.0.0.1: nothing leaves the machine
                "profile": lab.get("edgemoe-profile", ""),
                "budget": int(specs[name].budget) if name in specs else 0,
                "host": hosts.get(name),
            }
        )
    out = {"address": (st or {}).get("address"), "nodes": rows}
    if args.model or specs:
        from cluster.model import model_info
        from cluster.nodes import capacities
        from cluster.placement import node_loads, place
        from edgemoe.engine import DEMO

        info = model_info(args.model or DEMO)
        caps = capacities(list(specs.values()), info.shape)
        emap = place(info.shape, caps, info.stats)
        out["placement"] = [nl.as_dict() for nl in node_loads(emap, caps, info.shape, info.stats)]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"cluster {out['address'] or '(auto)'}: {sum(r['alive'] for r in rows)} of {len(rows)} raylets alive"
    )
    loads = {p["name"]: p for p in out.get("placement", [])}
    print(
        f"{'node':<12} {'alive':<6} {'address':<10} {'profile':<24} {'budget':>10}  "
        f"{'planned':<22} host"
    )
    for r in rows:
        p = loads.get(r["node"])
        plan = f"{p['experts']} experts, {100 * p['load']:.0f}% load" if p else ""
        h = r["host"]
        if h is None:
            host = "-"
        elif h.get("alive"):
            host = f"pid {h['pid']}, {h['cached']} cached ({h['cached_bytes'] // 1024} KiB), {h['calls']} calls"
        else:
            host = f"DOWN ({h.get('error', '')})"
        budget = f"{r['budget'] // 2**20} MiB" if r["budget"] else ""
        print(
            f"{r['node']:<12} {str(r['alive']).lower():<6} {r['address']:<10} {r['profile']:<24} "
            f"{budget:>10}  {plan:<22} {host}"
        )
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

    g = cs.add_parser(
        "generate",
        parents=[common],
        help="generate a prompts file on the cluster (a resumable job)",
    )
    g.add_argument("--model", help="the .emoe (default: the bundled demo model)")
    g.add_argument(
        "--prompts",
        required=True,
        help='JSON lines: {"prompt": ..., "id"?: ..., "max_tokens"?: ...}',
    )
    g.add_argument(
        "--out", required=True, help="results as JSON lines (parts kept in OUT.parts/ for resuming)"
    )
    g.add_argument("--nodes", help="the nodes file (default: the nodes `cluster up` started)")
    g.add_argument(
        "--max-tokens", type=_pos_int, default=64, help="new tokens per prompt (default 64)"
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--copies", type=_pos_int, default=1, help="replicas of every expert")
    g.add_argument("--address", help="the Ray cluster (default: RAY_ADDRESS or this machine's)")
    g.set_defaults(fn=_cmd_generate)

    u = cs.add_parser(
        "up", parents=[common], help="start a local emulated cluster: a raylet per node"
    )
    u.add_argument("--nodes", required=True, help="the nodes file")
    u.add_argument(
        "--dashboard-port", type=_pos_int, default=8265, help="the job server's port (default 8265)"
    )
    u.add_argument(
        "--timeout", type=_pos_int, default=300, help="seconds to wait for every node (default 300)"
    )
    u.add_argument("--state", help=argparse.SUPPRESS)
    u.set_defaults(fn=_cmd_up)

    d = cs.add_parser("down", parents=[common], help="stop the cluster `cluster up` started")
    d.add_argument("--state", help=argparse.SUPPRESS)
    d.set_defaults(fn=_cmd_down)

    st = cs.add_parser("status", parents=[common], help="nodes, planned placement, live hosts")
    st.add_argument("--model", help="plan for this .emoe (default: the demo)")
    st.add_argument("--address", help="the Ray cluster (default: the one `cluster up` started)")
    st.add_argument("--json", action="store_true")
    st.add_argument("--state", help=argparse.SUPPRESS)
    st.set_defaults(fn=_cmd_status)
