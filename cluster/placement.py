"""Placement: (model shape, nodes, routing statistics) -> expert map. Pure: no Ray, no I/O.

The rule (docs/design/ALGORITHMS.md §4.3):
1. Copies. Every expert gets `copies` replicas (at most one per node); then each of
   `spare` extra replicas goes to the expert with the largest load per replica
   (DeepSeek's EPLB), so hot experts are served from several hosts.
2. Packing. Replicas go heaviest first into the node with the least load per unit
   of speed, among the nodes with room left in their expert cache (bins scaled by
   each node's memory); a node never holds two copies of one expert. When no node
   has room, a node that may page takes it (the one whose cache is least
   over-committed): its host reads it from its own flash, as a single device does.
3. Affinity (optional). An expert's score on a node drops by `affinity` times the
   share of its tokens that go to (or come from) experts already on that node in
   the next (previous) layer (ExFlow), so a token's chain of experts tends to stay
   on one host and costs fewer round trips.

`repair` drops dead nodes and re-places the experts they leave without a copy
on survivors by the same rule, moving nothing else.

`rebalance` (a join, or any change of the node set) moves as few experts as
it can: the fresh placement for the new nodes gives each node a quota of
bytes and load; every node keeps what it holds up to its quota (shedding, when
over, the experts whose load best matches its excess, so few go), and only
the shed experts, the missing copies and the orphans of gone nodes are packed
by the rule above, new nodes first since they are the least loaded.

Shape legend: L MoE layers, E experts per layer.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cluster.types import (
    ClusterError,
    ExpertKey,
    ExpertLost,
    ExpertMap,
    ModelShape,
    NodeCapacity,
    RoutingStats,
)
from edgemoe.units import Bytes

# What a host process needs besides its expert cache, for `cluster plan` before any host
# runs: a Ray worker with torch imported measured ~330 MiB RSS here (the host measures its own).
HOST_FLOOR_ESTIMATE = Bytes.parse("330MiB")
MARGIN = Bytes.parse("24MiB")  # as the single-device planner: heap, allocator slack


class BadPlacement(ClusterError):
    fix = "check the placement arguments (copies >= 1, spare >= 0, at least one node)"


@dataclass(frozen=True)
class NodeLoad:
    """One node's share of a map: experts, their bytes against its room, routed load."""

    name: str
    experts: int
    nbytes: Bytes
    room: Bytes
    load: float  # share of all routed (token, expert) pairs it serves, 0..1
    paged: bool  # holds more than its cache: some of its experts come from flash

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "experts": self.experts,
            "bytes": int(self.nbytes),
            "room": int(self.room),
            "load": round(self.load, 4),
            "paged": self.paged,
        }


def host_room(budget: Bytes, floor: Bytes, io: Bytes) -> Bytes:
    """A host's expert cache: its budget less its process floor, I/O buffers and margin."""
    return Bytes(max(0, int(budget) - int(floor) - int(io) - int(MARGIN)))


def _loads(shape: ModelShape, stats: RoutingStats) -> dict[ExpertKey, float]:
    """Each expert's share of its layer's routed pairs (uniform where stats say nothing)."""
    out: dict[ExpertKey, float] = {}
    for layer in shape.layers:
        raw = {(layer, e): float(stats.load.get((layer, e), 0.0)) for e in range(shape.experts)}
        total = sum(raw.values())
        for k, v in raw.items():
            out[k] = v / total if total > 0 else 1.0 / shape.experts
    n = len(shape.layers) or 1
    return {k: v / n for k, v in out.items()}


def copies_per_expert(
    loads: dict[ExpertKey, float], copies: int, spare: int, nodes: int
) -> dict[ExpertKey, int]:
    """EPLB: base copies each, then every spare replica to the largest load per replica."""
    base = min(copies, nodes)
    count = dict.fromkeys(loads, base)
    heap = [(-w / base, k) for k, w in loads.items() if base < nodes]
    heapq.heapify(heap)
    for _ in range(spare):
        if not heap:
            break
        _, k = heapq.heappop(heap)
        count[k] += 1
        if count[k] < nodes:
            heapq.heappush(heap, (-loads[k] / count[k], k))
    return count


def _affinity(
    key: ExpertKey, held: set[ExpertKey], stats: RoutingStats, shape: ModelShape
) -> float:
    """Share of key's tokens whose expert in the neighbouring layers is in `held`."""
    if not stats.follows:
        return 0.0
    i = shape.layers.index(key[0])
    nxt = shape.layers[i + 1] if i + 1 < len(shape.layers) else None
    prev = shape.layers[i - 1] if i > 0 else None
    together = total = 0.0
    for e in range(shape.experts):
        if nxt is not None:
            c = stats.follows.get((key, (nxt, e)), 0.0)
            total += c
            together += c if (nxt, e) in held else 0.0
        if prev is not None:
            c = stats.follows.get(((prev, e), key), 0.0)
            total += c
            together += c if (prev, e) in held else 0.0
    return together / total if total else 0.0


def _pack(
    todo: Iterable[tuple[float, ExpertKey]],
    nodes: Sequence[NodeCapacity],
    shape: ModelShape,
    stats: RoutingStats,
    affinity: float,
    held: dict[str, set[ExpertKey]],
    used: dict[str, int],
    load: dict[str, float],
) -> None:
    """Place each (per-replica load, key), heaviest first; updates held/used/load in place."""
    for w, key in sorted(todo, key=lambda t: (-t[0], t[1])):
        size = int(shape.nbytes(key))
        free = [n for n in nodes if key not in held[n.name]]
        if not free:
            continue  # more copies asked than nodes: one per node
        fits = [n for n in free if used[n.name] + size <= int(n.room)]

        def score(n: NodeCapacity, w=w, key=key) -> tuple:
            aff = _affinity(key, held[n.name], stats, shape) if affinity else 0.0
            return ((load[n.name] + w) / n.speed - affinity * aff * w, nodes.index(n))

        if fits:
            best = min(fits, key=score)
        else:
            pagers = [n for n in free if n.paging]
            if not pagers:
                raise ExpertLost(
                    f"no node has room for expert {key[0]}.{key[1]} ({Bytes(size)}) and none may page"
                )
            best = min(
                pagers,
                key=lambda n: ((used[n.name] + size) / max(1, int(n.room)), *score(n)),
            )
        held[best.name].add(key)
        used[best.name] += size
        load[best.name] += w


def _check(nodes: Sequence[NodeCapacity], copies: int, spare: int) -> None:
    if not nodes:
        raise BadPlacement("no nodes to place experts on")
    if copies < 1 or spare < 0:
        raise BadPlacement(f"copies={copies}, spare={spare}")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise BadPlacement(f"node names repeat: {names}")
    for n in nodes:
        if n.speed <= 0:
            raise BadPlacement(f"node {n.name!r} has speed {n.speed}; speeds must be > 0")


def place(
    shape: ModelShape,
    nodes: Sequence[NodeCapacity],
    stats: RoutingStats | None = None,
    *,
    copies: int = 1,
    spare: int = 0,
    affinity: float = 0.0,
    version: int = 1,
) -> ExpertMap:
    """The expert map for these nodes (the module docstring gives the rule).

    Args:
        shape: the routed experts (ModelShape.from_facts).
        nodes: the hosts' capacities.
        stats: routing statistics (None: uniform load, no affinity).
        copies: replicas of every expert (2 survives any one node's loss).
        spare: extra replicas for the hottest experts (EPLB).
        affinity: weight of inter-layer co-location (0: off; 1: strong).
        version: the map's version.
    Returns:
        An ExpertMap; every expert has min(copies, len(nodes)) replicas or more.
    Raises:
        BadPlacement: bad arguments; ExpertLost: an expert fits on no node and none may page.
    """
    _check(nodes, copies, spare)
    stats = stats or RoutingStats()
    loads = _loads(shape, stats)
    count = copies_per_expert(loads, copies, spare, len(nodes))
    held = {n.name: set() for n in nodes}
    used = dict.fromkeys(held, 0)
    load = dict.fromkeys(held, 0.0)
    todo = [(loads[k] / count[k], k) for k in loads for _ in range(count[k])]
    _pack(todo, nodes, shape, stats, affinity, held, used, load)
    order = [n.name for n in nodes]
    replicas = {k: tuple(n for n in order if k in held[n]) for k in loads}
    return ExpertMap(version, replicas)


def repair(
    emap: ExpertMap,
    dead: Iterable[str],
    nodes: Sequence[NodeCapacity],
    shape: ModelShape,
    stats: RoutingStats | None = None,
) -> tuple[ExpertMap, tuple[ExpertKey, ...]]:
    """Drop dead nodes; re-place experts left with no copy on the live `nodes`.

    Returns:
        (the next version of the map, the experts no live node could take).
    """
    dead = set(dead)
    live = [n for n in nodes if n.name not in dead]
    stats = stats or RoutingStats()
    loads = _loads(shape, stats)
    kept = {k: tuple(h for h in hs if h not in dead) for k, hs in emap.replicas.items()}
    held = {n.name: {k for k, hs in kept.items() if n.name in hs} for n in live}
    used = {n: sum(int(shape.nbytes(k)) for k in ks) for n, ks in held.items()}
    load = {n: sum(loads.get(k, 0.0) / max(1, len(kept[k])) for k in ks) for n, ks in held.items()}
    orphans = [(loads.get(k, 0.0), k) for k, hs in kept.items() if not hs]
    lost: list[ExpertKey] = []
    for w, key in sorted(orphans, key=lambda t: (-t[0], t[1])):
        try:
            _pack([(w, key)], live, shape, stats, 0.0, held, used, load)
        except ExpertLost:
            lost.append(key)
            continue
        if not any(key in ks for ks in held.values()):
            lost.append(key)
    order = [n.name for n in live]
    replicas = {k: tuple(n for n in order if k in held[n]) for k in kept}
    return ExpertMap(emap.version + 1, replicas), tuple(sorted(lost))


def moved(old: ExpertMap, new: ExpertMap) -> int:
    """Replicas `new` puts on a node that did not hold them under `old` (each one a warm)."""
    return sum(len(set(new.hosts(k)) - set(old.hosts(k))) for k in new.replicas)


def _shed(
    keys: list[ExpertKey],
    share: dict[ExpertKey, float],
    size: dict[ExpertKey, int],
    max_bytes: int,
    max_load: float,
    avoid: set[ExpertKey],
) -> list[ExpertKey]:
    """Which of a node's experts to give up so it is within its quotas, few of them: each
    step drops the expert whose load is nearest the excess load per expert still to go,
    preferring one no other node gave up (two copies of one expert cannot both go to the
    same new node)."""
    keep = sorted(keys)
    out: list[ExpertKey] = []
    nbytes, load = sum(size[k] for k in keep), sum(share[k] for k in keep)
    while keep and (nbytes > max_bytes or load > max_load + 1e-12):
        over_bytes = max(0, nbytes - max_bytes)
        avg = size[keep[0]] or 1
        count = max(1, -(-over_bytes // avg))  # experts to drop for the bytes alone
        want = max(0.0, load - max_load) / count
        k = min(keep, key=lambda k: (k in avoid, abs(share[k] - want), k))
        keep.remove(k)
        out.append(k)
        nbytes -= size[k]
        load -= share[k]
    return out


def rebalance(
    emap: ExpertMap,
    shape: ModelShape,
    nodes: Sequence[NodeCapacity],
    stats: RoutingStats | None = None,
    *,
    copies: int = 1,
    spare: int = 0,
    affinity: float = 0.0,
    slack: float = 0.05,
    version: int | None = None,
) -> ExpertMap:
    """The map for a new node set that moves as few experts as it can (module docstring).

    Args:
        emap: the map now served (replicas on nodes not in `nodes` are dropped).
        nodes: every node of the new set, with its room and speed.
        copies, spare, affinity: as `place`, whose map sets each node's quotas.
        slack: a node keeps up to (1 + slack) times its fresh load share before it sheds.
        version: the new map's version (default: emap's + 1).
    Returns:
        An ExpertMap as balanced as `place`'s within `slack`, every expert with place's count
        of replicas; `moved(emap, result)` is the number of warms it costs.
    Raises:
        BadPlacement, ExpertLost: as `place`.
    """
    _check(nodes, copies, spare)
    stats = stats or RoutingStats()
    version = emap.version + 1 if version is None else version
    fresh = place(shape, nodes, stats, copies=copies, spare=spare, affinity=affinity)
    loads = _loads(shape, stats)
    count = {k: len(fresh.hosts(k)) for k in loads}
    share = {k: loads[k] / count[k] for k in loads}  # load of one replica
    size = {k: int(shape.nbytes(k)) for k in loads}
    names = {n.name for n in nodes}
    held = {n.name: set() for n in nodes}
    for k in loads:  # keep current replicas on live nodes, at most count[k] of them
        have = [h for h in emap.hosts(k) if h in names][: count[k]]
        for h in have:
            held[h].add(k)
    todo: list[tuple[float, ExpertKey]] = []
    shed: set[ExpertKey] = set()
    for n in nodes:
        quota_b = sum(size[k] for k in fresh.experts_on(n.name))
        quota_l = sum(share[k] for k in fresh.experts_on(n.name)) * (1 + slack)
        for k in _shed(sorted(held[n.name]), share, size, quota_b, quota_l, shed):
            held[n.name].discard(k)
            shed.add(k)
    for k in loads:
        have = sum(k in ks for ks in held.values())
        todo += [(share[k], k)] * (count[k] - have)
    used = {n: sum(size[k] for k in ks) for n, ks in held.items()}
    load = {n: sum(share[k] for k in ks) for n, ks in held.items()}
    _pack(todo, nodes, shape, stats, affinity, held, used, load)
    order = [n.name for n in nodes]
    out = ExpertMap(version, {k: tuple(n for n in order if k in held[n]) for k in loads})
    if moved(emap, fresh) <= moved(emap, out):  # e.g. every node new: nothing to keep
        return ExpertMap(version, fresh.replicas)
    return out


def node_loads(
    emap: ExpertMap,
    nodes: Sequence[NodeCapacity],
    shape: ModelShape,
    stats: RoutingStats | None = None,
) -> list[NodeLoad]:
    """Each node's experts, bytes and share of the routed load under a map (replicas split
    a hot expert's load evenly)."""
    loads = _loads(shape, stats or RoutingStats())
    out = []
    for n in nodes:
        keys = emap.experts_on(n.name)
        nbytes = Bytes(sum(int(shape.nbytes(k)) for k in keys))
        share = sum(loads.get(k, 0.0) / len(emap.hosts(k)) for k in keys)
        out.append(NodeLoad(n.name, len(keys), nbytes, n.room, share, nbytes > n.room))
    return out


def cross_host_hops(emap: ExpertMap, stats: RoutingStats, shape: ModelShape) -> float:
    """Share of consecutive-layer expert pairs (from the routing statistics) whose two
    experts have no host in common: the hops affinity placement tries to cut."""
    total = apart = 0.0
    for (a, b), c in stats.follows.items():
        total += c
        if not set(emap.hosts(a)) & set(emap.hosts(b)):
            apart += c
    return apart / total if total else 0.0
