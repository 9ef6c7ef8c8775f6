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


def parse_args(family: str, config: dict):
    """The family's ModelArgs for a config dict (parsed once; geometry is its methods)."""
    return family_module(family).ModelArgs.from_dict(config)


def build_model(family: str, args, weights, executor):
    """The family's Model for parsed args, over resident weights and an executor."""
    return family_module(family).Model(args, weights, executor)
