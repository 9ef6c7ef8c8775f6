"""edgemoe against transformers' own generate, same weights, same precision, every expert cached.

Builds a seeded random-weight model of one family with transformers, converts
it to .emoe at the same precision, then alternates runs of both engines:
prefill (a prompt of --prompt-len tokens) and decode (--new tokens, greedy).
Reports medians over --runs and the ratio edgemoe / transformers, and
appends the table to docs/BENCHMARKS.md with the command, machine and date.

    python tools/bench_transformers.py --family qwen3_moe --dtype bf16 --runs 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SHAPES = {  # a small but real-proportioned MoE: 32 experts, top-4, 8 layers
    "qwen3_moe": dict(
        vocab_size=8192,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1536,
        moe_intermediate_size=384,
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=True,
    ),
    "mixtral": dict(
        vocab_size=8192,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=768,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--family", default="qwen3_moe", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=("f32", "bf16"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import transformers
    from factories import make_tiny_hf

    import edgemoe
    from formats.convert import ConvertOptions, convert, open_source

    tdtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
    work = Path(tempfile.mkdtemp(prefix="edgemoe-bench-"))
    hf_dir = make_tiny_hf(a.family, work / "hf", seed=0, dtype="float32", **SHAPES[a.family])
    emoe = work / "m.emoe"
    with open_source(hf_dir) as src:
        convert(src, emoe, ConvertOptions(dense=a.dtype, experts=a.dtype, progress=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=tdtype).eval()
    ours = edgemoe.load(emoe, ctx=a.prompt_len + a.new + 8, dtype=a.dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, SHAPES[a.family]["vocab_size"], (1, a.prompt_len), generator=g)

    from tests.models.harness import greedy_ours  # batched greedy over edgemoe's model

    def hf_prefill():
        with torch.inference_mode():
            t = time.perf_counter()
            hf(prompt, use_cache=True)
            return time.perf_counter() - t

    def hf_generate():
        with torch.inference_mode():
            t = time.perf_counter()
            out = hf.generate(
                prompt, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0
            )
            return time.perf_counter() - t, out[0, a.prompt_len :].tolist()

    def our_prefill():
        with torch.inference_mode():
            t = time.perf_counter()
            m = ours.model
            m.logits(m.forward(prompt, m.new_cache(1, a.prompt_len))[:, -1])
            return time.perf_counter() - t

    def our_generate():
        with torch.inference_mode():
            t = time.perf_counter()
            toks, _ = greedy_ours(ours.model, [prompt[0].tolist()], a.new)
            return time.perf_counter() - t, toks[0]

    engines = {"transformers": (hf_prefill, hf_generate), "edgemoe": (our_prefill, our_generate)}
    rows = {n: {"prefill": [], "decode": []} for n in engines}
    tokens = {}
    for prefill, gen in engines.values():  # warm-up
        prefill(), gen()
    for _ in range(a.runs):
        for name, (prefill, gen) in engines.items():
            tp = prefill()
            tg, tokens[name] = gen()
            rows[name]["prefill"].append(a.prompt_len / tp)
            rows[name]["decode"].append((a.new - 1) / max(1e-9, tg - tp))
    agree, ref = tokens["edgemoe"], tokens["transformers"]
    same = sum(x == y for x, y in zip(agree, ref)) / len(ref)
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rows.items()}
    ratio = {k: med["edgemoe"][k] / med["transformers"][k] for k in ("prefill", "decode")}
    cmd = "python tools/bench_transformers.py " + " ".join(sys.argv[1:])
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    shape = SHAPES[a.family]
    table = [
        f"### edgemoe vs transformers generate: {a.family}, {a.dtype}, every expert cached",
        "",
        f"`{cmd}` on {cpu_name()}, {a.threads} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {when}. Model: {shape['num_hidden_layers']} layers, hidden "
        f"{shape['hidden_size']}, {shape.get('num_experts', shape.get('num_local_experts'))} experts top-"
        f"{shape['num_experts_per_tok']}, random weights; prompt {a.prompt_len} tokens, {a.new} new, "
        f"greedy; medians of {a.runs} alternating runs. Greedy tokens agreeing: {100 * same:.0f}%.",
        "",
        "| engine | prefill tok/s | decode tok/s |",
        "|---|---|---|",
        f"| transformers | {med['transformers']['prefill']:.1f} | {med['transformers']['decode']:.2f} |",
        f"| edgemoe | {med['edgemoe']['prefill']:.1f} | {med['edgemoe']['decode']:.2f} |",
        f"| ratio edgemoe / transformers | {ratio['prefill']:.2f}x | {ratio['decode']:.2f}x |",
        "",
    ]
    text = "\n".join(table)
    print(text)
    print(json.dumps({"median": med, "ratio": ratio, "agree": same}))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if not a.out.exists():
        a.out.write_text(
            "# Benchmarks\n\nTables are appended by the scripts that make them; each names its command, "
            "machine and date.\n\n"
        )
    with open(a.out, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
