"""Row-blocked encoding (how big tensors stream) gives the same bytes as whole-tensor encoding."""

from __future__ import annotations

import numpy as np
import pytest

from formats.codecs import codec_by_name
from formats.codecs.base import encode_blocked


@pytest.mark.parametrize(
    "name,options",
    [
        ("f32", {}),
        ("f16", {}),
        ("bf16", {}),
        ("int8", {}),
        ("int8", {"group": 32}),
        ("int4", {}),
        ("mwq", {}),
        ("mwq", {"bits": [5, 6, 7, 8]}),
        ("bitplane", {}),
    ],
)
@pytest.mark.parametrize("shape", [(37, 64), (256, 128), (8, 384)])
def test_blocked_equals_whole(name, options, shape):
    w = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    codec = codec_by_name(name)
    params = (
        codec.default_params(shape, **options)
        if options or codec.nested or name.startswith("int")
        else {}
    )
    whole = codec.encode(w, params)
    # 8-row blocks of 64..384 columns: many blocks, a short last one
    blocked = encode_blocked(
        codec, shape, params, lambda a, b: w[a:b], block_bytes=8 * 4 * shape[1]
    )
    assert [len(s) for s in blocked] == codec.level_nbytes(shape, params)
    assert blocked == whole


def test_blocked_1d():
    w = np.arange(1000, dtype=np.float32)
    codec = codec_by_name("f32")
    assert encode_blocked(codec, w.shape, {}, lambda a, b: w[a:b], block_bytes=64) == codec.encode(
        w, {}
    )
