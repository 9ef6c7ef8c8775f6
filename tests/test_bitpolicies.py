"""The stored bit policies (edgemoe/bitstored.py, fitted by edgemoe/bitfit.py): EdgeMoE's calibrated
level per expert and D²MoE's trained bit router, on a tiny bit-nested model."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import edgemoe
from edgemoe import bitfit
from edgemoe.bits import make
from edgemoe.bitstored import (
    BadBitPolicy,
    BitRouter,
    NoBitRouter,
    NoBitTable,
    read_table,
    table_blob,
)
from edgemoe.calibrate import calibrate_bits, text_segments, train_bit_router
from edgemoe.cli import main
from formats.amend import amend
from formats.reader import EmoeReader

TEXT = (
    "The quick brown fox jumps over the lazy dog. A database server answers queries; "
    "the function returns a list of rows. In the beginning was the word. "
) * 20
SEG = dict(segments=2, tokens=32)


@pytest.fixture
def nested(tiny_emoe, tmp_path):
    """A private copy (calibrate rewrites it) of a tiny qwen3_moe with mwq:2,3,4 experts, and text."""
    path = tmp_path / "m.emoe"
    shutil.copy(tiny_emoe("qwen3_moe", experts="mwq:2,3,4"), path)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    return path, text


def test_calibrated_table_round_trips_and_keeps_the_tolerance(nested, capsys):
    path, text = nested
    assert main(["calibrate", str(path), "--text", str(text), "--bits", "-q", "--segments", "2",
                 "--tokens", "32", "--tolerance", "0.01"]) == 0  # fmt: skip
    assert "stored each expert's level" in capsys.readouterr().out
    with EmoeReader(path, check_model=True) as r:
        table, info = read_table(r)
        assert sorted(table) == [0, 1, 2] and all(len(row) == 8 for row in table.values())
        assert all(1 <= lv <= 3 for row in table.values() for lv in row)
        assert info["tolerance"] == 0.01 and info["source"] == "calib.txt"
        # the measured loss of the chosen table is within the tolerance of the top level's
        assert info["loss"] - info["loss_top"] <= math.log1p(0.01) + 1e-9
        assert info["average_bits"] <= info["bits_top"] == 4.0
        pol = make("calibrated", r)
        ids = torch.tensor([[0, 5], [7, 2]])
        got = pol.levels(1, ids, torch.full((2, 2), 0.5), torch.zeros(2, 64))
        assert got.dtype == torch.int64 and got.tolist() == [
            [table[1][e] for e in row] for row in ids.tolist()
        ]
    # the stored policy, run again on the same text, measures what the fit measured
    m, ex = bitfit.open_for_fitting(path, 32)
    try:
        segs = torch.from_numpy(text_segments(m.tokenizer.encode(TEXT), 2, 32))
        ex.use_levels(pol.levels)
        s = bitfit.score(m, ex, segs)
    finally:
        m.close()
    assert s.loss == pytest.approx(info["loss"], abs=1e-4)
    assert s.average_bits == pytest.approx(info["average_bits"])


def test_zero_tolerance_never_loses_quality(nested):
    path, text = nested
    _, info = calibrate_bits(path, [str(text)], tolerance=0.0, **SEG)
    assert info["loss"] <= info["loss_top"] + 1e-9


def test_greedy_takes_the_cheapest_loss_per_bit_first():
    bits = {(0, 0): [2.0, 3.0, 4.0], (0, 1): [2.0, 3.0, 4.0]}
    delta = {(0, 0): [0.30, 0.02, 0.0], (0, 1): [0.05, 0.01, 0.0]}
    # (0, 1) is used 10x as much: its bits saved weigh 10x
    moves = bitfit.greedy_moves(delta, bits, {(0, 0): 10, (0, 1): 100})
    order = [(mv.expert, mv.level) for mv in moves]
    assert order == [(1, 2), (1, 1), (0, 2), (0, 1)]
    assert [round(mv.loss, 6) for mv in moves] == [0.01, 0.04, 0.02, 0.28]
    # an expert no token used goes last (it saves nothing on the text)
    moves = bitfit.greedy_moves(delta, bits, {(0, 0): 10})
    assert [(mv.expert, mv.level) for mv in moves][-2:] == [(1, 2), (1, 1)]


def test_router_levels_have_the_right_shape_and_stay_in_range():
    tops = torch.tensor([[3, 3, 2, 1]])  # an expert with fewer levels than the layer's most
    r = BitRouter([5], 4, 16, tops)
    with torch.no_grad():
        r.weight.normal_(0, 3.0)
        r.gate.normal_(0, 3.0)
        r.bias.zero_()  # no bias masking: the top mask must still hold
        r.bias.masked_fill_(torch.arange(1, 4) > tops[..., None], -1e4)
    ids = torch.randint(0, 4, (50, 2))
    lv = r.levels(5, ids, torch.rand(50, 2), torch.randn(50, 16))
    assert lv.shape == (50, 2) and lv.dtype == torch.int64
    assert (lv >= 1).all() and (lv <= tops[0][ids]).all()
    # a fresh router starts every pair at its expert's top level
    fresh = BitRouter([5], 4, 16, tops).levels(5, ids, torch.rand(50, 2), torch.randn(50, 16))
    assert torch.equal(fresh, tops[0][ids])


def test_penalty_lowers_average_bits_and_the_router_round_trips(nested):
    path, text = nested
    m, ex = bitfit.open_for_fitting(path, 32)
    try:
        segs = torch.from_numpy(text_segments(m.tokenizer.encode(TEXT), 2, 32))
        _, free = bitfit.fit_router(m, ex, segs, lam=0.0, steps=4, batch=2)
        _, dear = bitfit.fit_router(m, ex, segs, lam=2.0, steps=4, batch=2, lr=0.1)
    finally:
        m.close()
    assert free["average_bits"] == pytest.approx(4.0)  # no penalty: nothing pulls it down
    assert dear["average_bits"] < free["average_bits"] - 0.5
    info = train_bit_router(path, [str(text)], lam=2.0, steps=4, **SEG)
    with EmoeReader(path, check_model=True) as r:
        pol = make("trained", r)
        ids = torch.randint(0, 8, (9, 2))
        lv = pol.levels(2, ids, torch.rand(9, 2), torch.randn(9, 64))
        assert lv.shape == (9, 2) and ((lv >= 1) & (lv <= 3)).all()
        assert pol.info["lambda"] == 2.0 and pol.info["steps"] == 4
    assert info["average_bits"] < 4.0


def test_missing_policies_name_the_fix(nested):
    path, _ = nested
    with EmoeReader(path) as r:
        with pytest.raises(NoBitTable, match="edgemoe calibrate --bits"):
            make("calibrated", r)
        with pytest.raises(NoBitRouter, match="edgemoe calibrate --bit-router"):
            make("trained", r)
        with pytest.raises(ValueError, match="takes no argument"):
            make("calibrated:3", r)
    with pytest.raises(NoBitTable, match="edgemoe calibrate --bits"):
        edgemoe.load(path, bits="calibrated")


def test_a_table_that_does_not_fit_the_file_is_refused(nested):
    path, _ = nested
    amend(path, blobs={"bits_calibrated": table_blob({0: [9] * 8, 1: [1] * 8, 2: [1] * 8}, {})})
    with EmoeReader(path) as r, pytest.raises(BadBitPolicy, match="level 9"):
        make("calibrated", r)
    amend(path, blobs={"bits_calibrated": table_blob({0: [1] * 8}, {})})
    with EmoeReader(path) as r, pytest.raises(BadBitPolicy, match="layers"):
        make("calibrated", r)
