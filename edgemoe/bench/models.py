"""The bench models: seeded random-weight Mixtral-shaped Hugging Face checkpoints.

Written one tensor at a time (bf16 safetensors shards and their index), with a
byte-level BPE tokenizer trained on the system's licence texts, so that both
llama.cpp's converter and `edgemoe convert` accept the folder. Random weights
route without locality: a lower bound on what an expert cache can do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The tokenizer's specials; ids 0, 1, 2.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
# llama.cpp's name for the pre-tokenizer above (tokenizer.ggml.pre): byte-level GPT-2.
LLAMACPP_PRE = "gpt-2"


@dataclass(frozen=True)
class BenchShape:
    """A Mixtral-shaped model; `params` counts every weight."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    experts: int
    top_k: int
    vocab: int
    about: str

    def config(self) -> dict:
        heads = max(1, self.hidden // 128)
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 4),
            "head_dim": self.hidden // heads,
            "num_local_experts": self.experts,
            "num_experts_per_tok": self.top_k,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e6,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }

    @property
    def params(self) -> int:
        return sum(int(np.prod(s)) for _, s in tensor_shapes(self.config()))


SHAPES = {
    s.name: s
    for s in (
        # The reference measurement: 2.35 B parameters, Q8_0 GGUF 2381 MiB.
        BenchShape("mixtral-2b", 2048, 5632, 8, 8, 2, 8192, "Mixtral-shaped, 8 experts top-2"),
        # Same expert bytes cut 8x finer: 64 experts top-8, where caching and prefetch matter.
        BenchShape("mixtral-2b-fg", 2048, 704, 8, 64, 8, 8192, "fine-grained, 64 experts top-8"),
        # The demo's routing shape (16 experts top-2, 4 MoE layers) at the bench's size: its
        # recorded routing replays onto this one (`edgemoe bench --replay DEMO.emoe`).
        BenchShape(
            "mixtral-2b-r16", 2048, 5632, 4, 16, 2, 8192, "the demo's 16 experts top-2, 4 layers"
        ),
        # Small enough for a quick check of the whole pipeline (about 40 MiB at int8).
        BenchShape("mixtral-tiny", 256, 512, 4, 8, 2, 1024, "a pipeline check, 8 experts top-2"),
    )
}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Mixtral checkpoint, in file order."""
    d, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, h, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, d))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.input_layernorm.weight", (d,)),
            (f"{p}.post_attention_layernorm.weight", (d,)),
            (f"{p}.self_attn.q_proj.weight", (h * hd, d)),
            (f"{p}.self_attn.k_proj.weight", (kv * hd, d)),
            (f"{p}.self_attn.v_proj.weight", (kv * hd, d)),
            (f"{p}.self_attn.o_proj.weight", (d, h * hd)),
            (f"{p}.block_sparse_moe.gate.weight", (cfg["num_local_experts"], d)),
        ]
        for e in range(cfg["num_local_experts"]):
            q = f"{p}.block_sparse_moe.experts.{e}"
            out += [
                (f"{q}.w1.weight", (i, d)),
                (f"{q}.w3.weight", (i, d)),
                (f"{q}.w2.weight", (d, i)),
            ]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    return out


def _corpus(limit_chars: int = 3_000_000) -> list[str]:
    """Lines of English from the system's licence texts and docs (no network)."""
    lines: list[str] = []
    size = 0
    for folder in (Path("/usr/share/common-licenses"), Path("/usr/share/doc")):
        if not folder.is_dir():
            continue
        for path in sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix in ("", ".txt")
        ):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for ln in text.splitlines():
                if len(ln.strip()) > 20:
                    lines.append(ln.strip())
                    size += len(ln)
            if size >= limit_chars:
                return lines
    # A bare machine: enough distinct words for the merges (numbers spelt out in bases).
    lines += [
        " ".join(np.base_repr(k * 7919 + j, 36).lower() for j in range(12)) for k in range(60000)
    ]
    return lines


def write_tokenizer(out: Path, vocab: int) -> None:
    """Train a byte-level BPE of exactly `vocab` tokens into out/ (tokenizer.json + config)."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab:
        raise ValueError(f"the tokenizer trained to {tok.get_vocab_size()} tokens, wanted {vocab}")
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[2],
        "pad_token": SPECIALS[0],
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def make_model(shape: BenchShape | str, out: Path, *, seed: int = 0, shard_mib: int = 512) -> Path:
    """Write the checkpoint folder `out` (skipped when a complete one is there).

    Args:
        shape: a BenchShape or a name from SHAPES.
        out: the folder to write.
        seed: numpy seed of the weights (normal, std 0.02; norms are ones).
        shard_mib: largest shard.
    Returns:
        out.
    Raises:
        ValueError: an unknown shape name.
    """
    import torch
    from safetensors.torch import save_file

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"no bench model {shape!r}; choose one of {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    out = Path(out)
    done = out / "bench_model.json"
    if done.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = shape.config()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(out, shape.vocab)
    rng = np.random.default_rng(seed)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in tensor_shapes(cfg):
        n = int(np.prod(shp)) * 2
        if groups[-1] and size + n > shard_mib << 20:
            groups.append([])
            size = 0
        groups[-1].append((name, shp))
        size += n
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shp in group:
            if len(shp) == 1:
                arr = np.ones(shp, np.float32)
            else:
                arr = rng.standard_normal(shp, dtype=np.float32)
                arr *= 0.02
            tensors[name] = torch.from_numpy(arr).to(torch.bfloat16)
            weight_map[name] = fname
            total += arr.size * 2
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    record = {"shape": shape.name, "about": shape.about, "seed": seed, "params": shape.params}
    done.write_text(json.dumps(record, indent=1))  # written last: marks the folder complete
    return out
