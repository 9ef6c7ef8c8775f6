"""Rules over tensor names that the converter and the runtime both apply.

A name rule here is part of what a .emoe means: the converter stores router
tensors in f32 and the runtime keeps them in float32, so both read the rule
from this module rather than one from the other.
"""

from __future__ import annotations

import re

__all__ = ["is_router"]

# Small tensors that steer routing stay f32 whatever the dense codec is: routing decisions
# are precision-sensitive.
_ROUTER = re.compile(r"(\.gate\.weight|shared_expert_gate\.weight|e_score_correction_bias)$")


def is_router(name: str) -> bool:
    """Whether the tensor `name` steers routing (a router, a shared-expert gate, a score bias).

    Args:
        name: a tensor name as stored in the .emoe (Hugging Face naming).
    Returns:
        True for router tensors, which are stored in f32 and computed in float32.
    """
    return bool(_ROUTER.search(name))
