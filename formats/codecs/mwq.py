"""Matryoshka weight quantization (D²MoE's MWQ): a base code plus sign planes.

Level 1 is an asymmetric b1-bit group code; each further level adds one sign
bit per weight and one scale per group on top of the level below:

    level 1:  W1 = (Q1 - z1) * s1,       Q1 in [0, 2^b1 - 1]
    level k:  Wk = W(k-1) + sk * Bk,      Bk in {-1, +1}, sk >= 0

so loading level k of a weight reads the first k segments only.

Params (a dict in the tensor's header entry):
    group       int, a positive multiple of 8 dividing in_features (K).
    bits        list of ints [b1, b1+1, ..., bL], consecutive, 1 <= b1 <= 7,
                bL <= 8: the nominal bits per weight at each level.
    compensate  bool, optional (default false): encode the base level with
                GPTQ-like error compensation. Encoding only; decoding ignores it.
    joint_clip  bool, optional (default false): choose the base level's
                clipping for all levels together instead of for level 1 alone.
                Encoding only; decoding ignores it.

Byte layout. W is float32 [N, K] (N = out_features, K = in_features), G = K / group.
Groups are contiguous runs of `group` weights along K within a row; group j of
row n covers columns [j*group, (j+1)*group). A *plane* is one bit per weight
over the N*K weights in row-major order, packed with
numpy.packbits(bitorder="little"): weight i's bit is bit (i % 8), counting
from the least significant, of byte i // 8. A plane is N*K/8 bytes
(N*K % 8 == 0 because group % 8 == 0). All float16 values are IEEE 754
binary16, little-endian, row-major [N, G].

    Level 1 segment (b1*N*K/8 + 4*N*G bytes):
        b1 planes of the codes Q1, plane p holding bit p of each code, plane 0
        (least significant bit) first;
        s1  <f2 [N, G]  scale;
        z1  <f2 [N, G]  zero point (may be fractional).
        A decoder MUST reconstruct W1 = (float32(Q1) - float32(z1)) * float32(s1),
        in float32.
    Level k > 1 segment (N*K/8 + 2*N*G bytes):
        one sign plane: bit 1 means Bk = +1, bit 0 means Bk = -1;
        sk  <f2 [N, G]  scale.
        A decoder MUST reconstruct Wk = W(k-1) + float32(sk) * Bk, in float32.
    Q1 - z1 and sk * Bk are exact in float32, so each formula rounds once and
    every IEEE 754 decoder (fused multiply-add or not) gets the same bits.

Encoding (what this encoder does; a writer MAY fit the values differently, the
layout and the decode formulas above are the format):
    - Base level: the group's range [lo, hi] is widened to include 0, then
      scaled by each of 20 clipping ratios 1.0, 0.975, ..., 0.525; for each,
      s1 = f16(ratio*(hi-lo)/(2^b1-1)), z1 = f16(-ratio*lo/s1) and
      Q1 = clip(rint(W/s1 + z1), 0, 2^b1-1) from the float16-rounded values;
      per group the ratio with the lowest squared error is kept (first wins on
      ties, so ratio 1.0, plain min-max rounding, is always a candidate).
      With joint_clip the kept ratio is instead the one with the lowest
      sum over levels k = 1..L of (the group's level-k error) / (the level-k
      error of all groups together at ratio 1.0), each candidate's sign levels
      being fitted as below. Clipping that is best for level 1 leaves large
      residuals on the clipped weights that one-bit planes repair slowly; the
      joint choice trades some level-1 error for much lower upper-level error.
    - Sign levels: R = W - W(k-1), Bk = sign(R) with 0 -> +1,
      sk = f16(sum(h*|R|) / sum(h)) per group, the minimiser of
      sum(h * (R - sk*Bk)^2). W(k-1) is the decoder's own reconstruction, so
      encoder and decoder agree bit for bit.
    - With calibration activations X [T, K], errors are weighted per input
      column by h = mean over tokens of x^2 (the diagonal of X^T X / T), an
      approximation of the output error ||W X^T - Wq X^T||; without them h = 1.
      A group whose h sums to 0 falls back to h = 1.
    - compensate = true and X given: the base level is quantized column by
      column, left to right (GPTQ): H = 2 X^T X / T + lambda*I with
      lambda = 0.01 * mean(diag(H)), U the upper Cholesky factor of H^-1, each
      column's rounding error e pushed onto the later columns as
      W[:, j] -= e * U[i, j] / U[i, i]. A group's s1, z1 are fitted (as above)
      when its first column comes up, on the already-updated weights (with
      joint_clip, simulating the sign levels on those weights). The
      sign levels are then fitted against the original W. Without X,
      compensate has no effect.
    - Without X the work is done by formats/codecs/mwq_fast.py (torch, the same
      bytes as the numpy code here, which stays for calibrated weights and as
      the definition: tests/formats/test_codec_identity.py compares them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from formats.codecs.base import Codec, check_matrix, finite, pick_group, register
from formats.constants import CodecId
from formats.errors import CodecError

DEFAULT_GROUP = 128
DEFAULT_BITS = (2, 3, 4)
MAX_BASE_BITS = 7
MAX_BITS = 8
# Clipping ratios searched for the base level's range, widest first.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(20))
# GPTQ dampening: lambda = DAMP * mean(diag(H)).
DAMP = 0.01
# GPTQ lazy-batch width in columns (rounded up to a whole number of groups).
GPTQ_BLOCK = 128
PARAM_KEYS = frozenset({"group", "bits", "compensate", "joint_clip"})


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 and back, keeping float32: decode sees exactly these values."""
    return np.asarray(x).astype(np.float16).astype(np.float32)


def pack_plane(bits: np.ndarray) -> bytes:
    """One bit per weight (any shape, row-major), packed LSB-first into bytes."""
    return np.packbits(bits.reshape(-1).astype(np.uint8), bitorder="little").tobytes()


def unpack_plane(buf: bytes | memoryview, offset: int, n: int) -> np.ndarray:
    """The n bits (uint8 0/1) of the plane that starts at byte offset of buf."""
    packed = np.frombuffer(buf, dtype=np.uint8, count=n // 8, offset=offset)
    return np.unpackbits(packed, bitorder="little")


def check_int_list(cls: type[Codec], params: dict, key: str) -> list[int]:
    """params[key] as a non-empty list of ints (bools refused); CodecError otherwise."""
    v = params.get(key)
    if not isinstance(v, list | tuple) or not v:
        raise CodecError(f"{cls.name}: {key} must be a non-empty list of ints, got {v!r}")
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in v):
        raise CodecError(f"{cls.name}: {key} must be a list of ints, got {v!r}")
    return [int(b) for b in v]


def check_common(cls: type[Codec], shape: Sequence[int], params: dict, keys) -> tuple:
    """Params are a dict of known keys describing a non-empty [N, K] matrix."""
    if not isinstance(params, dict):
        raise CodecError(f"{cls.name}: params must be a dict, got {type(params).__name__}")
    unknown = set(params) - set(keys)
    if unknown:
        raise CodecError(f"{cls.name}: unknown params {sorted(map(str, unknown))}")
    rows, cols, g = check_matrix(cls, shape, params)
    if rows <= 0 or cols <= 0:
        raise CodecError(f"{cls.name}: shape {list(shape)} has no weights")
    return rows, cols, g


def column_weights(calib: np.ndarray | None, cols: int) -> np.ndarray | None:
    """Per-input-column mean of x^2 (diag(X^T X) / T) as float64 [K], or None."""
    if calib is None:
        return None
    x = np.asarray(calib)
    if x.ndim != 2 or x.shape[1] != cols or x.shape[0] == 0:
        raise CodecError(f"calibration activations must be [T, {cols}], got {list(x.shape)}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise CodecError("calibration activations contain NaN or infinity")
    return np.einsum("tk,tk->k", x, x) / x.shape[0]


def check_weight(cls: type[Codec], w: np.ndarray, params: dict) -> tuple[np.ndarray, int, int, int]:
    """The weight as float32 after the param check; refuses NaN and infinity."""
    w = np.asarray(w)
    cls.check_params(w.shape, params)
    rows, cols, g = check_matrix(cls, w.shape, params)
    return finite(cls, w), rows, cols, g


def _quantize(wg: np.ndarray, s: np.ndarray, z: np.ndarray, maxq: int) -> np.ndarray:
    """Codes (float32) of wg [..., g] for per-group s, z [...]."""
    safe = np.where(s > 0, s, np.float32(1.0))
    return np.clip(np.rint(wg / safe[..., None] + z[..., None]), 0, maxq).astype(np.float32)


def dequantize(q: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(q - z) * s in float32: the one formula encoder and decoder share."""
    return (q.astype(np.float32) - z[..., None]) * s[..., None]


def add_plane(w_prev: np.ndarray, signs: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W(k-1) + s * B with B = +1 where signs is 1, -1 where 0; float32 [N, G, g]."""
    b = signs.astype(np.float32) * np.float32(2.0) - np.float32(1.0)
    return w_prev + s[..., None] * b


def _group_weights(h: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray | None:
    """Column weights reshaped to [1, G, g] (1 where a group's sum to 0); None: uniform."""
    _, groups, g = shape
    if h is None:
        return None
    hg = h.reshape(1, groups, g).astype(np.float64)
    dead = hg.sum(axis=2, keepdims=True) <= 0
    return np.where(dead, 1.0, hg)


def _weighted_sum(x: np.ndarray, hg: np.ndarray | None) -> np.ndarray:
    """Per-group sum of x * h in float64 [N, G]. Uniform weights (None, the common case with
    no calibration data) skip the float64 product: the same numbers, about twice as fast."""
    if hg is None:
        return x.sum(axis=2, dtype=np.float64)
    return (x * hg).sum(axis=2)


def sign_plane(
    wg: np.ndarray, approx: np.ndarray, hg: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sign level on top of approx: (signs uint8 [N, G, g], s [N, G], new approx).

    s = sum(h*|R|) / sum(h) per group, rounded to float16 before it is used.
    """
    r = wg - approx
    signs = (r >= 0).astype(np.uint8)  # 0 -> +1
    with np.errstate(over="ignore"):
        s = _f16(_weighted_sum(np.abs(r), hg) / (r.shape[2] if hg is None else hg.sum(axis=2)))
    if not np.isfinite(s).all():
        raise CodecError("mwq: weights exceed the float16 range of the scales")
    return signs, s, add_plane(approx, signs, s)


def fit_base(
    wg: np.ndarray, hg: np.ndarray | None, bits: int, levels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group s, z (float16 values in float32) by a search over clipping ratios.

    Args:
        wg: weights [N, G, g] float32.
        hg: column weights [1, G, g] (broadcast over rows), None for uniform.
        bits: code width.
        levels: 1 picks the ratio with the lowest base-level error; L > 1
            (joint_clip) the lowest sum over levels 1..L of each level's error
            divided by that level's total error over all groups at ratio 1.0.
    Returns:
        (s, z), each float32 [N, G], exactly representable in float16.
    """
    maxq = (1 << bits) - 1
    lo = np.minimum(wg.min(axis=2), 0.0)
    hi = np.maximum(wg.max(axis=2), 0.0)
    best_err = np.full(lo.shape, np.inf)
    best_s = np.zeros(lo.shape, dtype=np.float32)
    best_z = np.zeros(lo.shape, dtype=np.float32)
    norm = None  # per-level totals at ratio 1.0 (the first candidate)
    for ratio in CLIP_RATIOS:
        with np.errstate(over="ignore", invalid="ignore"):
            s = _f16((hi - lo) * np.float32(ratio) / np.float32(maxq))
            safe = np.where(s > 0, s, np.float32(1.0))
            z = _f16(np.clip(-lo * np.float32(ratio) / safe, 0, maxq))
            approx = dequantize(_quantize(wg, s, z, maxq), s, z)
        if not np.isfinite(s).all():  # ratio 1.0 comes first and has the largest scales
            raise CodecError("mwq: weights exceed the float16 range of the scales")
        errs = [_weighted_sum((approx - wg) ** 2, hg)]
        for _ in range(levels - 1):
            approx = sign_plane(wg, approx, hg)[2]
            errs.append(_weighted_sum((approx - wg) ** 2, hg))
        if norm is None:
            norm = [max(float(e.sum()), np.finfo(np.float64).tiny) for e in errs]
        err = errs[0] if levels == 1 else sum(e / n for e, n in zip(errs, norm, strict=True))
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    return best_s, best_z


def _gptq_base(
    w: np.ndarray, calib: np.ndarray, h: np.ndarray, g: int, bits: int, levels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """GPTQ-quantize the base level; (q [N, K], s [N, G], z [N, G]) or None.

    None when the activations carry no signal (all zero) to compensate with.
    """
    rows, cols = w.shape
    x = calib.astype(np.float64)
    hess = 2.0 * (x.T @ x) / x.shape[0]  # [K, K]
    diag = np.diag(hess).copy()
    if diag.mean() <= 0:
        return None
    dead = diag == 0
    hess[dead, dead] = 1.0  # unused inputs: any value; keeps H invertible
    hess[np.diag_indices(cols)] += DAMP * diag.mean()
    try:
        lower_inv = np.linalg.inv(np.linalg.cholesky(hess))
        hinv = lower_inv.T @ lower_inv
        u = np.linalg.cholesky(hinv).T.astype(np.float32)  # upper, H^-1 = U^T U
    except np.linalg.LinAlgError:
        raise CodecError("mwq: calibration Hessian is not positive definite") from None

    maxq = (1 << bits) - 1
    groups = cols // g
    hg = _group_weights(h, (rows, groups, g))
    work = w.copy()
    q = np.empty((rows, cols), dtype=np.float32)
    s_all = np.empty((rows, groups), dtype=np.float32)
    z_all = np.empty((rows, groups), dtype=np.float32)
    block = g * max(1, GPTQ_BLOCK // g)  # whole groups, so a group never straddles blocks
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = work[:, b0:b1].copy()  # [N, B] updated in place column by column
        errs = np.empty_like(wb)
        for j in range(b1 - b0):
            i = b0 + j
            if i % g == 0:
                gi = i // g
                s, z = fit_base(wb[:, None, j : j + g], hg[:, gi : gi + 1], bits, levels)
                s_all[:, gi], z_all[:, gi] = s[:, 0], z[:, 0]
                s_col, z_col = s[:, 0], z[:, 0]
            col = wb[:, j]
            qc = _quantize(col[:, None], s_col, z_col, maxq)[:, 0]
            q[:, i] = qc
            e = (col - dequantize(qc[:, None], s_col, z_col)[:, 0]) / u[i, i]
            wb[:, j + 1 :] -= np.outer(e, u[i, i + 1 : b1])
            errs[:, j] = e
        work[:, b1:] -= errs @ u[b0:b1, b1:]
    return q, s_all, z_all


@register
class MWQ(Codec):
    """Bit-nested MWQ: b1-bit asymmetric base, then one sign plane per level."""

    id = CodecId.MWQ
    name = "mwq"
    nested = True

    @classmethod
    def default_params(
        cls,
        shape,
        group: int | None = None,
        bits: Sequence[int] | None = None,
        compensate: bool = False,
        joint_clip: bool = False,
        **_,
    ):
        params = {
            "group": pick_group(int(shape[-1]), group or DEFAULT_GROUP),
            "bits": [int(b) for b in (bits if bits is not None else DEFAULT_BITS)],
            "compensate": bool(compensate),
            "joint_clip": bool(joint_clip),
        }
        cls.check_params(shape, params)
        return params

    @classmethod
    def check_params(cls, shape, params):
        check_common(cls, shape, params, PARAM_KEYS)
        bits = check_int_list(cls, params, "bits")
        if not 1 <= bits[0] <= MAX_BASE_BITS:
            raise CodecError(f"mwq: base width {bits[0]} must be 1..{MAX_BASE_BITS}")
        if bits != list(range(bits[0], bits[0] + len(bits))) or bits[-1] > MAX_BITS:
            raise CodecError(
                f"mwq: bits {bits} must go up by one per level and end at most at {MAX_BITS}"
            )
        for key in ("compensate", "joint_clip"):
            if not isinstance(params.get(key, False), bool):
                raise CodecError(f"mwq: {key} must be a bool, got {params[key]!r}")

    @classmethod
    def level_bits(cls, params):
        return list(params["bits"])

    @classmethod
    def level_fields(cls, shape, params):
        cls.check_params(shape, params)
        rows, cols, g = check_matrix(cls, shape, params)
        plane, scales = rows * cols // 8, 2 * rows * (cols // g)
        bits = params["bits"]
        return [[plane] * bits[0] + [scales, scales]] + [[plane, scales]] * (len(bits) - 1)

    @classmethod
    def encode(cls, w, params, calib=None):
        w, rows, cols, g = check_weight(cls, w, params)
        bits = params["bits"]
        groups = cols // g
        # joint_clip: pick the base's clipping for the whole chain, not level 1 alone
        levels = len(bits) if params.get("joint_clip", False) else 1
        if calib is None:  # uniform weights: the vectorised encoder, the same bytes
            from formats.codecs.mwq_fast import encode_fast

            return encode_fast(w, g, bits, levels)
        h = column_weights(calib, cols)
        hg = _group_weights(h, (rows, groups, g))
        wg = w.reshape(rows, groups, g)

        base = None
        if params.get("compensate", False) and calib is not None:
            base = _gptq_base(w, np.asarray(calib), h, g, bits[0], levels)
        if base is None:
            s, z = fit_base(wg, hg, bits[0], levels)
            q = _quantize(wg, s, z, (1 << bits[0]) - 1)
        else:
            q, s, z = base
            q = q.reshape(rows, groups, g)
        codes = q.astype(np.uint8)
        seg = b"".join(pack_plane((codes >> p) & 1) for p in range(bits[0]))
        segments = [seg + s.astype("<f2").tobytes() + z.astype("<f2").tobytes()]

        approx = dequantize(codes, s, z)  # exactly what the decoder computes
        for _ in bits[1:]:
            signs, sk, approx = sign_plane(wg, approx, hg)
            segments.append(pack_plane(signs) + sk.astype("<f2").tobytes())
        return segments

    @classmethod
    def decode(cls, segments, shape, params):
        cls._check_segments(segments, shape, params)
        rows, cols, g = check_matrix(cls, shape, params)
        groups, n = cols // g, rows * cols
        nbytes_plane, n_groups = n // 8, rows * groups
        b1 = params["bits"][0]

        seg = segments[0]
        q = np.zeros(n, dtype=np.uint8)
        for p in range(b1):
            q |= unpack_plane(seg, p * nbytes_plane, n) << p
        off = b1 * nbytes_plane
        s = np.frombuffer(seg, dtype="<f2", count=n_groups, offset=off)
        z = np.frombuffer(seg, dtype="<f2", count=n_groups, offset=off + 2 * n_groups)
        w = dequantize(
            q.reshape(rows, groups, g),
            s.astype(np.float32).reshape(rows, groups),
            z.astype(np.float32).reshape(rows, groups),
        )
        for seg in segments[1:]:
            signs = unpack_plane(seg, 0, n).reshape(rows, groups, g)
            sk = np.frombuffer(seg, dtype="<f2", count=n_groups, offset=nbytes_plane)
            w = add_plane(w, signs, sk.astype(np.float32).reshape(rows, groups))
        return w.reshape(rows, cols)
