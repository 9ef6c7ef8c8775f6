"""`edgemoe plan`: what fits on a device, and the decode-speed bound there, before running."""

from __future__ import annotations

import json
from collections.abc import Callable

from devices.profiler import REFERENCE
from edgemoe import budget
from edgemoe.bound import expected_bound
from edgemoe.cache import DEFAULT_POLICY
from edgemoe.demo import DEMO
from edgemoe.facts import ModelFacts, resolve_dtype
from edgemoe.models import parse_args
from edgemoe.routing import RoutingTrace, expected_uses
from edgemoe.units import Bytes
from formats.reader import EmoeReader


def expert_ms(compute_factor: float, hidden: int, width: int) -> Callable[[int, int], float]:
    """(level, tokens) -> ms of one nested expert of this shape at that level on a device,
    from the devbox's per-level mwq times (devices/reference_expert_ms.json) times the
    device's compute_factor: the reference shape nearest in size, scaled by size, linear
    between the measured batches (1, 4, 16) and past them; a level above the measured ones
    scaled by its parts (one int4 part a level)."""
    ref = json.loads(REFERENCE.read_text())
    shapes = {
        tuple(int(d) for d in k.split("_")[-1].split(".")[0].split("x"))
        for k in ref
        if "mwq_l" in k
    }
    h, w = min(shapes, key=lambda s: abs(s[0] * s[1] - hidden * width))
    scale = compute_factor * hidden * width / (h * w)
    levels = sorted({int(k.split("mwq_l")[1][0]) for k in ref if "mwq_l" in k})
    batches = (1, 4, 16)

    def ms(level: int, tokens: int) -> float:
        k = min(level, levels[-1])
        t = [ref[f"expert_ms.mwq_l{k}_{h}x{w}.b{b}"] for b in batches]
        i = 0 if tokens <= 4 else 1
        lo, hi = batches[i], batches[i + 1]
        at = t[i] + (t[i + 1] - t[i]) * (max(tokens, 1) - lo) / (hi - lo)
        return scale * at * level / k

    return ms


def reachable(cache: int, experts: int, base: int, top: int) -> dict:
    """What a nested cache of `cache` bytes reaches: the experts it holds at the base level,
    and, once every expert's base fits, how many of them it can also hold at the top level
    (an entry holds the levels it has: the top costs top - base more than the base).

    Returns {"base": experts at the base level, "top": of those, how many at the top,
    "experts": all routed experts}.
    """
    at_base = min(experts, cache // max(1, base))
    spare = cache - at_base * base
    at_top = min(at_base, spare // max(1, top - base)) if top > base else at_base
    if at_base < experts:  # not every base fits: the top levels only take base room
        at_top = min(experts, cache // max(1, top))
    return {"base": int(at_base), "top": int(at_top), "experts": experts}


def make_plan(path, device, mem=None, ctx: int = 2048, batch: int = 1, dtype: str = "auto") -> dict:
    """The plan and the bound for one .emoe on one device profile (a DeviceProfile)."""
    path = path or DEMO
    r = EmoeReader(path, check_model=True)
    try:
        f = ModelFacts(r, parse_args(r.family, r.config), resolve_dtype(dtype, r))
        ctx = min(ctx, f.max_positions)
        mem = Bytes.parse(mem) if mem is not None else device.usable_memory
        p = budget.plan(f, mem, ctx=ctx, batch=batch, slotless=False)  # as `edgemoe run` plans
        trace = RoutingTrace.load(r)
        kw = dict(
            moe_layers=len(f.moe_layers),
            experts_per_layer=f.experts_per_layer,
            top_k=f.top_k,
            kv_bytes_per_token=f.kv_bytes(batch, ctx),
            memory_bandwidth=device.memory_bandwidth,
            flash_rand_read=device.flash_rand_read,
            flash_seq_read=device.flash_seq_read,
            batch=batch,
            lookup_only=f.lookup_only,
        )
        if trace is None:  # uniform routing: the bound and the expectation are one guess
            b = lru = expected_bound(p, **kw)
            routing = "uniform"
        else:
            fewest = expected_uses(trace, p.expert_slots, batch, belady=True)
            likely = expected_uses(trace, p.expert_slots, batch)
            b = expected_bound(p, **kw, uses=fewest)
            lru = expected_bound(p, **kw, uses=likely)
            routing = {
                "source": trace.source,
                "segments": likely.segments,
                "decode_tokens": likely.tokens,
                "misses_per_step": likely.misses,
                "fewest_misses_per_step": fewest.misses,
                "uses_per_step": likely.hits + likely.misses,
            }
        e0 = next(iter(r.experts.values()))
        slots = {
            k: round(p.expert_cache / max(1, f.expert_nbytes(e0.layer, k)), 1)
            for k in range(1, len(e0.levels) + 1)
        }
        reach = reachable(int(p.expert_cache), len(r.experts), f.expert_nbytes(e0.layer, 1),
                          f.expert_nbytes(e0.layer, len(e0.levels)))  # fmt: skip
        return {
            "model": str(path),
            "device": device.name,
            "ctx": ctx,
            "batch": batch,
            "plan": p.as_dict(),
            "slots_per_level": slots,
            "reachable": reach,
            "routing": routing,
            "policy": DEFAULT_POLICY,
            "expected_tok_s": lru.tokens_per_s,
            "expected_hit_rate": lru.hit_rate,
            **b.as_dict(),
        }
    finally:
        r.close()
