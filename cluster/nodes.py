"""The nodes file: which hosts a cluster has, their device profiles, budgets and links.

    [[node]]
    name = "orin"                     # letters, digits, - and _; unique
    profile = "jetson-orin-nano-8gb"  # devices/profiles name or a .profile path
    budget = "1GiB"                   # the host process's memory (default: the profile's usable)
    link = "wifi"                     # loopback | ethernet | wifi | lte, or rtt_ms + mbit_s
    paging = true                     # may serve more experts than its cache holds
    model = "/data/m.emoe"            # this host's copy (default: the coordinator's path)

Every problem is one `BadNodesFile` line naming the file, the node and the key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path

from cluster.placement import HOST_FLOOR_ESTIMATE, host_room
from cluster.types import (
    LINKS,
    BadNodesFile,
    BudgetBelowFloor,
    Link,
    ModelShape,
    NodeCapacity,
    NodeSpec,
)
from devices.profile import DeviceProfile, load_profile
from edgemoe.units import Bytes
from formats.errors import EmoeError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
NO_BYTES = Bytes(0)
_KEYS = {"name", "profile", "budget", "link", "rtt_ms", "mbit_s", "paging", "model"}


def _link(where: str, node: dict) -> Link:
    link = node.get("link")
    if link is not None and ("rtt_ms" in node or "mbit_s" in node):
        raise BadNodesFile(f"{where}: give either link or rtt_ms/mbit_s, not both")
    if link is not None:
        if link not in LINKS:
            raise BadNodesFile(f"{where}, key 'link': {link!r} is not one of {', '.join(LINKS)}")
        return LINKS[link]
    rtt, mbit = node.get("rtt_ms", 0), node.get("mbit_s")
    for key, v in (("rtt_ms", rtt), ("mbit_s", mbit)):
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e9
        ):
            raise BadNodesFile(f"{where}, key {key!r}: {v!r} is not a number >= 0")
    if mbit is not None and mbit <= 0:
        raise BadNodesFile(f"{where}, key 'mbit_s': {mbit!r} must be > 0")
    return Link(rtt / 1000.0, None if mbit is None else Bytes(int(mbit * 125_000)))


def parse_nodes(text: str, source: str = "<nodes>") -> tuple[NodeSpec, ...]:
    """Parse a nodes file's text.

    Raises:
        BadNodesFile: names the file, the node and the key.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadNodesFile(f"{source}: not valid TOML ({e})") from None
    extra = set(doc) - {"node"}
    if extra:
        raise BadNodesFile(f"{source}: unknown table(s) {sorted(extra)}; only [[node]] is read")
    nodes = doc.get("node")
    if not isinstance(nodes, list) or not nodes:
        raise BadNodesFile(f"{source}: no [[node]] tables")
    out: list[NodeSpec] = []
    for i, node in enumerate(nodes, start=1):
        where = f"{source}, node {i}"
        if not isinstance(node, dict):
            raise BadNodesFile(f"{where}: not a table")
        name = node.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise BadNodesFile(
                f"{where}, key 'name': {name!r} is not letters, digits, - and _ (1-63)"
            )
        where = f"{source}, node {name!r}"
        unknown = set(node) - _KEYS
        if unknown:
            raise BadNodesFile(
                f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(_KEYS)})"
            )
        if name in {n.name for n in out}:
            raise BadNodesFile(f"{where}: the name is used twice")
        prof = node.get("profile")
        if not isinstance(prof, str) or not prof:
            raise BadNodesFile(f"{where}, key 'profile': missing or not text")
        try:
            profile = load_profile(prof)
        except EmoeError as e:
            raise BadNodesFile(f"{where}, key 'profile': {e.what}") from None
        budget = node.get("budget")
        if budget is None:
            budget = profile.usable_memory
        else:
            try:
                budget = Bytes.parse(budget)
            except (ValueError, TypeError, OverflowError) as e:
                raise BadNodesFile(f"{where}, key 'budget': {budget!r}: {e}") from None
            if budget > profile.usable_memory:
                raise BadNodesFile(
                    f"{where}, key 'budget': {budget} exceeds the {profile.name}'s usable "
                    f"memory {profile.usable_memory}"
                )
        paging = node.get("paging", True)
        if not isinstance(paging, bool):
            raise BadNodesFile(f"{where}, key 'paging': {paging!r} is not true or false")
        model = node.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise BadNodesFile(f"{where}, key 'model': {model!r} is not a path")
        out.append(NodeSpec(name, prof, Bytes(budget), _link(where, node), paging, model))
    return tuple(out)


def load_nodes(path: str | Path) -> tuple[NodeSpec, ...]:
    """Read and check a nodes file (see the module docstring)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadNodesFile(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadNodesFile(f"{p}: cannot read it ({e})") from None
    return parse_nodes(text, str(p))


def profile_of(spec: NodeSpec) -> DeviceProfile:
    return load_profile(spec.profile)


def capacity(
    spec: NodeSpec,
    shape: ModelShape,
    *,
    floor: Bytes = HOST_FLOOR_ESTIMATE,
    io: Bytes = NO_BYTES,
) -> NodeCapacity:
    """A node's capacity for placement from its spec (its floor: measured or estimated).

    Raises:
        BudgetBelowFloor: the budget cannot hold the floor, I/O buffers and one expert.
    """
    room = host_room(spec.budget, floor, io)
    largest = max(shape.expert_bytes, default=Bytes(0))
    if room < largest:
        need = Bytes(int(spec.budget) - int(room) + int(largest))
        raise BudgetBelowFloor(
            f"node {spec.name!r}: a budget of {spec.budget} leaves {room} for experts after the "
            f"host's floor {floor} and I/O buffers {io}; one expert needs {largest}, so the "
            f"smallest budget is {need}"
        )
    p = profile_of(spec)
    return NodeCapacity(spec.name, room, 1.0 / p.compute_factor, spec.link.rtt_s, spec.paging)


def capacities(
    specs: Sequence[NodeSpec], shape: ModelShape, *, io: Bytes = NO_BYTES
) -> list[NodeCapacity]:
    return [capacity(s, shape, io=io) for s in specs]
