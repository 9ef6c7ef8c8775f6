"""Kernels torch lacks for this CPU class: compiled once with the system C compiler, cached.

`q8_linear` (csrc/q8.c): INT8 weights times INT8-quantized activations on AVX2,
ggml's Q8_0 dot product (activations in blocks of 32 with an f32 scale each,
as llama.cpp's Q8_0 matmul quantizes them; 32 products per maddubs). torch's
`_weight_int8pack_mm` widens to float and is 1.3-1.6x slower here for one
token (tools/kernel_table.py). Plain C, no torch headers: `cc` builds it in
about a second with a few tens of MB, so building on first use inside a run's
budget is safe; `edgemoe bench` builds it before its capped runs.

On by default where the CPU has AVX2 and FMA and a C compiler exists;
EDGEMOE_INT8_KERNEL=0 turns it off (torch's kernel, exact int8 x bf16), and
any failure to build falls back to torch's kernel with one line on stderr.
The library lands in $EDGEMOE_KERNEL_DIR (default ~/.cache/edgemoe/kernels),
named by the source's hash and written by an atomic rename: concurrent first
runs never see a half-written file and never wait on a lock.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

QK = 32  # activation block: one f32 scale per 32 INT8 values
_SRC = Path(__file__).parent / "csrc" / "q8.c"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-pthread", "-shared", "-fPIC", "-lm"]

_lock = threading.Lock()
_lib: list = []  # [] not tried yet; [None] unavailable; [CDLL] loaded


@functools.cache
def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return all(f in have for f in flags)
    return False


def kernel_dir() -> Path:
    return Path(os.environ.get("EDGEMOE_KERNEL_DIR", Path.home() / ".cache/edgemoe/kernels"))


def library_path() -> Path:
    """Where the compiled library for this source and these flags lives."""
    h = hashlib.sha256(_SRC.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    return kernel_dir() / f"q8-{h}.so"


def build() -> Path:
    """Compile csrc/q8.c if its library is not built yet; the library's path.

    Raises RuntimeError naming the compiler's complaint when it fails."""
    out = library_path()
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH; install gcc or set CC")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        p = subprocess.run(
            [cc, *_FLAGS, "-o", tmp, str(_SRC)], capture_output=True, text=True, timeout=300
        )
        if p.returncode != 0:
            raise RuntimeError(f"{cc} failed: {p.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load():
    if os.environ.get("EDGEMOE_INT8_KERNEL", "auto") == "0" or not _cpu_has("avx2", "fma"):
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"edgemoe: the AVX2 INT8 kernel is unavailable ({e}); using torch's", file=sys.stderr)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.q8_quantize.argtypes = [p, i64, i64, p, p]
    lib.q8_quantize.restype = None
    lib.q8_gemm.argtypes = [p, p, i64, i64, p, p, i64, p, ctypes.c_int]
    lib.q8_gemm.restype = ctypes.c_int
    lib.q8_swiglu.argtypes = [p, i64, i64, i64, p, p, p, p, p, p, p, ctypes.c_int]
    lib.q8_swiglu.restype = ctypes.c_int
    lib.q8_gateup.argtypes = [p, i64, i64, i64, p, p, p, p, p, ctypes.c_int]
    lib.q8_gateup.restype = ctypes.c_int
    lib.q8_down.argtypes = [p, i64, i64, i64, p, p, p, ctypes.c_int]
    lib.q8_down.restype = ctypes.c_int
    lib.q8_isa.argtypes = [ctypes.c_int]
    lib.q8_isa.restype = ctypes.c_int
    lib.mwq_gemm.argtypes = [
        p,
        i64,
        i64,
        p,
        ctypes.c_int,
        ctypes.c_int,
        p,
        i64,
        i64,
        p,
        ctypes.c_int,
    ]
    lib.mwq_gemm.restype = ctypes.c_int
    lib.layer1_attn.argtypes = [*[p] * 10, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.layer1_attn.restype = ctypes.c_int
    lib.q8_moe1.argtypes = [p, i64, i64, ctypes.c_int, p, p, p, p, p, p, p, ctypes.c_int, p,
                            ctypes.c_int]  # fmt: skip
    lib.q8_moe1.restype = ctypes.c_int
    lib.decode_chain.argtypes = [p, ctypes.c_int, *[p] * 7, i64, i64, ctypes.c_int, ctypes.c_int, p]
    lib.decode_chain.restype = ctypes.c_int
    lib.mwq_moe1.argtypes = [p, i64, i64, ctypes.c_int, p, p, ctypes.c_int, p, ctypes.c_int]
    lib.mwq_moe1.restype = ctypes.c_int
    return lib


def library():
    """The loaded kernel library, or None where it is off or unavailable."""
    with _lock:
        if not _lib:
            _lib.append(_load())
        return _lib[0]


def available() -> bool:
    return library() is not None


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f32 [T, K] (K a multiple of 32) -> (int8 [T, K], f32 scales [T, K // 32])."""
    return _quantize(library(), x.float().contiguous())


def _quantize(lib, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t, k = x.shape
    xq = torch.empty(t, k, dtype=torch.int8)
    xs = torch.empty(t, k // QK, dtype=torch.float32)
    lib.q8_quantize(x.data_ptr(), t, k, xq.data_ptr(), xs.data_ptr())
    return xq, xs


def isa(want: int = -1) -> str:
    """The SIMD path the kernels take: "avx512vnni" or "avx2". want=0 forces AVX2 (tests
    compare the two), 1 restores the best this CPU has, -1 only asks."""
    return "avx512vnni" if library().q8_isa(want) == 1 else "avx2"


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("the kernel could not allocate its scratch memory")


def mwq_available() -> bool:
    """Whether mwq weights can be computed as stored (mwq_linear): the kernel library is
    there (AVX2 and F16C at least; AVX-512 VNNI where the CPU has it)."""
    return available() and _cpu_has("f16c")


def _mwq_ptrs(parts, b1: int, n: int, k: int, group: int) -> tuple[list[int], list[int]]:
    """The plane and scale addresses of an mwq weight [n, k] at level len(parts), as the
    kernels take them (see mwq_linear)."""
    plane, groups = n * k // 8, k // group
    planes = [parts[0][0].data_ptr() + i * plane for i in range(b1)]
    planes += [p.data_ptr() for p, _ in parts[1:]]
    scales = [parts[0][1].data_ptr(), parts[0][1].data_ptr() + 2 * n * groups]
    scales += [sz.data_ptr() for _, sz in parts[1:]]
    return planes, scales


def mwq_linear(x: torch.Tensor, parts, b1: int, group: int, n: int) -> torch.Tensor:
    """x [T, K] (any float dtype) times an mwq weight [n, K] at level len(parts), as the file
    stores it (formats/codecs/mwq.py): parts[0] = (the b1 code planes, uint8; s1 then z1, f16
    bits as int16), parts[l] = (sign plane l + 1, its scales). f32 [T, n]. Needs
    mwq_available(), K % 64 == 0 and group % 64 == 0; AVX-512 VNNI where the CPU has it."""
    lib = _lib[0] if _lib else library()
    x = x.float().contiguous()
    t, k = x.shape
    planes, scales = _mwq_ptrs(parts, b1, n, k, group)
    pp = (ctypes.c_void_p * len(planes))(*planes)
    sp = (ctypes.c_void_p * len(scales))(*scales)
    y = torch.empty(t, n, dtype=torch.float32)
    _check(
        lib.mwq_gemm(
            x.data_ptr(), t, k, pp, b1, len(planes), sp, n, group, y.data_ptr(),
            torch.get_num_threads(),
        )
    )  # fmt: skip
    return y


MWQ_MAXP = 16  # planes per weight the fused call takes (q8.c's MWQ_MAXP)


class _MwqW(ctypes.Structure):
    _fields_ = [
        ("planes", ctypes.c_void_p * MWQ_MAXP),
        ("scales", ctypes.c_void_p * (MWQ_MAXP + 2)),
        ("b1", ctypes.c_int),
        ("nplanes", ctypes.c_int),
        ("group", ctypes.c_int64),
    ]


def mwq_fusable(experts) -> bool:
    """Whether mwq_experts takes these (gate, up, down) MwqLinear triples: one width, the
    gate and up weights of one group size, the down weights of another, few enough planes."""
    g0, d0 = experts[0][0], experts[0][2]
    return all(
        e[0].group == e[1].group == g0.group
        and e[2].group == d0.group
        and e[0].in_features == g0.in_features
        and e[0].out_features == e[1].out_features == g0.out_features
        and all(w.b1 + len(w.parts) - 1 <= MWQ_MAXP for w in e)
        for e in experts
    )


def mwq_experts(x: torch.Tensor, experts, coef: list[float], out: torch.Tensor) -> None:
    """out [D] (f32, contiguous) += sum_e coef[e] * expert_e(x) for one token x [D], every
    expert a (gate, up, down) of MwqLinear each at its own level (mwq_fusable), in one kernel
    call (mwq_moe1), as q8_experts does for INT8 experts. Each expert's output is rounded to
    bfloat16 first when its Linears compute in it."""
    lib = _lib[0] if _lib else library()
    x = x.float().contiguous()
    ws = (_MwqW * (3 * len(experts)))()
    for i, lin in enumerate(w for e in experts for w in e):
        planes, scales = _mwq_ptrs(lin.parts, lin.b1, lin.out_features, lin.in_features, lin.group)
        ws[i].planes[: len(planes)] = planes
        ws[i].scales[: len(scales)] = scales
        ws[i].b1, ws[i].nplanes, ws[i].group = lin.b1, len(planes), lin.group
    gate = experts[0][0]
    c = (ctypes.c_float * len(experts))(*coef)
    rnd = int(experts[0][2].dtype == torch.bfloat16)
    _check(
        lib.mwq_moe1(
            x.data_ptr(), gate.in_features, gate.out_features, len(experts), ws, c, rnd,
            out.data_ptr(), torch.get_num_threads(),
        )
    )  # fmt: skip


def q8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] (any float dtype) times INT8 weights q [N, K] with f32 row scales [N]:
    f32 [T, N]. Needs `available()` and K % 32 == 0; q and scale contiguous."""
    lib = _lib[0] if _lib else library()
    xq, xs = _quantize(lib, x.float().contiguous())
    t, k = xq.shape
    n = q.shape[0]
    y = torch.empty(t, n, dtype=torch.float32)
    _check(
        lib.q8_gemm(
            xq.data_ptr(), xs.data_ptr(), t, k, q.data_ptr(), scale.data_ptr(), n, y.data_ptr(),
            torch.get_num_threads(),
        )
    )  # fmt: skip
    return y


def q8_swiglu(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """One SwiGLU expert, down(silu(gate(x)) * up(x)), in one kernel call: x [T, D] (any
    float dtype), gate and up Int8Linear [I, D], down [D, I] (codes q, f32 row scales):
    f32 [T, D]. Needs `available()` and D, I multiples of 32."""
    lib = _lib[0] if _lib else library()
    x = x.float().contiguous()
    t, d = x.shape
    y = torch.empty(t, d, dtype=torch.float32)
    _check(
        lib.q8_swiglu(
            x.data_ptr(), t, d, gate.out_features, gate.q.data_ptr(), gate.scales.data_ptr(),
            up.q.data_ptr(), up.scales.data_ptr(), down.q.data_ptr(), down.scales.data_ptr(),
            y.data_ptr(), torch.get_num_threads(),
        )
    )  # fmt: skip
    return y


def q8_gate_up(x: torch.Tensor, gate, up) -> torch.Tensor:
    """q8_swiglu's first half: h = silu(gate(x)) * up(x), f32 [T, I], for an expert whose down
    rows have not landed yet; q8_down(h, down) then gives q8_swiglu's result bit for bit."""
    lib = _lib[0] if _lib else library()
    x = x.float().contiguous()
    t, d = x.shape
    i = gate.out_features
    h = torch.empty(t, i, dtype=torch.float32)
    _check(
        lib.q8_gateup(
            x.data_ptr(), t, d, i, gate.q.data_ptr(), gate.scales.data_ptr(), up.q.data_ptr(),
            up.scales.data_ptr(), h.data_ptr(), torch.get_num_threads(),
        )
    )  # fmt: skip
    return h


def q8_down(h: torch.Tensor, down) -> torch.Tensor:
    """q8_swiglu's second half: down(h), f32 [T, D], from q8_gate_up's h."""
    lib = _lib[0] if _lib else library()
    t, i = h.shape
    d = down.out_features
    y = torch.empty(t, d, dtype=torch.float32)
    _check(
        lib.q8_down(
            h.data_ptr(), t, d, i, down.q.data_ptr(), down.scales.data_ptr(), y.data_ptr(),
            torch.get_num_threads(),
        )
    )  # fmt: skip
    return y


def q8_experts(x: torch.Tensor, experts, coef: list[float], out: torch.Tensor) -> None:
    """out [D] (f32, contiguous) += sum_e coef[e] * expert_e(x) for one token x [D]: every
    expert a (gate, up, down) of Int8Linear on the Q8 kernel with one width, all in one kernel
    call (q8_moe1). Each expert's output is rounded to bfloat16 first when its Linears compute
    in it, as expert_forward's output is."""
    lib = _lib[0] if _lib else library()
    x = x.float().contiguous()
    n = len(experts)
    arr = ctypes.c_void_p * n
    gate = [e[0] for e in experts]
    ptrs = [
        arr(*[getattr(e[j], f).data_ptr() for e in experts])
        for j in range(3)
        for f in ("q", "scales")
    ]
    c = (ctypes.c_float * n)(*coef)
    rnd = int(experts[0][2].dtype == torch.bfloat16)
    _check(
        lib.q8_moe1(
            x.data_ptr(), gate[0].in_features, gate[0].out_features, n, *ptrs, c, rnd,
            out.data_ptr(), torch.get_num_threads(),
        )
    )  # fmt: skip
