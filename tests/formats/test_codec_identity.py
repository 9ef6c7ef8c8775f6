"""The vectorised encoders write the very bytes of the numpy ones they replaced.

tests/formats/mwq_reference.py holds frozen copies of the old encoders; every case here
encodes a matrix both ways and compares bytes (or that both refuse it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.codecs import mwq_fast
from formats.codecs.base import codec_by_name
from formats.codecs.mwq import CLIP_RATIOS
from formats.errors import CodecError
from tests.formats import mwq_reference as ref


def _matrices():
    """(name, w float32 [N, K], group): shapes, outlier rows, constant and zero rows, ties."""
    rng = np.random.default_rng(15)
    w = (rng.standard_normal((40, 256)) * 0.02).astype(np.float32)
    w[3] *= 60  # an outlier row
    w[5] = 0.013  # constant rows, positive and negative
    w[6] = -0.4
    w[7] = 0.0
    w[9, :128] = -0.5
    w[10, 5] = -0.0
    w[11, 17] = 3.0  # one outlier weight
    w[12, :] = np.abs(w[12])  # all >= 0: zero point 0
    yield "mixed", w, 128
    yield "gauss", (rng.standard_normal((24, 512)) * 0.02).astype(np.float32), 128
    yield "student-t", rng.standard_t(3, (16, 96)).astype(np.float32), 32
    yield "integers", rng.integers(-3, 4, (16, 64)).astype(np.float32), 16
    yield "tiny", (rng.standard_normal((16, 64)) * 1e-7).astype(np.float32), 8
    yield "wide-group", (rng.standard_normal((8, 512)) * 0.02).astype(np.float32), 256
    yield "odd-group", (rng.standard_normal((8, 72)) * 0.02).astype(np.float32), 24
    yield "large", (rng.standard_normal((8, 64)) * 3e3).astype(np.float32), 64
    yield "overflow", (rng.standard_normal((8, 64)) * 1e5).astype(np.float32), 64


MATRICES = list(_matrices())
CHAINS = [([2, 3, 4], True), ([2, 3, 4], False), ([5, 6, 7, 8], True), ([1, 2], True), ([4], False)]


def _both(encode_new, encode_old):
    """Both encoders' segments, or "refused" for one that raises a codec error."""
    out = []
    for f in (encode_new, encode_old):
        try:
            out.append(f())
        except (CodecError, ValueError):
            out.append("refused")
    return out


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: f"{c[0]}{'-joint' if c[1] else ''}")
@pytest.mark.parametrize("case", MATRICES, ids=lambda c: c[0])
def test_mwq_bytes_match_the_numpy_encoder(case, chain):
    _, w, group = case
    bits, joint = chain
    codec = codec_by_name("mwq")
    params = {"group": group, "bits": bits, "compensate": False, "joint_clip": joint}
    new, old = _both(lambda: codec.encode(w, params), lambda: ref.mwq_encode(w, group, bits, joint))
    assert new == old


def test_mwq_overflow_is_refused_not_clipped():
    _, w, group = MATRICES[-1]
    with pytest.raises(CodecError, match="float16 range"):
        codec_by_name("mwq").encode(w, {"group": group, "bits": [2, 3, 4], "joint_clip": True})


@pytest.mark.parametrize("case", MATRICES[:4], ids=lambda c: c[0])
def test_other_codecs_match_the_numpy_encoders(case):
    _, w, group = case
    for name, old in (
        ("bitplane", lambda p: ref.bitplane_encode(w, p["group"], p["bits"])),
        ("int8", lambda p: ref.int8_encode(w, p["group"])),
        ("int4", lambda p: ref.int4_encode(w, p["group"])),
    ):
        codec = codec_by_name(name)
        params = codec.default_params(w.shape, group=group)
        new, want = _both(lambda c=codec, p=params: c.encode(w, p), lambda o=old, p=params: o(p))
        assert new == want, name


def test_clip_ratios_agree():
    assert mwq_fast.CLIP_RATIOS == CLIP_RATIOS


@pytest.mark.parametrize("g", [8, 24, 128, 136, 256, 1024])
def test_pairwise_sum_is_numpys(g):
    """The float64 group sums add in numpy's order: same bits on values spanning 2^40."""
    rng = np.random.default_rng(g)
    x = rng.standard_normal((37, g)) * np.exp(rng.uniform(-14, 14, (37, g)))
    x = x.astype(np.float32)
    chunks = mwq_fast._chunks(torch.from_numpy(x))
    got = mwq_fast._pairwise(chunks, 0, g // 8).numpy()
    assert np.array_equal(got, x.sum(axis=1, dtype=np.float64))


@pytest.mark.parametrize("levels", [1, 3])
def test_bounds_contain_every_exact_score(levels):
    """The cheap pass's bounds hold every candidate's exact score (what makes the skip safe)."""
    rng = np.random.default_rng(levels)
    w = (rng.standard_t(4, (96, 128)) * 0.02).astype(np.float32)
    w[::7] *= 40
    wt = torch.from_numpy(w)
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = np.maximum(w.max(axis=1), 0.0)
    s, z = mwq_fast.candidates(lo, hi, 3)
    norm = [0.5, 0.25, 0.125][:levels] if levels > 1 else None
    blo, bhi, force = mwq_fast._bounds(wt, s, z, 3, levels, norm, None)
    assert not force.any()
    for r in range(len(CLIP_RATIOS)):
        errs = mwq_fast.exact_levels(
            wt, torch.from_numpy(s[:, r]), torch.from_numpy(z[:, r]), 3, levels
        )[0]
        exact = mwq_fast._score(list(errs), norm)
        assert (blo[:, r] <= exact).all() and (exact <= bhi[:, r]).all()
    width = (bhi - blo) / bhi
    assert width.median() < 3e-3  # tight enough that few groups need the exact pass


@pytest.mark.parametrize("case", [MATRICES[0], MATRICES[2]], ids=lambda c: c[0])
def test_mwq_bytes_match_across_many_blocks(case, monkeypatch):
    """Blocks of a few groups (not whole rows): the pieces join into the same bytes."""
    _, w, group = case
    monkeypatch.setattr(mwq_fast, "BLOCK_WEIGHTS", 7 * group)
    monkeypatch.setattr(mwq_fast, "EXACT_BLOCK_WEIGHTS", 11 * group)
    params = {"group": group, "bits": [2, 3, 4], "compensate": False, "joint_clip": True}
    new = codec_by_name("mwq").encode(w, params)
    assert new == ref.mwq_encode(w, group, [2, 3, 4], True)


def test_zero_minus_d_has_no_negative_zero():
    """The sign step relies on -d + 0.0 turning -0 into +0 (B = +1 where R = 0)."""
    d = torch.tensor([0.0, -0.0, 1.0, -2.0] * 50_000)  # long enough for the vector loop
    y = torch.neg(d).add_(0.0)
    assert torch.equal(torch.signbit(y), d > 0)
