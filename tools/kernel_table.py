"""Which CPU matmul computes one expert fastest here: a table for docs/BENCHMARKS.md.

    python tools/kernel_table.py [--rows 5632 --cols 2048] [--batches 1,8] [--runs 15]

For one expert-sized weight [rows, cols] and a batch of tokens, times every
path torch offers on this CPU, interleaved run by run (the box is shared:
medians, and each path's time relative to `_weight_int8pack_mm`, the one
edgemoe uses for INT8 experts):
- int8 weights, bf16 activations: `_weight_int8pack_mm` (per-row scales)
- int8 weights, f32 activations: the same kernel in float32
- int8 x int8: `torch._int_mm` after quantizing the activations per row
- int8 x int8: edgemoe's AVX2 Q8 kernel (edgemoe/fastkernels.py), the one Int8Linear uses
- int4 weights: `_weight_int4pack_mm_for_cpu` (group 64), bf16 activations
- dense bf16 and dense f32 weights: `F.linear`
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_doc import write_section  # noqa: E402

from edgemoe import fastkernels  # noqa: E402


def paths(rows: int, cols: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g) * 0.02
    x = torch.randn(batch, cols, generator=g)
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    out = {}
    xb, sb = x.bfloat16(), scale.bfloat16()
    out["int8 pack, bf16 act"] = lambda: torch.ops.aten._weight_int8pack_mm(xb, q, sb)
    out["int8 pack, f32 act"] = lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale)
    qt = q.t().contiguous()

    def int_mm():  # dynamic per-row activation quantization, int32 accumulate, rescale
        xs = x.abs().amax(dim=1, keepdim=True) / 127
        xq = torch.round(x / xs).to(torch.int8)
        pad = max(0, 17 - xq.shape[0])  # _int_mm wants more than 16 rows
        if pad:
            xq = torch.cat([xq, xq.new_zeros(pad, cols)])
        acc = torch._int_mm(xq, qt)[: x.shape[0]]
        return acc.float() * xs * scale

    out["int8 x int8 _int_mm"] = int_mm
    if fastkernels.available():  # edgemoe's: activations to INT8 per 32 (ggml's Q8_0 dot)
        path = "vpdpbusd" if fastkernels.isa() == "avx512vnni" else "AVX2 maddubs"
        out[f"edgemoe q8 ({path})"] = lambda: fastkernels.q8_linear(x, q, scale)
    group = 64
    wg = w.view(rows, cols // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s4 = ((hi - lo) / 15).clamp(min=1e-8)
    q4 = torch.round((wg - lo[..., None]) / s4[..., None]).clamp(0, 15).view(rows, cols)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32), 1)
    sz = torch.stack([s4, lo + 8 * s4], dim=-1).transpose(0, 1).contiguous().bfloat16()
    out["int4 pack (g64), bf16 act"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
        xb, packed, group, sz
    )
    wb = w.bfloat16()
    out["dense bf16"] = lambda: F.linear(xb, wb)
    out["dense f32"] = lambda: F.linear(x, w)
    return out


def measure(rows: int, cols: int, batch: int, runs: int) -> dict[str, float]:
    fns = paths(rows, cols, batch)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(runs):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def cpu() -> tuple[str, str]:
    name, flags = platform.processor(), ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and not name:
            name = line.split(":", 1)[1].strip()
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            flags = " ".join(
                f
                for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
                if f in have
            )
            break
    return name, flags


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=5632)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    res = {b: measure(a.rows, a.cols, b, a.runs) for b in batches}
    name, flags = cpu()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    base = "int8 pack, bf16 act"
    lines = [
        f"`python tools/kernel_table.py {' '.join(sys.argv[1:])}` on {name} ({flags}), {a.threads} "
        f"threads, torch {torch.__version__}, {when}. One [{a.rows}, {a.cols}] weight; medians of "
        f"{a.runs} interleaved runs, ms (x = relative to `_weight_int8pack_mm` with bf16 activations). "
        "The same weight every run: it stays in the CPU's caches where they hold it (an 11 MiB "
        "INT8 matrix), so these rank the kernels' arithmetic; decode streams every expert from "
        "memory (see the bench's share of its bound).",
        "",
        "| path | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for k in res[batches[0]]:
        cells = [f"{res[b][k]:.2f} ms ({res[b][k] / res[b][base]:.2f}x)" for b in batches]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    write_section("kernel-table", ["### Expert matmul kernels on this CPU", "", *lines])


if __name__ == "__main__":
    main()
