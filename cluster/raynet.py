"""Ray, on loopback only: the import, host actors pinned by custom resource, the pool.

Every Ray process edgemoe starts binds to 127.0.0.1: Ray's "no multi-node
cluster" switch (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) makes it resolve
"this node" to the loopback address instead of the machine's outward IP, and
emulated nodes are raylets on this machine. Set before Ray is imported.
"""

from __future__ import annotations

import os

from cluster.remote import HostFailed
from cluster.types import ClusterError, NodeSpec

LOOPBACK = "127.0.0.1"


class RayMissing(ClusterError):
    fix = "install the cluster extra: pip install -e '.[ray]'"


class NodeNotInCluster(ClusterError):
    fix = "start the node's raylet with its resource (`edgemoe cluster up --nodes FILE`)"


def ray_env() -> dict[str, str]:
    """Environment every Ray process of ours gets (loopback, no OOM-killer polling)."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_memory_monitor_refresh_ms": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def import_ray():
    """`import ray` on loopback; RayMissing names the extra when it is not installed."""
    for k, v in ray_env().items():
        os.environ.setdefault(k, v)
    try:
        import ray
    except ImportError:
        raise RayMissing("Ray is not installed") from None
    return ray


def connect(address: str | None = None):
    """Join a running Ray cluster (address None: the one on this machine, or RAY_ADDRESS)."""
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address or "auto", log_to_driver=False)
        except ConnectionError as e:
            raise ClusterError(
                f"no Ray cluster to join ({e})",
                "start one with `edgemoe cluster up --nodes FILE` or `ray start --head`",
            ) from None
    return ray


def cause(err: BaseException) -> BaseException:
    """The error a Ray task raised (RayTaskError wraps it), or err itself."""
    inner = getattr(err, "cause", None)
    return inner if isinstance(inner, BaseException) else err


def start_host(spec: NodeSpec, path: str, dtype: str, level: int, crc: int):
    """A host actor on the node that offers `spec.resource`; not yet opened."""
    ray = import_ray()
    from cluster.host import ExpertHost

    if ray.cluster_resources().get(spec.resource, 0) < 1:
        raise NodeNotInCluster(
            f"node {spec.name!r}: no live raylet offers the resource {spec.resource!r}"
        )
    actor = ray.remote(ExpertHost).options(
        num_cpus=0,
        resources={spec.resource: 1},
        max_concurrency=4,  # serve, warm and report at once (the executor itself is locked)
        max_restarts=0,
        name=f"edgemoe-host-{spec.name}",
        get_if_exists=False,
    )
    return actor.remote(spec, spec.model or path, dtype, level, crc)


class RayPool:
    """The RemoteExecutor's hosts as Ray actors."""

    def __init__(self, actors: dict, specs: dict[str, NodeSpec]):
        self.actors, self.specs = actors, specs

    def submit(self, node, version, layer, x, pair_row, pair_expert):
        return self.actors[node].compute.remote(version, layer, x, pair_row, pair_expert)

    def result(self, node, call, timeout):
        ray = import_ray()
        from ray.exceptions import GetTimeoutError, RayError

        try:
            return ray.get(call, timeout=timeout)
        except GetTimeoutError:
            raise HostFailed(node, f"no answer in {timeout:.1f} s") from None
        except RayError as e:  # actor or node died, worker crashed, or the call raised
            raise HostFailed(node, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None

    def rtt(self, node) -> float:
        return self.specs[node].link.rtt_s
