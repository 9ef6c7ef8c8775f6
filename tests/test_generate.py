"""Generation as steps: sequences join and leave a running batch, token ids and logprobs in
and out, per-request numbers that concurrent generations do not mix, errors that name the
Python API's parameters."""

from __future__ import annotations

import threading

import pytest
import torch

import edgemoe
from edgemoe.engine import BadRequest, RunStats
from edgemoe.generate import Request, Sequence, decode_step, prefill
from edgemoe.sampling import Sampling
from tests.models.harness import greedy_ours, load_ours

GREEDY = Sampling(temperature=0)
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Then it",
    "Hello",
    "A much longer prompt about nothing in particular, to make the lengths differ",
]


@pytest.fixture(scope="module")
def model(tiny_emoe):
    m = edgemoe.load(tiny_emoe("qwen3_moe"), ctx=128, batch=3)
    yield m
    m.close()


def _solo(m, ids, n):
    return m.complete([ids], max_tokens=n, sampling=GREEDY)[0].token_ids


def test_sequences_join_and_leave_a_running_batch(model, tiny_emoe):
    """A runs alone, B joins after 3 steps (prefill of B, then decode with A), C joins later,
    B leaves first: every sequence's tokens equal its solo greedy run, and the oracle's."""
    m = model
    ids = [m.encode(p) for p in PROMPTS]
    lengths = [20, 4, 9]
    want = [_solo(m, x, n) for x, n in zip(ids, lengths)]
    ref, _ = greedy_ours(load_ours(tiny_emoe("qwen3_moe"), dtype=m.dtype), [ids[0]], 20)
    assert want[0] == ref[0]
    cache, slots = m.kv_cache(), m.take_slots(3)
    try:
        seqs = [
            Sequence(Request(tuple(x), n, GREEDY), slot, m.tokenizer)
            for x, n, slot in zip(ids, lengths, slots)
        ]
        running = [seqs[0]]
        prefill(m, cache, running)
        for step in range(30):
            if step == 3:
                prefill(m, cache, [seqs[1]])  # a newcomer's prompt, alone
                running.append(seqs[1])
            if step == 5:
                prefill(m, cache, [seqs[2]])
                running.append(seqs[2])
            running = [s for s in running if not s.done]  # finished ones leave between steps
            if not running:
                break
            decode_step(m, cache, running)
        assert [s.out for s in seqs] == want
        assert all(s.finish_reason == "length" for s in seqs)
        assert [int(cache.lengths[s]) for s in slots] == [
            len(x) + n - 1 for x, n in zip(ids, lengths)
        ]
    finally:
        m.free_slots(slots)


def test_token_ids_in_ids_and_logprobs_out(model, tiny_emoe):
    m = model
    ids = m.encode(PROMPTS[0])
    c = m.complete([ids], max_tokens=6, sampling=GREEDY, logprobs=3)[0]
    _, steps = greedy_ours(load_ours(tiny_emoe("qwen3_moe"), dtype=m.dtype), [ids], 6)
    want = [float(torch.log_softmax(s[0], -1)[t]) for s, t in zip(steps, c.token_ids)]
    assert c.logprobs == pytest.approx(want, abs=0.05)
    assert len(c.top_logprobs) == 6 and all(len(t) == 3 for t in c.top_logprobs)
    assert all(top[0][0] == t for top, t in zip(c.top_logprobs, c.token_ids))  # greedy: the best
    assert c.text == m.tokenizer.decode(c.token_ids) and c.finish_reason == "length"
    assert c.stats.prompt_tokens == len(ids) and c.stats.new_tokens == 6
    assert m.generate(ids, max_tokens=6, sampling=GREEDY) == c.text  # ids or text alike


def test_two_generations_at_once_keep_their_own_numbers(model):
    m = model
    want = {p: m.complete([p], max_tokens=n, sampling=GREEDY)[0] for p, n in zip(PROMPTS, (12, 5))}
    got, errors = {}, []

    def run(p, n):
        try:
            st = RunStats()
            got[p] = (m.complete([p], max_tokens=n, sampling=GREEDY, stats=st)[0], st)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p, n)) for p, n in zip(PROMPTS, (12, 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for p, n in zip(PROMPTS, (12, 5)):
        c, st = got[p]
        assert c.token_ids == want[p].token_ids
        assert st.new_tokens == n and c.stats.new_tokens == n and st.batch == 1


def test_stop_strings_are_held_back_until_decided(model):
    m = model
    full = m.generate(PROMPTS[0], max_tokens=16, sampling=GREEDY)
    word = next(w for w in full.split() if len(w) >= 3)
    stop = word + "\u2603"  # starts like the output, never completes: shown once disproved
    pieces = list(m.stream(PROMPTS[0], max_tokens=16, sampling=GREEDY, stop=[stop]))
    assert "".join(pieces) == full


def test_errors_name_the_python_parameters(model, tiny_emoe):
    m = model
    with pytest.raises(BadRequest) as e:
        m.generate("Hello", max_tokens=0)
    assert e.value.param == "max_tokens" and "max_tokens=0" in str(e.value)
    with pytest.raises(BadRequest) as e:
        m.generate("Hello", max_tokens=1000)
    assert e.value.param == "max_tokens" and "ctx" in str(e.value)
    with pytest.raises(BadRequest) as e:
        m.generate([10**9], max_tokens=2)
    assert e.value.param == "prompt"
    with pytest.raises(BadRequest) as e:
        m.take_slots(4)
    assert e.value.param == "batch"
    with pytest.raises(BadRequest) as e:
        edgemoe.load(tiny_emoe("qwen3_moe"), ctx=10**7)
    assert e.value.param == "ctx" and "--" not in str(e.value)
    with pytest.raises(BadRequest) as e:
        edgemoe.load(tiny_emoe("qwen3_moe"), mem="lots")
    assert e.value.param == "mem"
