"""OLMoE: attention with q/k RMSNorm over the whole projection, optional qkv clipping,
softmax top-k routing (normalised only with norm_topk_prob), every layer sparse."""

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
    num_experts: int
    num_experts_per_tok: int
    vocab_size: int
    num_key_value_heads: int = 0
    intermediate_size: int = 0
    head_dim: int = 0
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelArgs:
        return finish_args(from_dict(cls, cfg), cfg)


class Model(CausalLM):
    def make_layer(self, i: int) -> DecoderLayer:
        a, w, p = self.args, self.weights, f"model.layers.{i}"
        attn = Attention.for_layer(w, a, i, qk_norm="full", clip_qkv=a.clip_qkv)
        route = partial(softmax_topk, k=a.num_experts_per_tok, normalize=a.norm_topk_prob)
        moe = RoutedMoE(w.tensor(f"{p}.mlp.gate.weight"), route, self.executor, i)
        return DecoderLayer(w, i, attn, moe, a.rms_norm_eps)
