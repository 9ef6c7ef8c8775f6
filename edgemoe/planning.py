"""`edgemoe plan`: what fits on a device, and the decode-speed bound there, before running."""

from __future__ import annotations

import types

import torch

from edgemoe import budget
from edgemoe.bound import expected_bound
from edgemoe.models import family_module
from edgemoe.routing import RoutingTrace, expected_uses
from edgemoe.units import Bytes
from formats.reader import EmoeReader


def model_facts(reader: EmoeReader, dtype: torch.dtype, batch: int, ctx: int) -> dict:
    """What the bound needs of a file: MoE shape, KV dims, and the per-step bytes the
    bound counts for the KV cache (`ctx` positions read each step) and leaves out for
    the embedding table (a lookup reads one row, not the table)."""
    mod = family_module(reader.family)
    args = mod.ModelArgs.from_dict(reader.config)
    layers = sorted({e.layer for e in reader.experts.values()})
    h, dk, dv = mod.Model.kv_dims(types.SimpleNamespace(args=args))
    item = torch.empty((), dtype=dtype).element_size()
    emb = reader.tensors["model.embed_tokens.weight"]
    return {
        "moe_layers": len(layers),
        "experts_per_layer": len(reader.experts) // max(1, len(layers)),
        "top_k": reader.config["num_experts_per_tok"],
        "kv_dims": (h, dk, dv),
        "kv_bytes_per_token": args.num_hidden_layers * batch * ctx * h * (dk + dv) * item,
        "lookup_only": emb.shape[0] * emb.shape[1] * item,
    }


def make_plan(path, device, mem=None, ctx: int = 2048, batch: int = 1, dtype: str = "auto") -> dict:
    """The plan and the bound for one .emoe on one device profile (a DeviceProfile)."""
    from edgemoe.engine import DEMO, _dtype

    path = path or DEMO
    r = EmoeReader(path)
    try:
        dt = _dtype(dtype, r)
        ctx = min(ctx, r.config.get("max_position_embeddings", ctx))
        facts = model_facts(r, dt, batch, ctx)
        mem = Bytes.parse(mem) if mem is not None else device.usable_memory
        p = budget.plan(r, mem, ctx=ctx, batch=batch, dtype=dt, kv_dims=facts["kv_dims"])
        trace = RoutingTrace.load(r)
        kw = dict(
            moe_layers=facts["moe_layers"],
            experts_per_layer=facts["experts_per_layer"],
            top_k=facts["top_k"],
            kv_bytes_per_token=facts["kv_bytes_per_token"],
            memory_bandwidth=device.memory_bandwidth,
            flash_rand_read=device.flash_rand_read,
            batch=batch,
            lookup_only=facts["lookup_only"],
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
        levels = max((len(e.levels) for e in r.experts.values()), default=1)
        e0 = next(iter(r.experts.values()))
        slots = {
            k: round(
                p.expert_cache / max(1, budget.expert_nbytes(r, e0.layer, e0.expert, k, dt)), 1
            )
            for k in range(1, levels + 1)
        }
        return {
            "model": str(path),
            "device": device.name,
            "ctx": ctx,
            "batch": batch,
            "plan": p.as_dict(),
            "slots_per_level": slots,
            "routing": routing,
            "expected_tok_s": lru.tokens_per_s,
            "expected_hit_rate": lru.hit_rate,
            **b.as_dict(),
        }
    finally:
        r.close()
