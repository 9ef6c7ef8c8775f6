"""`edgemoe cluster up`'s supervisor: a local emulated cluster on loopback.

`python -m cluster.up NODES STATE PORT` starts a Ray head (with the job server
on 127.0.0.1:PORT) and one raylet per node of the nodes file, each with its
custom resource and its spec as labels, writes STATE (JSON: its pid, the
addresses, the nodes) once every node is up, and sleeps. SIGTERM (`edgemoe
cluster down`) removes STATE and shuts every raylet down. The CLI starts it
detached and waits for STATE.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path


def state_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgemoe" / "cluster-up.json"


def read_state(path: Path) -> dict | None:
    """The running cluster's state, or None (no file, or its supervisor is gone)."""
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
        os.kill(int(st["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return st


def free_port() -> int:
    """A port free on the loopback now (another Ray cluster on this machine holds the
    defaults: its GCS on 6379, its dashboard agent on 52365)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    nodes_file, state, port = argv[0], Path(argv[1]), int(argv[2])
    from cluster.jobs import spec_labels
    from cluster.nodes import load_nodes
    from cluster.raynet import LOOPBACK, import_ray

    specs = load_nodes(nodes_file)
    import_ray()
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={
            "node_ip_address": LOOPBACK,
            "gcs_server_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
            "metrics_export_port": free_port(),
            "metrics_agent_port": free_port(),
            "runtime_env_agent_port": free_port(),
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": LOOPBACK,
            "dashboard_port": port,
            "object_store_memory": 100 * 1024 * 1024,
        },
    )

    def stop(*_):
        raise SystemExit(0)  # the finally below removes STATE and stops every raylet

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for s in specs:
            c.add_node(
                node_ip_address=LOOPBACK,
                num_cpus=1,
                resources={s.resource: 1},
                labels=spec_labels(s),
                object_store_memory=80 * 1024 * 1024,
            )
        c.wait_for_nodes()
        # again: each Ray node started in this process installs its own SIGTERM handler,
        # which exits without removing STATE
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        state.parent.mkdir(parents=True, exist_ok=True)
        tmp = state.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "address": c.address,
                    "dashboard": f"http://{LOOPBACK}:{port}",
                    "nodes": [s.name for s in specs],
                    "nodes_file": str(Path(nodes_file).absolute()),
                }
            )
        )
        os.replace(tmp, state)
        while True:
            time.sleep(3600)
    finally:
        state.unlink(missing_ok=True)
        c.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
