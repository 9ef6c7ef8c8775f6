"""Qwen2-MoE: GQA attention with qkv biases, softmax top-k routing, and a gated shared expert.

Sparse layers (not in mlp_only_layers, every decoder_sparse_step-th) route to
model.layers.N.mlp.experts.E.{gate,up,down}_proj and add
sigmoid(shared_expert_gate(x)) * shared_expert(x); the others are dense MLPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from edgemoe.models.base import (
    MLP,
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
    num_experts: int
    num_experts_per_tok: int
    vocab_size: int
    moe_intermediate_size: int = 0
    intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    head_dim: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelArgs:
        return finish_args(from_dict(cls, cfg), cfg)

    def is_sparse(self, i: int) -> bool:
        return (
            i not in self.mlp_only_layers
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        )


class Model(CausalLM):
    def make_layer(self, i: int) -> DecoderLayer:
        a, w, p = self.args, self.weights, f"model.layers.{i}"
        attn = Attention.for_layer(w, a, i)
        if a.is_sparse(i):
            route = partial(softmax_topk, k=a.num_experts_per_tok, normalize=a.norm_topk_prob)
            shared = (
                MLP(w, f"{p}.mlp.shared_expert")
                if w.has(f"{p}.mlp.shared_expert.gate_proj.weight")
                else None
            )
            gate = w.tensor(f"{p}.mlp.shared_expert_gate.weight") if shared else None
            mlp = RoutedMoE(w.tensor(f"{p}.mlp.gate.weight"), route, self.executor, i, shared, gate)
        else:
            mlp = MLP(w, f"{p}.mlp")
        return DecoderLayer(w, i, attn, mlp, a.rms_norm_eps)
