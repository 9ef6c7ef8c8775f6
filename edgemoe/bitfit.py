"""Fitting the stored bit policies (edgemoe/bitstored.py) on calibration text, on CPU.

The model runs through the engine (EdgeModel with an executor of this module,
dense weights unfused and float32 so autograd can pass through them), with
every routed expert dequantized at every stored level (`reader.tensor(name,
level)`: a bit-nested codec gives each level of the same expert). That is the
whole model's experts in float32 once per level: a fitting for models of the
demo's size, not for 47 B ones.

Calibrated (EdgeMoE §1, `fit_table`): every expert alone is put at each of
its lower levels, all others at their top, and the calibration loss (mean
next-token cross-entropy) is measured; a move of expert e from level v to v-1
costs the loss it adds and saves (bits of v - bits of v-1) x the pairs routed
to e, so the busiest experts save the most. Moves are taken greedily by loss
per bit saved (an expert's moves in order, each only after the one above it),
then the number of moves K is searched with real passes: the largest K whose
measured loss stays within log(1 + tolerance) of the top level's, i.e. the
perplexity within `tolerance` (2% by default). Our choices where the paper
leaves them open: the others stay at their top level (the paper: middle
width), the quality is perplexity on the calibration text, and the search on
K is a bisection over measured losses (it assumes the loss grows with K).

Trained (D²MoE §2.2, `fit_router`): a BitRouter per layer is trained with
Adam to minimise KL(top-level logits || the model's logits at the router's
levels) + lambda x the mean bits per expert weight of its pairs. The forward
pass uses the hard (argmax) level of each pair and the backward pass the
softmax over levels (straight-through), so training sees exactly what the
runtime computes; every level's output of a chosen expert is computed, for
the gradient. The penalty is the softmax-expected bits. Our choices: no cap
on the share of tokens per width (the paper has one), no Gumbel noise, the
top level of the same file stands in for full precision.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from edgemoe.bitstored import BitRouter, experts_per_layer, moe_layers, router_tops
from edgemoe.engine import EdgeModel
from edgemoe.moe.executor import ExpertExecutor
from formats import constants as C
from formats.reader import EmoeReader

DEFAULT_LAMBDA = 0.02  # nats of loss per token a bit per expert weight is worth
DEFAULT_STEPS = 150
LevelFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def level_bits(reader: EmoeReader) -> dict[tuple[int, int], list[float]]:
    """(layer, expert) -> nominal bits per weight of each level (the codecs' level_bits,
    weighted by each role's size; scales and zero points not counted)."""
    out = {}
    for key, e in reader.experts.items():
        n, b = 0, np.zeros(len(e.levels))
        for name in e.tensors.values():
            t = reader.tensors[name]
            size = int(np.prod(t.shape))
            n += size
            b += size * np.asarray(t.codec.level_bits(t.params), dtype=np.float64)[: len(b)]
        out[key] = (b / n).tolist()
    return out


class LevelExperts:
    """Every routed expert's three weights at every level, dequantized to float32 on first use."""

    def __init__(self, reader: EmoeReader):
        self.reader = reader
        self._w: dict[tuple[int, int, int], tuple[torch.Tensor, ...]] = {}

    def get(self, layer: int, expert: int, level: int) -> tuple[torch.Tensor, ...]:
        key = (layer, expert, level)
        if key not in self._w:
            e = self.reader.expert(layer, expert)
            self._w[key] = tuple(
                torch.from_numpy(self.reader.tensor(e.tensors[role], level))
                for role in C.EXPERT_ROLES
            )
        return self._w[key]

    def forward(self, x: torch.Tensor, layer: int, expert: int, level: int) -> torch.Tensor:
        """[N, D] -> [N, D] float32: the expert's SwiGLU at `level`."""
        g, u, d = self.get(layer, expert, level)
        x = x.float()
        return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


@dataclass
class Tally:
    """Pairs computed and their bits since the last reset (hard levels)."""

    pairs: int = 0
    bits: float = 0.0
    uses: dict[tuple[int, int], int] = field(default_factory=dict)  # (layer, expert) -> pairs
    expected: list[torch.Tensor] = field(default_factory=list)  # soft bits per pair (training)

    @property
    def average_bits(self) -> float:
        return self.bits / self.pairs if self.pairs else 0.0


class FitExecutor(ExpertExecutor):
    """Computes each (token, expert) pair at the level a function gives, from dequantized
    weights; or, with a router set, at the router's argmax level with its straight-through
    softmax for the gradient.

    Shape legend: T tokens, K chosen experts, D hidden, V levels.
    """

    def __init__(self, reader: EmoeReader):
        self.reader = reader
        self.experts = LevelExperts(reader)
        self.bits = level_bits(reader)
        self.tops = {key: len(e.levels) for key, e in reader.experts.items()}
        self.level_fn: LevelFn | None = None  # None: every expert at its top
        self.router: BitRouter | None = None
        self.tally = Tally()
        n = experts_per_layer(reader)
        self._bits_t = {  # layer -> [E, V] bits of each level (0 past the top)
            layer: torch.tensor(
                [
                    (self.bits.get((layer, e), [0.0]) + [0.0] * 16)[: max(self.tops.values())]
                    for e in range(n)
                ]
            )
            for layer in moe_layers(reader)
        }

    def use_levels(self, fn: LevelFn | None) -> None:
        self.level_fn, self.router = fn, None

    def use_table(self, table: dict[tuple[int, int], int]) -> None:
        """Each expert at table[(layer, expert)] (its top where missing)."""
        n = experts_per_layer(self.reader)
        rows = {
            layer: torch.tensor(
                [table.get((layer, e), self.tops.get((layer, e), 1)) for e in range(n)]
            )
            for layer in moe_layers(self.reader)
        }
        self.use_levels(lambda layer, ids, w, x: rows[layer][ids])

    def use_router(self, router: BitRouter | None) -> None:
        self.level_fn, self.router = None, router

    def reset(self) -> Tally:
        t, self.tally = self.tally, Tally()
        return t

    def begin(self, layer, x, expert_ids, expert_weights):
        self.routed(layer, expert_ids)
        if self.router is not None:
            return self._soft(layer, x, expert_ids, expert_weights)
        if self.level_fn is None:
            lv = torch.tensor(
                [[self.tops[(layer, int(e))] for e in row] for row in expert_ids.tolist()],
                dtype=torch.int64,
            ).view(expert_ids.shape)
        else:
            lv = self.level_fn(layer, expert_ids, expert_weights, x)  # [T, K]
        out = torch.zeros(x.shape, dtype=torch.float32)  # [T, D]
        t_idx = torch.arange(x.shape[0])[:, None].expand_as(expert_ids)
        span = int(lv.max()) + 1
        for key in torch.unique(expert_ids * span + lv).tolist():  # 1-D: unique(dim=0) is slow
            e, v = divmod(key, span)
            sel = (expert_ids == e) & (lv == v)  # [T, K]
            tok = t_idx[sel]
            y = self.experts.forward(x[tok], layer, e, v)  # [N, D]
            out = out.index_add(0, tok, y * expert_weights[sel].float()[:, None])
            n = int(sel.sum())
            t = self.tally
            t.pairs += n
            t.bits += n * self.bits[(layer, e)][v - 1]
            t.uses[(layer, e)] = t.uses.get((layer, e), 0) + n
        return out.to(x.dtype)

    def _soft(self, layer, x, expert_ids, expert_weights):
        r = self.router
        z = r.logits(layer, expert_ids, expert_weights.detach(), x.detach())  # [T, K, V]
        q = torch.softmax(z, dim=-1)
        hard = F.one_hot(q.argmax(-1), q.shape[-1]).to(q.dtype)
        s = hard + q - q.detach()  # [T, K, V]: hard forward, softmax gradient
        bits = self._bits_t[layer][expert_ids]  # [T, K, V]
        self.tally.expected.append((q * bits).sum(-1).reshape(-1))
        lv = q.argmax(-1) + 1  # [T, K]
        out = torch.zeros(x.shape, dtype=torch.float32)  # [T, D]
        t_idx = torch.arange(x.shape[0])[:, None].expand_as(expert_ids)
        for e in torch.unique(expert_ids).tolist():
            sel = expert_ids == e  # [T, K]
            tok = t_idx[sel]
            xs, ws, ss = x[tok], expert_weights[sel].float(), s[sel]  # [N, D], [N], [N, V]
            for v in range(1, self.tops[(layer, e)] + 1):
                y = self.experts.forward(xs, layer, e, v)
                out = out.index_add(0, tok, y * (ws * ss[:, v - 1])[:, None])
            t = self.tally
            for v in lv[sel].tolist():
                t.pairs += 1
                t.bits += self.bits[(layer, e)][v - 1]
            t.uses[(layer, e)] = t.uses.get((layer, e), 0) + len(tok)
        return out.to(x.dtype)

    def finish(self, handle):
        return handle


def open_for_fitting(path, ctx: int) -> tuple[EdgeModel, FitExecutor]:
    """The model with a FitExecutor, float32 and unfused (differentiable dense weights)."""
    holder: dict = {}

    def factory(context):
        holder["ex"] = FitExecutor(context.reader)
        return holder["ex"]

    m = EdgeModel(path, None, ctx=ctx, dtype="f32", fused=False, executor=factory)
    return m, holder["ex"]


def logits(m: EdgeModel, segs: torch.Tensor) -> torch.Tensor:
    """[S, T] token ids -> [S, T, V] float32 logits, one fresh context per segment (autograd
    on, so call under no_grad when no gradient is wanted)."""
    cache = m.model.new_cache(segs.shape[0], segs.shape[1])
    return m.model.logits(m.model.forward(segs, cache))


def ce(lg: torch.Tensor, segs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of [S, T, V] logits over [S, T] tokens."""
    return F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), segs[:, 1:].reshape(-1))


@dataclass
class Score:
    loss: float  # mean next-token cross-entropy (nats)
    average_bits: float  # bits per expert weight over every (token, chosen expert) pair
    uses: dict = field(default_factory=dict)  # (layer, expert) -> pairs routed to it

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def score(m: EdgeModel, ex: FitExecutor, segs: torch.Tensor, batch: int = 8) -> Score:
    """Teacher-forced loss and average bits of the executor's current levels."""
    ex.reset()
    total, n = 0.0, 0
    with torch.no_grad():
        for a in range(0, segs.shape[0], batch):
            s = segs[a : a + batch]
            total += float(ce(logits(m, s), s)) * s.shape[0]
            n += s.shape[0]
    t = ex.reset()
    return Score(total / n, t.average_bits, t.uses)


# ---------------------------------------------------------------- calibrated (EdgeMoE)


@dataclass(frozen=True)
class Move:
    """Expert (layer, expert) from level `level` + 1 down to `level`."""

    layer: int
    expert: int
    level: int
    loss: float  # added loss measured for this expert alone at `level`, over its level above
    saved: float  # bits saved over the calibration text's pairs


def greedy_moves(
    delta: dict[tuple[int, int], list[float]],
    bits: dict[tuple[int, int], list[float]],
    uses: dict[tuple[int, int], int],
) -> list[Move]:
    """Every expert's level drops in order of added loss per bit saved (an expert's drop to
    v - 1 becomes a candidate once it is at v).

    Args:
        delta: (layer, expert) -> added loss at each level 1..top (0 at the top).
        bits: (layer, expert) -> bits per weight at each level.
        uses: (layer, expert) -> pairs routed to it on the calibration text.
    """
    at = {key: len(d) for key, d in delta.items()}
    out = []

    def candidate(key):
        v = at[key]
        if v <= 1:
            return None
        saved = max(uses.get(key, 0), 0) * (bits[key][v - 1] - bits[key][v - 2])
        return Move(*key, v - 1, delta[key][v - 2] - delta[key][v - 1], saved)

    cands = {key: candidate(key) for key in delta}
    while True:
        live = [c for c in cands.values() if c is not None]
        if not live:
            return out
        # unused experts save nothing on this text but cost nothing either: they go last,
        # in order of their loss (0 here), before nothing
        best = min(live, key=lambda c: (c.loss / c.saved if c.saved > 0 else math.inf, c.loss))
        out.append(best)
        key = (best.layer, best.expert)
        at[key] -= 1
        cands[key] = candidate(key)


@dataclass
class Ranking:
    """What the one-expert-at-a-time passes measured (the costly part of fit_table)."""

    base: Score  # every expert at its top
    delta: dict[tuple[int, int], list[float]]  # added loss of each expert alone at each level
    passes: int
    seconds: float


def rank_experts(
    m: EdgeModel,
    ex: FitExecutor,
    segs: torch.Tensor,
    progress: Callable[[str, int, int], None] | None = None,
) -> Ranking:
    """The loss each expert alone adds at each of its lower levels, the others at their top."""
    t0 = time.perf_counter()
    ex.use_table({})
    base = score(m, ex, segs)
    keys = sorted(ex.tops)
    todo = sum(ex.tops[k] - 1 for k in keys)
    delta: dict[tuple[int, int], list[float]] = {}
    done = passes = 0
    for key in keys:
        top = ex.tops[key]
        row = [0.0] * top
        if base.uses.get(key, 0):  # an expert no calibration token uses changes no loss
            for v in range(1, top):
                ex.use_table({key: v})
                row[v - 1] = score(m, ex, segs).loss - base.loss
                passes += 1
                done += 1
                if progress:
                    progress("rank", done, todo)
        else:
            done += top - 1
        delta[key] = row
    ex.use_table({})
    return Ranking(base, delta, passes + 1, time.perf_counter() - t0)


def fit_table(
    m: EdgeModel,
    ex: FitExecutor,
    segs: torch.Tensor,
    tolerance: float = 0.02,
    progress: Callable[[str, int, int], None] | None = None,
    ranking: Ranking | None = None,
) -> tuple[dict[int, list[int]], dict]:
    """EdgeMoE's offline per-expert levels under a perplexity tolerance (see the module doc).

    Args:
        ranking: rank_experts' result on the same segments, to reuse for several tolerances.
    Returns:
        (layer -> [E] levels, info for the blob: tolerance, losses, bits, passes).
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance {tolerance} is negative")
    t0 = time.perf_counter()
    rk = ranking or rank_experts(m, ex, segs, progress)
    base, delta, uses = rk.base, rk.delta, rk.base.uses
    done = rk.passes
    moves = greedy_moves(delta, ex.bits, uses)

    def table_of(k: int) -> dict[tuple[int, int], int]:
        t = {}
        for mv in moves[:k]:
            t[(mv.layer, mv.expert)] = mv.level
        return t

    allowed = math.log1p(tolerance)
    measured: dict[int, Score] = {0: base}

    def at(k: int) -> Score:
        if k not in measured:
            ex.use_table(table_of(k))
            measured[k] = score(m, ex, segs)
            if progress:
                progress("search", len(measured) - 1, max(1, math.ceil(math.log2(len(moves) + 1))))
        return measured[k]

    # the greedy prediction gives the first guess; bisection on measured losses settles it
    pred, k_pred = 0.0, 0
    for i, mv in enumerate(moves):
        pred += mv.loss
        if pred <= allowed:
            k_pred = i + 1
    lo, hi = 0, len(moves)  # at(lo) within, at(hi + 1) beyond (or hi = all)
    if at(k_pred).loss - base.loss <= allowed:
        lo = k_pred
    else:
        hi = k_pred - 1
    if at(hi).loss - base.loss <= allowed:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if at(mid).loss - base.loss <= allowed:
            lo = mid
        else:
            hi = mid - 1
    chosen = table_of(lo)
    final = at(lo)
    n = experts_per_layer(ex.reader)
    table = {
        layer: [chosen.get((layer, e), ex.tops.get((layer, e), 1)) for e in range(n)]
        for layer in moe_layers(ex.reader)
    }
    info = {
        "tolerance": float(tolerance),
        "loss_top": base.loss,
        "loss": final.loss,
        "bits_top": base.average_bits,
        "average_bits": final.average_bits,
        "moves": lo,
        "passes": done + len(measured) - 1,
        "seconds": round(time.perf_counter() - t0 + (rk.seconds if ranking else 0.0), 1),
    }
    return table, info


# ---------------------------------------------------------------- trained (D²MoE)


def fit_router(
    m: EdgeModel,
    ex: FitExecutor,
    segs: torch.Tensor,
    lam: float = DEFAULT_LAMBDA,
    steps: int = DEFAULT_STEPS,
    lr: float = 0.01,
    batch: int = 4,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[BitRouter, dict]:
    """D²MoE's bit router, trained against the top level's logits with lambda x bits.

    Args:
        segs: [S, T] calibration tokens; each step takes `batch` segments.
        lam: the penalty per bit per expert weight (loss is in nats per token).
    Returns:
        (the router, info for the blob: lambda, steps, losses and bits on `segs`).
    """
    if lam < 0:
        raise ValueError(f"lambda {lam} is negative")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    layers, n = moe_layers(ex.reader), experts_per_layer(ex.reader)
    hidden = m.facts.args.hidden_size
    router = BitRouter(layers, n, hidden, router_tops(ex.reader, layers, n))
    ex.use_table({})
    top = score(m, ex, segs)
    with torch.no_grad():
        teacher = torch.cat(
            [
                torch.log_softmax(logits(m, segs[a : a + batch]), -1)
                for a in range(0, len(segs), batch)
            ]
        )  # [S, T, V]
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    ex.use_router(router)
    last = {}
    for step in range(steps):
        pick = torch.tensor(rng.sample(range(len(segs)), min(batch, len(segs))))
        ex.reset()
        lg = logits(m, segs[pick])
        t = teacher[pick]
        kl = (t.exp() * (t - torch.log_softmax(lg, -1))).sum(-1).mean()
        soft_bits = torch.cat(ex.tally.expected).mean()
        loss = kl + lam * soft_bits
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = {"kl": float(kl.detach()), "bits": ex.tally.average_bits}
        if progress:
            progress("train", step + 1, steps)
    router.requires_grad_(False)
    ex.use_levels(router.levels)
    final = score(m, ex, segs)
    ex.use_table({})
    info = {
        "lambda": float(lam),
        "steps": steps,
        "lr": lr,
        "loss_top": top.loss,
        "loss": final.loss,
        "bits_top": top.average_bits,
        "average_bits": final.average_bits,
        "last_step": last,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return router, info
