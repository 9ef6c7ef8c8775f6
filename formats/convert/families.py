"""What the converter knows of each MoE family: which tensors are routed experts.

A family is named by its Hugging Face `model_type`. For each, this module
says how routed-expert tensor names look, which layers are MoE layers, how
many experts each has and of what width, so the converter can lay experts
out per (layer, expert) and refuse a checkpoint that lacks one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from formats.errors import CheckpointError, UnsupportedArchitecture
from formats.names import is_router

# is_router lives in formats.names (the runtime applies it too); the converter imports it here.
__all__ = ["FAMILIES", "Family", "cfg_int", "family_of", "is_router"]

_PER_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_MIXTRAL = re.compile(
    r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w3|w2)\.weight$"
)
_ROLE = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
}


@dataclass(frozen=True)
class Family:
    model_type: str
    experts_keys: tuple[str, ...]  # config keys that may hold the number of routed experts
    width_key: str  # config key with an expert's intermediate size
    expert_re: re.Pattern

    def moe_layers(self, cfg: dict) -> list[int]:
        """Indices of the decoder layers that hold routed experts."""
        n = cfg_int(cfg, "num_hidden_layers")
        if self.model_type in ("qwen2_moe", "qwen3_moe"):
            step = cfg.get("decoder_sparse_step", 1) or 1
            dense = set(cfg.get("mlp_only_layers") or [])
            return [i for i in range(n) if i not in dense and (i + 1) % step == 0]
        if self.model_type in ("deepseek_v2", "deepseek_v3"):
            first = cfg.get("first_k_dense_replace", 0) or 0
            freq = cfg.get("moe_layer_freq", 1) or 1
            return [i for i in range(n) if i >= first and i % freq == 0]
        return list(range(n))

    def num_experts(self, cfg: dict) -> int:
        # transformers renames keys between versions (qwen3_moe: num_experts -> num_local_experts)
        key = next((k for k in self.experts_keys if cfg.get(k) is not None), self.experts_keys[0])
        return cfg_int(cfg, key)

    def expert_width(self, cfg: dict) -> int:
        return cfg_int(cfg, self.width_key)

    def classify(self, name: str) -> tuple[int, int, str] | None:
        """(layer, expert, role) for a routed-expert tensor name, else None."""
        m = self.expert_re.match(name)
        if not m:
            return None
        return int(m.group(1)), int(m.group(2)), _ROLE[m.group(3)]

    def expert_name(self, layer: int, expert: int, role: str) -> str:
        if self.model_type == "mixtral":
            w = {"gate": "w1", "up": "w3", "down": "w2"}[role]
            return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
        return f"model.layers.{layer}.mlp.experts.{expert}.{role}_proj.weight"


def cfg_int(cfg: dict, key: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise CheckpointError(
            f"config.json: {key!r} is {v!r}, expected a non-negative integer",
            "the config does not match its model family; use the model's own config.json",
        )
    return v


FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", ("num_local_experts",), "intermediate_size", _MIXTRAL),
    "qwen2_moe": Family("qwen2_moe", ("num_experts",), "moe_intermediate_size", _PER_EXPERT),
    "qwen3_moe": Family(
        "qwen3_moe", ("num_experts", "num_local_experts"), "moe_intermediate_size", _PER_EXPERT
    ),
    "olmoe": Family("olmoe", ("num_experts",), "intermediate_size", _PER_EXPERT),
    "deepseek_v2": Family(
        "deepseek_v2", ("n_routed_experts",), "moe_intermediate_size", _PER_EXPERT
    ),
    "deepseek_v3": Family(
        "deepseek_v3", ("n_routed_experts",), "moe_intermediate_size", _PER_EXPERT
    ),
}


def family_of(cfg: dict) -> Family:
    """The Family for a config dict; UnsupportedArchitecture names what it got."""
    mt = cfg.get("model_type")
    fam = FAMILIES.get(mt) if isinstance(mt, str) else None
    if fam is None:
        arch = cfg.get("architectures")
        raise UnsupportedArchitecture(
            f"model_type {mt!r} (architectures {arch!r}) is not a supported MoE family"
        )
    return fam
