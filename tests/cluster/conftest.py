"""A real Ray cluster for the cluster tests: `ray.cluster_utils.Cluster` on loopback, one
raylet per emulated node with its custom resource (heterogeneous: different profiles,
budgets and links are in the NodeSpecs the tests give the coordinator)."""

from __future__ import annotations

import os

import pytest

from cluster.raynet import LOOPBACK, ray_env

for _k, _v in ray_env().items():  # before anything imports ray
    os.environ.setdefault(_k, _v)

# fast node-death detection, so a killed raylet fails calls in about a second
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 300,
    "health_check_failure_threshold": 3,
}


def need_ray():
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("the Ray tests must run in CI: install '.[ray]'")
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")


class RayNodes:
    """The test cluster: add and remove emulated nodes by name."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "node_ip_address": LOOPBACK,
                "num_cpus": 1,
                "include_dashboard": False,
                "object_store_memory": 80 * 1024 * 1024,
                "_system_config": SYSTEM_CONFIG,
            },
        )
        self.nodes: dict = {}
        self.killed: list = []

    def add(self, name: str):
        node = self.cluster.add_node(
            node_ip_address=LOOPBACK,
            num_cpus=1,
            resources={f"edgemoe_host_{name}": 1},
            object_store_memory=80 * 1024 * 1024,
        )
        self.nodes[name] = node
        return node

    def remove(self, name: str, graceful: bool = False):
        node = self.nodes.pop(name)
        self.cluster.remove_node(node, allow_graceful=graceful)

    def kill_raylet(self, name: str) -> None:
        """Kill only the node's raylet (its workers die with it); removed from the cluster's
        books at the next ensure()."""
        node = self.nodes.pop(name)
        node.kill_raylet()
        self.killed.append(node)

    def ensure(self, *names: str) -> None:
        while self.killed:  # wait_for_nodes counts every node the cluster started
            self.cluster.remove_node(self.killed.pop(), allow_graceful=False)
        for n in names:
            if n not in self.nodes:
                self.add(n)
        self.cluster.wait_for_nodes()


@pytest.fixture(scope="session")
def ray_nodes():
    need_ray()
    import ray

    nodes = RayNodes()
    ray.init(address=nodes.cluster.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.cluster.shutdown()
