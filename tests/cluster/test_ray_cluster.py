"""The cluster on a real Ray cluster (ray.cluster_utils.Cluster, loopback): exactness
against the single device, node loss, an unrecoverable loss, elastic join, bad joins."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import edgemoe
from cluster.coordinator import Coordinator
from cluster.selection import RequestClass
from cluster.types import BudgetBelowFloor, ExpertLost, Link, ModelMismatch, NodeSpec
from edgemoe.sampling import Sampling
from edgemoe.units import Bytes

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = [[5, 17, 42, 99, 7], [3, 3, 8], [11, 12, 13, 14], [200, 1, 77]]
GB = Bytes.parse("1GiB")


def spec(name, profile="devbox", link=None, **kw):
    return NodeSpec(name, profile, kw.pop("budget", GB), link or Link(), **kw)


NODES = [
    spec("a", "devbox"),
    spec("b", "rpi5-8gb-nvme", Link(0.005, Bytes(12_500_000))),  # Wi-Fi: 5 ms, 100 Mbit/s
    spec("c", "jetson-orin-nano-8gb", Link(0.0005, Bytes(125_000_000))),
]


def single(path, info_dtype, prompts=PROMPTS, n=10):
    with edgemoe.load(path, None, dtype=info_dtype, batch=len(prompts)) as m:
        return [c.token_ids for c in m.complete(prompts, n, Sampling.greedy())]


def cluster_tokens(co, prompts=PROMPTS, n=10):
    return [c.token_ids for c in co.model.complete(prompts, n, Sampling.greedy())]


def alive_hosts():
    import ray

    return sorted(n for n in ray.util.list_named_actors() if n.startswith("edgemoe-host-"))


@pytest.mark.parametrize(
    "family, experts, dense", [("qwen3_moe", "int8", "bf16"), ("deepseek_v3", "f32", "f32")]
)
def test_greedy_equals_single_device(ray_nodes, tiny_emoe, family, experts, dense):
    ray_nodes.ensure("a", "b", "c")
    path = tiny_emoe(family, experts=experts, dense=dense)
    with Coordinator(path, NODES, batch=len(PROMPTS), timeout=20) as co:
        got = cluster_tokens(co)
        st = co.status()
        assert got == single(path, co.info.dtype)
        assert st["healthy"] and all(h["alive"] and h["calls"] > 0 for h in st["hosts"])
        # per-request MoE² classes in one batch: a 2 ms class skips the Wi-Fi node (b)
        rt = RequestClass("rt", latency_s=0.002)
        out = co.complete(PROMPTS, 10, Sampling.greedy(), classes=[None, rt, None, rt])
        assert [out[0].token_ids, out[2].token_ids] == [got[0], got[2]]
        assert all(len(c.token_ids) == 10 for c in out) and co.executor.dropped > 0
    assert alive_hosts() == []  # close() stopped every host


def test_node_loss_mid_generation(ray_nodes, tiny_emoe):
    """copies=2: a node lost mid-generation (its raylet removed without grace, and its host
    process with it, as when a machine drops); its experts' second copies answer at once."""
    import ray

    ray_nodes.ensure("a", "b", "c")
    path = tiny_emoe("qwen3_moe")
    with Coordinator(path, NODES, copies=2, batch=len(PROMPTS), timeout=10) as co:
        want = single(path, co.info.dtype)
        pid = ray.get(co.actors["a"].pid.remote())  # the nearest host: it serves most calls
        calls = {"n": 0}

        def kill_midway(layer, ids):
            calls["n"] += 1
            if calls["n"] == 12:
                ray_nodes.remove("a")
                try:  # the worker outlives its raylet for a moment; a lost machine does not
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        co.executor.observe(kill_midway)
        t0 = time.perf_counter()
        assert cluster_tokens(co) == want
        took = time.perf_counter() - t0
        f = co.executor.failures
        assert f and f[-1].recovered_s >= 0 and {x.node for x in f} == {"a"}
        st = co.status()
        assert {h["name"]: h["alive"] for h in st["hosts"]} == {"a": False, "b": True, "c": True}
        assert st["recoveries_s"] and max(st["recoveries_s"]) < 10
        print(f"node loss: recovered in {f[-1].recovered_s:.2f} s, generation {took:.1f} s")


def test_raylet_killed_mid_generation(ray_nodes, tiny_emoe):
    """node.kill_raylet() mid-generation: the tokens are those of a run without the failure,
    and the status soon reports the host down (its worker dies with its raylet)."""
    ray_nodes.ensure("a", "b", "c")
    path = tiny_emoe("qwen3_moe")
    with Coordinator(path, NODES, copies=2, batch=len(PROMPTS), timeout=10) as co:
        want = single(path, co.info.dtype)
        calls = {"n": 0}

        def kill_midway(layer, ids):
            calls["n"] += 1
            if calls["n"] == 9:
                ray_nodes.kill_raylet("a")

        co.executor.observe(kill_midway)
        assert cluster_tokens(co) == want
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if not {h["name"]: h["alive"] for h in co.status()["hosts"]}["a"]:
                break
            time.sleep(1)
        st = co.status()
        assert {h["name"]: h["alive"] for h in st["hosts"]} == {"a": False, "b": True, "c": True}
        assert cluster_tokens(co) == want  # and it serves on


def test_host_sigkill_replaced_on_survivors(ray_nodes, tiny_emoe):
    """copies=1: a host process SIGKILLed; its experts are re-placed on the survivors."""
    import ray

    ray_nodes.ensure("a", "b", "c")
    path = tiny_emoe("deepseek_v3")
    with Coordinator(path, NODES, batch=len(PROMPTS), timeout=10) as co:
        want = single(path, co.info.dtype)
        pid = ray.get(co.actors["a"].pid.remote())
        lost_experts = co.executor.map.experts_on("a")
        calls = {"n": 0}

        def kill_midway(layer, ids):
            calls["n"] += 1
            if calls["n"] == 7:
                os.kill(pid, signal.SIGKILL)

        co.executor.observe(kill_midway)
        assert cluster_tokens(co) == want
        m = co.executor.map
        assert "a" not in m.nodes() and all(m.hosts(k) for k in lost_experts)
        assert co.status()["hosts"][0]["alive"] is False


def test_unrecoverable_is_named_then_serving_resumes(ray_nodes, tiny_emoe):
    """Every host gone: the request fails with ExpertLost in bounded time (no hang); the
    coordinator lives on, reports it, and serves again once a node joins."""
    ray_nodes.ensure("a", "b")
    path = tiny_emoe("qwen3_moe")
    co = Coordinator(path, NODES[:2], batch=len(PROMPTS), timeout=5, retries=1).start()
    try:
        want = single(path, co.info.dtype)
        import ray

        for a in co.actors.values():
            ray.kill(a)
        t0 = time.perf_counter()
        with pytest.raises(ExpertLost):
            cluster_tokens(co)
        assert time.perf_counter() - t0 < 30
        st = co.status()
        assert not st["healthy"] and not any(h["alive"] for h in st["hosts"])
        ray_nodes.ensure("c")
        co.join(NODES[2])
        assert cluster_tokens(co) == want
    finally:
        co.close()


def test_join_while_serving(ray_nodes, tiny_emoe):
    ray_nodes.ensure("a", "b", "c")
    path = tiny_emoe("qwen3_moe")
    prompts = PROMPTS * 2  # 8 streams
    with Coordinator(path, NODES[:2], batch=len(prompts), timeout=20) as co:
        want = single(path, co.info.dtype, prompts, 24)
        out, errors = {}, []

        def serve():
            try:
                out["tokens"] = cluster_tokens(co, prompts, 24)
            except Exception as e:  # noqa: BLE001 - the test reports it
                errors.append(e)

        t = threading.Thread(target=serve)
        t.start()
        time.sleep(0.5)
        v0 = co.executor.map.version
        report = co.join(NODES[2])
        t.join(120)
        assert not errors and out["tokens"] == want
        assert report.version == v0 + 1 and co.executor.map.version == v0 + 1
        assert "c" in co.executor.map.nodes() and report.moved > 0
        assert report.opened_s <= report.warmed_s <= report.switched_s <= report.drained_s
        assert not co.executor.failures
        # warming measured both ways (own flash vs a peer's memory via the object store)
        assert report.file_ms > 0 and report.peer_ms > 0 and report.source in ("file", "peer")
        print(f"join: {report}")


def test_bad_joins_are_named_and_leave_nothing(ray_nodes, tiny_emoe, tmp_path):
    ray_nodes.ensure("a", "b", "c")
    path = tiny_emoe("qwen3_moe")
    other = tiny_emoe("mixtral")
    # at start: the whole start is refused and every host it opened is stopped
    with pytest.raises(ModelMismatch, match="node 'b'.*header CRC"):
        Coordinator(path, [NODES[0], spec("b", model=str(other))], timeout=20).start()
    assert alive_hosts() == []
    with Coordinator(path, NODES[:2], batch=1, timeout=20) as co:
        with pytest.raises(ModelMismatch, match="header CRC"):
            co.join(spec("c", model=str(other)))
        with pytest.raises(BudgetBelowFloor, match="smallest budget"):
            co.join(spec("c", budget=Bytes.parse("300MiB")))
        assert alive_hosts() == ["edgemoe-host-a", "edgemoe-host-b"]
        assert co.status()["healthy"]
