"""The coordinator: the resident model here, routed experts on the hosts.

    co = Coordinator("model.emoe", load_nodes("nodes.toml")).start()   # inside ray.init(...)
    print(co.model.generate("The capital of France is", max_tokens=16))
    co.join(new_spec)          # elastic scale-up while requests are served
    co.status()                # every host's real state
    co.complete(prompts, 16, classes=[RequestClass("rt", latency_s=0.01), None])  # MoE² classes
    co.close()

The coordinator process loads the model with `edgemoe.load(..., executor=...)`:
embeddings, attention, routers and shared experts stay here, each MoE layer's
routed pairs go to the hosts through a RemoteExecutor. Placement is
cluster/placement.py on the hosts' measured rooms.

Failure: a failed call marks its host dead; `_on_failure` repairs the map
(redundant copies serve at once; experts left with no copy are re-placed on
survivors, which page them from their own file) and the executor re-issues
the pairs. Join: the new host opens (same header CRC), placement is recomputed
moving as few experts as it can (placement.rebalance), hosts warm what they gain, the map switches by version, the old map drains,
then hosts drop what they lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import edgemoe
from cluster.model import ModelInfo, model_info
from cluster.nodes import capacity
from cluster.placement import moved, node_loads, place, rebalance, repair
from cluster.raynet import RayPool, cause, import_ray, start_host
from cluster.remote import RemoteExecutor
from cluster.requests import RequestClasses
from cluster.types import ClusterError, ExpertMap, HostStatus, NodeCapacity, NodeSpec
from edgemoe.units import Bytes

OPEN_TIMEOUT_S = 300.0  # a host's start: a worker process importing torch, opening its file


@dataclass(frozen=True)
class JoinReport:
    """Times of one elastic join, seconds from the join call."""

    node: str
    opened_s: float  # the host is up and checked
    warmed_s: float  # every host holds what the new map gives it
    switched_s: float  # the new map serves
    drained_s: float  # no call of the old map is in flight; old copies dropped
    version: int
    moved: int  # experts warmed on a host that did not hold them
    source: str = "file"  # where most were warmed from: "file" or "peer" (the faster, measured)
    file_ms: float = -1.0  # measured ms an expert from the host's own flash (-1: not measured)
    peer_ms: float = -1.0  # measured ms an expert from a peer's memory via the object store
    fresh_moved: int = -1  # warms a from-scratch placement would have cost instead


class Coordinator:
    """Args:
    model: the .emoe (the coordinator's copy; hosts use theirs, NodeSpec.model).
    nodes: the hosts.
    copies, spare, affinity: placement (cluster/placement.py).
    dtype, level, ctx, batch: as edgemoe.load.
    timeout, retries: per call (RemoteExecutor).
    warm: read every host's experts before serving.
    """

    def __init__(
        self,
        model: str | Path,
        nodes: Sequence[NodeSpec],
        *,
        copies: int = 1,
        spare: int = 0,
        affinity: float = 0.0,
        dtype: str = "auto",
        level: int | None = None,
        ctx: int | None = None,
        batch: int = 1,
        timeout: float = 30.0,
        retries: int = 3,
        warm: bool = True,
    ):
        self.path = Path(model)
        self.specs: dict[str, NodeSpec] = {}
        self._pending = list(nodes)
        self.copies, self.spare, self.affinity = copies, spare, affinity
        self.dtype, self.level, self.ctx, self.batch = dtype, level, ctx, batch
        self.timeout, self.retries, self.warm = timeout, retries, warm
        self.actors: dict = {}
        self.caps: dict[str, NodeCapacity] = {}
        self.dead: dict[str, str] = {}  # name -> why
        self.lost: tuple = ()
        self.executor: RemoteExecutor | None = None
        self.model = None
        self.info: ModelInfo | None = None
        self._lock = threading.Lock()  # map changes (repair, join, restart) one at a time
        self._version = 1  # the last map version handed out (under _lock)
        self._sels: dict = {}  # (request class, map version) -> its Selection
        self._sel_lock = threading.Lock()
        self.classes: RequestClasses | None = None

    # ---- start and stop
    def _open(self, specs: Sequence[NodeSpec]) -> dict[str, HostStatus]:
        """Start and open hosts; on any failure stop them all and raise the named error."""
        ray = import_ray()
        info = self.info
        started = {}
        try:
            for s in specs:
                started[s.name] = start_host(s, str(self.path), info.dtype, info.level, info.crc)
            names = list(started)
            refs = [started[n].open.remote() for n in names]
            from ray.exceptions import GetTimeoutError

            try:
                got = ray.get(refs, timeout=OPEN_TIMEOUT_S)
            except GetTimeoutError:
                raise ClusterError(
                    f"hosts {', '.join(names)} did not start within {OPEN_TIMEOUT_S:.0f} s",
                    "check that their raylets are alive and not starved (`edgemoe cluster status`)",
                ) from None
            except Exception as e:
                raise cause(e) from None
        except BaseException:
            for a in started.values():
                ray.kill(a)
            raise
        self.actors.update(started)
        return dict(zip(names, got))

    def _capacity(self, spec: NodeSpec, st: HostStatus) -> NodeCapacity:
        cap = capacity(spec, self.info.shape, floor=st.floor)
        return NodeCapacity(cap.name, st.room, cap.speed, cap.rtt_s, cap.paging)

    def start(self) -> Coordinator:
        """Start the hosts, place the experts, warm them, load the resident model."""
        self.info = info = model_info(self.path, self.dtype, self.level)
        specs, self._pending = self._pending, []
        names = [s.name for s in specs]
        if len(set(names)) != len(names) or not specs:
            raise ClusterError(f"nodes {names}: need one or more, each name once")
        statuses = self._open(specs)
        for s in specs:
            self.specs[s.name] = s
            self.caps[s.name] = self._capacity(s, statuses[s.name])
        try:
            emap = place(
                info.shape,
                list(self.caps.values()),
                info.stats,
                copies=self.copies,
                spare=self.spare,
                affinity=self.affinity,
            )
            if self.warm:
                self._warm(emap, ExpertMap(0, {}))
            pool = RayPool(self.actors, self.specs)
            self.executor = RemoteExecutor(
                pool, emap, self._on_failure, timeout=self.timeout, retries=self.retries
            )
            # no cache is made here: the factory returns the remote executor, not ctx.local()
            self.model = edgemoe.load(
                self.path,
                None,
                ctx=self.ctx,
                batch=self.batch,
                dtype=info.dtype,
                level=info.level,
                executor=lambda context: self.executor,
            )
            self.executor.selector = self._selection
            self.classes = RequestClasses(self.model, self.executor)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every host and free the model (idempotent)."""
        ray = import_ray()
        for a in self.actors.values():
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass
        self.actors.clear()
        if self.model is not None:
            self.model.close()
            self.model = None

    def __enter__(self) -> Coordinator:
        return self.start() if self.model is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- placement changes
    def live(self) -> list[str]:
        return [n for n in self.specs if n not in self.dead]

    def _warm(
        self, new: ExpertMap, old: ExpertMap, probe: int = 4
    ) -> tuple[int, str, float, float]:
        """Each host gets what `new` gives it and `old` did not, from its own file or from a
        peer's memory through the Ray object store, whichever a probe of `probe` experts
        each way measures faster. Returns (experts moved, source, file ms, peer ms)."""
        ray = import_ray()
        gains = {n: sorted(set(new.experts_on(n)) - set(old.experts_on(n))) for n in self.live()}
        gains = {n: g for n, g in gains.items() if g}
        moved = sum(len(g) for g in gains.values())
        cached = {}
        if old.replicas:  # peers' caches: what could come from memory
            names = [n for n in self.live() if old.experts_on(n)]
            got = ray.get([self.actors[n].cached.remote() for n in names], timeout=OPEN_TIMEOUT_S)
            cached = {n: set(ks) for n, ks in zip(names, got)}

        def peer_of(key, host):
            return next((p for p, ks in cached.items() if p != host and key in ks), None)

        def from_peers(host, keys):
            by_peer: dict[str, list] = {}
            for k in keys:
                by_peer.setdefault(peer_of(k, host), []).append(k)
            refs = [self.actors[host].warm.remote(by_peer.pop(None, []))] if None in by_peer else []
            for p, ks in by_peer.items():  # the weights go peer -> host through the object store
                refs.append(self.actors[host].adopt.remote(self.actors[p].export.remote(ks)))
            return refs

        source, file_ms, peer_ms = "file", -1.0, -1.0
        host = next(
            (n for n, g in gains.items() if sum(peer_of(k, n) is not None for k in g) >= 2 * probe),
            None,
        )
        if host is not None:  # measure both ways on this host's first experts
            g = gains[host]
            peerable = [k for k in g if peer_of(k, host) is not None]
            a, b = peerable[:probe], peerable[probe : 2 * probe]
            t0 = time.perf_counter()
            ray.get(from_peers(host, a), timeout=OPEN_TIMEOUT_S)
            peer_ms = 1e3 * (time.perf_counter() - t0) / len(a)
            t0 = time.perf_counter()
            ray.get(self.actors[host].warm.remote(b), timeout=OPEN_TIMEOUT_S)
            file_ms = 1e3 * (time.perf_counter() - t0) / len(b)
            source = "peer" if peer_ms < file_ms else "file"
            gains[host] = [k for k in g if k not in a and k not in b]
        refs = []
        for n, g in gains.items():
            if g:
                refs += from_peers(n, g) if source == "peer" else [self.actors[n].warm.remote(g)]
        ray.get(refs, timeout=OPEN_TIMEOUT_S)
        return moved, source, file_ms, peer_ms

    def _on_failure(self, dead: set[str]) -> ExpertMap:
        """The executor lost hosts: repair the map and switch to it."""
        ray = import_ray()
        with self._lock:
            new_dead = dead - set(self.dead)
            for n in new_dead:
                self.dead[n] = "failed a call"
                a = self.actors.get(n)
                if a is not None:
                    try:
                        ray.kill(a)  # a timed-out host may live on: nothing left running
                    except Exception:
                        pass
            cur = self.executor.map
            if not new_dead and not any(h in dead for hs in cur.replicas.values() for h in hs):
                return cur
            caps = [self.caps[n] for n in self.live()]
            emap, self.lost = repair(cur, set(self.dead), caps, self.info.shape, self.info.stats)
            emap = ExpertMap(self._next_version(), emap.replicas)
            self.executor.set_map(emap)
            return emap

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    def join(self, spec: NodeSpec) -> JoinReport:
        """Add a host while requests are served (see the module docstring).

        Raises:
            ModelMismatch, BudgetBelowFloor, NodeNotInCluster: the host is refused and stopped.
        """
        ray = import_ray()
        t0 = time.perf_counter()
        if spec.name in self.specs and spec.name not in self.dead:
            raise ClusterError(
                f"node {spec.name!r} is already a host", "give the new node a new name"
            )
        st = self._open([spec])[spec.name]
        opened = time.perf_counter() - t0
        with self._lock:
            self.specs[spec.name] = spec
            self.dead.pop(spec.name, None)
            self.caps[spec.name] = self._capacity(spec, st)
            self.executor.pool.actors = self.actors
            self.executor.pool.specs = self.specs
            self.executor.dead.discard(spec.name)
            old = self.executor.map
            new = rebalance(  # keeps what it can where it is: few warms, few drops
                old,
                self.info.shape,
                [self.caps[n] for n in self.live()],
                self.info.stats,
                copies=self.copies,
                spare=self.spare,
                affinity=self.affinity,
                version=self._next_version(),
            )
            caps = [self.caps[n] for n in self.live()]
            fresh = place(
                self.info.shape,
                caps,
                self.info.stats,
                copies=self.copies,
                spare=self.spare,
                affinity=self.affinity,
            )
        warmed_n, source, file_ms, peer_ms = self._warm(new, old)
        warmed = time.perf_counter() - t0
        self.executor.set_map(new)
        switched = time.perf_counter() - t0
        self.executor.drained(new.version, timeout=OPEN_TIMEOUT_S)
        refs = []
        for n in self.live():
            lose = sorted(set(old.experts_on(n)) - set(new.experts_on(n)))
            if lose:
                refs.append(self.actors[n].drop.remote(lose))
        ray.get(refs, timeout=OPEN_TIMEOUT_S)
        drained = time.perf_counter() - t0
        return JoinReport(
            spec.name,
            opened,
            warmed,
            switched,
            drained,
            new.version,
            warmed_n,
            source,
            file_ms,
            peer_ms,
            moved(old, fresh),
        )

    def restart_with(self, specs: Sequence[NodeSpec]) -> float:
        """Stop-the-world re-placement, the baseline `join` is measured against: every host
        stopped, hosts started on `specs`, experts placed and warmed, then serving resumes.
        The caller drains (no forward pass in flight) first. Returns the seconds it took."""
        ray = import_ray()
        t0 = time.perf_counter()
        with self._lock:
            for a in self.actors.values():
                ray.kill(a)
            self.actors.clear()
            self.specs, self.caps, self.dead = {}, {}, {}
            statuses = self._open(specs)
            for s in specs:
                self.specs[s.name] = s
                self.caps[s.name] = self._capacity(s, statuses[s.name])
            new = place(
                self.info.shape,
                list(self.caps.values()),
                self.info.stats,
                copies=self.copies,
                spare=self.spare,
                affinity=self.affinity,
                version=self._next_version(),
            )
            self._warm(new, ExpertMap(0, {}))
            self.executor.pool.actors = self.actors
            self.executor.pool.specs = self.specs
            self.executor.dead.clear()
            self.executor.set_map(new)
        return time.perf_counter() - t0

    def _selection(self, klass, emap: ExpertMap):
        """A request class's MoE² Selection on a map (cached per class and map version): the
        experts whose replica meets its latency budget, within its energy budget."""
        from cluster.selection import loads_per_token, node_costs, select_experts

        key = (klass, emap.version)
        with self._sel_lock:
            sel = self._sels.get(key)
        if sel is not None:
            return sel
        cfg = self.model.reader.config
        width = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        item = 4 if self.info.dtype == "f32" else 2
        costs = node_costs([self.specs[n] for n in self.live()], cfg["hidden_size"], width, item)
        loads = loads_per_token(self.info.shape, self.info.stats.load)
        sel = select_experts(emap, costs, loads, klass, self.info.shape)
        with self._sel_lock:
            self._sels = {k: v for k, v in self._sels.items() if k[1] == emap.version}
            self._sels[key] = sel
        return sel

    def complete(self, prompts: list, max_tokens: int = 128, sampling=None, classes=None, **kw):
        """Generate prompts together, each under its own MoE² request class.

        Args:
            classes: one selection.RequestClass (or None: the default, `set_class`) per prompt;
                a batch may mix classes. Other arguments as EdgeModel.complete.
        Raises:
            ClusterError: classes do not match the prompts.
        """
        return self.classes.complete(prompts, max_tokens, sampling, classes, **kw)

    def set_class(self, klass) -> object:
        """The default class: requests given none are served under it from now on (None:
        every choice). Returns its Selection on the current map (or None)."""
        self.classes.default = klass
        return None if klass is None else self._selection(klass, self.executor.map)

    # ---- state
    def status(self, timeout: float = 5.0) -> dict:
        """Every host's real state (each asked, with a timeout), the map and the loads."""
        ray = import_ray()
        hosts = []
        for name, spec in self.specs.items():
            if name in self.dead:
                hosts.append(
                    HostStatus(
                        name, False, profile=spec.profile, budget=spec.budget, error=self.dead[name]
                    )
                )
                continue
            try:
                hosts.append(ray.get(self.actors[name].status.remote(), timeout=timeout))
            except Exception as e:
                why = (
                    f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    if str(e)
                    else type(e).__name__
                )
                hosts.append(
                    HostStatus(name, False, profile=spec.profile, budget=spec.budget, error=why)
                )
        emap = self.executor.map
        caps = [self.caps[n] for n in self.live()]
        return {
            "model": str(self.path),
            "version": emap.version,
            "healthy": all(h.alive for h in hosts if h.name not in self.dead) and not self.lost,
            "hosts": [h.as_dict() for h in hosts],
            "loads": [
                nl.as_dict() for nl in node_loads(emap, caps, self.info.shape, self.info.stats)
            ],
            "lost_experts": [f"{k[0]}.{k[1]}" for k in self.lost],
            "failures": len(self.executor.failures),
            # seconds from a failed call to its pairs answered elsewhere, per recovered layer
            "recoveries_s": [
                round(f.recovered_s, 3) for f in self.executor.failures if f.recovered_s >= 0
            ],
            "bytes_moved": int(Bytes(self.executor.stats().bytes_read)),
            # MoE²: (token, layer)s whose class served none of their choices (top one kept)
            "selection_fallbacks": self.executor.fallbacks,
        }
