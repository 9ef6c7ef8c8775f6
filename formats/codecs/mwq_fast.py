"""MWQ's encoder vectorised with torch: the same bytes as the numpy encoder in mwq.py, faster.

The numpy encoder tries 20 clipping ratios per group and keeps the one with the lowest error
(or joint score over the levels); each try costs some 30 passes over the weights. Here:

1. A cheap pass per ratio (10 float32 passes) computes bounds on each candidate's exact score
   (see _bounds): level k's error follows from level k-1's error and absolute sum in exact
   arithmetic, and every rounding is bounded.
2. A group whose best candidate's bounds overlap another's (a near tie, a few per cent) gets
   those candidates scored exactly, with the numpy encoder's arithmetic step by step
   (exact_levels; sums in numpy's pairwise order), so the choice is the same bit for bit.
3. The chosen candidate is encoded with that same exact arithmetic.

Only the case without calibration data is here (uniform column weights, no GPTQ); mwq.py
keeps the numpy code for the rest. torch is imported when an encode needs it.
"""

from __future__ import annotations

import numpy as np

from formats.errors import CodecError

CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(20))  # as mwq.CLIP_RATIOS; a test checks

RANGE_MSG = "mwq: weights exceed the float16 range of the scales"
# Weights per block of groups. The bounds pass keeps its few float32 temporaries in the
# caches; the exact pass does many small ops per block (its sums), so it takes more at once.
BLOCK_WEIGHTS = 1 << 17
EXACT_BLOCK_WEIGHTS = 1 << 20
_U = 2.0**-24  # float32 unit roundoff


def _f16(x: np.ndarray) -> np.ndarray:
    """numpy's float16 rounding (float64 -> float16 in one step) as float32."""
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(np.float16).astype(np.float32)


def _chunks(w):
    """Groups [m, g] -> [g/8, 8m], x[c, 8i + j] = w[i, 8c + j]: numpy's eight running sums of a
    group become whole-row adds (long contiguous loops instead of loops of 8)."""
    m, g = w.shape
    return w.reshape(m, g // 8, 8).transpose(0, 1).reshape(g // 8, m * 8).contiguous()


def _unchunk(x):
    """Inverse of _chunks: [g/8, 8m] -> [m, g]."""
    c, m8 = x.shape
    return x.reshape(c, m8 // 8, 8).transpose(0, 1).reshape(m8 // 8, c * 8)


def _pairwise(x, c0: int, c1: int):
    """Each group's sum over chunks c0..c1-1 of x [c, 8m], float64 [m], in numpy's pairwise
    order (8 running sums up to 128 terms, halves above): the bits of x.sum(dtype=float64)."""
    import torch

    n = 8 * (c1 - c0)
    if n > 128:
        half = n // 2
        half -= half % 8
        return _pairwise(x, c0, c0 + half // 8) + _pairwise(x, c0 + half // 8, c1)
    r = x[c0].to(torch.float64)
    for c in range(c0 + 1, c1):
        r += x[c]
    r = r.view(-1, 8)
    return ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))


def _sign_scale(abs_sum, g: int):
    """f16(sum|R| / g) of a sign level, float32 [m]; CodecError if it overflows."""
    import torch

    s = _f16(abs_sum.numpy() / g)
    if not np.isfinite(s).all():
        raise CodecError(RANGE_MSG)
    return torch.from_numpy(s)


def exact_levels(w, s, z, maxq: int, levels: int, planes: bool = False):
    """The reference's arithmetic for groups w [m, g] float32 at scales s, z [m] float32.

    Returns (errs, codes, signs, scales): errs float64 [levels, m], each level's squared error
    as the numpy encoder sums it (None with planes); with planes, codes uint8 [m, g], and per
    sign level its signs bool [m, g] (True: B = +1) and scale float32 [m].
    """
    import torch

    m, g = w.shape
    x = _chunks(w)
    rep = 8  # chunk layout: a group's scalar repeats over its 8 columns
    s8 = s.repeat_interleave(rep)
    z8 = z.repeat_interleave(rep)
    t = x / torch.where(s8 > 0, s8, 1.0)
    t += z8
    t.round_()
    t.clamp_(0, maxq)
    codes = _unchunk(t).to(torch.uint8) if planes else None
    t -= z8
    t *= s8  # (q - z) * s
    d = t - x  # approx - w; the reference's R = w - approx is exactly -d
    tmp = torch.empty_like(x)
    errs = None if planes else [_pairwise(torch.mul(d, d, out=tmp), 0, g // 8)]
    signs, scales = [], []
    for _ in range(levels - 1):
        sk = _sign_scale(_pairwise(torch.abs(d, out=tmp), 0, g // 8), g)
        if planes:
            signs.append(_unchunk(d <= 0))  # R >= 0 <=> d <= 0, zeros included
            scales.append(sk)
        # W + sk * B: copysign(sk, 0 - d) is +sk exactly where d <= 0 (0 - (-0) = +0)
        torch.neg(d, out=tmp).add_(0.0)
        torch.copysign(sk.repeat_interleave(rep), tmp, out=tmp)
        t += tmp
        torch.sub(t, x, out=d)
        if not planes:
            errs.append(_pairwise(torch.mul(d, d, out=tmp), 0, g // 8))
    return (None if planes else torch.stack(errs)), codes, signs, scales


def candidates(lo: np.ndarray, hi: np.ndarray, maxq: int) -> tuple[np.ndarray, np.ndarray]:
    """s, z float32 [m, R] of every clip ratio, computed exactly as the numpy encoder does."""
    r = np.array(CLIP_RATIOS, dtype=np.float32)
    lo, hi = lo[:, None], hi[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        s = _f16((hi - lo) * r / np.float32(maxq))
        safe = np.where(s > 0, s, np.float32(1.0))
        z = _f16(np.clip(-lo * r / safe, 0, maxq))
    if not np.isfinite(s).all():
        raise CodecError(RANGE_MSG)
    return s, z


def _score(errs, norm):
    """The reference's criterion: level-1 error, or sum over levels of error / norm."""
    if norm is None:
        return errs[0]
    sc = errs[0] / norm[0]
    for e, n in zip(errs[1:], norm[1:], strict=True):
        sc = sc + e / n
    return sc


def _bounds(w, s, z, maxq: int, levels: int, norm, first):
    """Bounds [lo, hi] float64 [m, R] on every candidate's exact score, from a cheap pass.

    The pass computes each candidate's exact level-1 values and then only float32 sums:
    E1 = sum d^2 and A1 = sum |d|; level k follows in exact arithmetic from the one before,
    E_k = E_(k-1) - 2 s_k A_(k-1) + g s_k^2 (each |d| moves by s_k towards 0), with A_k from
    one more pass. Every rounding the pass or the reference makes is bounded, so the exact
    score lies inside; a scale whose float16 rounding is in doubt is carried as both values.
    first: the exact scores of candidate 0 (known from the norm pass) or None.
    Returns (lo, hi, force): force marks candidates to evaluate exactly whatever their bounds
    (a sign scale that may overflow float16).
    """
    import torch

    m, g = w.shape
    n_r = s.shape[1]
    st, zt = torch.from_numpy(s), torch.from_numpy(z)
    inv = 1 / torch.where(st > 0, st, 1.0)
    gam = 1.01 * (g - 1) * _U + 12 * _U  # relative error of a float32 sum of g terms, + slack
    e1 = torch.zeros(m, n_r, dtype=torch.float64)
    a_est = [torch.zeros(m, n_r, dtype=torch.float64) for _ in range(levels - 1)]
    s_used = [torch.zeros(m, n_r, dtype=torch.float64) for _ in range(levels - 1)]
    t = torch.empty_like(w)
    e = torch.empty_like(w)
    r0 = 0 if first is None else 1
    for r in range(r0, n_r):
        # e = q - (w/s + z), so s*e is d1 = (q - z)*s - w up to a few roundings of the
        # largest value (bounded below), and |e| moves by at most as much as w/s + z does
        # (|clamp(round(t)) - t| is 1-Lipschitz): w * (1/s) + z in one pass will do
        torch.addcmul(zt[:, r : r + 1], w, inv[:, r : r + 1], out=t)
        torch.round(t, out=e)
        e.clamp_(0, maxq)
        e -= t
        e.abs_()
        sr = st[:, r].double()
        e1[:, r] = (torch.linalg.vector_norm(e, 2, -1).double() * sr).square()
        for k in range(levels - 1):
            a = e.sum(-1, dtype=torch.float32).double() * sr
            a_est[k][:, r] = a
            if k + 1 < levels - 1:
                c = (a / g / sr).float()[:, None]  # the next scale, in units of s
                s_used[k][:, r] = c[:, 0].double() * sr
                e -= c
                e.abs_()  # ||d_k| - s_k| / s = |d_(k+1)| / s
    # Intervals on the reference's values. d_k = a_k - w with a_k its float32 values; its
    # sums E_k = sum d_k^2, A_k = sum |d_k| (real numbers) are what it rounds by at most 3.3u.
    # |a_k| <= maxq*s + s_2 + ... + s_k bounds the rounding of a_(k+1) = a_k + s*B
    bmax = torch.maximum(
        torch.from_numpy(np.abs(w.numpy()).max(1)).double()[:, None], (maxq * st).double()
    )
    bmax = bmax * 1.01
    # | s|e| - |d1| | <= zeta per weight: the roundings of this pass's w*(1/s) + z (6.2u bmax)
    # and of the reference's w/s + z (twice 3u bmax) and (q - z)*s (2u bmax)
    zeta = 15.5 * _U * bmax
    force = st == 0  # s*e is 0 there while d1 = -w: scored exactly
    a1 = a_est[0] if levels > 1 else e1.sqrt() * g**0.5  # sum |d| <= sqrt(g sum d^2)
    a1_hi = a1 * (1 + 2 * (gam + 2 * _U)) + g * zeta
    e1_lo = e1 * (1 - 2 * gam) - 2 * zeta * a1_hi - g * zeta * zeta
    e1_hi = e1 * (1 + 2 * gam) + 2 * zeta * a1_hi + g * zeta * zeta
    errs_lo, errs_hi = [e1_lo.clamp(min=0)], [e1_hi]
    a_prev_sum = torch.zeros(m, n_r, dtype=torch.float64)  # sum of earlier A_j upper bounds
    ds_total = torch.zeros(m, n_r, dtype=torch.float64)  # sum of |true scale - scale used|
    a_lo = a_hi = None
    for k in range(levels - 1):
        a = a_est[k]
        # A_(k+1): the float32 sum, its |d| roundings, the a roundings, the scales used
        err = 2 * (gam + 2 * _U) * a + 2.1 * _U * a_prev_sum
        err = err + g * ds_total + 1.02 * k * g * _U * bmax + g * zeta
        a_lo, a_hi = (a - err).clamp(min=0), a + err
        a_prev_sum = a_prev_sum + a_hi
        with np.errstate(over="ignore"):  # the reference's scale from its own sum
            sk_lo = torch.from_numpy(_f16((a_lo * (1 - 1.02 * _U)).numpy() / g)).double()
            sk_hi = torch.from_numpy(_f16((a_hi * (1 + 1.02 * _U)).numpy() / g)).double()
        if torch.isinf(sk_lo).any():
            raise CodecError(RANGE_MSG)
        force |= torch.isinf(sk_hi)
        sk_hi = torch.where(torch.isinf(sk_hi), sk_lo, sk_hi)
        ds_total = ds_total + torch.maximum((sk_hi - s_used[k]).abs(), (sk_lo - s_used[k]).abs())
        bmax = bmax + 1.01 * sk_hi
        # sum (|d_k| - s)^2 = E_k - 2 s A_k + g s^2, then the rounding of a_k + s*B moves
        # each d by at most u*bmax
        p_lo, p_hi = errs_lo[-1], errs_hi[-1]
        m_lo = torch.minimum(*[p_lo - 2 * sv * a_hi + g * sv * sv for sv in (sk_lo, sk_hi)])
        m_hi = torch.maximum(*[p_hi - 2 * sv * a_lo + g * sv * sv for sv in (sk_lo, sk_hi)])
        slack = 2.0**-46 * (p_hi + 2 * sk_hi * a_hi + g * sk_hi * sk_hi)
        m_lo, m_hi = (m_lo - slack).clamp(min=0), m_hi + slack
        spread = 2.02 * _U * bmax * torch.sqrt(g * m_hi) + 1.02 * g * _U * _U * bmax * bmax
        errs_lo.append((m_lo - spread).clamp(min=0))
        errs_hi.append(m_hi + spread + 2.02 * _U * bmax * g * _U * bmax)
    score_lo = score_hi = None
    for k in range(levels):
        lo_k = errs_lo[k] * (1 - 3.4 * _U)
        hi_k = errs_hi[k] * (1 + 3.4 * _U) + 2.0**-140 * g
        if norm is not None:
            lo_k, hi_k = lo_k / norm[k], hi_k / norm[k]
        score_lo = lo_k if score_lo is None else score_lo + lo_k
        score_hi = hi_k if score_hi is None else score_hi + hi_k
    score_lo = score_lo * (1 - 2.0**-40)
    score_hi = score_hi * (1 + 2.0**-40)
    if first is not None:
        score_lo[:, 0] = first
        score_hi[:, 0] = first
    return score_lo, score_hi, force


def fit_base_fast(wg: np.ndarray, bits: int, levels: int, stats: dict | None = None):
    """fit_base(wg, None, bits, levels) of the numpy encoder, bit for bit: (s, z) [N, G]."""
    import torch

    rows, groups, g = wg.shape
    maxq = (1 << bits) - 1
    lo = np.minimum(wg.min(axis=2), 0.0).reshape(-1)
    hi = np.maximum(wg.max(axis=2), 0.0).reshape(-1)
    s, z = candidates(lo, hi, maxq)
    w = torch.from_numpy(np.ascontiguousarray(wg, dtype=np.float32).reshape(-1, g))
    n_g = w.shape[0]
    step = max(1, BLOCK_WEIGHTS // g)
    big = max(1, EXACT_BLOCK_WEIGHTS // g)
    st, zt = torch.from_numpy(s), torch.from_numpy(z)
    norm = first = None
    if levels > 1:  # the norm: every group's exact errors at ratio 1.0
        e = torch.cat(
            [
                exact_levels(w[i : i + big], st[i : i + big, 0], zt[i : i + big, 0], maxq, levels)[
                    0
                ]
                for i in range(0, n_g, big)
            ],
            1,
        )
        tiny = np.finfo(np.float64).tiny
        norm = [max(float(ek.numpy().reshape(rows, groups).sum()), tiny) for ek in e]
        first = _score(list(e), norm)
    best = torch.empty(n_g, dtype=torch.int64)
    many = torch.zeros(n_g, dtype=torch.bool)
    pairs_g, pairs_r = [], []
    for i in range(0, n_g, step):
        j = min(n_g, i + step)
        blo, bhi, force = _bounds(
            w[i:j], s[i:j], z[i:j], maxq, levels, norm, None if first is None else first[i:j]
        )
        # a forced candidate's bounds mean nothing: it is scored exactly, never a yardstick
        top = torch.where(force, float("inf"), bhi).min(1, keepdim=True).values
        cand = (blo <= top) | force
        many[i:j] = cand.sum(1) > 1
        best[i:j] = cand.to(torch.int8).argmax(1)  # the first (here: only) candidate
        gi, ri = torch.nonzero(cand & many[i:j, None], as_tuple=True)
        pairs_g.append(gi + i)
        pairs_r.append(ri)
    # near ties: score their candidates exactly, all blocks' together (few, small ops)
    gi, ri = torch.cat(pairs_g), torch.cat(pairs_r)
    n_pairs = len(gi)
    if n_pairs:
        sc = torch.cat(
            [
                _score(
                    list(
                        exact_levels(
                            w[gi[a:b]], st[gi[a:b], ri[a:b]], zt[gi[a:b], ri[a:b]], maxq, levels
                        )[0]
                    ),
                    norm,
                )
                for a, b in ((a, min(n_pairs, a + big)) for a in range(0, n_pairs, big))
            ]
        )
        gmin = torch.full((n_g,), float("inf"), dtype=torch.float64)
        gmin.scatter_reduce_(0, gi, sc, "amin")
        win = torch.where(sc == gmin[gi], ri, len(CLIP_RATIOS))  # first of equals wins
        pick = torch.full((n_g,), len(CLIP_RATIOS), dtype=torch.int64)
        pick.scatter_reduce_(0, gi, win, "amin")
        best = torch.where(many, pick, best)
    if stats is not None:
        stats["pairs_per_group"] = n_pairs / n_g
    bi = best.numpy()[:, None]
    return (
        np.take_along_axis(s, bi, 1)[:, 0].reshape(rows, groups),
        np.take_along_axis(z, bi, 1)[:, 0].reshape(rows, groups),
    )


def encode_fast(w: np.ndarray, g: int, bits: list[int], levels: int) -> list[bytes]:
    """MWQ.encode(w, params) without calibration data: the same segments, bit for bit.

    Args:
        w: float32 [N, K], finite (checked by the caller).
        g: group size; bits: the level widths; levels: 1, or len(bits) with joint_clip.
    """
    import torch

    rows, cols = w.shape
    groups = cols // g
    s, z = fit_base_fast(w.reshape(rows, groups, g), bits[0], levels)
    maxq = (1 << bits[0]) - 1
    wt = torch.from_numpy(np.ascontiguousarray(w).reshape(-1, g))
    st, zt = torch.from_numpy(s.reshape(-1)), torch.from_numpy(z.reshape(-1))
    n_g = wt.shape[0]
    # packed as each block is done (a block is whole groups, so a whole number of bytes of
    # every plane): the planes never sit in memory unpacked
    planes: list[list[bytes]] = [[] for _ in range(bits[0] + len(bits) - 1)]
    scales = np.empty((len(bits) - 1, n_g), dtype=np.float32)
    step = max(1, EXACT_BLOCK_WEIGHTS // g)
    for i in range(0, n_g, step):
        j = min(n_g, i + step)
        _, q, sg, sk = exact_levels(wt[i:j], st[i:j], zt[i:j], maxq, len(bits), planes=True)
        flat = q.numpy().reshape(-1)
        for p in range(bits[0]):
            planes[p].append(np.packbits((flat >> p) & 1, bitorder="little").tobytes())
        for k in range(len(bits) - 1):
            bit = sg[k].numpy().reshape(-1)
            planes[bits[0] + k].append(np.packbits(bit, bitorder="little").tobytes())
            scales[k, i:j] = sk[k].numpy()
    seg = b"".join(b"".join(planes[p]) for p in range(bits[0]))
    segments = [seg + s.astype("<f2").tobytes() + z.astype("<f2").tobytes()]
    for k in range(len(bits) - 1):
        plane = b"".join(planes[bits[0] + k])
        segments.append(plane + scales[k].astype("<f2").tobytes())
    return segments
