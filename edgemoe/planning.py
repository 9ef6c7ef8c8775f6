"""`edgemoe plan`: what fits on a device, and the decode-speed bound there, before running."""

from __future__ import annotations

from edgemoe import budget
from edgemoe.bound import expected_bound
from edgemoe.cache import DEFAULT_POLICY
from edgemoe.demo import DEMO
from edgemoe.facts import ModelFacts, resolve_dtype
from edgemoe.models import parse_args
from edgemoe.routing import RoutingTrace, expected_uses
from edgemoe.units import Bytes
from formats.reader import EmoeReader


def make_plan(path, device, mem=None, ctx: int = 2048, batch: int = 1, dtype: str = "auto") -> dict:
    """The plan and the bound for one .emoe on one device profile (a DeviceProfile)."""
    path = path or DEMO
    r = EmoeReader(path, check_model=True)
    try:
        f = ModelFacts(r, parse_args(r.family, r.config), resolve_dtype(dtype, r))
        ctx = min(ctx, f.max_positions)
        mem = Bytes.parse(mem) if mem is not None else device.usable_memory
        p = budget.plan(f, mem, ctx=ctx, batch=batch)
        trace = RoutingTrace.load(r)
        kw = dict(
            moe_layers=len(f.moe_layers),
            experts_per_layer=f.experts_per_layer,
            top_k=f.top_k,
            kv_bytes_per_token=f.kv_bytes(batch, ctx),
            memory_bandwidth=device.memory_bandwidth,
            flash_rand_read=device.flash_rand_read,
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
        return {
            "model": str(path),
            "device": device.name,
            "ctx": ctx,
            "batch": batch,
            "plan": p.as_dict(),
            "slots_per_level": slots,
            "routing": routing,
            "policy": DEFAULT_POLICY,
            "expected_tok_s": lru.tokens_per_s,
            "expected_hit_rate": lru.hit_rate,
            **b.as_dict(),
        }
    finally:
        r.close()
