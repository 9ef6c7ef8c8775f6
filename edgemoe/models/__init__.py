"""Model families, one module each, named after the Hugging Face model_type.

Each module has ModelArgs.from_dict (unknown keys dropped) and Model, a
CausalLM over a Weights accessor and an ExpertExecutor.
"""

from __future__ import annotations

import importlib

from formats.errors import EmoeError

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


class UnknownFamily(EmoeError):
    fix = f"edgemoe runs {', '.join(FAMILIES)}; convert one of those"


def family_module(family: str):
    if family not in FAMILIES:
        raise UnknownFamily(f"model family {family!r} is not one the runtime knows")
    return importlib.import_module(f"edgemoe.models.{family}")


def build_model(family: str, config: dict, weights, executor):
    """The family's Model for a config dict, over resident weights and an executor."""
    mod = family_module(family)
    return mod.Model(mod.ModelArgs.from_dict(config), weights, executor)
