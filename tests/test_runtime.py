"""The runtime's seams: store, cache, waves, planner, sampling, generation."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import edgemoe
from edgemoe import Bytes
from edgemoe.budget import BudgetTooSmall
from edgemoe.cache import ExpertCache
from edgemoe.engine import RunStats
from edgemoe.kernels import DenseLinear
from edgemoe.moe.dispatch import dispatch
from edgemoe.moe.executor import ResidentExecutor
from edgemoe.moe.experts import ExpertWeights
from edgemoe.moe.reference import reference_moe
from edgemoe.sampling import Sampling, sample
from edgemoe.store import ExpertStore
from formats.reader import EmoeReader
from tests.models.harness import greedy_ours, load_ours

GREEDY = Sampling(temperature=0)
PROMPT = "The quick brown fox jumps over the lazy dog. Then it"


def test_dispatch_combine_equals_reference():
    torch.manual_seed(0)
    t, d, i, e, k = 13, 16, 24, 6, 2
    x = torch.randn(t, d)
    dense = {j: (torch.randn(i, d), torch.randn(i, d), torch.randn(d, i)) for j in range(e)}
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    w = torch.rand(t, k)
    ex = ResidentExecutor(
        {(0, j): ExpertWeights(*(DenseLinear(m) for m in dense[j])) for j in range(e)}
    )
    torch.testing.assert_close(
        ex.run(0, x, ids, w), reference_moe(x, ids, w, dense), rtol=1e-5, atol=1e-4
    )
    groups = dispatch(ids, w)
    assert sorted(a.expert for a in groups) == sorted(set(ids.flatten().tolist()))
    assert sum(len(a.tokens) for a in groups) == t * k


def test_cache_lru_holds_and_capacity():
    c = ExpertCache(100)
    assert c.put((0, 0, 1), "a", 40) and c.put((0, 1, 1), "b", 40)
    assert c.acquire((0, 0, 1)).value == "a"  # a is now the most recent, and held
    assert c.put((0, 2, 1), "c", 40)  # evicts b (LRU, not held)
    assert (0, 1, 1) not in c and (0, 0, 1) in c and c.used <= c.capacity
    c.acquire((0, 2, 1))
    c.acquire((0, 2, 1))  # held twice: one release does not free it
    assert not c.put((0, 3, 1), "d", 40)  # both residents held: refused, nothing evicted
    assert len(c) == 2 and c.used == 80
    c.release((0, 0, 1))
    c.release((0, 2, 1))
    assert c.put((0, 3, 1), "d", 40) and (0, 0, 1) not in c and (0, 2, 1) in c
    c.release((0, 2, 1))
    assert c.put((0, 4, 1), "e", 40) and c.evictions == 3
    assert not c.put((9, 9, 1), "huge", 101)
    assert c.hits == 3 and c.misses == 0


def test_cache_reservations_survive_until_released():
    """A reserved (in-flight) entry holds its room and cannot be evicted; an unheld in-flight
    entry evicted is cancelled; fill corrects the size."""
    from concurrent.futures import Future

    c = ExpertCache(100)
    e = c.reserve((1, 0, 1), 60)
    assert e is not None and e.pins == 1 and c.used == 60
    c.fill((1, 0, 1), Future())
    assert c.peek((1, 0, 1)).in_flight
    assert c.reserve((1, 1, 1), 60) is None  # the room is held
    assert c.reserve((1, 1, 1), 40) is not None
    c.release((1, 1, 1))
    c.fill((1, 1, 1), "x", 30)
    assert c.used == 90
    c.release((1, 0, 1))
    fut = c.peek((1, 0, 1)).value
    assert c.put((1, 2, 1), "y", 70)  # evicts the unheld in-flight entry (LRU-oldest) and x
    assert fut.cancelled() and (1, 0, 1) not in c


@pytest.mark.parametrize("mode", ["direct", "buffered", "refused"])
def test_store_reads_match_reader(tiny_emoe, monkeypatch, mode):
    src = tiny_emoe("qwen3_moe", experts="mwq:2,3,4", dense="bf16")
    if (
        mode == "refused"
    ):  # a filesystem that refuses O_DIRECT reads: fall back to buffered + DONTNEED
        real = os.preadv
        calls = {"n": 0}

        def preadv(fd, bufs, off):
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, bufs, off)

        monkeypatch.setattr(os, "preadv", preadv)
    with EmoeReader(src) as r:
        store = ExpertStore(r, threads=2, direct=mode != "buffered")
        keys = list(r.experts)[:6]
        futs = {(k, lv): store.fetch(*k, lv) for k in keys for lv in (1, 3)}
        for (k, lv), f in futs.items():
            want = [bytes(r.read_chunk(ci)) for ci in r.experts[k].levels[:lv]]
            assert f.result() == want
        up = store.fetch(*keys[0], 3, have=1).result()  # upgrade: only the extra levels
        assert up == [bytes(r.read_chunk(ci)) for ci in r.experts[keys[0]].levels[1:3]]
        assert store.reads == len(futs) + 1 and store.bytes_read > 0
        assert store.direct == (mode == "direct"), "O_DIRECT works on the work disk"
        store.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_generation_is_identical_at_every_budget(tiny_emoe, family):
    path = tiny_emoe(family)
    ref = load_ours(path)
    m = edgemoe.load(path, ctx=128)
    ids = m.tokenizer.encode(PROMPT)
    want, _ = greedy_ours(ref, [ids], 24)
    reads = []
    for cache in [m.plan.all_experts, m.plan.all_experts // 2, m.plan.largest_expert]:
        mm = edgemoe.load(path, ctx=128, batch=1, expert_cache=cache)
        got, _ = greedy_ours(mm.model, [ids], 24)
        assert got[0] == want[0], f"expert cache {cache}"
        assert mm.executor.cache.used <= mm.executor.cache.capacity
        reads.append(mm.store.bytes_read)
        mm.close()
    assert reads[0] <= reads[1] < reads[2], reads


def test_prefill_reads_each_touched_expert_once(tiny_emoe):
    path = tiny_emoe("qwen3_moe")
    plan = edgemoe.load(path, ctx=256).plan
    m = edgemoe.load(path, ctx=256, expert_cache=plan.largest_expert)  # a cache of one expert
    assert m.plan.expert_slots < 2
    long_prompt = " ".join([PROMPT] * 8)
    ids = m.tokenizer.encode(long_prompt)
    touched = set()
    real_begin = m.executor.begin

    def spy(layer, x, expert_ids, w):
        touched.update((layer, e) for e in expert_ids.flatten().tolist())
        return real_begin(layer, x, expert_ids, w)

    m.executor.begin = spy
    with torch.inference_mode():
        m.model.forward(torch.tensor([ids]), m.model.new_cache(1, len(ids)))
    assert len(ids) > 60 and m.store.reads == len(
        touched
    )  # one read per touched expert, not per token


def test_budget_too_small_names_the_minimum(tiny_emoe):
    path = tiny_emoe("mixtral")
    with pytest.raises(BudgetTooSmall, match="smallest budget that works is") as e:
        edgemoe.load(path, mem="100MB", ctx=128)
    assert "mem=" in str(e.value) and e.value.param == "mem"
    need = Bytes.parse(str(e.value).split("smallest budget that works is ")[1].split(";")[0])
    # what it names is enough, with the slack of this process's own growth
    edgemoe.load(path, mem=need + Bytes.parse("64MiB"), ctx=128).close()


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(1)
    assert sample(logits, Sampling(temperature=0), None).tolist() == [1, 0]
    assert sample(logits, Sampling(temperature=1.0, top_k=1), g).tolist() == [1, 0]
    assert sample(logits, Sampling(temperature=1.0, top_p=0.01), g).tolist() == [1, 0]
    draws = [
        sample(logits, Sampling(temperature=5.0, seed=3), torch.Generator().manual_seed(3)).tolist()
        for _ in range(2)
    ]
    assert draws[0] == draws[1]
    with pytest.raises(ValueError):
        Sampling(top_p=0)


def test_batch_stop_strings_and_stream(tiny_emoe):
    m = edgemoe.load(tiny_emoe("olmoe"), ctx=128, batch=3)
    prompts = [
        PROMPT,
        "Hello",
        "A much longer prompt about nothing in particular, to pad the batch",
    ]
    st = RunStats()
    batched = m.generate(prompts, max_tokens=16, sampling=GREEDY, stats=st)
    alone = [m.generate(p, max_tokens=16, sampling=GREEDY) for p in prompts]
    assert batched == alone
    assert "".join(m.stream(prompts[0], max_tokens=16, sampling=GREEDY)) == alone[0]
    first = alone[0]
    # a stop string made of complete characters from the middle of the greedy output
    starts = [i for i in range(1, len(first)) if first[i].isalnum()]
    assert starts, f"no usable stop string in {first!r}"
    stop = first[starts[0]]
    cut = m.generate(prompts[0], max_tokens=16, stop=[stop], sampling=GREEDY)
    assert cut == first[: first.find(stop)]
    s = m.summary(st)
    assert s["new_tokens"] == st.new_tokens > 0 and s["prefill_tok_s"] > 0
    assert 0 <= s["hit_rate"] <= 1 and st.batch == 3


def test_read_slabs_page_size_follows_the_cache_share(monkeypatch):
    """Slabs go in 2 MiB pages where a small cache reuses few slabs for many reads, in 4 KiB
    pages where a large cache is mostly read once (a cold prefill faults in every slab);
    EDGEMOE_HUGE_SLABS decides when set. The page kind shows in the process's smaps."""
    from edgemoe.store import HUGE_SLABS_BELOW, anon, huge_slabs

    monkeypatch.delenv("EDGEMOE_HUGE_SLABS", raising=False)
    assert huge_slabs(0.1) and not huge_slabs(0.5) and not huge_slabs(1.0)
    assert huge_slabs(HUGE_SLABS_BELOW * 0.99) and not huge_slabs(HUGE_SLABS_BELOW)
    monkeypatch.setenv("EDGEMOE_HUGE_SLABS", "1")
    assert huge_slabs(1.0)
    monkeypatch.setenv("EDGEMOE_HUGE_SLABS", "0")
    assert not huge_slabs(0.0)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        return
    import ctypes

    def huge_kib(m):  # AnonHugePages of the mapping that holds m
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        lines = Path("/proc/self/smaps").read_text().splitlines()
        for i, line in enumerate(lines):
            lo, _, hi = line.split()[0].partition("-")
            if "-" in line.split()[0] and int(lo, 16) <= addr < int(hi, 16):
                for rest in lines[i + 1 :]:
                    if rest.startswith("AnonHugePages:"):
                        return int(rest.split()[1])
        return 0

    for huge in (True, False):
        m = anon(8 << 20, huge)
        m.write(b"\1" * len(m))  # fault every page in
        assert (huge_kib(m) > 0) is huge, huge


def test_read_parts_cover_the_span_once_head_first(monkeypatch):
    """The head's byte ranges widen to whole pages and merge; the rest of the span is their
    complement; both are cut into parts of at most PART bytes, in order."""
    from edgemoe import store as store_mod

    monkeypatch.setattr(store_mod, "PART", 8192)
    head = store_mod._pages([(9000, 9100), (10, 5000), (4096, 6000)], 20000)
    assert head == [(0, 12288)]
    assert store_mod._pages([(100, 200), (20000, 20480)], 20480) == [(0, 4096), (16384, 20480)]
    rest = store_mod._complement([(0, 4096), (16384, 20480)], 24576)
    assert rest == [(4096, 16384), (20480, 24576)]
    parts = store_mod._split([(4096, 16384), (20480, 24576)])
    assert parts == [(4096, 8192), (12288, 4096), (20480, 4096)]
    assert sum(n for _, n in parts) + 8192 == 24576


def test_split_reads_land_in_parts_head_first(tiny_emoe, monkeypatch, tmp_path):
    """An owned raw read larger than a part goes in parts: its payloads equal the file's
    chunks, it counts as one read of its bytes, its head (the gate and up an INT8 expert
    stores first) lands as a future of its own, and a corrupt chunk fails the read."""
    from edgemoe import store as store_mod
    from edgemoe.prepare import head_of, prepare_expert
    from formats.errors import ChecksumMismatch

    monkeypatch.setattr(store_mod, "PART", 4096)
    src = tiny_emoe("mixtral", experts="int8", dense="bf16")
    with EmoeReader(src) as r:
        store = ExpertStore(r, threads=2)
        key = max(r.experts, key=lambda k: r.chunks[r.experts[k].levels[0]].length)
        e = r.experts[key]
        span = store._span(*key, 0, 1)[1]
        assert span > 2 * 4096, "the test needs an expert of several parts"
        head = head_of(r, e, 1, torch.float32)
        assert head is not None
        assert 0 < max(hi for _, hi in head[0]) < r.chunks[e.levels[0]].length  # gate, up
        fut = store.fetch(*key, 1, own=True, head=head)
        gate, up = fut.head.result(timeout=30)
        got = fut.result(timeout=30)
        assert [bytes(p) for p in got] == [bytes(r.read_chunk(ci)) for ci in e.levels]
        assert got.slab is not None and store.reads == 1 and store.bytes_read == span
        # the head's Linears are the whole expert's, on the same bytes of the slab
        whole = prepare_expert(r, e, got, torch.float32, slab=got.slab)
        assert torch.equal(gate.q, whole.gate.q) and torch.equal(up.scales, whole.up.scales)
        assert gate.q.data_ptr() == whole.gate.q.data_ptr()
        store.close()
    bad = tmp_path / "bad.emoe"
    data = bytearray(Path(src).read_bytes())
    with EmoeReader(src) as r:
        c = r.chunks[r.experts[key].levels[0]]
        data[r.data_offset + c.offset + c.length - 10] ^= 0xFF  # in down's rows: after the head
    bad.write_bytes(bytes(data))
    with EmoeReader(bad) as r:
        store = ExpertStore(r, threads=2)
        fut = store.fetch(*key, 1, own=True, head=head_of(r, r.experts[key], 1, torch.float32))
        fut.head.result(timeout=30)  # the head's bytes are intact
        with pytest.raises(ChecksumMismatch):
            fut.result(timeout=30)
        # read ahead, then taken: the same head first, the same error, no hang
        a = store.ahead(*key, 1, head=head_of(r, r.experts[key], 1, torch.float32))
        fut = store.take(a, head=head_of(r, r.experts[key], 1, torch.float32))
        fut.head.result(timeout=30)
        with pytest.raises(ChecksumMismatch):
            fut.result(timeout=30)
        store.close()


@pytest.mark.parametrize("experts,bits", [("int8", None), ("mwq:2,3,4", "fixed:2")])
def test_early_gate_up_decodes_the_same_tokens(tiny_emoe, monkeypatch, experts, bits):
    """Reads in parts, gate and up computed as they land and down after: the same greedy
    tokens as whole reads, at a cache small enough that decode misses."""
    from edgemoe import fastkernels
    from edgemoe import store as store_mod
    from edgemoe.moe import local

    if not fastkernels.available():
        pytest.skip("no AVX2 INT8 kernel")
    path = tiny_emoe("mixtral", experts=experts, dense="bf16")
    ids = None
    runs = {}
    real = local.swiglu_head
    for part in (1 << 30, 4096):
        monkeypatch.setattr(store_mod, "PART", part)
        calls = {"n": 0}

        def spy(*a, _calls=calls):
            _calls["n"] += 1
            return real(*a)

        monkeypatch.setattr(local, "swiglu_head", spy)
        # no reads ahead: they go in parts whatever PART is
        m = edgemoe.load(path, ctx=128, batch=1, expert_cache="30%", bits=bits, prefetch="off")
        ids = ids or m.tokenizer.encode(PROMPT)
        got, _ = greedy_ours(m.model, [ids], 16)
        runs[part] = (got[0], calls["n"], m.executor.stats().misses)
        m.close()
    whole, split = runs[1 << 30], runs[4096]
    assert whole[1] == 0 and split[1] > 0, runs  # the head path ran only with parts
    assert split[0] == whole[0] and split[2] > 0, runs


@pytest.mark.parametrize("experts,bits", [("int8", None), ("mwq:2,3,4", "fixed:2")])
def test_a_small_cache_is_made_at_load_and_every_read_lands_in_it(tiny_emoe, experts, bits):
    """A cache of less than half the experts, read in place at one level: its slabs are made
    (faulted in) at load, one per slot, and decode reads into them, making none."""
    path = tiny_emoe("mixtral", experts=experts, dense="bf16")
    ids = None
    runs = {}
    for share in ("100%", "30%"):
        m = edgemoe.load(path, ctx=128, batch=1, expert_cache=share, bits=bits)
        made = m.store.slabs_made
        ids = ids or m.tokenizer.encode(PROMPT)
        got, _ = greedy_ours(m.model, [ids], 16)
        level = int(bits[-1]) if bits else m.level
        slots = int(m.plan.expert_cache // m.facts.expert_nbytes(0, level))
        runs[share] = (got[0], made, m.store.slabs_made, slots)
        assert m.arena_slabs == made
        span = m.store._span(0, 0, 0, level)[1]
        # the arena is the cache's room: a slab is its expert's bytes rounded up to pages
        assert made * span <= m.plan.expert_cache + made * 8192, (made, span)
        st = m.executor.stats()
        m.close()
    assert runs["100%"][1] == 0  # every expert cached: nothing made at load
    tokens, made, after, slots = runs["30%"]
    assert tokens == runs["100%"][0] and st.misses > 0
    assert made == slots > 0 and after == made, runs


@pytest.mark.parametrize("experts,bits", [("int8", None), ("mwq:2,3,4", "fixed:2")])
def test_one_level_in_place_plans_no_io_room_and_reads_into_slots(tiny_emoe, experts, bits):
    """At one level, read in place and without prefetch, every read gets a cache slot (later
    waves evict what the layer released), so the plan's I/O term is zero; a batch of three
    at a cache of one expert reads nothing without a slot and decodes the same tokens.
    A policy that mixes levels or prefetch keeps the room for a read without a slot."""
    path = tiny_emoe("mixtral", experts=experts, dense="bf16")
    ref = edgemoe.load(path, ctx=128, batch=3, bits=bits)
    assert ref.plan.io_buffers == 0
    prompts = [PROMPT, "In the beginning", "The database server"]
    ids = [ref.tokenizer.encode(p) for p in prompts]
    want, _ = greedy_ours(ref.model, ids, 12)
    one = ref.plan.largest_expert
    ref.close()
    m = edgemoe.load(path, ctx=128, batch=3, expert_cache=one, bits=bits)
    assert m.plan.expert_slots < 2
    got, _ = greedy_ours(m.model, ids, 12)
    s = m.executor.stats()
    m.close()
    assert got == want and s.misses > 0 and s.uncached == 0, s
    keep = [dict(prefetch=True)] + ([dict(bits="gate:q=0.5")] if bits else [])
    for kw in keep:
        p = edgemoe.load(path, ctx=128, batch=3, **kw)
        assert p.plan.io_buffers > 0, kw
        p.close()
