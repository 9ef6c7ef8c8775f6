"""`edgemoe plan`: what fits on a device, and the decode-speed bound there, before running."""

from __future__ import annotations

import types

import torch

from edgemoe import budget
from edgemoe.bound import expected_bound
from edgemoe.models import family_module
from edgemoe.units import Bytes
from formats.reader import EmoeReader


def model_facts(reader: EmoeReader) -> dict:
    """MoE layer count, experts per layer, top-k, KV dims and the embedding bytes of a file."""
    mod = family_module(reader.family)
    args = mod.ModelArgs.from_dict(reader.config)
    layers = sorted({e.layer for e in reader.experts.values()})
    per_layer = len(reader.experts) // max(1, len(layers))
    return {
        "moe_layers": len(layers),
        "experts_per_layer": per_layer,
        "top_k": reader.config["num_experts_per_tok"],
        "kv_dims": mod.Model.kv_dims(types.SimpleNamespace(args=args)),
        "n_layers": args.num_hidden_layers,
    }


def make_plan(path, device, mem=None, ctx: int = 2048, batch: int = 1, dtype: str = "auto") -> dict:
    """The plan and the bound for one .emoe on one device profile (a DeviceProfile)."""
    from edgemoe.engine import DEMO, _dtype

    path = path or DEMO
    r = EmoeReader(path)
    try:
        facts = model_facts(r)
        dt = _dtype(dtype, r)
        ctx = min(ctx, r.config.get("max_position_embeddings", ctx))
        mem = Bytes.parse(mem) if mem is not None else device.usable_memory
        p = budget.plan(r, mem, ctx=ctx, batch=batch, dtype=dt, kv_dims=facts["kv_dims"])
        item = torch.empty((), dtype=dt).element_size()
        h, dk, dv = facts["kv_dims"]
        kv_per_token = (
            facts["n_layers"] * batch * ctx * h * (dk + dv) * item
        )  # a full context is read each step
        emb = r.tensors["model.embed_tokens.weight"]
        lookup = emb.shape[0] * emb.shape[1] * item
        b = expected_bound(
            p,
            moe_layers=facts["moe_layers"],
            experts_per_layer=facts["experts_per_layer"],
            top_k=facts["top_k"],
            kv_bytes_per_token=kv_per_token,
            memory_bandwidth=device.memory_bandwidth,
            flash_rand_read=device.flash_rand_read,
            batch=batch,
            lookup_only=lookup,
        )
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
            **b.as_dict(),
        }
    finally:
        r.close()
