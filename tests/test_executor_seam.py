"""The executor seam, version 2: injection, stats(), hint() prefetch with reservations,
begin/finish with reads in flight, and a failed read that leaves nothing held."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

import edgemoe
from edgemoe.moe.api import (
    ExecutorContext,
    ExecutorStats,
    ExpertExecutor,
    ResidentExecutor,
    load_all_experts,
)
from edgemoe.sampling import Sampling
from formats.reader import EmoeReader

GREEDY = Sampling(temperature=0)
PROMPT = "The quick brown fox jumps over the lazy dog. Then it"


def test_an_injected_executor_is_used_and_reports_through_stats(tiny_emoe):
    """The engine works with an executor it knows only through the seam."""
    path = tiny_emoe("mixtral")
    made = []

    def resident(ctx: ExecutorContext) -> ExpertExecutor:
        made.append(ctx)
        return ResidentExecutor(load_all_experts(ctx.reader, ctx.dtype))

    with edgemoe.load(path, ctx=64, executor=resident) as m:
        got = m.generate(PROMPT, max_tokens=8, sampling=GREEDY)
        s = m.summary()
        assert s["hit_rate"] == 1.0 and s["bytes_read"] == 0 and s["expert_reads"] == 0
        assert m.executor.stats().hits > 0
    assert len(made) == 1 and made[0].plan.expert_cache > 0
    with edgemoe.load(path, ctx=64) as m:
        assert m.generate(PROMPT, max_tokens=8, sampling=GREEDY) == got
        st = m.executor_stats()
        assert isinstance(st, ExecutorStats) and st.reads > 0 and st.bytes_read > 0


def _layer_inputs(m, layer, experts):
    d = m.facts.args.hidden_size
    x = torch.randn(2, d, generator=torch.Generator().manual_seed(layer)).to(m.dtype)
    ids = torch.tensor([experts, experts[::-1]])
    w = torch.full(ids.shape, 0.5)
    return x, ids, w


def test_hint_prefetches_into_reservations_that_survive_the_layer_before(tiny_emoe):
    path = tiny_emoe("mixtral")
    probe = edgemoe.load(path, ctx=64)
    size = probe.facts.expert_nbytes(0, probe.level)
    probe.close()
    # room for 3 experts: layer 0 needs 2 others, which must not evict layer 1's prefetch
    with edgemoe.load(path, ctx=64, expert_cache=3 * size, prefetch="eager") as m:
        ex = m.executor
        ex.hint(1, torch.tensor([[2]]))
        assert ex.stats().prefetch_issued == 1 and (1, 2, m.level) in ex.cache
        with torch.inference_mode():
            ex.run(0, *_layer_inputs(m, 0, [0, 1]))
            ex.run(0, *_layer_inputs(m, 0, [3, 4]))  # evictions: layer 0's own, not the reserved
            assert (1, 2, m.level) in ex.cache
            before = ex.stats()
            y = ex.run(1, *_layer_inputs(m, 1, [2, 2]))
        after = ex.stats()
        assert after.hits - before.hits == 1 and after.misses == before.misses
        assert after.prefetch_used == 1 and after.prefetch_wasted == 0
        assert ex.cache.held == 0
    with edgemoe.load(path, ctx=64) as ref, torch.inference_mode():
        want = ref.executor.run(1, *_layer_inputs(ref, 1, [2, 2]))
    assert torch.equal(y, want)


def _landed(a, timeout=30.0):
    """Wait until every part of a read ahead has landed."""
    end = time.monotonic() + timeout
    while a.read.left and time.monotonic() < end:
        time.sleep(0.005)
    assert a.read.left == 0


def test_read_ahead_is_taken_over_or_dropped(tiny_emoe):
    """With a cache short of every expert, a hint reads the likeliest uncached expert into
    a slab of its own whose room the cache sets aside (no room of its own in the plan). The
    layer that misses on it takes the parts that landed (no byte read twice), computes what
    a fresh read gives, and the room becomes that expert's entry; a layer that does not use
    it drops it, its bytes counted wasted, its slab and its room given back."""
    path = tiny_emoe("mixtral", experts="int8")  # computed in place: read into slabs
    with edgemoe.load(path, ctx=64, prefetch="idle") as ref, torch.inference_mode():
        size = ref.facts.expert_nbytes(0, ref.level)
        want = ref.executor.run(1, *_layer_inputs(ref, 1, [2, 2]))
        assert ref.prefetch == "off"  # every expert cached: nothing to read ahead
        room = ref.plan.io_buffers
    ahead = edgemoe.load(path, ctx=64, expert_cache=3 * size, prefetch="idle")
    with ahead as m, torch.inference_mode():
        assert m.plan.io_buffers == room  # the read ahead's room is the cache's
        assert m.prefetch == "idle"
        ex, store = m.executor, m.store
        ex.hint(1, torch.tensor([[2, 5]]))
        assert ex.stats().prefetch_issued == 1 and (1, 2) not in ex.cache  # not an entry
        assert ex.cache.used == size  # but its room is set aside
        _landed(ex._next)
        before = store.bytes_read
        y = ex.run(1, *_layer_inputs(m, 1, [2, 2]))
        s = ex.stats()
        assert torch.equal(y, want)
        assert store.bytes_read == before, "the layer read again what was read ahead"
        assert s.prefetch_used == 1 and s.misses == 1 and (1, 2) in ex.cache
        assert ex.cache.used == size  # the room set aside became (1, 2)'s entry
        # a wrong guess: dropped when its layer begins, its slab back in the free list
        ex.hint(1, torch.tensor([[6]]))
        assert ex.cache.used == 2 * size
        _landed(ex._next)
        ex.run(1, *_layer_inputs(m, 1, [2, 2]))
        s = ex.stats()
        assert (
            s.prefetch_wasted == 1 and s.prefetch_bytes_wasted == store._span(1, 6, 0, m.level)[1]
        )
        assert ex._next is None and any(store._slabs.values())
        assert ex.cache.used == size  # the room given back
        assert s.prediction_accuracy == 0.5  # [2, 5] then [6], for [2] each time


def test_read_ahead_room_evicts_and_looks_past_cached_layers(tiny_emoe):
    """A full cache gives its next victim's room to a read ahead; where the next layer's
    guessed experts are all cached, the read ahead is one of a later layer's (`later`), and
    the layers in between leave it alone; dropped, its room comes back with its slab."""
    path = tiny_emoe("mixtral", experts="int8")
    with edgemoe.load(path, ctx=64, prefetch="idle") as ref:
        size = ref.facts.expert_nbytes(0, ref.level)
    with edgemoe.load(path, ctx=64, expert_cache=2 * size, prefetch="idle") as m:
        with torch.inference_mode():
            ex = m.executor
            ex.run(0, *_layer_inputs(m, 0, [0, 1]))  # the cache is full: (0, 0), (0, 1)
            assert ex.cache.used == 2 * size and ex.cache.free == 0
            evicted = ex.cache.evictions
            ex.hint(0, torch.tensor([[0, 1]]), lambda: iter([(1, torch.tensor([[3, 4]]))]))
            assert ex._next is not None and ex._next.key == (1, 3)  # layer 0's are cached
            assert ex.cache.evictions == evicted + 1 and ex.cache.used == 2 * size
            ex.account_hits(0, [1])  # layer 0 (the chain's way) leaves layer 1's read alone
            assert ex._next is not None and ex._next.key == (1, 3)
            # dropped (as by a layer that routes elsewhere): its room comes back with its slab
            a = ex._next
            ex._drop_ahead()
            _landed_or_freed(a)
            ex._reclaim()
            assert ex.cache.used == size and not ex._limbo


def _landed_or_freed(a, timeout=30.0):
    end = time.monotonic() + timeout
    while not a.freed and time.monotonic() < end:
        time.sleep(0.005)
    assert a.freed


def test_read_ahead_waits_for_demanded_reads(tiny_emoe, monkeypatch):
    """No part of a read ahead starts while a demanded read has a part queued or in flight."""
    from edgemoe import store as store_mod

    monkeypatch.setattr(store_mod, "PART", 4096)
    monkeypatch.setattr(store_mod, "AHEAD_PART", 8192)
    started = []
    with EmoeReader(tiny_emoe("mixtral", experts="int8")) as r:
        store = store_mod.ExpertStore(r, threads=2, throttle=started.append)
        fut = store.fetch(0, 0, 1, own=True)
        a = store.ahead(0, 1, 1)
        fut.result(timeout=30)
        _landed(a)
        first, second = store._span(0, 0, 0, 1)[1], store._span(0, 1, 0, 1)[1]
        n = first // 4096
        assert started[:n] == [4096] * n and sum(started[n:]) == second, started
        assert started[n] == 8192
        store.close()


def test_begin_issues_reads_before_finish(tiny_emoe):
    with edgemoe.load(tiny_emoe("mixtral"), ctx=64) as m, torch.inference_mode():
        ex = m.executor
        h = ex.begin(0, *_layer_inputs(m, 0, [0, 1]))
        assert ex.stats().reads == 2 and ex.cache.held == 2  # in flight, slots reserved
        ex.finish(h)
        assert ex.cache.held == 0 and len(ex.cache) == 2


def test_a_failed_read_leaves_nothing_held(tiny_emoe, monkeypatch):
    with edgemoe.load(tiny_emoe("mixtral"), ctx=64) as m, torch.inference_mode():
        ex = m.executor
        ex.run(0, *_layer_inputs(m, 0, [0, 1]))  # two cached

        def broken(*a, **k):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(m.store, "_read", broken)
        with pytest.raises(OSError):
            ex.run(0, *_layer_inputs(m, 0, [0, 5]))  # a hit and a read that fails
        assert ex.cache.held == 0
        assert (0, 5, m.level) not in ex.cache and (0, 0, m.level) in ex.cache
        monkeypatch.undo()
        ex.run(0, *_layer_inputs(m, 0, [0, 5]))  # the layer runs again afterwards


def test_int8_experts_compute_in_their_read_buffers(tiny_emoe):
    """Raw INT8 experts are read into slabs the kernels use in place (no copy, no fresh pages
    per miss): the same tokens as the copied path, slabs reused, the cache's byte count what
    the planner counts."""
    path = tiny_emoe("qwen3_moe", experts="int8", dense="bf16")
    with edgemoe.load(path, ctx=64) as m:
        assert m.facts.borrows(0, 0, 1)
        want = m.generate(PROMPT, max_tokens=12, sampling=GREEDY)
        size = m.facts.expert_nbytes(0, 1)
    copied = lambda ctx: dataclasses.replace(ctx, borrow=None).local()  # noqa: E731
    with edgemoe.load(path, ctx=64, executor=copied) as ref:  # the same kernels on copies
        assert ref.generate(PROMPT, max_tokens=12, sampling=GREEDY) == want
        assert ref.store.slabs_made == 0
    with edgemoe.load(path, ctx=64, expert_cache=3 * size) as m:
        assert m.generate(PROMPT, max_tokens=12, sampling=GREEDY) == want
        ex = m.executor
        assert ex.stats().reads > 20 and m.store.slabs_made <= 3 + m.store.threads + 1
        assert all(ex.cache.peek(k).nbytes == size for k in ex.cache.keys())
        assert ex.cache.used == len(ex.cache) * size <= ex.cache.capacity
