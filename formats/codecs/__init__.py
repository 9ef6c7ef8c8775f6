"""Codecs of the .emoe container, registered by fixed id (see base.py)."""

from formats.codecs import bitplane, intq, mwq, raw  # noqa: F401  (registration)
from formats.codecs.base import (
    Codec,
    codec_by_name,
    get_codec,
    numel,
    pick_group,
    register,
    registered,
)

__all__ = ["Codec", "codec_by_name", "get_codec", "numel", "pick_group", "register", "registered"]
