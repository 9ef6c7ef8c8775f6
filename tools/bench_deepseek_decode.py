"""Decode speed and KV-cache size of a DeepSeek-V2-shaped model (scaled down: hidden 1024, 16
heads, kv_lora_rank 256, 4 layers) in bf16 with every expert resident, at two context lengths.
Give it a checkout to compare revisions (e.g. a `git worktree` of an older commit):

    python tools/bench_deepseek_decode.py [REPO]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402
from factories import make_tiny_hf  # noqa: E402

from formats.convert import ConvertOptions, convert, open_source  # noqa: E402
from tests.models.harness import load_ours  # noqa: E402

SHAPE = dict(
    hidden_size=1024,
    num_attention_heads=16,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    num_hidden_layers=4,
    moe_intermediate_size=256,
    intermediate_size=1024,
    max_position_embeddings=2048,
    vocab_size=1024,
)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="edgemoe-ds-"))
    hf = make_tiny_hf("deepseek_v2", work / "hf", **SHAPE)
    with open_source(hf) as src:
        convert(src, work / "m.emoe", ConvertOptions(dense="bf16", experts="bf16", progress=False))
    m = load_ours(work / "m.emoe", torch.bfloat16)
    for ctx in (128, 1024):
        cache = m.new_cache(1, ctx + 40)
        with torch.inference_mode():
            m.forward(torch.randint(3, 1000, (1, ctx)), cache)
            times = []
            for _ in range(32):
                t0 = time.perf_counter()
                m.forward(torch.randint(3, 1000, (1, 1)), cache)
                times.append(time.perf_counter() - t0)
        kv = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
        print(
            f"ctx {ctx}: decode {1 / statistics.median(times):.1f} tok/s (median of 32), "
            f"KV cache {kv / 2**20:.1f} MiB"
        )


if __name__ == "__main__":
    main()
