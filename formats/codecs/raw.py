"""Raw float codecs: f32, f16 and bf16, one level each, little-endian."""

from __future__ import annotations

import numpy as np

from formats.codecs.base import Codec, numel, register
from formats.constants import CodecId
from formats.errors import CodecError


class _Raw(Codec):
    itemsize: int

    @classmethod
    def level_bits(cls, params: dict) -> list[int]:
        return [cls.itemsize * 8]

    @classmethod
    def level_fields(cls, shape, params) -> list[list[int]]:
        return [[numel(shape) * cls.itemsize]]

    @classmethod
    def check_params(cls, shape, params) -> None:
        if params:
            raise CodecError(f"{cls.name} takes no params, got {params!r}")


@register
class F32(_Raw):
    id = CodecId.F32
    name = "f32"
    itemsize = 4

    @classmethod
    def encode(cls, w, params, calib=None):
        return [np.ascontiguousarray(w, dtype="<f4").tobytes()]

    @classmethod
    def decode(cls, segments, shape, params):
        cls._check_segments(segments, shape, params)
        return np.frombuffer(segments[0], dtype="<f4").reshape(shape).astype(np.float32)


@register
class F16(_Raw):
    id = CodecId.F16
    name = "f16"
    itemsize = 2

    @classmethod
    def encode(cls, w, params, calib=None):
        return [np.ascontiguousarray(w, dtype="<f2").tobytes()]

    @classmethod
    def decode(cls, segments, shape, params):
        cls._check_segments(segments, shape, params)
        return np.frombuffer(segments[0], dtype="<f2").reshape(shape).astype(np.float32)


def f32_to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (as torch does)."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, np.uint16(0x7FC0), rounded)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@register
class BF16(_Raw):
    id = CodecId.BF16
    name = "bf16"
    itemsize = 2

    @classmethod
    def encode(cls, w, params, calib=None):
        return [f32_to_bf16_bits(w).astype("<u2").tobytes()]

    @classmethod
    def decode(cls, segments, shape, params):
        cls._check_segments(segments, shape, params)
        bits = np.frombuffer(segments[0], dtype="<u2").reshape(shape)
        return bf16_bits_to_f32(bits)
