"""What each family's runtime reads, as data: config keys with their types and defaults,
and the tensors each layer must hold with the shapes the config implies.

The defaults mirror the ModelArgs dataclasses of edgemoe/models/*.py (a key a
config lacks means the same there and here); formats.validate applies these
rules to files and checkpoints. Adding a family is adding a FamilyRules entry.

Shape legend: D hidden, V vocabulary, H heads, Hkv key/value heads, Dh head
dim, E routed experts, W expert width, I dense MLP width, S shared expert
width; MLA: Q q_lora_rank, C kv_lora_rank, N qk_nope_head_dim, R
qk_rope_head_dim, Dv v_head_dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """One config key the runtime reads.

    kind: "int", "num" (finite int or float), "bool", "str", "ints" (list of ints),
    "int?" (an int, or an explicit null that means something: DeepSeek's q_lora_rank),
    "num?" (a number or null), "map?" (a map or null).
    """

    kind: str
    default: object = REQUIRED
    lo: float = 1
    gt: bool = False  # the value must be strictly greater than lo
    choices: tuple = ()


INT = Key("int")
_COMMON = {
    "hidden_size": INT,
    "num_hidden_layers": INT,
    "num_attention_heads": INT,
    "num_experts_per_tok": INT,
    "vocab_size": INT,
    "rms_norm_eps": Key("num", 1e-6, lo=0, gt=True),
    "rope_theta": Key("num", 10000.0, lo=0, gt=True),
    "rope_parameters": Key("map?", None),
    "tie_word_embeddings": Key("bool", False),
    "max_position_embeddings": Key("int", 4096),
    "bos_token_id": Key("int?", None, lo=0),
}
_STANDARD = {
    **_COMMON,
    "num_key_value_heads": Key("int", 0, lo=0),  # 0: as many as attention heads
    "head_dim": Key("int", 0, lo=0),  # 0: hidden_size // num_attention_heads
    "intermediate_size": Key("int", 0, lo=0),
    "norm_topk_prob": Key("bool", False),
}
_QWEN = {
    **_STANDARD,
    "num_key_value_heads": INT,
    "moe_intermediate_size": Key("int", 0, lo=0),
    "shared_expert_intermediate_size": Key("int", 0, lo=0),
    "decoder_sparse_step": Key("int", 1),
    "mlp_only_layers": Key("ints", ()),
}
_DEEPSEEK = {
    **_COMMON,
    "intermediate_size": INT,
    "moe_intermediate_size": Key("int", 1407),
    "n_routed_experts": Key("int", 64),
    "n_shared_experts": Key("int", 2, lo=0),
    "first_k_dense_replace": Key("int", 0, lo=0),
    "moe_layer_freq": Key("int", 1),
    "q_lora_rank": Key("int?", 1536),
    "kv_lora_rank": Key("int", 512),
    "qk_nope_head_dim": Key("int", 128),
    "qk_rope_head_dim": Key("int", 64),
    "v_head_dim": Key("int", 128),
    "topk_method": Key("str", "greedy", choices=("greedy", "group_limited_greedy")),
    "n_group": Key("int", 1),
    "topk_group": Key("int", 1),
    "routed_scaling_factor": Key("num", 1.0, lo=0, gt=True),
    "norm_topk_prob": Key("bool", False),
    "mlp_bias": Key("bool", False, choices=(False,)),
    "rope_scaling": Key("map?", None),
    "max_position_embeddings": Key("int", 2048),
}
_DEEPSEEK_V3 = {
    **_DEEPSEEK,
    "moe_intermediate_size": Key("int", 2048),
    "n_routed_experts": Key("int", 256),
    "n_shared_experts": Key("int", 1, lo=0),
    "first_k_dense_replace": Key("int", 3, lo=0),
    "topk_method": Key("str", "noaux_tc"),  # V3 always routes noaux_tc, whatever it says
    "n_group": Key("int", 8),
    "topk_group": Key("int", 4),
    "routed_scaling_factor": Key("num", 2.5, lo=0, gt=True),
    "norm_topk_prob": Key("bool", True),
    "mlp_bias": Key("bool", False),
    "max_position_embeddings": Key("int", 4096),
    "rope_interleave": Key("bool", True),
}

# A tensor rule: (name under the layer prefix, shape from the dims, when it must exist).
# need: True (always), False (checked only when present), or a function of (dims, has).
Rule = tuple[str, Callable[[SimpleNamespace], tuple], object]

_GQA: list[Rule] = [
    ("self_attn.q_proj.weight", lambda d: (d.H * d.Dh, d.D), True),
    ("self_attn.k_proj.weight", lambda d: (d.Hkv * d.Dh, d.D), True),
    ("self_attn.v_proj.weight", lambda d: (d.Hkv * d.Dh, d.D), True),
    ("self_attn.o_proj.weight", lambda d: (d.D, d.H * d.Dh), True),
    ("self_attn.q_proj.bias", lambda d: (d.H * d.Dh,), False),
    ("self_attn.k_proj.bias", lambda d: (d.Hkv * d.Dh,), False),
    ("self_attn.v_proj.bias", lambda d: (d.Hkv * d.Dh,), False),
    ("self_attn.o_proj.bias", lambda d: (d.D,), False),
]
_QK_NORM_HEAD: list[Rule] = [  # Qwen3: RMSNorm over each head
    ("self_attn.q_norm.weight", lambda d: (d.Dh,), True),
    ("self_attn.k_norm.weight", lambda d: (d.Dh,), True),
]
_QK_NORM_FULL: list[Rule] = [  # OLMoE: RMSNorm over the whole projection
    ("self_attn.q_norm.weight", lambda d: (d.H * d.Dh,), True),
    ("self_attn.k_norm.weight", lambda d: (d.Hkv * d.Dh,), True),
]
_MLA: list[Rule] = [
    ("self_attn.q_proj.weight", lambda d: (d.H * (d.N + d.R), d.D), lambda d, has: d.Q is None),
    ("self_attn.q_a_proj.weight", lambda d: (d.Q, d.D), lambda d, has: d.Q is not None),
    ("self_attn.q_a_layernorm.weight", lambda d: (d.Q,), lambda d, has: d.Q is not None),
    (
        "self_attn.q_b_proj.weight",
        lambda d: (d.H * (d.N + d.R), d.Q),
        lambda d, has: d.Q is not None,
    ),
    ("self_attn.kv_a_proj_with_mqa.weight", lambda d: (d.C + d.R, d.D), True),
    ("self_attn.kv_a_layernorm.weight", lambda d: (d.C,), True),
    ("self_attn.kv_b_proj.weight", lambda d: (d.H * (d.N + d.Dv), d.C), True),
    ("self_attn.o_proj.weight", lambda d: (d.D, d.H * d.Dv), True),
    ("self_attn.q_proj.bias", lambda d: (d.H * (d.N + d.R),), False),
    ("self_attn.q_a_proj.bias", lambda d: (d.Q,), False),
    ("self_attn.q_b_proj.bias", lambda d: (d.H * (d.N + d.R),), False),
    ("self_attn.kv_a_proj_with_mqa.bias", lambda d: (d.C + d.R,), False),
    ("self_attn.kv_b_proj.bias", lambda d: (d.H * (d.N + d.Dv),), False),
    ("self_attn.o_proj.bias", lambda d: (d.D,), False),
]
NORMS: list[Rule] = [
    ("input_layernorm.weight", lambda d: (d.D,), True),
    ("post_attention_layernorm.weight", lambda d: (d.D,), True),
]
DENSE_MLP: list[Rule] = [
    ("mlp.gate_proj.weight", lambda d: (d.I, d.D), True),
    ("mlp.up_proj.weight", lambda d: (d.I, d.D), True),
    ("mlp.down_proj.weight", lambda d: (d.D, d.I), True),
]


def _router(prefix: str) -> list[Rule]:
    return [(f"{prefix}.weight", lambda d: (d.E, d.D), True)]


def _has_qwen_shared(d, has) -> bool:
    return has("mlp.shared_expert.gate_proj.weight")


_QWEN2_SHARED: list[Rule] = [
    ("mlp.shared_expert.gate_proj.weight", lambda d: (d.S, d.D), False),
    ("mlp.shared_expert.up_proj.weight", lambda d: (d.S, d.D), _has_qwen_shared),
    ("mlp.shared_expert.down_proj.weight", lambda d: (d.D, d.S), _has_qwen_shared),
    ("mlp.shared_expert_gate.weight", lambda d: (1, d.D), _has_qwen_shared),
]
_DEEPSEEK_SHARED: list[Rule] = [
    ("mlp.shared_experts.gate_proj.weight", lambda d: (d.S, d.D), lambda d, has: d.S > 0),
    ("mlp.shared_experts.up_proj.weight", lambda d: (d.S, d.D), lambda d, has: d.S > 0),
    ("mlp.shared_experts.down_proj.weight", lambda d: (d.D, d.S), lambda d, has: d.S > 0),
]
_V3_BIAS: list[Rule] = [("mlp.gate.e_score_correction_bias", lambda d: (d.E,), True)]
GLOBAL: list[Rule] = [
    ("model.embed_tokens.weight", lambda d: (d.V, d.D), True),
    ("model.norm.weight", lambda d: (d.D,), True),
    ("lm_head.weight", lambda d: (d.V, d.D), False),  # absent: tied to the embedding
]


@dataclass(frozen=True)
class FamilyRules:
    keys: dict[str, Key]
    experts_keys: tuple[str, ...]  # the config key of E, with the names transformers also used
    width_key: str  # the config key of W
    attention: list[Rule]
    moe: list[Rule]  # in a sparse layer, besides the routed experts
    mla: bool = False


RULES: dict[str, FamilyRules] = {
    "mixtral": FamilyRules(
        {**_STANDARD, "num_key_value_heads": INT, "rope_theta": Key("num", 1e6, lo=0, gt=True)},
        ("num_local_experts",),
        "intermediate_size",
        _GQA,
        _router("block_sparse_moe.gate"),
    ),
    "qwen2_moe": FamilyRules(
        {**_QWEN, "rope_theta": Key("num", 1e6, lo=0, gt=True)},
        ("num_experts",),
        "moe_intermediate_size",
        _GQA,
        _router("mlp.gate") + _QWEN2_SHARED,
    ),
    "qwen3_moe": FamilyRules(
        {
            **_QWEN,
            "rope_theta": Key("num", 1e6, lo=0, gt=True),
            "norm_topk_prob": Key("bool", True),
        },
        ("num_experts", "num_local_experts"),
        "moe_intermediate_size",
        _GQA + _QK_NORM_HEAD,
        _router("mlp.gate"),
    ),
    "olmoe": FamilyRules(
        {
            **_STANDARD,
            "rms_norm_eps": Key("num", 1e-5, lo=0, gt=True),
            "clip_qkv": Key("num?", None, lo=0, gt=True),
        },
        ("num_experts",),
        "intermediate_size",
        _GQA + _QK_NORM_FULL,
        _router("mlp.gate"),
    ),
    "deepseek_v2": FamilyRules(
        _DEEPSEEK,
        ("n_routed_experts",),
        "moe_intermediate_size",
        _MLA,
        _router("mlp.gate") + _DEEPSEEK_SHARED,
        mla=True,
    ),
    "deepseek_v3": FamilyRules(
        _DEEPSEEK_V3,
        ("n_routed_experts",),
        "moe_intermediate_size",
        _MLA,
        _router("mlp.gate") + _V3_BIAS + _DEEPSEEK_SHARED,
        mla=True,
    ),
}
FAMILIES = tuple(RULES)
