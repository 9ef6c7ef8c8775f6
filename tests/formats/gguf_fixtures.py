"""Write GGUF files from tiny HF model folders the way llama.cpp lays them out.

Not a test module: test_convert_gguf.py imports it. write_gguf_like_llamacpp
follows llama.cpp's convert_hf_to_gguf.py (conversion/{llama,qwen,olmo,
deepseek,base}.py in the llama.cpp tree vendored by llama-cpp-python 0.3.36):
the metadata keys it writes per architecture, gguf-py's tensor names,
experts stacked into [E, out, in], Mixtral's q/k rotary row permutation, and
DeepSeek's kv_b_proj split into a transposed attn_k_b and attn_v_b. It is a
re-statement of that layout written for these tests, not llama.cpp's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import tokenizers
from safetensors.numpy import load_file

ARCHS = {
    "mixtral": gguf.MODEL_ARCH.LLAMA,
    "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
    "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
    "olmoe": gguf.MODEL_ARCH.OLMOE,
    "deepseek_v2": gguf.MODEL_ARCH.DEEPSEEK2,
    "deepseek_v3": gguf.MODEL_ARCH.DEEPSEEK2,
}
QT = gguf.GGMLQuantizationType
FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

# Pre-tokenizers as the models' own tokenizer.json files write them; the
# name is what llama.cpp stores in tokenizer.ggml.pre for that tokenizer.
_LLAMA3 = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}"
    "\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2 = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}"
    "\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_DEEPSEEK_V3 = [
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]
PRE_SPLITS = {"gpt-2": None, "llama-bpe": [_LLAMA3], "qwen2": [_QWEN2], "deepseek-v3": _DEEPSEEK_V3}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog, 12345 times in 2024. "
    "Permission is hereby granted, free of charge, to any person obtaining a copy "
    "of this software, to deal in the Software without restriction.\n"
)


def corpus_lines(n: int = 400) -> list[str]:
    """A few hundred lines of English from the system's licence texts."""
    lines: list[str] = []
    for folder in (Path("/usr/share/common-licenses"), Path("/usr/share/doc")):
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix == ""):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            lines += [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
            if len(lines) >= n:
                return lines[:n]
    return lines + [_FALLBACK_TEXT] * max(0, n - len(lines))


def _pre_tokenizer(pre: str):
    pt = tokenizers.pre_tokenizers
    splits = PRE_SPLITS[pre]
    if splits is None:
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    return pt.Sequence(
        [pt.Split(tokenizers.Regex(r), behavior="isolated") for r in splits]
        + [pt.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def train_tiny_bpe_tokenizer(out_dir, vocab_size: int, pre: str = "gpt-2") -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer of exactly vocab_size tokens into out_dir.

    Args:
        out_dir: folder that receives tokenizer.json and tokenizer_config.json.
        vocab_size: total tokens, specials included (> 259: 256 bytes + 3 specials).
        pre: pre-tokenizer, a key of PRE_SPLITS.

    Returns:
        The trained tokenizer; ids 0, 1, 2 are <|endoftext|>, <|im_start|>, <|im_end|>.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"trained {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": SPECIALS[0],
                "eos_token": SPECIALS[2],
                "pad_token": SPECIALS[0],
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 4096,
            },
            indent=1,
        )
    )
    return tok


SPM_SPECIALS = ["<unk>", "<s>", "</s>"]


def train_tiny_spm_tokenizer(out_dir, vocab_size: int) -> tokenizers.Tokenizer:
    """Train a SentencePiece-style BPE (Llama/Mistral layout) into out_dir.

    Ids 0-2 are <unk>, <s>, </s>; 3-258 are the byte-fallback tokens <0x00>..<0xFF>;
    then characters and merges. Spaces become "▁", prepended once, and BOS is
    added, as in Mixtral's tokenizer.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, pt = tokenizers.normalizers, tokenizers.pre_tokenizers
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = n.Sequence([n.Prepend("\u2581"), n.Replace(" ", "\u2581")])
    # train within words only, as SentencePiece does; encoding needs no pre-tokenizer then
    tok.pre_tokenizer = pt.Split("\u2581", behavior="merged_with_next")
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, special_tokens=SPM_SPECIALS + byte_tokens
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    doc = json.loads(tok.to_str())
    doc["pre_tokenizer"] = None
    doc["added_tokens"] = [a for a in doc["added_tokens"] if a["content"] in SPM_SPECIALS]
    doc["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    doc["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<s>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    tok = tokenizers.Tokenizer.from_str(json.dumps(doc))
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"trained {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "chat_template": CHAT_TEMPLATE,
                "legacy": True,
            },
            indent=1,
        )
    )
    return tok


def _add_spm_vocab(w: gguf.GGUFWriter, hf_dir: Path, tok_json: dict, vocab_size: int) -> None:
    """llama.cpp's _set_vocab_sentencepiece, from the pieces instead of tokenizer.model.

    A SentencePiece BPE scores each piece by minus its merge rank; here the id is
    that rank. Specials and byte pieces score 0.
    """
    by_id = {i: t for t, i in tok_json["model"]["vocab"].items()}
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        tok = by_id.get(i, f"[PAD{i}]")
        tokens.append(tok)
        if tok == "<unk>":
            kind = gguf.TokenType.UNKNOWN
        elif tok in SPM_SPECIALS:
            kind = gguf.TokenType.CONTROL
        elif tok.startswith("<0x") and len(tok) == 6:
            kind = gguf.TokenType.BYTE
        elif i not in by_id:
            kind = gguf.TokenType.UNUSED
        else:
            kind = gguf.TokenType.NORMAL
        types.append(kind)
        scores.append(-float(i) if kind == gguf.TokenType.NORMAL else 0.0)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=False).add_to_gguf(w, quiet=True)


def _detect_pre(tokenizer_json: dict) -> str:
    """llama.cpp recognises a tokenizer by hashing its output; compare the JSON instead."""
    for pre in PRE_SPLITS:
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = _pre_tokenizer(pre)
        if json.loads(tok.to_str())["pre_tokenizer"] == tokenizer_json["pre_tokenizer"]:
            return pre
    raise ValueError("tokenizer.json has a pre-tokenizer this fixture does not know")


def _add_vocab(w: gguf.GGUFWriter, hf_dir: Path, vocab_size: int, pre: str | None) -> None:
    """llama.cpp's _set_vocab_gpt2: tokens padded to vocab_size, types, merges, specials."""
    path = hf_dir / "tokenizer.json"
    doc = json.loads(path.read_text())
    if doc["model"].get("byte_fallback"):  # a SentencePiece-style vocabulary
        _add_spm_vocab(w, hf_dir, doc, vocab_size)
        return
    tok = tokenizers.Tokenizer.from_file(str(path))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or _detect_pre(doc))
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(w, quiet=True)


def _add_parameters(w: gguf.GGUFWriter, c: dict, mt: str, ftype) -> None:
    """The metadata TextModel.set_gguf_parameters and the family classes write."""
    deepseek = mt.startswith("deepseek")
    rope = c.get("rope_parameters") or {}
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(1 if deepseek else c["num_key_value_heads"])  # MLA as MQA
    w.add_rope_freq_base(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    if rope.get("rope_type") in ("linear", "yarn") and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        w.add_rope_scaling_factor(rope["factor"])
    if rope.get("rope_type") == "yarn" and rope.get("factor") is not None:
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            if key in rope:
                add(rope[key])
        if deepseek and "mscale_all_dim" in rope:
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])  # llama.cpp's legacy
    w.add_layer_norm_rms_eps(1e-5 if mt == "olmoe" else c["rms_norm_eps"])
    w.add_expert_count(c.get("num_local_experts") or c.get("num_experts") or c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    if c.get("n_group") is not None:
        w.add_expert_group_count(c["n_group"])
        w.add_expert_group_used_count(c["topk_group"])
    if c.get("scoring_func") == "sigmoid":
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if c.get("head_dim") is not None and not deepseek:
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    w.add_file_type(ftype)
    if mt == "mixtral":
        w.add_vocab_size(c["vocab_size"])
        w.add_rope_dimension_count(
            c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        )
    if mt in ("qwen2_moe", "qwen3_moe"):
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    if mt == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
    if deepseek:
        w.add_leading_dense_block_count(c["first_k_dense_replace"])
        w.add_vocab_size(c["vocab_size"])
        if c.get("q_lora_rank") is not None:
            w.add_q_lora_rank(c["q_lora_rank"])
        w.add_kv_lora_rank(c["kv_lora_rank"])
        w.add_key_length(c["kv_lora_rank"] + c["qk_rope_head_dim"])
        w.add_value_length(c["kv_lora_rank"])
        w.add_key_length_mla(c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
        w.add_value_length_mla(c["v_head_dim"])
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
        w.add_expert_shared_count(c["n_shared_experts"])
        w.add_expert_weights_scale(c["routed_scaling_factor"])
        if c.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(c["qk_rope_head_dim"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # rows (head, half, i) -> (head, i, half): llama.cpp's rotary layout for llama
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_tensors_llamacpp_order(c: dict, mt: str, hf: dict[str, np.ndarray]):
    """Yield (name llama.cpp's tensor map knows, array) after its modify_tensors steps."""
    n_head, n_kv = c["num_attention_heads"], c["num_key_value_heads"]
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    n_exp = c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts")
    for name, data in hf.items():
        if name == "lm_head.weight" and c.get("tie_word_embeddings"):
            continue
        if mt == "mixtral" and name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        if mt == "mixtral" and name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        parts = name.split(".")
        if ".experts." in name and "shared_experts" not in name:
            bid, xid, proj = int(parts[2]), int(parts[5]), parts[6]
            experts.setdefault((bid, proj), {})[xid] = data
            if len(experts[(bid, proj)]) == n_exp:
                per_expert = experts.pop((bid, proj))
                stacked = np.stack([per_expert[x] for x in range(n_exp)])
                if mt == "mixtral":
                    yield f"layers.{bid}.feed_forward.experts.{proj}.weight", stacked
                else:
                    yield f"model.layers.{bid}.mlp.experts.{proj}.weight", stacked
            continue
        if mt.startswith("deepseek") and name.endswith("kv_b_proj.weight"):
            nope, v = c["qk_nope_head_dim"], c["v_head_dim"]
            kv_b = data.reshape(n_head, nope + v, data.shape[-1])
            yield name.replace("kv_b_proj", "k_b_proj"), kv_b[:, :nope].transpose(0, 2, 1)
            yield name.replace("kv_b_proj", "v_b_proj"), kv_b[:, nope:]
            continue
        # llama.cpp renames the V3 router bias so its ".bias" suffix maps
        yield name.replace("e_score_correction_bias", "e_score_correction.bias"), data
    assert not experts, f"unstacked experts left: {sorted(experts)}"


def _qtype(gguf_name: str, data: np.ndarray, dtype: str) -> QT:
    """llama.cpp's choice: 1-D tensors, norms, routers and biases stay F32."""
    f32_kinds = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP)
    stem = gguf_name.rsplit(".", 1)[0]
    if (
        data.ndim <= 1
        or gguf_name.endswith("_norm.weight")
        or not gguf_name.endswith(".weight")
        or any(stem.endswith(gguf.TENSOR_NAMES[k].split(".")[-1]) for k in f32_kinds)
    ):
        return QT.F32
    return QT[dtype]


def _fuse(mapped: dict, model_arch) -> dict:
    # current llama.cpp lists attn_qkv for every family here but deepseek2 (MLA)
    fuse_qkv = model_arch != gguf.MODEL_ARCH.DEEPSEEK2
    out, used = {}, set()
    for new, data in mapped.items():
        if ".ffn_gate_exps." in new:
            up = new.replace("ffn_gate_exps", "ffn_up_exps")
            out[new.replace("ffn_gate_exps", "ffn_gate_up_exps")] = np.concatenate(
                [data, mapped[up]], 1
            )
            used.add(up)
        elif ".attn_q." in new and fuse_qkv:
            k, v = (new.replace(".attn_q.", f".attn_{x}.") for x in "kv")
            out[new.replace(".attn_q.", ".attn_qkv.")] = np.concatenate(
                [data, mapped[k], mapped[v]], 0
            )
            used.update((k, v))
    out.update(
        (n, d)
        for n, d in mapped.items()
        if n not in used
        and n not in out
        and not (".ffn_gate_exps." in n or (".attn_q." in n and fuse_qkv))
    )
    return out


def _unstack(mapped: dict) -> dict:
    out = {}
    for new, data in mapped.items():
        if new.endswith("_exps.weight"):
            for xid, expert in enumerate(data):
                out[new.replace("_exps.weight", f".{xid}.weight")] = expert
        else:
            out[new] = data
    return out


def write_gguf_like_llamacpp(
    hf_dir,
    out_path,
    dtype: str = "F32",
    *,
    arch: str | None = None,
    drop: tuple[str, ...] = (),
    pre: str | None = None,
    fuse: bool = False,
    per_expert: bool = False,
    extra: dict[str, np.ndarray] | None = None,
    drop_keys: tuple[str, ...] = (),
    split_max_tensors: int = 0,
) -> Path:
    """Write out_path from the saved HF model folder hf_dir as llama.cpp would.

    Args:
        hf_dir: folder with config.json, model.safetensors and tokenizer.json.
        out_path: the .gguf to write.
        dtype: "F32", "F16", "BF16" or "Q8_0" for 2-D weights (Q8_0 falls back to
            F16 where a row is not a multiple of 32, as llama.cpp does).
        arch: write this general.architecture instead (to test refusals).
        drop: GGUF tensor names to leave out (to test missing tensors).
        pre: tokenizer.ggml.pre to write; detected from tokenizer.json when None.
        fuse: fuse gate+up experts into ffn_gate_up_exps and q/k/v into attn_qkv, as
            llama.cpp's --fuse-gate-up-exps and --fuse-qkv do.
        per_expert: write experts one tensor each, blk.N.ffn_gate.E.weight, as
            Mixtral GGUFs from before stacked experts (early 2024) are.
        extra: more tensors to write, by GGUF name (to test unknown names).
        drop_keys: metadata keys to leave out (to test missing metadata).
        split_max_tensors: split into shards of this many tensors, as llama.cpp's
            --split-max-tensors does (names end in -00001-of-0000N.gguf).

    Returns:
        The path written: out_path, or the first shard's.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    c = json.loads((hf_dir / "config.json").read_text())
    mt = c["model_type"]
    if mt.startswith("deepseek") and c["num_key_value_heads"] != c["num_attention_heads"]:
        raise ValueError(
            "llama.cpp splits kv_b_proj with num_key_value_heads; DeepSeek "
            "configs have it equal to num_attention_heads"
        )
    model_arch = ARCHS[mt]
    w = gguf.GGUFWriter(
        out_path, arch or gguf.MODEL_ARCH_NAMES[model_arch], split_max_tensors=split_max_tensors
    )
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(hf_dir.name)
    _add_parameters(w, c, mt, FILE_TYPES[dtype])
    _add_vocab(w, hf_dir, c["vocab_size"], pre)
    for key in drop_keys:
        del w.kv_data[0][key]
    names = gguf.get_tensor_name_map(model_arch, c["num_hidden_layers"])
    hf = load_file(str(hf_dir / "model.safetensors"))
    mapped = {}
    for name, data in _hf_tensors_llamacpp_order(c, mt, hf):
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"gguf-py has no name for {name}")
        mapped[new] = data
    if fuse:
        mapped = _fuse(mapped, model_arch)
    if per_expert:
        mapped = _unstack(mapped)
    mapped.update(extra or {})
    for new, data in mapped.items():
        if new in drop:
            continue
        data = np.ascontiguousarray(data, dtype=np.float32)
        qtype = _qtype(new, data, dtype)
        try:
            raw = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:
            qtype = QT.F16
            raw = gguf.quants.quantize(data, qtype)
        w.add_tensor(new, raw, raw_dtype=qtype if qtype not in (QT.F32, QT.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shards = sorted(out_path.parent.glob(f"{out_path.stem}-0*-of-*.gguf"))
    return shards[0] if split_max_tensors and shards else out_path
