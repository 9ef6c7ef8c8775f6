"""Write a random-weight Mixtral-shaped Hugging Face checkpoint of any size.

No transformers needed: config.json, bf16 safetensors shards and the shard
index are written directly, one tensor at a time, so the tool can make a
checkpoint larger than this machine's memory. Used to prove that conversion
streams (tests/formats/test_convert_memory.py) and for benchmarks.

    python tools/make_checkpoint.py OUT_DIR --hidden 1024 --intermediate 2048 \\
        --layers 8 --experts 8 --shard-mb 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgemoe.bench.models import tensor_shapes  # every tensor of a Mixtral checkpoint


def mixtral_config(
    hidden: int, intermediate: int, layers: int, experts: int, vocab: int, top_k: int = 2
) -> dict:
    heads = max(1, hidden // 128)
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "head_dim": hidden // heads,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def write_checkpoint(out: Path, cfg: dict, shard_bytes: int, seed: int = 0) -> int:
    """Write shards of at most shard_bytes; returns the total tensor bytes."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(cfg)
    groups, cur, size = [], [], 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    groups.append(cur)
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                arr = np.ones(shape, np.float32)
            else:
                arr = rng.standard_normal(shape, dtype=np.float32) * 0.02
            tensors[name] = torch.from_numpy(arr).to(torch.bfloat16)
            weight_map[name] = fname
            total += arr.size * 2
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = mixtral_config(a.hidden, a.intermediate, a.layers, a.experts, a.vocab)
    total = write_checkpoint(a.out, cfg, a.shard_mb << 20, a.seed)
    print(f"wrote {a.out}: {total / 2**20:.0f} MiB of bf16 tensors")


if __name__ == "__main__":
    main()
