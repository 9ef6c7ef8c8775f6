"""Cluster records: nodes, the model's expert shape, routing statistics, the expert map.

Small frozen records that placement, the coordinator and the hosts pass
around; none imports Ray, so the pure parts (placement.py) and their tests
run without it. Byte counts are `Bytes`, never bare ints.

Shape legend: L MoE layers, E experts per layer, K experts per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from edgemoe.units import Bytes
from formats.errors import EmoeError

ExpertKey = tuple[int, int]  # (layer, expert)


# ---------------------------------------------------------------- errors


class ClusterError(EmoeError):
    """Base of the cluster's named errors."""

    fix = "see `edgemoe cluster --help`"


class BadNodesFile(ClusterError):
    fix = "fix the nodes file: [[node]] tables with name, profile, budget (see cluster/README.md)"


class BudgetBelowFloor(ClusterError):
    fix = "raise the node's budget in the nodes file"


class ModelMismatch(ClusterError):
    fix = "copy the same .emoe to every host (compare `edgemoe inspect --json` headers)"


class ExpertLost(ClusterError):
    """Every copy of an expert is gone and no live host can take it."""

    fix = "add a node (`edgemoe cluster up` / a raylet with the node's resource) and retry"


class BadPromptsFile(ClusterError):
    fix = 'write one JSON object per line: {"id": "...", "prompt": "..."} (id optional)'


# ---------------------------------------------------------------- nodes


@dataclass(frozen=True)
class Link:
    """The emulated network link between the coordinator and a host.

    rtt_s: round-trip latency; bandwidth: bytes per second each way (None: unlimited).
    """

    rtt_s: float = 0.0
    bandwidth: Bytes | None = None

    def seconds(self, nbytes: int) -> float:
        """One way's transfer time of nbytes (half the RTT plus serialisation)."""
        wire = 0.0 if self.bandwidth is None else nbytes / int(self.bandwidth)
        return self.rtt_s / 2 + wire


# Named links for nodes files (public figures: typical home Wi-Fi 5 and wired LAN).
LINKS = {
    "loopback": Link(0.0, None),
    "ethernet": Link(0.0005, Bytes(125_000_000)),  # 1 Gbit/s, 0.5 ms RTT
    "wifi": Link(0.005, Bytes(12_500_000)),  # 100 Mbit/s, 5 ms RTT
    "lte": Link(0.040, Bytes(2_500_000)),  # 20 Mbit/s, 40 ms RTT
}


@dataclass(frozen=True)
class NodeSpec:
    """One node of a nodes file.

    name: unique; also names its Ray custom resource (`resource`).
    profile: a device profile name or path (devices/profiles); budget: the host process's
    memory budget; link: its network to the coordinator. paging: whether the host may be
    given more experts than its cache holds (it pages them from its flash, as one device does).
    model: the path of the host's own copy of the .emoe (checked against the coordinator's).
    """

    name: str
    profile: str
    budget: Bytes
    link: Link = field(default_factory=Link)
    paging: bool = True
    model: str | None = None  # this host's copy of the .emoe (None: the coordinator's path)

    @property
    def resource(self) -> str:
        return f"edgemoe_host_{self.name}"


@dataclass(frozen=True)
class NodeCapacity:
    """What placement needs of a node: its room for experts and its relative speed.

    room: bytes of its expert cache; speed: expert throughput relative to the devbox
    (1 / the profile's compute_factor); rtt_s: its link's round trip; paging: see NodeSpec.
    """

    name: str
    room: Bytes
    speed: float = 1.0
    rtt_s: float = 0.0
    paging: bool = True


# ---------------------------------------------------------------- model and routing


@dataclass(frozen=True)
class ModelShape:
    """The routed experts placement distributes: per MoE layer, E experts of expert_bytes."""

    layers: tuple[int, ...]
    experts: int
    top_k: int
    expert_bytes: tuple[Bytes, ...]  # per entry of `layers`, at the run's level

    def keys(self) -> list[ExpertKey]:
        return [(layer, e) for layer in self.layers for e in range(self.experts)]

    def nbytes(self, key: ExpertKey) -> Bytes:
        return self.expert_bytes[self.layers.index(key[0])]

    @classmethod
    def from_facts(cls, facts, level: int) -> ModelShape:
        """From an `edgemoe.facts.ModelFacts` (a loaded model's `.facts`) at a level."""
        layers = tuple(facts.moe_layers)
        return cls(
            layers,
            facts.experts_per_layer,
            facts.top_k,
            tuple(Bytes(facts.expert_nbytes(layer, level)) for layer in layers),
        )


@dataclass(frozen=True)
class RoutingStats:
    """How often each expert is chosen, and which experts follow which across layers.

    load: (layer, expert) -> share of routed tokens (missing: uniform).
    follows: ((layer, e), (next layer, e')) -> how often one token chose both.
    """

    load: Mapping[ExpertKey, float] = field(default_factory=dict)
    follows: Mapping[tuple[ExpertKey, ExpertKey], float] = field(default_factory=dict)

    @classmethod
    def from_trace(cls, ids, layers: list[int]) -> RoutingStats:
        """From a routing trace's ids, a [S, T, L, K] array (edgemoe calibrate's)."""
        import numpy as np

        a = np.asarray(ids).reshape(-1, len(layers), np.asarray(ids).shape[-1])  # [S*T, L, K]
        load: dict[ExpertKey, float] = {}
        follows: dict[tuple[ExpertKey, ExpertKey], float] = {}
        for li, layer in enumerate(layers):
            uniq, n = np.unique(a[:, li, :], return_counts=True)
            for e, c in zip(uniq.tolist(), n.tolist()):
                load[(layer, e)] = float(c)
            if li + 1 < len(layers):
                nxt = layers[li + 1]
                pairs = a[:, li, :, None].astype(np.int64) * 65536 + a[:, li + 1, None, :]
                uniq, n = np.unique(pairs, return_counts=True)
                for p, c in zip(uniq.tolist(), n.tolist()):
                    follows[((layer, p // 65536), (nxt, p % 65536))] = float(c)
        return cls(load, follows)


# ---------------------------------------------------------------- the expert map


@dataclass(frozen=True)
class ExpertMap:
    """Which hosts serve each expert, at a version. Calls carry the version they were made on;
    a new map is a new record with a higher version (switched atomically by the coordinator).
    """

    version: int
    replicas: Mapping[ExpertKey, tuple[str, ...]]

    def __post_init__(self):
        object.__setattr__(self, "replicas", MappingProxyType(dict(self.replicas)))

    def hosts(self, key: ExpertKey) -> tuple[str, ...]:
        return self.replicas.get(key, ())

    def nodes(self) -> list[str]:
        return sorted({n for hs in self.replicas.values() for n in hs})

    def experts_on(self, node: str) -> list[ExpertKey]:
        return sorted(k for k, hs in self.replicas.items() if node in hs)

    def as_dict(self) -> dict:
        return {
            "version": self.version,
            "replicas": {f"{k[0]}.{k[1]}": list(v) for k, v in sorted(self.replicas.items())},
        }


@dataclass(frozen=True)
class HostStatus:
    """A host's own report (its `status()` call) or the coordinator's view of a dead one."""

    name: str
    alive: bool
    pid: int = 0
    profile: str = ""
    budget: Bytes = Bytes(0)
    floor: Bytes = Bytes(0)
    room: Bytes = Bytes(0)
    cached: int = 0  # experts in its cache
    cached_bytes: Bytes = Bytes(0)
    calls: int = 0
    reads: int = 0
    bytes_read: Bytes = Bytes(0)
    error: str = ""

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {k: int(v) if isinstance(v, Bytes) else v for k, v in asdict(self).items()}
