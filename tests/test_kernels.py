"""Every fused kernel against the codec's own decoder + F.linear (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemoe.kernels import DenseLinear, Int4Linear, Int8Linear, make_linear, reference_linear
from formats.codecs import codec_by_name

CASES = [
    ("int8", {}, Int8Linear),
    ("int4", {"group": 64}, Int4Linear),
    ("int4", {}, Int4Linear),
    ("mwq", {}, Int4Linear),
    ("mwq", {"group": 32}, Int4Linear),
    ("bitplane", {}, DenseLinear),
    ("bf16", None, DenseLinear),
    ("f32", None, DenseLinear),
    ("mwq", {"bits": [5, 6, 7, 8]}, DenseLinear),
]


@pytest.mark.parametrize("name,options,kind", CASES)
@pytest.mark.parametrize("shape", [(64, 128), (96, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(name, options, kind, shape, dtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    codec = codec_by_name(name)
    params = codec.default_params(shape, **options) if options is not None else {}
    segs = codec.encode(w, params)
    x = torch.randn(5, shape[1], dtype=dtype)
    for level in range(1, len(segs) + 1):
        fused = make_linear(codec.id, shape, params, segs[:level], dtype)
        assert isinstance(fused, kind), type(fused)
        ref = reference_linear(codec.id, shape, params, segs[:level], torch.float32)
        want = ref(x.float())
        got = fused(x).float()
        # bf16 carries int4 scales and zero points in 8 mantissa bits: ~1.5% of the output range
        tol = 4e-2 if dtype == torch.bfloat16 else 2e-5
        assert torch.allclose(got, want, atol=tol * want.abs().max().item(), rtol=tol), (
            level,
            (got - want).abs().max(),
        )
        assert fused.nbytes > 0 and fused.out_features == shape[0]
