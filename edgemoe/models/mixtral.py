"""Mixtral: GQA attention with rotary embeddings, softmax top-k routing renormalised.

Routed experts live under model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}
(gate, up, down); the router is block_sparse_moe.gate. Every layer is sparse.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from edgemoe.models.base import (
    Attention,
    CausalLM,
    DecoderLayer,
    RoutedMoE,
    StandardArgs,
    finish_args,
    from_dict,
)
from edgemoe.moe.router import softmax_topk


@dataclass
class ModelArgs(StandardArgs):
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
        return finish_args(from_dict(cls, cfg), cfg)


class Model(CausalLM):
    def make_layer(self, i: int) -> DecoderLayer:
        a, w, p = self.args, self.weights, f"model.layers.{i}"
        attn = Attention.for_layer(w, a, i)
        route = partial(softmax_topk, k=a.num_experts_per_tok, normalize=True)
        moe = RoutedMoE(w.tensor(f"{p}.block_sparse_moe.gate.weight"), route, self.executor, i)
        return DecoderLayer(w, i, attn, moe, a.rms_norm_eps)
