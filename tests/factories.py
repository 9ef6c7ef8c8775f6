"""Tiny seeded MoE checkpoints of every supported family, built with transformers.

The configs are the smallest that still exercise each family's structure:
shared experts (qwen2_moe, deepseek), q/k norms (qwen3_moe, olmoe), MLA with
and without q LoRA (deepseek_v2/v3), a leading dense layer (deepseek),
group-limited and sigmoid routing (deepseek_v3).
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_MLA = dict(
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    moe_intermediate_size=32,
    intermediate_size=96,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    num_key_value_heads=4,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=1.0,
    rope_scaling=None,
)

CONFIGS: dict[str, dict] = {
    "mixtral": dict(
        intermediate_size=64, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2
    ),
    "qwen2_moe": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        norm_topk_prob=True,
    ),
    "olmoe": dict(
        intermediate_size=32, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2
    ),
    "deepseek_v2": dict(
        _MLA, q_lora_rank=None, topk_method="group_limited_greedy", scoring_func="softmax"
    ),
    "deepseek_v3": dict(_MLA, q_lora_rank=48),
}


def tiny_config(family: str, **overrides):
    import transformers

    kw = dict(_COMMON, **CONFIGS[family])
    kw.update(overrides)
    return transformers.AutoConfig.for_model(family, **kw)


def make_tiny_hf(
    family: str, out_dir: str | Path, seed: int = 0, dtype: str = "float32", **overrides
) -> Path:
    """Save a seeded random-weight model of `family` to out_dir; return the folder.

    Weights are drawn with a larger std than transformers' init so routing and
    logits are not flat, which would make greedy comparisons meaningless.
    """
    import torch
    import transformers

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
    model = model.to(getattr(torch, dtype))
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
