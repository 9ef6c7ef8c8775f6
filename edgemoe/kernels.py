"""Linear layers over stored weights: fused quantized kernels, plus a reference.

`make_linear` turns one tensor's level segments (as stored in a .emoe) into a
callable `y = x @ W.T` that computes on the stored codes where torch has a
fused CPU kernel:

    f32 / f16 / bf16      dense weight in the compute dtype       F.linear
    int8, one scale/row   int8 codes + per-row scales             _weight_int8pack_mm
    int4                  packed nibbles + group scale/offset     _weight_int4pack_mm_for_cpu
    mwq, base <= 4 bits   one int4 kernel per level, summed       (level 1: (q - z) s;
                                                                  level k: s_k (2b - 1) as code b + 7)
    anything else         dequantized once to the compute dtype   F.linear

Dequantize-then-matmul per call is never used: a 5632x2048 INT8 matrix costs
~13 ms to dequantize here and ~0.4 ms to multiply fused. `reference_linear`
(dequantize with the codec's own decoder, then F.linear) is the oracle the
tests compare every kernel against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from formats.codecs import get_codec
from formats.codecs.mwq import unpack_plane

INT4_GROUPS = (32, 64, 128, 256)


def _fields(codec, shape, params, segments, level: int) -> list[memoryview]:
    """Split level `level`'s segment (0-based) into its fields."""
    sizes = codec.level_fields(shape, params)[level]
    seg, out, pos = memoryview(segments[level]), [], 0
    for n in sizes:
        out.append(seg[pos : pos + n])
        pos += n
    return out


def _f16(buf, rows: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(buf, dtype="<f2").astype(np.float32).reshape(rows, -1))


class Linear(ABC):
    """y = x @ W.T for x [..., K]; `nbytes` is the memory its weights hold."""

    out_features: int
    in_features: int
    nbytes: int

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class DenseLinear(Linear):
    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None):
        self.w, self.bias = w.contiguous(), bias
        self.out_features, self.in_features = w.shape
        self.nbytes = w.numel() * w.element_size() + (
            0 if bias is None else bias.numel() * bias.element_size()
        )

    def __call__(self, x):
        return F.linear(x.to(self.w.dtype), self.w, self.bias)


class Int8Linear(Linear):
    """Per-output-row symmetric INT8: the layout _weight_int8pack_mm takes as is."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        self.q, self.scales, self.dtype = q.contiguous(), scales.to(dtype).contiguous(), dtype
        self.out_features, self.in_features = q.shape
        self.nbytes = q.numel() + self.scales.numel() * self.scales.element_size()

    def __call__(self, x):
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, self.in_features).to(self.dtype), self.q, self.scales
        )
        return y.reshape(*lead, self.out_features)


class Int4Linear(Linear):
    """Group-wise INT4 w = (q - 8) * scale + zero, torch's CPU int4 layout.

    Several levels (mwq) are several such matrices summed: `parts` holds
    (packed, scale_and_zeros) pairs.
    """

    def __init__(
        self, parts: list[tuple[torch.Tensor, torch.Tensor]], group: int, shape, dtype: torch.dtype
    ):
        self.parts, self.group, self.dtype = parts, group, dtype
        self.out_features, self.in_features = shape
        self.nbytes = sum(
            p.numel() * p.element_size() + sz.numel() * sz.element_size() for p, sz in parts
        )

    def __call__(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        y = None
        for packed, sz in self.parts:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group, sz)
            y = part if y is None else y + part
        return y.reshape(*lead, self.out_features)


def _int4_part(
    q: np.ndarray, scale: torch.Tensor, zero: torch.Tensor, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """q uint8 [N, K] in 0..15, scale/zero float32 [N, G] -> (packed, scale_and_zeros [G, N, 2])."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.from_numpy(q.astype(np.int32)), 1
    )
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, sz


def reference_weight(
    codec_id: int, shape, params: dict, segments: Sequence, dtype=torch.float32
) -> torch.Tensor:
    """The weight as the codec's own decoder gives it (the oracle)."""
    codec = get_codec(codec_id)
    return torch.from_numpy(codec.decode(list(segments), shape, params)).to(dtype)


def reference_linear(codec_id, shape, params, segments, dtype=torch.float32) -> DenseLinear:
    return DenseLinear(reference_weight(codec_id, shape, params, segments, dtype))


def make_linear(
    codec_id: int,
    shape,
    params: dict,
    segments: Sequence,
    dtype: torch.dtype = torch.bfloat16,
    fused: bool = True,
) -> Linear:
    """A Linear over a tensor's first len(segments) levels, fused where torch allows.

    Args:
        codec_id, shape, params: the tensor's header entry.
        segments: its level segments 1..L (raw bytes), L = the level to compute at.
        dtype: compute dtype of activations and dense weights.
        fused: False forces the reference path (tests, debugging).
    """
    codec = get_codec(codec_id)
    name, rows = codec.name, int(shape[0])
    if not fused or len(shape) != 2 or name in ("f32", "f16", "bf16"):
        return reference_linear(codec_id, shape, params, segments, dtype)
    cols = int(shape[1])
    group = params.get("group")
    if name == "int8" and group == cols:
        codes, scales = _fields(codec, shape, params, segments, 0)
        q = torch.from_numpy(np.frombuffer(codes, dtype=np.int8).reshape(rows, cols).copy())
        return Int8Linear(q, _f16(scales, rows).reshape(rows), dtype)
    int4_ok = group in INT4_GROUPS and cols % group == 0 and rows % 16 == 0 and cols % 64 == 0
    if name == "int4" and int4_ok:
        nib, s, m = _fields(codec, shape, params, segments, 0)
        packed = np.frombuffer(nib, dtype=np.uint8).reshape(rows, cols // 2)
        q = np.empty((rows, cols), np.uint8)
        q[:, 0::2], q[:, 1::2] = packed & 0x0F, packed >> 4
        scale, offset = _f16(s, rows), _f16(m, rows)
        return Int4Linear([_int4_part(q, scale, offset + 8 * scale, dtype)], group, shape, dtype)
    if name == "mwq" and int4_ok and params["bits"][0] <= 4:
        n, b1 = rows * cols, params["bits"][0]
        fields = _fields(codec, shape, params, segments, 0)
        q = np.zeros(n, np.uint8)
        for p in range(b1):
            q |= unpack_plane(fields[p], 0, n) << p
        s1, z1 = _f16(fields[b1], rows), _f16(fields[b1 + 1], rows)
        parts = [_int4_part(q.reshape(rows, cols), s1, (8 - z1) * s1, dtype)]
        for k in range(1, len(segments)):
            plane, sk = _fields(codec, shape, params, segments, k)
            b = unpack_plane(plane, 0, n).reshape(rows, cols)
            sk = _f16(sk, rows)
            # s_k (2b - 1) = ((b + 7) - 8) * 2 s_k + s_k: small terms, no bf16 cancellation
            parts.append(_int4_part(b + 7, 2 * sk, sk, dtype))
        return Int4Linear(parts, group, shape, dtype)
    return reference_linear(codec_id, shape, params, segments, dtype)


class BiasLinear(Linear):
    """A Linear plus a float bias (qkv biases over quantized weights)."""

    def __init__(self, inner: Linear, bias: torch.Tensor):
        self.inner, self.bias = inner, bias
        self.out_features, self.in_features = inner.out_features, inner.in_features
        self.nbytes = inner.nbytes + bias.numel() * bias.element_size()

    def __call__(self, x):
        y = self.inner(x)
        return y + self.bias.to(y.dtype)


def prepared_nbytes(
    codec_name: str, shape, params: dict, levels: int, dtype: torch.dtype, fused: bool = True
) -> int:
    """Bytes make_linear's result holds for this tensor, computed without building it (planner)."""
    item = torch.empty((), dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= int(d)
    if len(shape) != 2:
        return n * 4 if len(shape) == 1 else n * item
    rows, cols = int(shape[0]), int(shape[1])
    group = params.get("group")
    int4_ok = group in INT4_GROUPS and cols % group == 0 and rows % 16 == 0 and cols % 64 == 0
    if fused and codec_name == "int8" and group == cols:
        return n + rows * item
    if (
        fused
        and int4_ok
        and (codec_name == "int4" or (codec_name == "mwq" and params["bits"][0] <= 4))
    ):
        k = 1 if codec_name == "int4" else levels
        return k * (n // 2 + 2 * rows * (cols // group) * item)
    return n * item
