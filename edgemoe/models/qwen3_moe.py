"""Qwen3-MoE: GQA attention with per-head q/k RMSNorm, softmax top-k routing, no shared expert.

Sparse layers follow Qwen2-MoE's rule (mlp_only_layers, decoder_sparse_step);
the routing arguments and layer layout are Qwen2-MoE's, so they are reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from edgemoe.models import qwen2_moe
from edgemoe.models.base import MLP, Attention, CausalLM, DecoderLayer, RoutedMoE
from edgemoe.moe.router import softmax_topk


@dataclass
class ModelArgs(qwen2_moe.ModelArgs):
    norm_topk_prob: bool = True

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelArgs:
        cfg = dict(cfg)
        if cfg.get("num_experts") is None:  # transformers 5 names it num_local_experts
            cfg["num_experts"] = cfg.get("num_local_experts")
        return super().from_dict(cfg)


class Model(CausalLM):
    def make_layer(self, i: int) -> DecoderLayer:
        a, w, p = self.args, self.weights, f"model.layers.{i}"
        attn = Attention.for_layer(w, a, i, qk_norm="head")
        if a.is_sparse(i):
            route = partial(softmax_topk, k=a.num_experts_per_tok, normalize=a.norm_topk_prob)
            mlp = RoutedMoE(w.tensor(f"{p}.mlp.gate.weight"), route, self.executor, i)
        else:
            mlp = MLP(w, f"{p}.mlp")
        return DecoderLayer(w, i, attn, mlp, a.rms_norm_eps)
