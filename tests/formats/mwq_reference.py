"""Frozen copies of the numpy encoders as they were before they were vectorised (mwq without
calibration, bitplane, int8, int4): the oracle that the fast encoders must match byte for byte.

Test-only. Copied from formats/codecs/{mwq,bitplane,intq}.py at commit 77b56de; do not
"fix" anything here, the point is that it never changes.
"""

from __future__ import annotations

import numpy as np

CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(20))


def _f16(x):
    return np.asarray(x).astype(np.float16).astype(np.float32)


def pack_plane(bits):
    return np.packbits(bits.reshape(-1).astype(np.uint8), bitorder="little").tobytes()


def _quantize(wg, s, z, maxq):
    safe = np.where(s > 0, s, np.float32(1.0))
    return np.clip(np.rint(wg / safe[..., None] + z[..., None]), 0, maxq).astype(np.float32)


def dequantize(q, s, z):
    return (q.astype(np.float32) - z[..., None]) * s[..., None]


def add_plane(w_prev, signs, s):
    b = signs.astype(np.float32) * np.float32(2.0) - np.float32(1.0)
    return w_prev + s[..., None] * b


def sign_plane(wg, approx):
    r = wg - approx
    signs = (r >= 0).astype(np.uint8)
    with np.errstate(over="ignore"):
        s = _f16(np.abs(r).sum(axis=2, dtype=np.float64) / r.shape[2])
    if not np.isfinite(s).all():
        raise ValueError("mwq: weights exceed the float16 range of the scales")
    return signs, s, add_plane(approx, signs, s)


def fit_base(wg, bits, levels=1):
    maxq = (1 << bits) - 1
    lo = np.minimum(wg.min(axis=2), 0.0)
    hi = np.maximum(wg.max(axis=2), 0.0)
    best_err = np.full(lo.shape, np.inf)
    best_s = np.zeros(lo.shape, dtype=np.float32)
    best_z = np.zeros(lo.shape, dtype=np.float32)
    norm = None
    for ratio in CLIP_RATIOS:
        with np.errstate(over="ignore", invalid="ignore"):
            s = _f16((hi - lo) * np.float32(ratio) / np.float32(maxq))
            safe = np.where(s > 0, s, np.float32(1.0))
            z = _f16(np.clip(-lo * np.float32(ratio) / safe, 0, maxq))
            approx = dequantize(_quantize(wg, s, z, maxq), s, z)
        if not np.isfinite(s).all():
            raise ValueError("mwq: weights exceed the float16 range of the scales")
        errs = [((approx - wg) ** 2).sum(axis=2, dtype=np.float64)]
        for _ in range(levels - 1):
            approx = sign_plane(wg, approx)[2]
            errs.append(((approx - wg) ** 2).sum(axis=2, dtype=np.float64))
        if norm is None:
            norm = [max(float(e.sum()), np.finfo(np.float64).tiny) for e in errs]
        err = errs[0] if levels == 1 else sum(e / n for e, n in zip(errs, norm, strict=True))
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    return best_s, best_z


def mwq_encode(w, group, bits, joint_clip=False):
    """MWQ.encode(w, {"group": group, "bits": bits, "joint_clip": joint_clip}) without calib."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    groups = cols // group
    wg = w.reshape(rows, groups, group)
    levels = len(bits) if joint_clip else 1
    s, z = fit_base(wg, bits[0], levels)
    q = _quantize(wg, s, z, (1 << bits[0]) - 1)
    codes = q.astype(np.uint8)
    seg = b"".join(pack_plane((codes >> p) & 1) for p in range(bits[0]))
    segments = [seg + s.astype("<f2").tobytes() + z.astype("<f2").tobytes()]
    approx = dequantize(codes, s, z)
    for _ in bits[1:]:
        signs, sk, approx = sign_plane(wg, approx)
        segments.append(pack_plane(signs) + sk.astype("<f2").tobytes())
    return segments


def _f16_up(x):
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    low = h.astype(np.float32) < x
    h = np.where(low, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float32)


def bitplane_encode(w, group, bits):
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    wg = w.reshape(rows, cols // group, group)
    lo = np.minimum(wg.min(axis=2), 0.0)
    hi = np.maximum(wg.max(axis=2), 0.0)
    s = _f16_up((hi - lo) / np.float32(255))
    safe = np.where(s > 0, s, np.float32(1.0))
    z = np.clip(np.rint(-lo / safe), 0, 255)
    q = np.clip(np.rint(wg / safe[..., None] + z[..., None]), 0, 255).astype(np.uint8)
    segments, done = [], 0
    for r in bits:
        segments.append(b"".join(pack_plane((q >> (7 - p)) & 1) for p in range(done, r)))
        done = r
    segments[0] += s.astype("<f2").tobytes() + z.astype(np.uint8).tobytes()
    return segments


def _fp16(x):
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(np.float16).astype(np.float32)


def int8_encode(w, group):
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    wg = w.reshape(rows, cols // group, group)
    s = _fp16(np.abs(wg).max(axis=2) / 127.0)
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.rint(wg / safe[..., None]), -127, 127).astype(np.int8)
    return [q.tobytes() + s.astype("<f2").tobytes()]


def int4_encode(w, group):
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    wg = w.reshape(rows, cols // group, group)
    lo, hi = wg.min(axis=2), wg.max(axis=2)
    s = _fp16((hi - lo) / 15.0)
    m = _fp16(lo)
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.rint((wg - m[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    q = q.reshape(rows, cols)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return [packed.tobytes() + s.astype("<f2").tobytes() + m.astype("<f2").tobytes()]
