"""Routing replay (edgemoe/replay.py): a model routes by another model's recorded routing trace
(the demo's, 16 experts top-2 over 4 MoE layers), as `edgemoe bench --replay` runs it."""

from __future__ import annotations

import numpy as np
import pytest

import edgemoe
from edgemoe.demo import DEMO
from edgemoe.replay import BadReplay
from edgemoe.routing import RoutingTrace
from formats.convert import ConvertOptions, convert, open_source
from formats.reader import EmoeReader
from tests.factories import make_tiny_hf
from tests.formats.gguf_fixtures import train_tiny_bpe_tokenizer


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """A tiny Mixtral with the demo's 16 experts top-2 (and 3 MoE layers, not its 4)."""
    d = tmp_path_factory.mktemp("tiny16")
    train_tiny_bpe_tokenizer(d, 384)
    hf = make_tiny_hf("mixtral", d, vocab_size=384, num_local_experts=16)
    out = d / "tiny16.emoe"
    with open_source(hf) as src:
        convert(src, out, ConvertOptions(experts="int8", dense="int8", progress=False))
    return out


def test_replay_routes_by_the_recorded_trace(tiny16):
    with EmoeReader(DEMO) as r:
        trace = RoutingTrace.load(r)
    s, t, n_layers, k = trace.ids.shape
    m = edgemoe.load(tiny16, ctx=128, replay=DEMO)
    seen = []
    m.executor.observe(lambda layer, ids: seen.append((layer, ids.clone())))
    ids = m.encode("The quick brown fox jumps over the lazy dog")
    m.complete([ids], max_tokens=5)
    n = len(ids)
    steps = [seen[i : i + 3] for i in range(0, len(seen), 3)]  # 3 MoE layers a pass
    assert len(steps) == 5  # the prompt's pass, then 4 decode steps
    for step, first in zip(steps, [0, n, n + 1, n + 2, n + 3]):
        for i, (layer, got) in enumerate(step):
            want = trace.ids[0, first : first + got.shape[0], i % n_layers].astype(np.int64)
            assert layer == i and np.array_equal(got.numpy(), want), (layer, first)
    m.close()


def test_replay_refuses_a_model_of_other_shape(tiny_emoe):
    path = tiny_emoe("mixtral", experts="int8", dense="int8")  # 8 experts a layer
    with pytest.raises(BadReplay, match="the model's layers have 8") as e:
        edgemoe.load(path, ctx=64, replay=DEMO)
    assert "same top-k" in e.value.fix
