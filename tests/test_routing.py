"""Routing statistics: the recorded trace is the model's real routing, the replay counts what
the runtime's cache counts, and plan uses the trace stored in the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemoe.calibrate import NotEnoughText, record, text_segments
from edgemoe.engine import DEMO, EdgeModel
from edgemoe.routing import (
    BadRoutingStats,
    RoutingTrace,
    expected_uses,
    locality,
    replay,
)
from formats import constants as C
from formats.amend import amend
from formats.reader import EmoeReader


@pytest.mark.parametrize("fam", ["mixtral", "qwen3_moe", "olmoe"])
def test_trace_is_the_routing_transformers_computes(tiny_hf, tiny_emoe, fam):
    """Every token's recorded experts are the top-k of transformers' own router logits."""
    import transformers

    path = tiny_emoe(fam)
    segs = np.random.default_rng(0).integers(3, 300, size=(2, 40))
    m = EdgeModel(path)
    trace = record(m, segs, "random tokens", chunk=16)  # chunking must not shift tokens
    m.close()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf(fam, vocab_size=384))
    k = trace.ids.shape[3]
    for s in range(2):
        with torch.no_grad():
            out = hf(torch.from_numpy(segs[s : s + 1]), output_router_logits=True)
        for i, logits in enumerate(out.router_logits):
            want = torch.topk(logits.float(), k, dim=-1).indices.sort(-1).values.numpy()
            got = np.sort(trace.ids[s, :, i].astype(np.int64), axis=-1)
            assert (got == want).all(), f"segment {s}, MoE layer {i}"


def test_trace_skips_dense_layers(tiny_emoe):
    """DeepSeek's first layer is dense: the trace covers only the layers with experts."""
    m = EdgeModel(tiny_emoe("deepseek_v3"))
    trace = record(m, np.arange(3, 35).reshape(1, 32), "ids")
    m.close()
    assert trace.layers == [1, 2]
    assert trace.ids.shape == (1, 32, 2, 2)


def test_replay_counts_what_the_runtime_counts():
    """Replaying the executor calls of a real run through `replay` gives the run's own hits and
    misses, prefill and decode, for a batch and a cache smaller than a step's experts."""
    probe = EdgeModel(DEMO)
    size = probe.executor.expert_nbytes(0)
    probe.close()
    for slots, policy in [(3, "lru"), (3, "lfu"), (11, "lfu"), (40, "lru")]:
        # prefetch off: the replay has the routing, not the hidden states hints come from
        m = EdgeModel(DEMO, batch=2, expert_cache=size * slots, policy=policy, prefetch=False)
        calls: list = []
        stop = m.executor.observe(
            lambda layer, ids, calls=calls: calls.append((layer, ids.numpy().copy()))
        )
        m.generate(["The function returns", "In the beginning"], max_tokens=12)
        stop()
        got = (m.executor.cache.hits, m.executor.cache.misses)
        assert replay(calls, slots, policy=policy) == got, (slots, policy)
        fewest = replay(calls, slots, belady=True)
        assert (
            fewest[1] <= m.executor.cache.misses
            and sum(fewest) == m.executor.cache.hits + m.executor.cache.misses
        )
        assert m.executor.cache.misses > 0
        m.close()


def _trace(ids) -> RoutingTrace:
    ids = np.asarray(ids, dtype=np.uint16)
    return RoutingTrace(ids, list(range(ids.shape[2])), "synthetic")


def test_expected_uses_on_known_patterns():
    s, t, layers, k, e = 4, 200, 3, 2, 8
    same = np.zeros((s, t, layers, k), dtype=np.uint16)
    same[..., 1] = 5
    u = expected_uses(_trace(same), slots=layers * k, batch=1)
    assert (u.hits, u.misses) == (layers * k, 0)  # the same two experts every token

    # a cycle through all 8 experts, 2 a token, against a cache holding 3 of a layer's 8: LRU
    # always evicts the expert needed next, so nothing hits
    cyc = np.stack([(np.arange(t)[:, None] * k + np.arange(k)) % e] * layers, axis=1)
    cyc = np.broadcast_to(cyc, (s, t, layers, k))
    u = expected_uses(_trace(cyc), slots=3 * layers, batch=1, policy="lru")
    assert u.hits == 0 and u.misses == layers * k
    # LFU keeps the often used and lets newcomers go: the cycle no longer defeats the cache
    u = expected_uses(_trace(cyc), slots=3 * layers, batch=1, policy="lfu")
    assert u.hits > 0.2 * layers * k

    # uniform routing, no locality: LRU hits with probability slots / experts
    rng = np.random.default_rng(1)
    uni = np.stack(
        [
            [[rng.choice(e, k, replace=False) for _ in range(layers)] for _ in range(t)]
            for _ in range(s)
        ]
    )
    for slots in (6, 12, 18):
        u = expected_uses(_trace(uni), slots=slots, batch=1, policy="lru")
        assert abs(u.hit_rate - slots / (layers * e)) < 0.06, slots
        assert abs(u.hits + u.misses - layers * k) < 1e-9


def test_batch_wider_than_the_trace_scales_per_step_uses():
    rng = np.random.default_rng(2)
    ids = np.stack(
        [[[rng.choice(8, 2, replace=False) for _ in range(2)] for _ in range(64)] for _ in range(2)]
    )
    two = expected_uses(_trace(ids), slots=4, batch=2)
    four = expected_uses(_trace(ids), slots=4, batch=4)
    assert four.segments == two.segments == 2
    assert four.hits == pytest.approx(2 * two.hits) and four.misses == pytest.approx(2 * two.misses)


def test_locality():
    ids = np.zeros((1, 10, 1, 2), dtype=np.uint16)
    ids[..., 1] = 1
    assert locality(_trace(ids)) == 1.0
    ids[0, 1::2, 0] = [2, 3]
    assert locality(_trace(ids)) == 0.0


def test_text_segments():
    segs = text_segments(list(range(100)), 3, 10)
    assert segs.shape == (3, 10) and segs[0, 0] == 0 and segs[-1, -1] == 99
    with pytest.raises(NotEnoughText, match="has 20 tokens; 3 segments of 10 need 30"):
        text_segments(list(range(20)), 3, 10)


def _stored(tmp_path, tiny_emoe, meta_change=None, blob=None):
    """A copy of the tiny qwen3 file with a recorded trace, then `meta_change` applied."""
    import shutil

    path = tmp_path / "m.emoe"
    shutil.copy(tiny_emoe("qwen3_moe"), path)
    m = EdgeModel(path)
    trace = record(m, np.arange(3, 67).reshape(2, 32), "ids")
    m.close()
    meta = trace.meta()
    if meta_change:
        meta_change(meta)
    amend(path, metadata={C.M_ROUTING_STATS: meta}, blobs={"routing_trace": blob or trace.blob()})
    return path, trace


def test_stored_trace_round_trips(tmp_path, tiny_emoe):
    path, trace = _stored(tmp_path, tiny_emoe)
    with EmoeReader(path) as r:
        back = RoutingTrace.load(r)
    assert back.layers == trace.layers and (back.ids == trace.ids).all()


@pytest.mark.parametrize(
    "change, blob, msg",
    [
        (lambda m: m.update(shape=[2, 32, 3]), None, "is not four positive integers"),
        (
            lambda m: m.update(layers=[0, 1]),
            None,
            "cover layers \\[0, 1\\], the file's MoE layers are \\[0, 1, 2\\]",
        ),
        (lambda m: m.update(blob="nope"), None, "name blob 'nope', which the file does not hold"),
        (lambda m: m.update(dtype="<u4"), None, "dtype"),
        (None, b"\x00" * 10, "has 10 bytes, shape \\[2, 32, 3, 2\\] needs 768"),
        (None, b"\xff" * 768, "name expert 65535, layers have 8"),
    ],
)
def test_bad_stored_trace_is_named(tmp_path, tiny_emoe, change, blob, msg):
    path, _ = _stored(tmp_path, tiny_emoe, change, blob)
    with EmoeReader(path) as r, pytest.raises(BadRoutingStats, match=msg) as e:
        RoutingTrace.load(r)
    assert "edgemoe calibrate" in str(e.value)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_belady_never_misses_more_than_a_policy(policy):
    rng = np.random.default_rng(3)
    # a cycle: LRU always evicts the expert needed next and hits nothing; Belady keeps some
    cyc = np.stack([(np.arange(120)[:, None] * 2 + np.arange(2)) % 8] * 2, axis=1)[None]
    assert expected_uses(_trace(cyc), slots=6, policy="lru").hits == 0
    assert expected_uses(_trace(cyc), slots=6, belady=True).hits > 0
    skew = rng.choice(8, size=(4, 120, 2, 2), p=[0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    skew[..., 1] = (skew[..., 0] + 1 + rng.integers(0, 7, size=skew.shape[:3])) % 8  # distinct
    for slots in (2, 5, 9, 16):
        for batch in (1, 3):
            lru = expected_uses(_trace(skew), slots, batch, policy=policy)
            opt = expected_uses(_trace(skew), slots, batch, belady=True)
            assert opt.misses <= lru.misses and opt.hits + opt.misses == pytest.approx(
                lru.hits + lru.misses
            )


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_calibrate_stores_a_trace_that_plan_uses(tmp_path, tiny_emoe):
    import json
    import shutil
    from pathlib import Path

    path = tmp_path / "m.emoe"
    shutil.copy(tiny_emoe("qwen3_moe"), path)
    text = Path(__file__).parents[1] / "formats" / "SPEC.md"
    plan = ["plan", path, "--device", "devbox", "--mem", "8GiB", "--batch", "2", "--json"]
    assert json.loads(_cli(*plan).stdout)["routing"] == "uniform"
    p = _cli(
        "calibrate", path, "--text", text, "--segments", "3", "--tokens", "48", "--mem", "8GiB"
    )
    assert p.returncode == 0, p.stderr
    assert "stored the routing of 3 x 48 tokens" in p.stdout
    assert "routing statistics: 3 x 48 tokens of SPEC.md" in _cli("inspect", path).stdout
    assert _cli("verify", path, "-q").returncode == 0
    rep = json.loads(_cli(*plan).stdout)
    rt = rep["routing"]
    assert rt["source"] == "SPEC.md" and rt["segments"] == 2 and rt["decode_tokens"] == 48 - 32
    assert rt["fewest_misses_per_step"] <= rt["misses_per_step"]
    assert rep["bound_tok_s"] >= rep["expected_tok_s"] > 0
    assert "fewest any cache policy" in _cli(*plan[:-1]).stdout


@pytest.mark.parametrize("case", ["short", "missing"])
def test_calibrate_refuses_bad_text_and_leaves_the_file(tmp_path, tiny_emoe, case):
    import shutil

    path = tmp_path / "m.emoe"
    shutil.copy(tiny_emoe("qwen3_moe"), path)
    before = path.read_bytes()
    text = tmp_path / "t.txt"
    if case == "short":
        text.write_text("too short")
    p = _cli("calibrate", path, "--text", text, "--mem", "8GiB")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert ("segments of 256 need 2048" if case == "short" else "no such file") in p.stderr
    assert path.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(
        ["m.emoe"] + ["t.txt"] * (case == "short")
    )


def test_convert_can_calibrate_in_one_go(tmp_path):
    from pathlib import Path

    from factories import make_tiny_hf

    from tests.formats.gguf_fixtures import train_tiny_bpe_tokenizer

    train_tiny_bpe_tokenizer(tmp_path, 384)
    make_tiny_hf("olmoe", tmp_path, vocab_size=384)
    text = Path(__file__).parents[1] / "formats" / "SPEC.md"
    out = tmp_path / "o.emoe"
    p = _cli("convert", tmp_path, out, "--experts", "int8", "-q", "--calibrate", text)
    assert p.returncode == 0, p.stderr
    assert "stored the routing of 8 x 256 tokens" in p.stdout
    with EmoeReader(out) as r:
        assert RoutingTrace.load(r).ids.shape == (8, 256, 3, 2)


def test_belady_plan_is_fast_for_a_large_model():
    """A DeepSeek-V3-sized trace (58 MoE layers, 256 experts, top-8) with thousands of slots:
    a victim scan per miss took minutes; the heap keeps it to seconds."""
    import time

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(2, 64, 58, 8), dtype=np.uint16)
    t0 = time.perf_counter()
    u = expected_uses(_trace(ids), slots=3000, belady=True)
    assert time.perf_counter() - t0 < 30
    assert u.misses <= expected_uses(_trace(ids), slots=3000).misses
