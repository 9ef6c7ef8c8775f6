"""Rebuild a Hugging Face config.json from a GGUF's metadata.

Sizes come from the `{arch}.*` keys llama.cpp writes, falling back to tensor
shapes where older converters left a key out; per-family defaults (top-k
renormalisation, DeepSeek's V2/V3 routing) fill in what GGUF does not store.
"""

from __future__ import annotations

import gguf

from formats.errors import ShapeMismatch

KL = gguf.Keys.LLM
KA = gguf.Keys.Attention
KR = gguf.Keys.Rope
KT = gguf.Keys.Tokenizer

HF_CLASSES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
# llama.cpp hard-codes top-k renormalisation per architecture unless the file says otherwise
NORM_TOPK_DEFAULT = {"qwen2_moe": False, "qwen3_moe": True, "olmoe": False}


def build_config(model_type: str, get, need, shape, names) -> dict:
    """config.json of the HF model a GGUF was converted from.

    Args:
        model_type: the HF `model_type` the GGUF architecture maps to.
        get: metadata lookup, get(key, default=None), `{arch}` in the key filled in.
        need: like get, but for a key the config cannot be built without.
        shape: shape of a GGUF tensor by name, in numpy (HF) dim order.
        names: the GGUF tensor names (only tested for membership).

    Returns:
        The config dict, with `architectures` and `model_type` set.

    Raises:
        CheckpointError: from `need`, when a required metadata key is missing.
        ShapeMismatch: DeepSeek MLA dims in the metadata disagree with the tensors.
    """
    g, mt = get, model_type
    n_head = need(KA.HEAD_COUNT)
    vocab = g(KL.VOCAB_SIZE)
    if vocab is None:
        vocab = (
            shape("token_embd.weight")[0] if "token_embd.weight" in names else len(g(KT.LIST) or [])
        )
    theta = float(g(KR.FREQ_BASE, 10000.0))
    c = {
        "architectures": [HF_CLASSES[mt]],
        "model_type": mt,
        "vocab_size": vocab,
        "hidden_size": need(KL.EMBEDDING_LENGTH),
        "intermediate_size": _first(g(KL.FEED_FORWARD_LENGTH)),
        "num_hidden_layers": need(KL.BLOCK_COUNT),
        "num_attention_heads": n_head,
        "num_key_value_heads": _first(g(KA.HEAD_COUNT_KV, n_head)),
        "max_position_embeddings": g(KL.CONTEXT_LENGTH),
        "rms_norm_eps": g(KA.LAYERNORM_RMS_EPS, 1e-6),
        "hidden_act": "silu",
        "num_experts_per_tok": need(KL.EXPERT_USED_COUNT),
        "tie_word_embeddings": "output.weight" not in names,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "bos_token_id": g(KT.BOS_ID),
        "eos_token_id": g(KT.EOS_ID),
        "pad_token_id": g(KT.PAD_ID),
    }
    _rope_scaling(c, g)
    n_experts = need(KL.EXPERT_COUNT)
    norm = g(KL.EXPERT_WEIGHTS_NORM)
    if mt == "mixtral":
        c.update(num_local_experts=n_experts, sliding_window=None)
        if c["intermediate_size"] is None and "blk.0.ffn_gate_exps.weight" in names:
            c["intermediate_size"] = shape("blk.0.ffn_gate_exps.weight")[1]
    elif mt in ("qwen2_moe", "qwen3_moe", "olmoe"):
        moe_ff = g(KL.EXPERT_FEED_FORWARD_LENGTH)
        if moe_ff is None and "blk.0.ffn_gate_exps.weight" in names:
            moe_ff = shape("blk.0.ffn_gate_exps.weight")[1]
        bias = "blk.0.attn_q.bias" in names
        c.update(
            num_experts=n_experts,
            norm_topk_prob=NORM_TOPK_DEFAULT[mt] if norm is None else bool(norm),
        )
        if mt == "olmoe":
            c.update(
                intermediate_size=moe_ff or c["intermediate_size"],
                attention_bias=bias,
                clip_qkv=g(KA.CLAMP_KQV),
            )
        else:
            c.update(
                moe_intermediate_size=moe_ff,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                use_sliding_window=False,
            )
        if mt == "qwen2_moe":
            shared = g(KL.EXPERT_SHARED_FEED_FORWARD_LENGTH)
            if shared is None and "blk.0.ffn_gate_shexp.weight" in names:
                shared = shape("blk.0.ffn_gate_shexp.weight")[0]
            c.update(shared_expert_intermediate_size=shared, qkv_bias=bias)
        if mt == "qwen3_moe":
            c.update(attention_bias=bias)
    else:
        _deepseek_config(c, n_experts, norm, g, need, shape, names)
    if not mt.startswith("deepseek") and g(KA.KEY_LENGTH):
        c["head_dim"] = g(KA.KEY_LENGTH)
    return c


def _rope_scaling(c: dict, g) -> None:
    kind, factor = g(KR.SCALING_TYPE), g(KR.SCALING_FACTOR)
    if kind not in ("linear", "yarn") or factor is None:
        return
    rope = {"rope_type": kind, "type": kind, "factor": float(factor)}
    if kind == "yarn":
        rope["original_max_position_embeddings"] = g(KR.SCALING_ORIG_CTX_LEN)
        for key, hf in (
            (KR.SCALING_YARN_BETA_FAST, "beta_fast"),
            (KR.SCALING_YARN_BETA_SLOW, "beta_slow"),
        ):
            if g(key) is not None:
                rope[hf] = float(g(key))
        if (log_mul := g(KR.SCALING_YARN_LOG_MUL)) is not None:
            # llama.cpp stores 0.1 * mscale_all_dim for deepseek2; HF DeepSeek
            # configs carry mscale == mscale_all_dim, which this assumes
            rope["mscale_all_dim"] = rope["mscale"] = float(log_mul) / 0.1
    c["rope_scaling"] = rope
    c["rope_parameters"] = {**rope, "rope_theta": c["rope_theta"]}
    del c["rope_parameters"]["type"]


def _deepseek_config(c: dict, n_experts: int, norm, g, need, shape, names) -> None:
    v3 = c["model_type"] == "deepseek_v3"
    rope_dim = need(KR.DIMENSION_COUNT)
    if g(KA.KEY_LENGTH_MLA) is not None:  # llama.cpp since MLA absorption (k_b/v_b)
        qk_head, v_head = g(KA.KEY_LENGTH_MLA), need(KA.VALUE_LENGTH_MLA)
    else:  # older files: key/value lengths are the MHA head dims
        qk_head, v_head = need(KA.KEY_LENGTH), need(KA.VALUE_LENGTH)
    n_group = g(KL.EXPERT_GROUP_COUNT, 1)
    c.update(
        num_key_value_heads=c["num_attention_heads"],  # GGUF's 1 is llama.cpp's MQA view
        n_routed_experts=n_experts,
        n_shared_experts=g(KL.EXPERT_SHARED_COUNT, 0),
        moe_intermediate_size=g(KL.EXPERT_FEED_FORWARD_LENGTH),
        first_k_dense_replace=g(KL.LEADING_DENSE_BLOCK_COUNT, 0),
        q_lora_rank=g(KA.Q_LORA_RANK),
        kv_lora_rank=need(KA.KV_LORA_RANK),
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=qk_head - rope_dim,
        v_head_dim=v_head,
        head_dim=rope_dim,
        n_group=n_group,
        topk_group=g(KL.EXPERT_GROUP_USED_COUNT, 1),
        routed_scaling_factor=float(g(KL.EXPERT_WEIGHTS_SCALE, 1.0)),
        norm_topk_prob=bool(norm),
        scoring_func="sigmoid" if v3 else "softmax",
        # DeepSeek-V2 routes within groups when it has them; V2-Lite has one group
        topk_method="noaux_tc" if v3 else ("group_limited_greedy" if n_group > 1 else "greedy"),
    )
    # cross-check the MLA dims against the tensors they shape
    kb = "blk.0.attn_k_b.weight"
    if kb in names and shape(kb)[1:] != (c["kv_lora_rank"], c["qk_nope_head_dim"]):
        raise ShapeMismatch(
            f"{kb} is {shape(kb)}, but kv_lora_rank "
            f"{c['kv_lora_rank']} and qk_nope_head_dim "
            f"{c['qk_nope_head_dim']} come from the metadata"
        )


def _first(v):
    return v[0] if isinstance(v, list) else v
