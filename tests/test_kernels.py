"""Every kernel against the codec's own decoder + F.linear (the reference); its byte count
against what it builds; in-place upgrades against building at the higher level."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from edgemoe import fastkernels
from edgemoe.kernels import (
    DenseLinear,
    Int4Linear,
    Int8Linear,
    MwqLinear,
    NotUpgradable,
    kernel_for,
    reference_linear,
)
from formats.codecs import codec_by_name, registered
from formats.constants import CodecId
from formats.errors import UnknownCodec

CASES = [
    ("int8", {}, Int8Linear),
    ("int4", {"group": 64}, Int4Linear),
    ("int4", {}, Int4Linear),
    ("mwq", {}, Int4Linear),
    ("mwq", {"group": 32}, Int4Linear),
    ("bitplane", {}, Int4Linear),
    ("bitplane", {"bits": [4, 8]}, Int4Linear),
    ("bitplane", {"bits": [1, 2, 3, 4, 5, 6, 7, 8]}, DenseLinear),  # 8 int4 parts: dense
    ("bf16", None, DenseLinear),
    ("f32", None, DenseLinear),
    # 5-bit base codes: no int4 parts; computed as stored where the kernel library builds
    ("mwq", {"bits": [5, 6, 7, 8]}, MwqLinear if fastkernels.mwq_available() else DenseLinear),
]
# Shape classes: fused int4 (rows % 16, cols % 64), cols too narrow for int4 (the tiny test
# models' down projections), rows not a multiple of 16.
SHAPES = [(64, 128), (96, 256), (64, 32), (40, 64)]
# Every codec with its params, for the byte-count and upgrade tests.
SPECS = [
    ("f32", None),
    ("f16", None),
    ("bf16", None),
    ("int8", {}),
    ("int8", {"group": 16}),
    ("int4", {}),
    ("mwq", {}),
    ("mwq", {"bits": [5, 6, 7, 8]}),
    ("bitplane", {}),
    ("bitplane", {"bits": [6, 8]}),
    ("bitplane", {"bits": [1, 2, 3, 4, 5, 6, 7, 8]}),
]


def _encode(name, options, shape, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    codec = codec_by_name(name)
    params = codec.default_params(shape, **options) if options is not None else {}
    return codec, params, codec.encode(w, params)


@pytest.mark.parametrize("name,options,kind", CASES)
@pytest.mark.parametrize("shape", [(64, 128), (96, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(name, options, kind, shape, dtype):
    codec, params, segs = _encode(name, options, shape)
    x = torch.randn(5, shape[1], dtype=dtype)
    for level in range(1, len(segs) + 1):
        fused = kernel_for(codec.id).build(shape, params, segs[:level], dtype)
        assert isinstance(fused, kind), type(fused)
        ref = reference_linear(codec.id, shape, params, segs[:level], torch.float32)
        want = ref(x.float())
        got = fused(x).float()
        # bf16 carries int4 scales and zero points in 8 mantissa bits: ~1.5% of the output range
        tol = 4e-2 if dtype == torch.bfloat16 else 2e-5
        if getattr(fused, "fast", False):  # the Q8 kernel rounds activations to INT8 per 32
            tol = max(tol, 2e-2)
        assert torch.allclose(got, want, atol=tol * want.abs().max().item(), rtol=tol), (
            level,
            (got - want).abs().max(),
        )
        assert fused.nbytes > 0 and fused.out_features == shape[0] and fused.level == level


@pytest.mark.parametrize("name,options", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_nbytes_is_what_build_holds(name, options, shape, dtype, fused):
    codec, params, segs = _encode(name, options, shape)
    kernel = kernel_for(codec)
    for level in range(1, len(segs) + 1):
        built = kernel.build(shape, params, segs[:level], dtype, fused)
        assert kernel.nbytes(shape, params, level, dtype, fused) == built.nbytes, (level, built)


@pytest.mark.parametrize("name,options", [s for s in SPECS if codec_by_name(s[0]).nested])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_upgrade_in_place_equals_build_bit_for_bit(name, options, shape, dtype, fused):
    codec, params, segs = _encode(name, options, shape, seed=1)
    kernel, top = kernel_for(codec), len(segs)
    x = torch.randn(7, shape[1], dtype=dtype)
    for start in range(1, top):
        for stop in range(start + 1, top + 1):
            lin = kernel.build(shape, params, segs[:start], dtype, fused)
            same = kernel.upgrade(lin, shape, params, segs[start:stop], dtype)
            want = kernel.build(shape, params, segs[:stop], dtype, fused)
            assert same is lin and lin.level == stop and type(lin) is type(want)
            assert lin.nbytes == want.nbytes == kernel.nbytes(shape, params, stop, dtype, fused)
            assert torch.equal(lin(x), want(x)), (start, stop)


def test_upgrade_one_level_at_a_time_equals_build():
    codec, params, segs = _encode("mwq", {}, (64, 128))
    kernel, x = kernel_for(codec), torch.randn(3, 128, dtype=torch.bfloat16)
    lin = kernel.build((64, 128), params, segs[:1], torch.bfloat16)
    for k in range(1, len(segs)):
        kernel.upgrade(lin, (64, 128), params, segs[k : k + 1], torch.bfloat16)
    assert torch.equal(lin(x), kernel.build((64, 128), params, segs, torch.bfloat16)(x))


@pytest.mark.parametrize("name", ["int8", "int4", "f32", "bf16"])
def test_one_level_codecs_refuse_to_upgrade_naming_the_codec(name):
    codec, params, segs = _encode(name, {} if name.startswith("int") else None, (64, 128))
    kernel = kernel_for(codec)
    lin = kernel.build((64, 128), params, segs, torch.float32)
    with pytest.raises(NotUpgradable, match=name):
        kernel.upgrade(lin, (64, 128), params, segs, torch.float32)


def test_upgrade_refuses_levels_past_the_last_and_bad_sizes_without_changing_anything():
    codec, params, segs = _encode("bitplane", {}, (64, 128))
    kernel = kernel_for(codec)
    lin = kernel.build((64, 128), params, segs[:2], torch.float32)
    before = (lin.level, lin.nbytes, len(lin.parts))
    with pytest.raises(NotUpgradable, match="past the last level"):
        kernel.upgrade(lin, (64, 128), params, segs[1:], torch.float32)
    with pytest.raises(NotUpgradable, match="level 3 segment has"):
        kernel.upgrade(lin, (64, 128), params, [segs[2][:-1]], torch.float32)
    assert (lin.level, lin.nbytes, len(lin.parts)) == before
    top = kernel.build((64, 128), params, segs, torch.float32, fused=False)
    with pytest.raises(NotUpgradable):
        kernel.upgrade(top, (64, 128), params, segs[:1], torch.float32)


def test_every_codec_has_one_kernel_by_id_or_class():
    for cid, codec in registered().items():
        k = kernel_for(cid)
        assert k is kernel_for(codec) is kernel_for(CodecId(cid)) and k.codec is codec
    assert kernel_for(CodecId.F16) is not kernel_for(CodecId.BF16)
    with pytest.raises(UnknownCodec):
        kernel_for(99)


def test_a_linear_needs_a_2d_weight():
    codec, params, segs = _encode("f32", None, (8,))
    with pytest.raises(ValueError, match="2-D"):
        kernel_for(codec).build((8,), params, segs, torch.float32)
    with pytest.raises(ValueError, match="2-D"):
        kernel_for(codec).nbytes((8,), params, 1, torch.float32)


@pytest.mark.parametrize("experts", ["mwq:2,3,4", "bitplane:2,4,8"])
def test_upgrade_expert_equals_prepare_at_the_higher_level(tiny_emoe, experts):
    from edgemoe.moe.experts import expert_forward
    from edgemoe.prepare import prepare_expert, upgrade_expert
    from formats.reader import EmoeReader

    with EmoeReader(tiny_emoe("qwen2_moe", experts=experts)) as r:
        e = next(iter(r.experts.values()))
        chunks = [r.read_chunk(ci) for ci in e.levels]
        x = torch.randn(4, r.config["hidden_size"], dtype=torch.bfloat16)
        ew = prepare_expert(r, e, chunks[:1], torch.bfloat16)
        assert upgrade_expert(r, e, ew, chunks[1:], torch.bfloat16) is ew and ew.level == 3
        want = prepare_expert(r, e, chunks, torch.bfloat16)
        assert ew.nbytes == want.nbytes
        assert torch.equal(expert_forward(x, ew), expert_forward(x, want))
        with pytest.raises(NotUpgradable, match="past its last level"):
            upgrade_expert(r, e, ew, chunks[:1], torch.bfloat16)


def test_the_avx2_q8_kernel_matches_a_q8_reference_and_serves_int8_linears(tmp_path):
    """The AVX2 Q8 kernel builds where the CPU has AVX2 and FMA (cc, in a fresh cache folder),
    computes exactly ggml's Q8_0 arithmetic (activations rounded to INT8 per block of 32),
    serves Int8Linear for one token and a batch, and is off with EDGEMOE_INT8_KERNEL=0."""
    import os
    import subprocess
    import sys

    from edgemoe.fastkernels import _cpu_has

    if not _cpu_has("avx2", "fma"):
        pytest.skip("no AVX2/FMA on this CPU")
    code = """
import torch
from edgemoe import fastkernels
from edgemoe.kernels import Int8Linear
assert fastkernels.available(), "the kernel did not build"
assert fastkernels.library_path().exists()
import torch.nn.functional as F
g = torch.Generator().manual_seed(0)
paths = ["avx2"] + (["avx512vnni"] if fastkernels.isa(1) == "avx512vnni" else [])
for path in paths:
    assert fastkernels.isa(0 if path == "avx2" else 1) == path
    for N, K in ((1001, 256), (203, 224)):  # 1001 % 4: the row tail; 224 % 64: a masked step
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        s = torch.rand(N, generator=g) * 0.01
        x = torch.randn(5, K, generator=g) * 3
        x[0, :32] = 0  # an all-zero block
        x[1, 40] = 1e3  # an outlier
        xb = x.view(5, K // 32, 32)
        d = xb.abs().amax(-1, keepdim=True) / 127
        xq = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1)), 0)
        assert torch.equal(fastkernels.quantize(x)[0].view(5, K // 32, 32).float(), xq)
        ref = torch.einsum("tbj,nbj,tb->tn", xq, q.float().view(N, K // 32, 32), d[..., 0]) * s
        got = fastkernels.q8_linear(x, q, s)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-3), (path, (got - ref).abs().max())
        for dtype in (torch.float32, torch.bfloat16):
            lin = Int8Linear(q, s, dtype)
            assert lin.fast
            exact = x.to(dtype).float() @ (q.float() * s[:, None]).T
            for t in (1, 5):
                out = lin(x[:t].to(dtype)).float()
                err = (out - exact[:t]).norm() / exact[:t].norm()
                assert err < 0.02, err
    # one SwiGLU expert in one call equals its three Linears on the same kernel
    D, I = 96, 224
    lins = []
    for n, k in ((I, D), (I, D), (D, I)):
        lins.append(Int8Linear(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
                               torch.rand(n, generator=g) * 0.01, torch.float32))
    for t in (1, 3, 40):
        x = torch.randn(t, D, generator=g)
        three = lins[2](F.silu(lins[0](x)) * lins[1](x))
        one = fastkernels.q8_swiglu(x, *lins)
        assert torch.allclose(one, three, rtol=1e-4, atol=1e-4), (path, t, (one - three).abs().max())
        # in two calls (gate and up as they land, down after): the same bits
        two = fastkernels.q8_down(fastkernels.q8_gate_up(x, lins[0], lins[1]), lins[2])
        assert torch.equal(two, one), (path, t, (two - one).abs().max())
print("ok")
"""
    env = dict(os.environ, EDGEMOE_KERNEL_DIR=str(tmp_path / "k"))
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]
    off = subprocess.run(
        [sys.executable, "-c", "from edgemoe import fastkernels; print(fastkernels.available())"],
        capture_output=True, text=True, timeout=300, env=dict(env, EDGEMOE_INT8_KERNEL="0"),
    )  # fmt: skip
    assert off.stdout.strip() == "False"


@pytest.mark.skipif(not fastkernels.mwq_available(), reason="no AVX2/F16C or no C compiler")
@pytest.mark.parametrize("path", ["avx2", "avx512vnni"])
def test_mwq_is_computed_as_stored(path):
    """An mwq weight holds exactly its stored level segments (no int4 repack, a level costs
    its own bits) and computes each level as the reference decode does, up to the
    activations' INT8 rounding, on each SIMD path; truncate frees the top levels' bytes."""
    if fastkernels.isa(0 if path == "avx2" else 1) != path:
        pytest.skip(f"this CPU has no {path}")
    try:
        # rows in blocks of 4 (decode) with a tail of 2 rows per thread, groups of 1 and 2
        # 64-weight steps, up to 4 levels
        for shape, group, bits in (((128, 256), 64, [2, 3, 4]), ((124, 512), 128, [3, 4, 5, 6])):
            codec, params, segs = _encode("mwq", {"bits": bits, "group": group}, shape)
            lin = kernel_for(codec).build(shape, params, segs, torch.float32)
            assert type(lin) is MwqLinear and lin.nbytes == sum(len(s) for s in segs)
            for level in range(1, len(bits) + 1):
                for t in (1, 3, 9):  # decode (rows 4 at a time), or rows unpacked
                    xt = torch.randn(t, shape[1])
                    want = reference_linear(codec.id, shape, params, segs[:level])(xt)
                    got = lin.at(level)(xt)
                    assert ((got - want).norm() / want.norm()).item() < 0.02, (shape, level, t)
        assert lin.truncate(1) and lin.nbytes == len(segs[0]) and lin.level == 1
    finally:
        fastkernels.isa(1)


@pytest.mark.skipif(not fastkernels.mwq_available(), reason="no AVX2/F16C or no C compiler")
@pytest.mark.parametrize("path", ["avx2", "avx512vnni"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mwq_experts_in_one_call_equal_expert_by_expert(path, dtype):
    """A token's mwq experts, each at its own level, in one kernel call (mwq_moe1) give what
    expert_forward gives expert by expert, weighted and summed."""
    from edgemoe.moe.experts import ExpertWeights, expert_forward

    if fastkernels.isa(0 if path == "avx2" else 1) != path:
        pytest.skip(f"this CPU has no {path}")
    try:
        D, W = 256, 384  # gate/up groups of 128 over D, down groups of 128 over the width W
        experts, levels = [], [3, 1, 2]
        for e, level in enumerate(levels):
            lins = []
            for j, shape in enumerate(((W, D), (W, D), (D, W))):
                params = {"bits": [2, 3, 4], "group": 128}
                codec, params, segs = _encode("mwq", params, shape, seed=3 * e + j)
                lins.append(kernel_for(codec).build(shape, params, segs[:level], dtype))
            experts.append(tuple(lins))
        assert fastkernels.mwq_fusable(experts)
        coef = [0.5, 0.3, 0.2]
        x = torch.randn(1, D).to(dtype)
        want = torch.zeros(1, D)
        for (g, u, d), c in zip(experts, coef):
            want += c * expert_forward(x, ExpertWeights(g, u, d)).float()
        got = torch.zeros(D)
        fastkernels.mwq_experts(x[0], experts, coef, got)
        err = ((got - want[0]).norm() / want.norm()).item()
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), err
    finally:
        fastkernels.isa(1)


@pytest.mark.skipif(not fastkernels.mwq_available(), reason="no AVX2/F16C or no C compiler")
def test_mwq_borrows_its_stored_bytes():
    """Built with borrow=True an mwq weight computes on the caller's bytes in place: it
    counts none of them (the lender does), and a level appended later counts its own."""
    shape = (128, 256)
    codec, params, segs = _encode("mwq", {"bits": [2, 3, 4], "group": 64}, shape)
    k = kernel_for(codec)
    assert k.can_borrow(shape, params)
    for level in (1, 2):
        assert k.borrowed_bytes(shape, params, level) == k.nbytes(shape, params, level)
    slab = bytearray(segs[0] + segs[1])
    views = [memoryview(slab)[: len(segs[0])], memoryview(slab)[len(segs[0]) :]]
    lin = k.build(shape, params, views, torch.float32, borrow=True)
    assert type(lin) is MwqLinear and lin.nbytes == 0
    x = torch.randn(2, shape[1])
    want = reference_linear(codec.id, shape, params, segs[:2])(x)
    assert ((lin(x) - want).norm() / want.norm()).item() < 0.02
    k.upgrade(lin, shape, params, [segs[2]], torch.float32)
    assert lin.level == 3 and lin.nbytes == len(segs[2])


PLACE_PROBE = """
import ctypes, json, os, torch
from edgemoe import fastkernels
from edgemoe.kernels import Int8Linear
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
def lin(n, k):
    return Int8Linear(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
                      torch.rand(n, generator=g) / 100, torch.float32)
gate, up, down = lin(256, 128), lin(256, 128), lin(128, 256)
getcpu = ctypes.CDLL(None).sched_getcpu
before = set(os.listdir("/proc/self/task"))
fastkernels.q8_swiglu(torch.randn(1, 128), gate, up, down)
new = sorted(set(os.listdir("/proc/self/task")) - before)
allowed = sorted(os.sched_getaffinity(0))
for _ in range(50):  # the caller may move between the call and getcpu: until they agree
    fastkernels.q8_swiglu(torch.randn(1, 128), gate, up, down)
    cpu = getcpu()
    masks = [sorted(os.sched_getaffinity(int(t))) for t in new]
    if masks == [[c for c in allowed if c != cpu]]:
        break
print(json.dumps([allowed, cpu, masks]))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_kernel_team_wakes_off_the_callers_cpu_unless_told_not_to():
    """The team's worker may run on every CPU the process may use but the one its caller
    ran the last job on; the caller keeps its own mask; EDGEMOE_TEAM_PLACE=0 leaves both."""
    import json
    import subprocess
    import sys

    if not fastkernels.available():
        pytest.skip("no AVX2 INT8 kernel")
    got = {}
    for place in ("1", "0"):
        env = dict(os.environ, EDGEMOE_TEAM_PLACE=place)
        p = subprocess.run([sys.executable, "-c", PLACE_PROBE], capture_output=True, text=True,
                           env=env, timeout=300)  # fmt: skip
        assert p.returncode == 0, p.stderr
        got[place] = json.loads(p.stdout.strip().splitlines()[-1])
    allowed, cpu, masks = got["1"]
    assert len(masks) == 1, masks  # one worker for two threads
    assert masks[0] == [c for c in allowed if c != cpu] and cpu in allowed
    allowed, cpu, masks = got["0"]
    assert masks == [allowed]
