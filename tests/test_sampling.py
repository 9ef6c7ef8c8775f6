"""Sampling: llama.cpp's defaults, greedy as pure argmax, the repetition penalty, validation."""

from __future__ import annotations

import math

import pytest
import torch

from edgemoe.sampling import Sampling, _penalize, sample


def test_defaults_are_llama_cpp_s():
    s = Sampling()
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (0.8, 40, 0.95, 0.05)
    assert (s.repetition_penalty, s.repeat_last_n, s.seed) == (1.1, 64, None)
    assert not s.is_greedy
    assert Sampling.greedy().temperature == 0 and Sampling.greedy().is_greedy


def test_greedy_is_argmax_and_ignores_the_penalty():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    history = [[1] * 64, [0] * 64]  # the argmax of each row was just repeated
    g = Sampling.greedy()
    assert sample(logits, g, None, history).tolist() == [1, 0]
    assert sample(
        logits, Sampling(temperature=0, repetition_penalty=100.0), None, history
    ).tolist() == [1, 0]


def test_penalty_divides_positive_and_multiplies_negative_logits():
    z = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    out = _penalize(z, [[0, 1, 1]], 2.0, 64)
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]


def test_penalty_covers_only_the_window():
    z = torch.tensor([[2.0, 2.0, 2.0]])
    out = _penalize(z, [[0, 1, 2]], 2.0, 2)  # token 0 is older than the last 2
    assert out.tolist() == [[2.0, 1.0, 1.0]]
    # ids outside the vocabulary (pads, a bigger tokenizer) are ignored, not an error
    assert _penalize(z, [[-1, 7]], 2.0, 64).tolist() == z.tolist()


@pytest.mark.parametrize(
    "logits,expect",
    [([2.0, 1.9], 1), ([-1.0, -1.05], 1)],  # 2.0/1.1 < 1.9; -1.0*1.1 < -1.05
)
def test_penalty_changes_the_choice(logits, expect):
    s = Sampling(top_k=1, seed=0)
    z = torch.tensor([logits])
    assert sample(z, s, torch.Generator().manual_seed(0), [[0]]).item() == expect
    assert sample(z, s, torch.Generator().manual_seed(0), None).item() == 0  # no history


def test_min_p_drops_unlikely_tokens():
    # probabilities ~ [0.70, 0.26, 0.035, ...]: min_p 0.1 keeps the first two only
    logits = torch.tensor([[2.0, 1.0, -1.0, -1.0, -1.0]])
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1, repetition_penalty=1.0)
    g = torch.Generator().manual_seed(1)
    draws = {sample(logits, s, g).item() for _ in range(300)}
    assert draws == {0, 1}


def test_top_k_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(1)
    assert sample(logits, Sampling(temperature=1.0, top_k=1), g).tolist() == [1, 0]
    assert sample(logits, Sampling(temperature=1.0, top_p=0.01, min_p=0), g).tolist() == [1, 0]


def test_plain_sampling_follows_the_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([sample(logits.expand(1000, 3), s, g) for _ in range(4)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.03)


def test_seeded_draws_repeat():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    s = Sampling(temperature=1.5, seed=3)
    runs = [
        [sample(logits, s, g, [[1, 2], [3]]).tolist() for _ in range(5)]
        for g in (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))
    ]
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "name,value",
    [
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", -0.5),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("min_p", -0.1),
        ("min_p", 2.0),
        ("min_p", math.inf),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.1),
        ("repetition_penalty", math.nan),
        ("repeat_last_n", -1),
        ("seed", -1),
        ("seed", 2**64),
        ("temperature", True),
    ],
)
def test_bad_values_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=f"sampling {name}="):
        Sampling(**{name: value})
