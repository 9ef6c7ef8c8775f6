"""Kernels torch lacks for this CPU class, compiled once on first use and cached.

`int8_gemv` (csrc/int8_gemv.cpp): INT8 weights times f32 activations for a few
tokens, AVX2 + FMA, OpenMP over rows: 1.65x torch's `_weight_int8pack_mm` for
one token here (one core). Opt-in with EDGEMOE_INT8_KERNEL=1 (and the `kernels`
extra, which brings ninja): the build takes 1-2 minutes and ~900 MB of compiler
memory, which must not happen unasked inside a run's memory budget. Where it
is off, the CPU lacks AVX2/FMA or the build fails, `int8_gemv()` is None and
callers use torch's kernel. The build lands in the torch extensions cache
($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

_lock = threading.Lock()
_loaded: dict[str, object] = {}


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


def _build():
    if os.environ.get("EDGEMOE_INT8_KERNEL") != "1" or not _cpu_has("avx2", "fma"):
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        src = Path(__file__).parent / "csrc" / "int8_gemv.cpp"
        built = Path(_get_build_directory("edgemoe_int8_gemv", False)) / "edgemoe_int8_gemv.so"
        if not built.exists():
            print("edgemoe: building the AVX2 INT8 kernel (once, about a minute)", file=sys.stderr)
        mod = load(
            name="edgemoe_int8_gemv",
            sources=[str(src)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
        return mod.int8_gemv
    except Exception as e:  # noqa: BLE001 - any build failure falls back to torch's kernel
        print(f"edgemoe: the AVX2 INT8 kernel did not build ({e}); using torch's", file=sys.stderr)
        return None


def int8_gemv():
    """The compiled int8_gemv(x f32 [T, K], q int8 [N, K], scale f32 [N]) -> f32 [T, N], or None."""
    with _lock:
        if "int8_gemv" not in _loaded:
            _loaded["int8_gemv"] = _build()
        return _loaded["int8_gemv"]
