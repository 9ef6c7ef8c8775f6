"""Routing statistics: which experts a model sends real text to, and the cache hits that implies.

`edgemoe calibrate` runs the model over text, teacher-forced, in S segments of
T tokens, and records every MoE layer's top-k choice for every token: the
routing trace, a [S, T, L, K] uint16 array stored in the .emoe as the blob
`routing_trace`, described by the metadata key `edgemoe.routing_stats`.

`edgemoe plan` replays the trace through the runtime's own schedule
(`replay` runs moe/schedule.py, as `LocalExecutor` does, on the real
`ExpertCache` and eviction policy) for a cache of C expert slots and a batch of B sequences:
the first WARMUP tokens of each segment are the prompt (one prefill pass),
the rest are decode steps, whose hits and misses per step replace the
uniform-routing guess C / N. Uniform routing has no temporal locality; real
routing has a lot of it (a token's experts are often the previous token's),
so the uniform guess overstates misses.

Shape legend: S segments, T tokens per segment, L MoE layers, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.cache import DEFAULT_POLICY, POLICIES, Belady, ExpertCache
from edgemoe.moe.schedule import simulate
from formats import constants as C
from formats.errors import EmoeError
from formats.reader import EmoeReader

TRACE_BLOB = C.BLOB_ROUTING_TRACE
TRACE_DTYPE = C.ROUTING_TRACE_DTYPE
WARMUP = 32  # tokens of each segment replayed as the prompt, not counted


class BadRoutingStats(EmoeError):
    fix = "run `edgemoe calibrate MODEL --text FILE` again to rewrite them"


@dataclass
class RoutingTrace:
    ids: np.ndarray  # [S, T, L, K] uint16 expert index
    layers: list[int]  # decoder layer index of each of the L MoE layers
    source: str  # the text it was recorded on

    @property
    def segments(self) -> int:
        return self.ids.shape[0]

    @property
    def tokens(self) -> int:
        return self.ids.shape[1]

    def meta(self) -> dict:
        """The `edgemoe.routing_stats` metadata entry describing the blob."""
        return {
            "blob": TRACE_BLOB,
            "dtype": TRACE_DTYPE,
            "shape": list(self.ids.shape),
            "layers": list(self.layers),
            "source": self.source,
        }

    def blob(self) -> bytes:
        return np.ascontiguousarray(self.ids, dtype=TRACE_DTYPE).tobytes()

    def counts(self, experts: int) -> np.ndarray:
        """[L, E] how many tokens chose each expert."""
        flat = self.ids.transpose(2, 0, 1, 3).reshape(len(self.layers), -1)  # [L, S*T*K]
        return np.stack([np.bincount(row, minlength=experts) for row in flat])

    @classmethod
    def load(cls, reader: EmoeReader) -> RoutingTrace | None:
        """The file's trace, checked against the file's experts; None if it has none."""
        meta = reader.metadata.get(C.M_ROUTING_STATS)
        if meta is None:
            return None
        where = f"{reader.path}: routing statistics"
        if not isinstance(meta, dict) or meta.get("dtype") != TRACE_DTYPE:
            raise BadRoutingStats(f"{where} are not a map with dtype {TRACE_DTYPE!r}")
        shape, layers, name = meta.get("shape"), meta.get("layers"), meta.get("blob")
        if not (
            isinstance(shape, list)
            and len(shape) == 4
            and all(isinstance(d, int) and d > 0 for d in shape)
        ):
            raise BadRoutingStats(f"{where}: shape {shape!r} is not four positive integers")
        moe_layers = sorted({e.layer for e in reader.experts.values()})
        if layers != moe_layers or shape[2] != len(moe_layers):
            raise BadRoutingStats(
                f"{where} cover layers {layers}, the file's MoE layers are {moe_layers}"
            )
        top_k = reader.config.get("num_experts_per_tok")
        if shape[3] != top_k:
            raise BadRoutingStats(
                f"{where} hold {shape[3]} experts per token, the model routes {top_k}"
            )
        if name not in reader.blobs:
            raise BadRoutingStats(f"{where} name blob {name!r}, which the file does not hold")
        raw = reader.read_chunk(reader.blobs[name])
        if len(raw) != 2 * int(np.prod(shape)):
            raise BadRoutingStats(
                f"{where}: blob {name!r} has {len(raw)} bytes, shape {shape} needs {2 * int(np.prod(shape))}"
            )
        ids = np.frombuffer(raw, dtype=TRACE_DTYPE).reshape(shape).astype(np.uint16)
        n = len(reader.experts) // len(moe_layers)
        if ids.size and int(ids.max()) >= n:
            raise BadRoutingStats(f"{where} name expert {int(ids.max())}, layers have {n}")
        return cls(ids, layers, str(meta.get("source", "")))


# ---------------------------------------------------------------- replay


Call = tuple[int, np.ndarray]  # (layer, [n, K] expert ids of one executor call)


def replay(
    calls: list[Call],
    slots: int,
    belady: bool = False,
    count_from: int = 0,
    policy: str = DEFAULT_POLICY,
) -> tuple[int, int]:
    """Put a stream of executor calls through the runtime's cache protocol with room for
    `slots` experts, evicting by `policy` (the runtime's, cache.POLICIES) or by Belady (the
    fewest misses any policy could have). Returns (hits, misses) of calls[count_from:], what
    LocalExecutor would count."""
    needs = []  # per call: (layer, expert) -> {level: its pairs} (all at level 1)
    for layer, ids in calls:
        experts, counts = np.unique(ids, return_counts=True)  # dispatch's order, ascending
        needs.append({(layer, e): {1: n} for e, n in zip(experts.tolist(), counts.tolist())})
    policy = Belady([set(n) for n in needs]) if belady else POLICIES[policy]()
    cache = ExpertCache(max(0, int(slots)), policy)
    h0 = m0 = 0
    for i, need in enumerate(needs):
        if i == count_from:
            h0, m0 = cache.hits, cache.misses
        if belady:
            policy.now = i
        simulate(cache, need)
    return cache.hits - h0, cache.misses - m0


@dataclass(frozen=True)
class Expected:
    """Expert uses per decode step of a batch, from replaying a trace."""

    hits: float
    misses: float
    segments: int  # trace segments the replay used
    tokens: int  # decode tokens it counted

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0


def _calls(trace: RoutingTrace, group: np.ndarray, a: int, b: int) -> list[Call]:
    """Executor calls for tokens a..b of the segments in `group` processed together."""
    k = trace.ids.shape[3]
    return [
        (layer, trace.ids[group, a:b, i].reshape(-1, k)) for i, layer in enumerate(trace.layers)
    ]


def expected_uses(
    trace: RoutingTrace,
    slots: float,
    batch: int = 1,
    belady: bool = False,
    policy: str = DEFAULT_POLICY,
) -> Expected:
    """Hits and misses per decode step for `batch` sequences and a cache of `slots` experts,
    under the runtime's `policy` or (belady=True) the fewest misses any eviction policy could
    have. Prefetch is not simulated (hints come from hidden states, which a trace lacks).

    Segments are taken `batch` at a time; a batch wider than the trace uses all its
    segments and scales the per-step counts by batch / segments.
    """
    s, t = trace.segments, trace.tokens
    width = min(batch, s)
    warm = min(WARMUP, t - 1)
    hits = misses = steps = 0
    for g in range(s // width):
        group = np.arange(g * width, (g + 1) * width)
        calls = _calls(trace, group, 0, warm)  # the prompt: one prefill pass
        for step in range(warm, t):
            calls += _calls(trace, group, step, step + 1)
        h, m = replay(calls, int(slots), belady, count_from=len(trace.layers), policy=policy)
        hits, misses, steps = hits + h, misses + m, steps + t - warm
    scale = batch / width
    return Expected(scale * hits / steps, scale * misses / steps, width * (s // width), steps)


def locality(trace: RoutingTrace) -> float:
    """Share of a token's experts that the previous token of its segment also chose (per layer)."""
    ids = trace.ids.astype(np.int64)  # [S, T, L, K]
    prev, cur = ids[:, :-1, :, :, None], ids[:, 1:, :, None, :]  # compare every pair of choices
    shared = (prev == cur).any(axis=3).sum(axis=-1)  # [S, T-1, L]
    return float(shared.mean() / ids.shape[3]) if shared.size else 0.0
