"""Mixtral: GQA attention with rotary embeddings, softmax top-k routing renormalised.

Routed experts live under model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}
(gate, up, down); the router is block_sparse_moe.gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgemoe.models.base import Attention, CausalLM, from_dict, rms_norm, rope_theta
from edgemoe.moe.router import softmax_topk


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    vocab_size: int
    intermediate_size: int = 0
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelArgs:
        args = from_dict(cls, cfg)
        args.rope_theta = rope_theta(cfg, args.rope_theta)
        args.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        return args


class MoE:
    def __init__(self, model: Model, i: int):
        self.router = model.weights.tensor(
            f"model.layers.{i}.block_sparse_moe.gate.weight"
        )  # [E, D]
        self.k, self.layer, self.executor = model.args.num_experts_per_tok, i, model.executor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)  # [T, D]
        logits = flat.float() @ self.router.float().T  # [T, E]
        ids, w = softmax_topk(logits, self.k, normalize=True)  # [T, K]
        return self.executor.run(self.layer, flat, ids, w).reshape(b, s, d)


class Layer:
    def __init__(self, model: Model, i: int):
        a, w, p = model.args, model.weights, f"model.layers.{i}"
        self.attn = Attention(
            w,
            f"{p}.self_attn",
            a.num_attention_heads,
            a.num_key_value_heads,
            a.head_dim,
            a.rope_theta,
            a.rms_norm_eps,
        )
        self.ln1 = w.tensor(f"{p}.input_layernorm.weight")
        self.ln2 = w.tensor(f"{p}.post_attention_layernorm.weight")
        self.moe, self.eps = MoE(model, i), a.rms_norm_eps

    def __call__(self, x, positions, mask, cache, i):
        h = x + self.attn(rms_norm(x, self.ln1, self.eps), positions, mask, cache, i)
        return h + self.moe(rms_norm(h, self.ln2, self.eps))


class Model(CausalLM):
    def make_layer(self, i: int) -> Layer:
        return Layer(self, i)

    def kv_dims(self):
        a = self.args
        return a.num_key_value_heads, a.head_dim, a.head_dim
