"""The model worker in-process: continuous batching, admission, disconnects, prefix reuse."""

from __future__ import annotations

import queue
import time

import pytest

import edgemoe
from edgemoe.generate import Request, Sequence, decode_step, prefill, step
from edgemoe.sampling import Sampling
from edgemoe.serve.worker import Done, Failed, Job, QueueFull, Slots, Worker

GREEDY = Sampling.greedy()


@pytest.fixture(scope="module")
def demo_f32():
    """The demo in f32 at batch 4: prefix reuse then matches a full prefill to float precision."""
    m = edgemoe.load(None, None, ctx=512, batch=4, dtype="f32")
    yield m
    m.close()


def start(model, **kw) -> Worker:
    w = Worker(lambda: model, **kw)
    w.start()
    deadline = time.monotonic() + 60
    while w.state != "serving":
        assert w.state == "loading" and time.monotonic() < deadline, w.error
        time.sleep(0.01)
    return w


class Client:
    """A job and the events the worker gave it, with when they came."""

    def __init__(self, w: Worker, ids, max_tokens, **kw):
        self.events: queue.Queue = queue.Queue()
        self.job = Job(Request(tuple(ids), max_tokens, GREEDY, **kw), self._emit)
        self.first = self.done_at = None
        w.submit(self.job)

    def _emit(self, ev):
        now = time.perf_counter()
        if isinstance(ev, list) and self.first is None:
            self.first = now
        if isinstance(ev, (Done, Failed)):
            self.done_at = now
        self.events.put(ev)

    def result(self, timeout=120):
        while True:
            ev = self.events.get(timeout=timeout)
            if isinstance(ev, (Done, Failed)):
                return ev


def test_a_short_request_does_not_wait_for_a_long_one(demo_f32):
    w = start(demo_f32)
    try:
        ids = demo_f32.encode("In the beginning")
        long = Client(w, ids, 300)
        while long.first is None:
            time.sleep(0.005)
        short = Client(w, demo_f32.encode("The function returns"), 4)
        s, lg = short.result(), long.result()
        assert isinstance(s, Done) and isinstance(lg, Done)
        assert short.done_at < long.done_at  # it joined the running batch and left first
        assert len(s.seq.out) == 4 and s.seq.finish_reason == "length"
    finally:
        w.stop()


def test_a_short_newcomer_joins_the_decode_pass(demo_f32):
    """A newcomer's prompt is computed in the running rows' decode pass (packed: a's one token
    beside b's prompt, no padding): one forward pass, and every sequence's tokens are its solo
    greedy run's."""
    m = demo_f32
    long_ids, short_ids = m.encode("In the beginning God created"), m.encode("The function")
    assert len(short_ids) <= 8
    want = [m.complete([x], max_tokens=n, sampling=GREEDY)[0].token_ids
            for x, n in ((long_ids, 12), (short_ids, 6))]  # fmt: skip
    cache, slots = m.kv_cache(), m.take_slots(2)
    passes, forward = [], m.forward
    m.forward = lambda tokens, *a: passes.append(tuple(tokens.shape)) or forward(tokens, *a)
    try:
        a, b = (
            Sequence(Request(tuple(x), n, GREEDY), slot, m.tokenizer)
            for x, n, slot in zip((long_ids, short_ids), (12, 6), slots)
        )
        prefill(m, cache, [a])
        decode_step(m, cache, [a])
        passes.clear()
        records = step(m, cache, [b], [a])
        assert passes == [(1, 1 + len(short_ids))]  # one pass: a's next token beside b's prompt
        assert [r.seq for r in records] == [b, a] and b.out and len(a.out) == 3
        while not (a.done and b.done):
            decode_step(m, cache, [a, b])
        assert [a.out, b.out] == want
        assert int(cache.lengths[b.slot]) == len(short_ids) + 6 - 1
    finally:
        del m.forward
        m.free_slots(slots)


def test_a_long_prompt_is_computed_over_steps_beside_the_running_rows(demo_f32):
    """With a budget of 16 prompt tokens a step, a 40-token prompt takes three passes; the
    running row gets a token in each, and both sequences' tokens are their solo greedy runs'."""
    m = demo_f32
    long_ids = m.encode("And the LORD spake unto Moses, saying, Speak unto the children of " * 3)
    run_ids = m.encode("In the beginning God created")
    long_ids = long_ids[:40]
    assert len(long_ids) == 40
    want = [m.complete([x], max_tokens=n, sampling=GREEDY)[0].token_ids
            for x, n in ((run_ids, 10), (long_ids, 5))]  # fmt: skip
    cache, slots = m.kv_cache(), m.take_slots(2)
    passes, forward = [], m.forward
    m.forward = lambda tokens, *a: passes.append(tokens.shape[1]) or forward(tokens, *a)
    try:
        a, b = (
            Sequence(Request(tuple(x), n, GREEDY), slot, m.tokenizer)
            for x, n, slot in zip((run_ids, long_ids), (10, 5), slots)
        )
        prefill(m, cache, [a])
        passes.clear()
        for i, prefilled in enumerate((16, 32)):
            records = step(m, cache, [b], [a], budget=16)
            assert [r.seq for r in records] == [a] and len(a.out) == i + 2
            assert b.prefilling and b.prefilled == prefilled and not b.out
            assert int(cache.lengths[b.slot]) == prefilled
        records = step(m, cache, [b], [a], budget=16)
        assert [r.seq for r in records] == [b, a] and len(b.out) == 1 and not b.prefilling
        assert passes == [17, 17, 9]  # a's token beside 16, 16 and the last 8 prompt tokens
        assert b.stats.ttft_s > 0 and b.stats.prefill_s > 0
        while not (a.done and b.done):
            decode_step(m, cache, [a, b])
        assert [a.out, b.out] == want
    finally:
        del m.forward
        m.free_slots(slots)


def test_static_batching_makes_the_newcomer_wait(demo_f32):
    w = start(demo_f32, static=True)
    try:
        long = Client(w, demo_f32.encode("In the beginning"), 40)
        while long.first is None:
            time.sleep(0.005)
        short = Client(w, demo_f32.encode("The function returns"), 4)
        short.result(), long.result()
        assert short.first > long.done_at  # admitted only once the batch was empty
    finally:
        w.stop()


def test_a_full_queue_refuses_and_a_cancelled_job_frees_its_slot(demo_f32):
    w = start(demo_f32, max_queue=1)
    try:
        ids = demo_f32.encode("In the beginning")
        running = []
        for _ in range(4):  # every slot (one at a time: the queue holds one)
            running.append(Client(w, ids, 400))
            while running[-1].first is None:
                time.sleep(0.005)
        waiting = Client(w, ids, 4)  # the queue's one place
        with pytest.raises(QueueFull):
            Client(w, ids, 4)
        running[0].job.cancel()  # a client that went away
        assert isinstance(running[0].result(), Failed)
        assert isinstance(waiting.result(), Done)  # took the freed slot at the next step
        for c in running[1:]:
            c.job.cancel()
            c.result()
        assert not w.running and w.waiting == 0
    finally:
        w.stop()


def test_prefix_reuse_computes_only_the_new_turn(demo_f32):
    m = demo_f32
    long_question = "Who made the heaven and the earth, and the sea, and all that in them is? " * 12
    turn1 = m.encode([{"role": "user", "content": long_question}])  # ~250 tokens

    def conversation(reuse: bool):
        w = start(m, prefix_reuse=reuse)
        try:
            a = Client(w, turn1, 24).result()
            kept = turn1 + a.seq.out  # what the slot's KV holds (the last token not fed)
            turn2 = kept + m.encode("\nAnd the earth?")
            b = Client(w, turn2, 24).result()
            return a, b
        finally:
            w.stop()

    a1, b1 = conversation(True)
    a0, b0 = conversation(False)
    assert a1.cached == 0 and a0.cached == 0 and b0.cached == 0
    # all of it but, when the reply ran to max_tokens, its last token (sampled, never fed)
    assert b1.cached >= len(turn1) + len(a1.seq.out) - 1
    assert b1.seq.stats.prefill_s < b0.seq.stats.prefill_s  # ~10 tokens computed, not ~280
    assert b1.seq.out == b0.seq.out  # the same tokens as a full prefill


def test_slots_keep_conversations_apart():
    s = Slots([0, 1, 2], reuse=True)
    header = (7, 7, 7)  # a chat template's opening, shared by every conversation
    a, _ = s.take(header + (1, 2, 3))
    s.give(a, header + (1, 2, 3, 4, 5, 6))
    b, n = s.take(header + (9,))  # another conversation: not at the cost of the first one's KV
    assert b != a and n == 0
    s.give(b, header + (9, 9))
    assert s.take(header + (1, 2, 3, 4, 5, 6, 8)) == (a, 9)  # the next turn: its own slot
    s.give(a, header + (1, 2, 3, 4, 5, 6, 8))
    system = tuple(range(100, 140))  # a long shared system prompt is worth taking over
    c, _ = s.take(system + (1,))
    s.give(c, system + (1, 2))
    assert s.take(system + (5,)) == (c, 40)
    off = Slots([0], reuse=False)
    slot, _ = off.take((1, 2))
    off.give(slot, (1, 2))
    assert off.take((1, 2, 3)) == (0, 0)  # reuse off: nothing kept
