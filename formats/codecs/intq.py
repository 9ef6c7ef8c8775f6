"""Group-wise round-to-nearest INT8 (symmetric) and INT4 (asymmetric) codecs.

Both lay their bytes out so the runtime's fused kernels need no unpacking
pass over the codes: INT8 codes are row-major int8 [N, K] (what
torch's _weight_int8pack_mm takes), INT4 codes are row-major nibbles, the
even column in the low nibble (what _convert_weight_to_int4pack_for_cpu
takes). Scales and offsets are float16 [N, K/group] after the codes.
"""

from __future__ import annotations

import numpy as np

from formats.codecs.base import Codec, check_matrix, finite, fp16_scales, pick_group, register
from formats.constants import CodecId

DEFAULT_INT4_GROUP = 128


@register
class Int8(Codec):
    """Symmetric INT8: w = q * s, q in [-127, 127], one scale per group.

    The default group is the whole row (per-output-channel), the layout the
    fused int8 matmul consumes directly.
    """

    id = CodecId.INT8
    name = "int8"

    @classmethod
    def default_params(cls, shape, group: int | None = None, **_):
        cols = int(shape[-1])
        return {"group": pick_group(cols, group) if group else cols}

    @classmethod
    def check_params(cls, shape, params):
        check_matrix(cls, shape, params)

    @classmethod
    def level_bits(cls, params):
        return [8]

    @classmethod
    def level_fields(cls, shape, params):
        rows, cols, g = check_matrix(cls, shape, params)
        return [[rows * cols, 2 * rows * (cols // g)]]

    @classmethod
    def encode(cls, w, params, calib=None):
        rows, cols, g = check_matrix(cls, w.shape, params)
        wg = finite(cls, w).reshape(rows, cols // g, g)
        s = fp16_scales(cls, np.abs(wg).max(axis=2) / 127.0)  # [N, G]
        safe = np.where(s > 0, s, 1.0)
        q = np.clip(np.rint(wg / safe[..., None]), -127, 127).astype(np.int8)
        return [q.tobytes() + s.astype("<f2").tobytes()]

    @classmethod
    def decode(cls, segments, shape, params):
        cls._check_segments(segments, shape, params)
        rows, cols, g = check_matrix(cls, shape, params)
        buf = segments[0]
        q = np.frombuffer(buf, dtype=np.int8, count=rows * cols).reshape(rows, cols // g, g)
        s = np.frombuffer(buf, dtype="<f2", offset=rows * cols).reshape(rows, cols // g)
        return (q.astype(np.float32) * s.astype(np.float32)[..., None]).reshape(rows, cols)


@register
class Int4(Codec):
    """Asymmetric INT4: w = q * s + m, q in [0, 15], scale and offset per group."""

    id = CodecId.INT4
    name = "int4"

    @classmethod
    def default_params(cls, shape, group: int | None = None, **_):
        return {"group": pick_group(int(shape[-1]), group or DEFAULT_INT4_GROUP)}

    @classmethod
    def check_params(cls, shape, params):
        check_matrix(cls, shape, params)

    @classmethod
    def level_bits(cls, params):
        return [4]

    @classmethod
    def level_fields(cls, shape, params):
        rows, cols, g = check_matrix(cls, shape, params)
        return [[rows * cols // 2, 2 * rows * (cols // g), 2 * rows * (cols // g)]]

    @classmethod
    def encode(cls, w, params, calib=None):
        rows, cols, g = check_matrix(cls, w.shape, params)
        wg = finite(cls, w).reshape(rows, cols // g, g)
        lo, hi = wg.min(axis=2), wg.max(axis=2)
        s = fp16_scales(cls, (hi - lo) / 15.0)
        m = fp16_scales(cls, lo)
        safe = np.where(s > 0, s, 1.0)
        q = np.clip(np.rint((wg - m[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
        q = q.reshape(rows, cols)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
        return [packed.tobytes() + s.astype("<f2").tobytes() + m.astype("<f2").tobytes()]

    @classmethod
    def decode(cls, segments, shape, params):
        cls._check_segments(segments, shape, params)
        rows, cols, g = check_matrix(cls, shape, params)
        buf = segments[0]
        n_codes, n_groups = rows * cols // 2, rows * (cols // g)
        packed = np.frombuffer(buf, dtype=np.uint8, count=n_codes).reshape(rows, cols // 2)
        s = np.frombuffer(buf, dtype="<f2", count=n_groups, offset=n_codes)
        m = np.frombuffer(buf, dtype="<f2", count=n_groups, offset=n_codes + 2 * n_groups)
        q = np.empty((rows, cols), dtype=np.float32)
        q[:, 0::2] = packed & 0x0F
        q[:, 1::2] = packed >> 4
        q = q.reshape(rows, cols // g, g)
        s = s.astype(np.float32).reshape(rows, -1, 1)
        m = m.astype(np.float32).reshape(rows, -1, 1)
        return (q * s + m).reshape(rows, cols)
