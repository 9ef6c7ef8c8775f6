"""DeepSeek-V3: DeepSeek-V2's MLA and layers with sigmoid, bias-corrected group routing.

The router scores experts with a sigmoid; mlp.gate.e_score_correction_bias
shifts the scores used to choose groups and experts, never the weights
("noaux_tc"). The attention, dense leading layers, shared experts and cache
are DeepSeek-V2's (deepseek_v2.py); V3 also honours rope_interleave (true in
DeepSeek's checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from edgemoe.models import deepseek_v2
from edgemoe.moe.router import sigmoid_group_topk


@dataclass
class ModelArgs(deepseek_v2.ModelArgs):
    # defaults are transformers' DeepseekV3Config defaults
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    first_k_dense_replace: int = 3
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    max_position_embeddings: int = 4096
    rope_interleave: bool = True

    def check(self) -> None:
        """Nothing to refuse: transformers' V3 always routes noaux_tc (it ignores
        topk_method and scoring_func) and its MLPs have no biases."""


class Model(deepseek_v2.Model):
    """DeepSeek-V3 over resident weights and an expert executor."""

    rope_in_f32 = False  # V3 rotates cos/sin tables in the compute dtype

    def rope_interleaved(self, args: ModelArgs) -> bool:
        return args.rope_interleave

    def router(self, i: int):
        """Layer i's routing rule: logits [T, E] -> (ids [T, K], weights [T, K])."""
        a = self.args
        bias = self.weights.tensor(f"model.layers.{i}.mlp.gate.e_score_correction_bias")  # [E]
        return partial(
            sigmoid_group_topk,
            bias=bias,
            k=a.num_experts_per_tok,
            n_group=a.n_group,
            topk_group=a.topk_group,
            normalize=a.norm_topk_prob,
            scale=a.routed_scaling_factor,
        )
