"""Bit-plane slicing of one uniform asymmetric INT8 code into nested widths.

Each weight has one 8-bit code q; the view at r bits uses the top r bits of q,
t = q >> (8 - r), so level j only adds the next bit planes of the same code.
No calibration is needed; the low views are coarse (a 2-bit view is four
evenly spaced values across the group's range).

Params (a dict in the tensor's header entry):
    group  int, a positive multiple of 8 dividing in_features (K).
    bits   list of ints [r1, r2, ..., 8], strictly ascending, r1 >= 1, last
           exactly 8: the bits per weight at each level.

Byte layout. W is float32 [N, K] (N = out_features, K = in_features), G = K / group.
Groups are contiguous runs of `group` weights along K within a row. A *plane*
is one bit per weight over the N*K weights in row-major order, packed with
numpy.packbits(bitorder="little") (weight i's bit is bit i % 8, counting from
the least significant, of byte i // 8), N*K/8 bytes, exactly as in mwq.

    Level 1 segment (r1*N*K/8 + 3*N*G bytes):
        r1 planes of q, most significant bit first: bits 7, 6, ..., 8 - r1;
        s  <f2 [N, G]  scale (IEEE 754 binary16, little-endian, row-major);
        z  u1  [N, G]  integer zero point 0..255, row-major.
    Level j > 1 segment ((r_j - r_(j-1))*N*K/8 bytes):
        the planes of bits 7 - r_(j-1), ..., 8 - r_j, most significant first.

    Decoding level j with r = r_j: t = the r bits read so far, most significant
    first (t = q >> (8 - r)), d = 2^(8 - r). A decoder MUST reconstruct, in float32,

        W_r = (t*d + (d - 1)/2 - z) * s

    which is (q - z) * s at r = 8. Bin t holds the codes t*d .. t*d + d - 1,
    i.e. the values W/s + z in [t*d - 1/2, t*d + d - 1/2); (d - 1)/2 puts the
    reconstruction at the bin's centre, so a weight spread evenly over a bin
    is reconstructed without bias (t*d alone would be low by (d - 1)/2 steps).
    t*d + (d - 1)/2 - z is exact in float32 (integers and halves of magnitude
    below 512), so the result rounds once and every decoder gets the same bits.

Encoding: per group the range [lo, hi] is widened to include 0;
s = (hi - lo)/255 rounded to float16, upwards so the range still fits;
z = clip(rint(-lo/s), 0, 255); q = clip(rint(W/s + z), 0, 255), computed from
the stored (rounded) s. An all-zero group has s = 0, z = 0, q = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np

from formats.codecs.base import Codec, check_matrix, pick_group, register
from formats.codecs.mwq import (
    check_common,
    check_int_list,
    check_weight,
    pack_plane,
    unpack_plane,
)
from formats.constants import CodecId
from formats.errors import CodecError

DEFAULT_GROUP = 128
DEFAULT_BITS = (2, 4, 8)
CODE_BITS = 8
PARAM_KEYS = frozenset({"group", "bits"})


def _f16_up(x: np.ndarray) -> np.ndarray:
    """Round to a float16 value >= x (x >= 0), returned as float32."""
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    low = h.astype(np.float32) < x
    h = np.where(low, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float32)


def view(t: np.ndarray, r: int, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """W_r = (t*d + (d-1)/2 - z) * s with d = 2^(8-r); float32 [N, G, g]."""
    d = 1 << (CODE_BITS - r)
    c = t.astype(np.float32) * np.float32(d) + np.float32((d - 1) / 2) - z[..., None]
    return c * s[..., None]


@register
class Bitplane(Codec):
    """Nested views of one asymmetric INT8 group code by its top bit planes."""

    id = CodecId.BITPLANE
    name = "bitplane"
    nested = True

    @classmethod
    def default_params(
        cls, shape, group: int | None = None, bits: Sequence[int] | None = None, **_
    ):
        params = {
            "group": pick_group(int(shape[-1]), group or DEFAULT_GROUP),
            "bits": [int(b) for b in (bits if bits is not None else DEFAULT_BITS)],
        }
        cls.check_params(shape, params)
        return params

    @classmethod
    def check_params(cls, shape, params):
        check_common(cls, shape, params, PARAM_KEYS)
        bits = check_int_list(cls, params, "bits")
        ascending = all(a < b for a, b in pairwise(bits))
        if bits[0] < 1 or bits[-1] != CODE_BITS or not ascending:
            raise CodecError(
                f"bitplane: bits {bits} must ascend strictly from at least 1 and end at {CODE_BITS}"
            )

    @classmethod
    def level_bits(cls, params):
        return list(params["bits"])

    @classmethod
    def level_fields(cls, shape, params):
        cls.check_params(shape, params)
        rows, cols, g = check_matrix(cls, shape, params)
        plane, n_groups = rows * cols // 8, rows * (cols // g)
        bits = params["bits"]
        fields = [[plane] * bits[0] + [2 * n_groups, n_groups]]
        fields += [[plane] * (b - a) for a, b in pairwise(bits)]
        return fields

    @classmethod
    def encode(cls, w, params, calib=None):
        w, rows, cols, g = check_weight(cls, w, params)
        wg = w.reshape(rows, cols // g, g)
        lo = np.minimum(wg.min(axis=2), 0.0)
        hi = np.maximum(wg.max(axis=2), 0.0)
        s = _f16_up((hi - lo) / np.float32(255))
        if not np.isfinite(s).all():
            raise CodecError("bitplane: weights exceed the float16 range of the scales")
        safe = np.where(s > 0, s, np.float32(1.0))
        z = np.clip(np.rint(-lo / safe), 0, 255)
        q = np.clip(np.rint(wg / safe[..., None] + z[..., None]), 0, 255).astype(np.uint8)

        bits = params["bits"]
        segments, done = [], 0
        for r in bits:
            planes = b"".join(pack_plane((q >> (7 - p)) & 1) for p in range(done, r))
            segments.append(planes)
            done = r
        segments[0] += s.astype("<f2").tobytes() + z.astype(np.uint8).tobytes()
        return segments

    @classmethod
    def decode(cls, segments, shape, params):
        cls._check_segments(segments, shape, params)
        rows, cols, g = check_matrix(cls, shape, params)
        groups, n = cols // g, rows * cols
        nbytes_plane, n_groups = n // 8, rows * groups
        bits = params["bits"]
        r = bits[len(segments) - 1]

        t = np.zeros(n, dtype=np.uint8)
        done = 0
        for seg, top in zip(segments, bits, strict=False):  # bits may be longer
            for p in range(top - done):
                t = (t << 1) | unpack_plane(seg, p * nbytes_plane, n)
            done = top
        off = bits[0] * nbytes_plane
        s = np.frombuffer(segments[0], dtype="<f2", count=n_groups, offset=off)
        z = np.frombuffer(segments[0], dtype=np.uint8, count=n_groups, offset=off + 2 * n_groups)
        w = view(
            t.reshape(rows, groups, g),
            r,
            s.astype(np.float32).reshape(rows, groups),
            z.astype(np.float32).reshape(rows, groups),
        )
        return w.reshape(rows, cols)
