"""Codec round trips, size tables, prefix decoding and error against plain RTN.

The oracle is `rtn`, a few lines of numpy: round-to-nearest asymmetric group
quantization with min-max range and integer zero point, float32 parameters.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.codecs import codec_by_name, registered
from formats.codecs.bitplane import Bitplane
from formats.codecs.intq import Int4, Int8
from formats.codecs.mwq import MWQ
from formats.errors import CodecError

SHAPES = [(16, 64), (48, 128), (256, 384)]
GROUPS = [32, 128]
# (codec name, options for default_params)
PLAIN = [("f32", {}), ("f16", {}), ("bf16", {}), ("int8", {}), ("int4", {})]
NESTED = [
    ("mwq", {"bits": [2, 3, 4]}),
    ("mwq", {"bits": [5, 6, 7, 8]}),
    ("mwq", {"bits": [2, 3, 4], "joint_clip": True}),
    ("bitplane", {"bits": [2, 4, 8]}),
    ("bitplane", {"bits": [1, 3, 8]}),
]
GROUPED = {"int8", "int4", "mwq", "bitplane"}


def rtn(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Plain round-to-nearest asymmetric group quantization (the reference)."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group).astype(np.float64)
    lo = np.minimum(wg.min(axis=2, keepdims=True), 0)
    hi = np.maximum(wg.max(axis=2, keepdims=True), 0)
    maxq = 2**bits - 1
    s = np.where(hi > lo, (hi - lo) / maxq, 1.0)
    z = np.round(-lo / s)
    q = np.clip(np.round(wg / s + z), 0, maxq)
    return ((q - z) * s).reshape(n, k)


def rel_err(w: np.ndarray, wq: np.ndarray) -> float:
    return float(np.linalg.norm(w - wq) / np.linalg.norm(w))


def weight(shape, seed=0, heavy=False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if heavy:
        return (rng.standard_t(4, size=shape) * 0.02).astype(np.float32)
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


def activations(tokens: int, cols: int, seed: int = 1) -> np.ndarray:
    """Correlated activations X = Z @ A with uneven channel scales, like an LLM's."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((cols, cols)) / np.sqrt(cols)
    scale = np.exp(rng.standard_normal(cols) * 0.5)
    z = rng.standard_normal((tokens, cols))
    return ((z @ a + 0.1 * z) * scale).astype(np.float32)


def make(name, opts, shape, group):
    codec = codec_by_name(name)
    if name in GROUPED:
        return codec, codec.default_params(shape, group=group, **opts)
    return codec, codec.default_params(shape, **opts)


def cases(specs):
    out = []
    for name, opts in specs:
        for shape in SHAPES:
            groups = GROUPS if name in GROUPED else [None]
            for g in groups:
                tag = "-".join(map(str, opts.get("bits", [])))
                tag += "-joint" if opts.get("joint_clip") else ""
                out.append(pytest.param(name, opts, shape, g, id=f"{name}{tag}-{shape}-g{g}"))
    return out


ALL_CASES = cases(PLAIN + NESTED)
NESTED_CASES = cases(NESTED)


@pytest.mark.parametrize("name,opts,shape,group", ALL_CASES)
def test_round_trip_sizes_and_prefixes(name, opts, shape, group):
    codec, params = make(name, opts, shape, group)
    w = weight(shape)
    segs = codec.encode(w, params)
    assert all(isinstance(s, bytes) for s in segs)
    assert [len(s) for s in segs] == codec.level_nbytes(shape, params)
    assert len(segs) == len(codec.level_bits(params)) == codec.num_levels(params)
    assert codec.encode(w, params) == segs  # deterministic encoder
    for k in range(1, len(segs) + 1):
        out = codec.decode(segs[:k], shape, params)
        assert out.shape == tuple(shape) and out.dtype == np.float32
        assert np.isfinite(out).all()
        # decoding reads only the first k segments, as bytes or memoryviews
        again = codec.decode([memoryview(bytearray(s)) for s in segs[:k]], shape, params)
        np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("name,opts,shape,group", NESTED_CASES)
def test_nested_error_falls_with_level(name, opts, shape, group):
    codec, params = make(name, opts, shape, group)
    w = weight(shape, heavy=True)
    segs = codec.encode(w, params)
    errs = [rel_err(w, codec.decode(segs[:k], shape, params)) for k in range(1, len(segs) + 1)]
    assert all(b <= a for a, b in pairwise(errs)), errs
    bits = codec.level_bits(params)
    ref = [rel_err(w, rtn(w, b, params["group"])) for b in bits]
    if name == "mwq":
        # base level: its clipping search includes plain min-max rounding
        assert errs[0] <= ref[0] * 1.001, (errs, ref)
    else:
        assert errs[-1] == pytest.approx(ref[-1], rel=0.02), (errs, ref)


def test_lower_chain_is_a_byte_prefix():
    shape, w = (48, 128), weight((48, 128))
    for name, short, long in [
        ("mwq", [2, 3], [2, 3, 4]),
        ("mwq", [5], [5, 6, 7, 8]),
        ("bitplane", [2, 8], [2, 4, 8]),
    ]:
        codec = codec_by_name(name)
        a = codec.encode(w, codec.default_params(shape, group=32, bits=short))
        b = codec.encode(w, codec.default_params(shape, group=32, bits=long))
        assert b[0] == a[0]
        if name == "mwq":
            assert b[: len(a)] == a


def _mwq_scales(seg: bytes, shape, g: int, offset: int) -> np.ndarray:
    rows, cols = shape
    return np.frombuffer(seg, "<f2", count=rows * cols // g, offset=offset).astype(np.float32)


def test_mwq_sign_levels_add_plus_minus_one_scale():
    """Level k - level k-1 is +-s_k per group, s_k >= 0 as stored."""
    shape, g = (48, 128), 32
    w = weight(shape, heavy=True)
    params = MWQ.default_params(shape, group=g, bits=[2, 3, 4])
    segs = MWQ.encode(w, params)
    prev = MWQ.decode(segs[:1], shape, params)
    for k in range(2, 4):
        cur = MWQ.decode(segs[:k], shape, params)
        s = _mwq_scales(segs[k - 1], shape, g, shape[0] * shape[1] // 8)
        assert (s >= 0).all()
        step = np.abs(cur - prev).reshape(shape[0], -1, g)
        np.testing.assert_allclose(
            step, np.broadcast_to(s.reshape(shape[0], -1, 1), step.shape), rtol=1e-6, atol=1e-9
        )
        prev = cur


def test_mwq_base_matches_stored_formula():
    """Level 1 equals (Q1 - z1) * s1 with Q1 re-derived from the stored planes."""
    shape, g = (16, 64), 32
    w = weight(shape)
    params = MWQ.default_params(shape, group=g, bits=[3])
    (seg,) = MWQ.encode(w, params)
    n = shape[0] * shape[1]
    planes = np.unpackbits(np.frombuffer(seg, np.uint8, count=3 * n // 8), bitorder="little")
    q = sum(planes[p * n : (p + 1) * n].astype(np.int64) << p for p in range(3))
    s = _mwq_scales(seg, shape, g, 3 * n // 8)
    z = _mwq_scales(seg, shape, g, 3 * n // 8 + 2 * n // g)
    expect = (q.reshape(shape[0], -1, g) - z.reshape(shape[0], -1, 1)) * s.reshape(shape[0], -1, 1)
    np.testing.assert_array_equal(MWQ.decode([seg], shape, params), expect.reshape(shape))


def test_bitplane_views_match_reference_and_are_unbiased():
    shape, g = (256, 384), 128
    w = weight(shape)
    params = Bitplane.default_params(shape, group=g, bits=[1, 2, 3, 4, 5, 6, 7, 8])
    segs = Bitplane.encode(w, params)
    n, groups = shape[0] * shape[1], shape[0] * shape[1] // g
    s = np.frombuffer(segs[0], "<f2", count=groups, offset=n // 8).astype(np.float64)
    z = np.frombuffer(segs[0], np.uint8, count=groups, offset=n // 8 + 2 * groups)
    s, z = s.reshape(shape[0], -1, 1), z.reshape(shape[0], -1, 1).astype(np.float64)
    full = Bitplane.decode(segs, shape, params).reshape(shape[0], -1, g)
    q = np.rint(full / np.where(s > 0, s, 1) + z).astype(np.int64)  # recover the INT8 codes
    assert q.min() >= 0 and q.max() <= 255
    for r in range(1, 9):
        d = 2 ** (8 - r)
        t = q >> (8 - r)
        expect = ((t + 0.5) * d - 0.5 - z) * s
        got = Bitplane.decode(segs[:r], shape, params).reshape(expect.shape)
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-9)
        # the midpoint offset leaves no systematic error; t * d alone would be off by ~d/2 steps
        err = (got - w.reshape(got.shape)) / s
        assert abs(err.mean()) < 0.01 * d + 0.01, (r, err.mean())


def test_mwq_calibration_weighting_lowers_weighted_error():
    shape, g = (48, 128), 32
    w, x = weight(shape), activations(256, shape[1])
    h = (x.astype(np.float64) ** 2).mean(axis=0)
    params = MWQ.default_params(shape, group=g, bits=[2])
    plain = MWQ.decode(MWQ.encode(w, params), shape, params)
    fitted = MWQ.decode(MWQ.encode(w, params, calib=x), shape, params)
    # per group the search picks the lowest h-weighted error among the same candidates
    assert (((w - fitted) ** 2) * h).sum() <= (((w - plain) ** 2) * h).sum()


@pytest.mark.parametrize("bits", [[2, 3, 4], [5, 6, 7, 8]])
def test_mwq_compensation_lowers_output_error(bits):
    shape, g = (64, 256), 64
    w = weight(shape)
    x_fit, x_eval = activations(1024, shape[1], seed=1), None
    rng = np.random.default_rng(7)
    x_eval = x_fit[rng.permutation(len(x_fit))[:512]]

    def out_err(params):
        segs = MWQ.encode(w, params, calib=x_fit)
        w1 = MWQ.decode(segs[:1], shape, params)
        return np.linalg.norm((w - w1) @ x_eval.T) / np.linalg.norm(w @ x_eval.T)

    plain = out_err(MWQ.default_params(shape, group=g, bits=bits))
    comp = out_err(MWQ.default_params(shape, group=g, bits=bits, compensate=True))
    assert comp < 0.95 * plain, (comp, plain)


def gptq_reference(w, x, g, bits):
    """Unbatched GPTQ in float64 (one column at a time, full-width updates)."""
    from formats.codecs.mwq import fit_base

    n, k = w.shape
    x = x.astype(np.float64)
    hess = 2 * x.T @ x / len(x)
    hess += 0.01 * np.diag(hess).mean() * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(hess)).T  # upper, H^-1 = U^T U
    hg = (x**2).mean(axis=0).reshape(1, k // g, g)
    work, out, maxq = w.astype(np.float64), np.empty((n, k)), 2**bits - 1
    for i in range(k):
        if i % g == 0:
            s, z = fit_base(
                work[:, None, i : i + g].astype(np.float32), hg[:, i // g : i // g + 1], bits
            )
            s, z = s[:, 0].astype(np.float64), z[:, 0].astype(np.float64)
        q = np.clip(np.rint(work[:, i] / np.where(s > 0, s, 1) + z), 0, maxq)
        out[:, i] = (q - z) * s
        err = (work[:, i] - out[:, i]) / u[i, i]
        work[:, i:] -= np.outer(err, u[i, i:])
    return out


def test_mwq_compensation_matches_unbatched_gptq():
    shape, g = (32, 256), 32  # several lazy-update blocks of 128 columns
    w, x = weight(shape), activations(512, shape[1])
    params = MWQ.default_params(shape, group=g, bits=[3], compensate=True)
    got = MWQ.decode(MWQ.encode(w, params, calib=x), shape, params)
    ref = gptq_reference(w, x, g, 3)
    # float32 vs float64 rounding may flip a few codes at ties; the rest must agree
    assert np.mean(np.isclose(got, ref, rtol=1e-3, atol=1e-6)) > 0.99
    out = lambda wq: np.linalg.norm((w - wq) @ x.T)  # noqa: E731
    assert out(got) == pytest.approx(out(ref), rel=0.02)


def test_mwq_joint_clip_lowers_upper_levels():
    """Choosing the base's clipping for the whole chain: much lower top-level error."""
    shape, g = (256, 384), 128
    w = weight(shape, heavy=True)

    def errs(joint):
        params = MWQ.default_params(shape, group=g, bits=[2, 3, 4], joint_clip=joint)
        segs = MWQ.encode(w, params)
        return [rel_err(w, MWQ.decode(segs[:k], shape, params)) for k in (1, 2, 3)]

    plain, joint = errs(False), errs(True)
    assert joint[2] < 0.85 * plain[2], (plain, joint)
    assert joint[1] < plain[1], (plain, joint)
    assert plain[0] <= joint[0] < rel_err(w, rtn(w, 2, g)), (plain, joint)


def test_mwq_compensate_without_calibration_is_plain():
    shape = (16, 64)
    w = weight(shape)
    a = MWQ.encode(w, MWQ.default_params(shape, compensate=True))
    b = MWQ.encode(w, MWQ.default_params(shape))
    assert a == b


@pytest.mark.parametrize("name", ["int4", "int8"])
def test_plain_int_codecs_near_rtn(name):
    shape, g = (256, 384), 128
    w = weight(shape, heavy=True)
    codec = codec_by_name(name)
    params = codec.default_params(shape, group=g)
    err = rel_err(w, codec.decode(codec.encode(w, params), shape, params))
    # int8 is symmetric (one code fewer each side of 0), int4 min-max with a float offset
    ref = rel_err(w, rtn(w, codec.level_bits(params)[0], g))
    assert err <= 2.0 * ref, (err, ref)


def test_raw_codecs_exact():
    w = weight((16, 64))
    for name in ("f32", "f16", "bf16"):
        codec = codec_by_name(name)
        out = codec.decode(codec.encode(w, {}), w.shape, {})
        assert rel_err(w, out) < (1e-7 if name == "f32" else 1e-2)


def test_special_groups():
    """All-zero groups decode to zero; a constant group stays close; tiny and huge."""
    shape = (8, 64)
    w = weight(shape)
    w[0] = 0.0
    w[1] = 0.5
    w[2, :32] = -3.0
    for name, bits in [("mwq", [2, 3, 4]), ("mwq", [5, 6, 7, 8]), ("bitplane", [2, 4, 8])]:
        codec = codec_by_name(name)
        params = codec.default_params(shape, group=32, bits=bits)
        segs = codec.encode(w, params)
        for k in range(1, len(segs) + 1):
            out = codec.decode(segs[:k], shape, params)
            assert np.isfinite(out).all()
            assert (out[0] == 0).all()
        np.testing.assert_allclose(out[1], 0.5, rtol=0.01)
        np.testing.assert_allclose(out[2, :32], -3.0, rtol=0.01)


@pytest.mark.parametrize("codec", [MWQ, Bitplane, Int8, Int4])
def test_encode_refuses_bad_weights(codec):
    shape = (8, 64)
    params = codec.default_params(shape, group=32)
    for bad in (np.nan, np.inf, 1e8):
        w = weight(shape)
        w[3, 5] = bad
        with pytest.raises(CodecError):
            codec.encode(w, params)
    with pytest.raises(CodecError):
        codec.encode(weight((8, 40)), params)
    if codec is MWQ:
        with pytest.raises(CodecError):
            codec.encode(weight(shape), params, calib=np.ones((4, 32), np.float32))


@pytest.mark.parametrize("codec", [MWQ, Bitplane])
def test_decode_refuses_bad_segments(codec):
    shape = (8, 64)
    params = codec.default_params(shape, group=32)
    segs = codec.encode(weight(shape), params)
    with pytest.raises(CodecError):
        codec.decode(segs + [segs[-1]], shape, params)
    with pytest.raises(CodecError):
        codec.decode([], shape, params)
    with pytest.raises(CodecError):
        codec.decode([segs[0][:-1]], shape, params)
    with pytest.raises(CodecError):
        codec.decode([segs[0], segs[1] + b"\0"], shape, params)


BAD_MWQ = [
    {"group": 32, "bits": []},
    {"group": 32, "bits": [0, 1]},
    {"group": 32, "bits": [8]},
    {"group": 32, "bits": [2, 4]},
    {"group": 32, "bits": [3, 2]},
    {"group": 32, "bits": [6, 7, 8, 9]},
    {"group": 32, "bits": [2.0, 3.0]},
    {"group": 32, "bits": [True, 2]},
    {"group": 32, "bits": "234"},
    {"group": 32},
    {"group": 40, "bits": [2, 3]},
    {"group": 12, "bits": [2, 3]},
    {"group": 0, "bits": [2, 3]},
    {"group": True, "bits": [2, 3]},
    {"group": "32", "bits": [2, 3]},
    {"group": 32, "bits": [2, 3], "compensate": 1},
    {"group": 32, "bits": [2, 3], "extra": 1},
    {"group": 32, "bits": [2, 3], "joint_clip": None},
]
BAD_BITPLANE = [
    {"group": 32, "bits": [2, 4]},
    {"group": 32, "bits": [0, 8]},
    {"group": 32, "bits": [4, 4, 8]},
    {"group": 32, "bits": [4, 2, 8]},
    {"group": 32, "bits": [2, 9]},
    {"group": 32, "bits": [2, 4, 8], "compensate": False},
    {"group": 64, "bits": [2, 4, 8]},
    {"bits": [2, 4, 8]},
]


@pytest.mark.parametrize(
    "codec,params", [(MWQ, p) for p in BAD_MWQ] + [(Bitplane, p) for p in BAD_BITPLANE]
)
def test_check_params_rejects(codec, params):
    with pytest.raises(CodecError):
        codec.check_params((8, 96), params)


@pytest.mark.parametrize("codec", [MWQ, Bitplane])
def test_check_params_rejects_bad_shapes(codec):
    params = codec.default_params((8, 64), group=32)
    for shape in [(64,), (2, 8, 64), (0, 64), (8, -64), (-8, 64)]:
        with pytest.raises(CodecError):
            codec.check_params(shape, params)
    with pytest.raises(CodecError):
        codec.check_params((8, 64), [("group", 32)])


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 300), st.floats(allow_nan=True), st.text(max_size=4)
)
values = st.one_of(
    scalars, st.lists(scalars, max_size=6), st.lists(st.integers(-2, 10), max_size=6)
)
param_dicts = st.dictionaries(
    st.sampled_from(["group", "bits", "compensate", "joint_clip", "extra"]), values, max_size=5
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=param_dicts)
def test_check_params_only_raises_codec_error(params):
    for codec in registered().values():
        try:
            codec.check_params((8, 64), params)
        except CodecError:
            continue
        # accepted params must give a consistent size table
        sizes = codec.level_nbytes((8, 64), params)
        assert all(isinstance(n, int) and n > 0 for n in sizes)
        assert len(sizes) == len(codec.level_bits(params))
