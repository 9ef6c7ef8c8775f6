"""Read a llama.cpp GGUF file as the Hugging Face checkpoint it was made from.

GGUFSource undoes what llama.cpp's convert_hf_to_gguf.py does, so the
converter core sees the HF names, shapes and config.json of the original.

Architectures (`general.architecture` -> HF `model_type`):
    llama      -> mixtral      only with `llama.expert_count` > 0 (dense llama is refused)
    qwen2moe   -> qwen2_moe
    qwen3moe   -> qwen3_moe
    olmoe      -> olmoe
    deepseek2  -> deepseek_v3  if `deepseek2.expert_gating_func` is sigmoid (2) or
                               any `blk.N.exp_probs_b.bias` exists (V3's router bias)
               -> deepseek_v2  otherwise (softmax gating, llama.cpp's default too)

Tensors: `blk.N.ffn_{gate,up,down}_exps` ([E, out, in]) are split into one
HF tensor per expert, as are the fused `ffn_gate_up_exps` and the per-expert
`blk.N.ffn_gate.E.weight` names of early Mixtral GGUFs; a fused `attn_qkv`
is split by head counts; `attn_k_b` + `attn_v_b` (llama.cpp's MLA absorption
layout) are merged back into `kv_b_proj`; for llama (Mixtral) the rotary
permutation of q_proj/k_proj rows is undone, so F32 GGUFs load bit-exact.
`rope_freqs` and layers past `block_count` (DeepSeek MTP) are skipped; any
other unknown tensor is an error.

Tokenizer (see gguf_tokenizer.py): "gpt2" (byte-level BPE) vocabularies are
rebuilt with the pre-tokenizer of `tokenizer.ggml.pre` for gpt-2/default/olmo,
qwen2, llama-bpe (llama3), deepseek-llm, deepseek-v3 and deepseek-coder; other
pre names fall back to GPT-2's regex and set `tokenizer_warning`. "llama"
(SentencePiece) vocabularies become a byte-fallback BPE whose merges come from
the token scores. Anything else leaves tokenizer_json None with a warning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

# HF_CLASSES and NORM_TOPK_DEFAULT moved with the config rebuild; still importable here
from formats.convert.gguf_config import HF_CLASSES as HF_CLASSES
from formats.convert.gguf_config import NORM_TOPK_DEFAULT as NORM_TOPK_DEFAULT
from formats.convert.gguf_config import build_config
from formats.convert.gguf_names import (
    BLOCK_KINDS,
    BLOCK_RE,
    EXPERT_KINDS,
    GLOBAL_NAMES,
    OLD_EXPERT_RE,
    SKIPPED,
    block_hf_names,
    expert_hf_name,
    required_tensors,
)
from formats.convert.gguf_tokenizer import tokenizer_json
from formats.convert.source import CheckpointSource, TensorInfo
from formats.errors import CheckpointError, MissingTensor, ShapeMismatch, UnsupportedArchitecture

MT = gguf.MODEL_TENSOR
KL = gguf.Keys.LLM
KA = gguf.Keys.Attention
KR = gguf.Keys.Rope
KT = gguf.Keys.Tokenizer
TT = gguf.TokenType

ARCH_MODEL_TYPES = {
    "llama": "mixtral",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "olmoe": "olmoe",
    "deepseek2": "deepseek_v2",  # or deepseek_v3, see _model_type
}

_TRUNCATED_FIX = (
    "the file is incomplete (interrupted copy or download?); download or convert it again"
)


@dataclass(frozen=True)
class _Recipe:
    """How one HF tensor is cut from GGUF tensors (shapes in numpy order).

    op: "copy" whole tensor; "expert" row `index` of a stacked [E, ...] tensor;
    "half" expert `index`, then half `part` (0 gate, 1 up) of its rows;
    "rows" rows [start, stop) of a fused tensor; "kv_b" merge sources (k_b, v_b).
    unpermute: head count to undo llama.cpp's rotary row permutation with (0: none).
    """

    op: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    index: int = 0
    part: int = 0
    start: int = 0
    stop: int = 0
    unpermute: int = 0


def _open_reader(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    # gguf-py reports short or corrupt files with whatever numpy raises first
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as exc:
        raise CheckpointError(
            f"{path} ({size} bytes) is truncated or corrupt: gguf-py cannot parse it ({exc})",
            _TRUNCATED_FIX,
        ) from exc
    if reader.byte_order != "I":
        raise CheckpointError(
            f"{path} is a big-endian GGUF",
            "convert it with llama.cpp's gguf_convert_endian.py to little-endian first",
        )
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {t.name!r} ends at byte "
                f"{t.data_offset + t.n_bytes} but the file has {size}",
                _TRUNCATED_FIX,
            )
    return reader


_SHARD_RE = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")


def _open_shards(path: Path) -> list[gguf.GGUFReader]:
    """Readers of a GGUF and, if it is one shard of a split model, of all its shards."""
    reader = _open_reader(path)
    count = reader.fields.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT)
    count = count.contents() if count is not None else 1
    if count <= 1:
        return [reader]
    m = _SHARD_RE.fullmatch(path.name)
    if m is None:
        raise CheckpointError(
            f"{path} is one of {count} shards, but its name does not end in -NNNNN-of-NNNNN.gguf",
            "give the shards their original names",
        )
    readers = []
    for no in range(1, count + 1):
        shard = path.with_name(f"{m[1]}-{no:05d}-of-{count:05d}.gguf")
        if not shard.is_file():
            raise CheckpointError(
                f"shard {shard.name} of {path.name} is missing",
                "download all shards of the model into one folder",
            )
        readers.append(reader if shard == path else _open_reader(shard))
    want = readers[0].fields.get(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    have = sum(len(r.tensors) for r in readers)
    if want is not None and want.contents() != have:
        raise CheckpointError(
            f"{path.name}: the shards hold {have} tensors, shard 1 says {want.contents()}",
            "download all shards again",
        )
    return readers


def _dequantize(t, index: int | None = None) -> np.ndarray:
    """float32 copy of a GGUF tensor (or of its [index] slice), numpy dim order."""
    raw = np.asarray(t.data if index is None else t.data[index])
    try:
        out = gguf.quants.dequantize(raw, t.tensor_type)
    except NotImplementedError as exc:
        raise CheckpointError(
            f"tensor {t.name!r} is stored as {t.tensor_type.name}, which gguf-py cannot dequantize",
            "use a GGUF quantized with a type gguf-py reads (F32, F16, BF16, Q4_0..Q8_0, K-quants)",
        ) from exc
    return np.array(out, dtype=np.float32)  # copy: never hand out a view of the mmap


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's permute() interleaves the two rotary halves of each head:
    # rows (head, half, i) -> (head, i, half). This is its exact inverse.
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


class GGUFSource(CheckpointSource):
    """A llama.cpp GGUF file presented with HF names, shapes and config.json.

    Args:
        path: the .gguf file; for a split model ("-00001-of-00003.gguf") any one
            shard, the others being beside it.

    Attributes:
        arch: the GGUF `general.architecture`.
        tokenizer_warning: why tokenizer_json is missing or may encode differently, else None.
        skipped: GGUF tensors with no HF counterpart that were left out.

    Raises:
        CheckpointError: not a GGUF, truncated, or a tensor this mapping does not know.
        UnsupportedArchitecture: an architecture other than the six MoE families.
        MissingTensor: a tensor the architecture needs is absent.
        ShapeMismatch: a tensor's shape disagrees with the metadata.
    """

    kind = "gguf"

    def __init__(self, path):
        self.path = Path(path)
        self._readers = _open_shards(self.path)
        self._fields = self._readers[0].fields  # shard 1 carries all metadata
        self._gguf = {}
        for reader in self._readers:
            for t in reader.tensors:
                if t.name in self._gguf:
                    raise CheckpointError(f"{self.path.name}: tensor {t.name!r} is in two shards")
                self._gguf[t.name] = t
        self.arch = self._get("general.architecture")
        if self.arch not in ARCH_MODEL_TYPES:
            raise UnsupportedArchitecture(f"{self.path.name}: GGUF architecture {self.arch!r}")
        self.model_type = self._model_type()
        self.skipped: list[str] = []
        self._recipes = self._map_tensors()
        self.config = build_config(self.model_type, self._get, self._need, self._shape, self._gguf)
        self._check_complete()
        self.generation_config = {
            k: self.config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if self.config.get(k) is not None
        } or None
        self.tokenizer_json, self.tokenizer_warning = tokenizer_json(self._get)
        self.chat_template = self._get(KT.CHAT_TEMPLATE)

    # -- metadata -----------------------------------------------------------

    def _get(self, key: str, default=None):
        """One metadata value; `{arch}` in the key is filled in."""
        field = self._fields.get(key.format(arch=getattr(self, "arch", "")))
        if field is None:
            return default
        value = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
        return value

    def _need(self, key: str):
        """A metadata value the config cannot be built without."""
        value = self._get(key)
        if value is None:
            raise CheckpointError(
                f"{self.path.name}: metadata key {key.format(arch=self.arch)!r} is missing",
                "this GGUF was not written by llama.cpp's converter for its architecture; "
                "convert the Hugging Face checkpoint instead",
            )
        return value

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._gguf[name].shape.tolist()))

    def _model_type(self) -> str:
        if self.arch == "llama":
            if not self._get(KL.EXPERT_COUNT, 0):
                raise UnsupportedArchitecture(
                    f"{self.path.name}: GGUF architecture 'llama' without experts "
                    "(llama.expert_count is 0 or absent), a dense model"
                )
            return "mixtral"
        if self.arch == "deepseek2":
            sigmoid = self._get(KL.EXPERT_GATING_FUNC) == gguf.ExpertGatingFuncType.SIGMOID
            has_bias = any(n.endswith(".exp_probs_b.bias") for n in self._gguf)
            return "deepseek_v3" if sigmoid or has_bias else "deepseek_v2"
        return ARCH_MODEL_TYPES[self.arch]

    # -- tensor names ---------------------------------------------------------

    def _map_tensors(self) -> dict[str, _Recipe]:
        recipes: dict[str, _Recipe] = {}
        n_layers = self._get(KL.BLOCK_COUNT)
        hf_names = block_hf_names(self.model_type)
        k_b: dict[int, str] = {}
        for name, t in self._gguf.items():
            dtype = t.tensor_type.name
            shape = self._shape(name)
            if name in SKIPPED:
                self.skipped.append(name)
                continue
            stem, _, suffix = name.rpartition(".")
            if stem in GLOBAL_NAMES:
                recipes[f"{GLOBAL_NAMES[stem]}.{suffix}"] = _Recipe("copy", (name,), shape, dtype)
                continue
            m = BLOCK_RE.fullmatch(name)
            if m is None:
                raise CheckpointError(
                    f"{self.path.name}: tensor {name!r} has no Hugging Face "
                    f"counterpart known for {self.arch}"
                )
            bid, rest, suffix = int(m[1]), m[2], m[3]
            if n_layers is not None and bid >= n_layers:
                self.skipped.append(name)  # MTP / next-token-prediction layers
                continue
            layer = f"model.layers.{bid}"
            kind = BLOCK_KINDS.get(rest)
            if (old := OLD_EXPERT_RE.fullmatch(rest)) is not None:
                hf = expert_hf_name(self.model_type, bid, int(old[2]), EXPERT_KINDS[old[1]])
                recipes[hf] = _Recipe("copy", (name,), shape, dtype)
            elif kind in (MT.FFN_GATE_EXP, MT.FFN_UP_EXP, MT.FFN_DOWN_EXP, MT.FFN_GATE_UP_EXP) and (
                shape[0] != self._get(KL.EXPERT_COUNT, shape[0])
            ):
                raise ShapeMismatch(
                    f"{name} stacks {shape[0]} experts, but "
                    f"{self.arch}.expert_count is {self._get(KL.EXPERT_COUNT)}"
                )
            elif kind in (MT.FFN_GATE_EXP, MT.FFN_UP_EXP, MT.FFN_DOWN_EXP):
                for xid in range(shape[0]):
                    recipes[expert_hf_name(self.model_type, bid, xid, kind)] = _Recipe(
                        "expert", (name,), shape[1:], dtype, index=xid
                    )
            elif kind == MT.FFN_GATE_UP_EXP:
                half = (shape[1] // 2, *shape[2:])
                for xid in range(shape[0]):
                    for part, sub in enumerate((MT.FFN_GATE_EXP, MT.FFN_UP_EXP)):
                        recipes[expert_hf_name(self.model_type, bid, xid, sub)] = _Recipe(
                            "half", (name,), half, dtype, index=xid, part=part
                        )
            elif kind == MT.FFN_EXP_PROBS_B:
                recipes[f"{layer}.mlp.gate.e_score_correction_bias"] = _Recipe(
                    "copy", (name,), shape, dtype
                )
            elif kind == MT.ATTN_QKV:
                recipes.update(self._split_qkv(name, layer, suffix, shape, dtype))
            elif kind == MT.ATTN_K_B:
                k_b[bid] = name
            elif kind == MT.ATTN_V_B:
                pass  # merged with its attn_k_b below
            elif kind in hf_names:
                recipes[f"{layer}.{hf_names[kind]}.{suffix}"] = _Recipe(
                    "copy", (name,), shape, dtype, unpermute=self._heads_to_unpermute(kind)
                )
            else:
                raise CheckpointError(
                    f"{self.path.name}: tensor {name!r} has no Hugging Face "
                    f"counterpart known for {self.arch}"
                )
            if kind == MT.FFN_GATE_INP_SHEXP and len(shape) == 1:  # squeezed by old converters
                recipes[f"{layer}.mlp.shared_expert_gate.weight"] = _Recipe(
                    "copy", (name,), (1, shape[0]), dtype
                )
        for bid, kb in k_b.items():
            recipes[f"model.layers.{bid}.self_attn.kv_b_proj.weight"] = self._merge_kv_b(bid, kb)
        for hf, r in recipes.items():
            if r.unpermute and r.shape[0] % (2 * r.unpermute):
                raise ShapeMismatch(
                    f"{hf}: {r.shape[0]} rows do not split into {r.unpermute} "
                    "rotary heads of two halves"
                )
        return recipes

    def _heads_to_unpermute(self, kind) -> int:
        if self.arch != "llama":
            return 0  # only LlamaModel (undo_permute) permutes among these families
        n_head = self._get(KA.HEAD_COUNT)
        if kind == MT.ATTN_Q:
            return n_head
        if kind == MT.ATTN_K:
            return self._get(KA.HEAD_COUNT_KV, n_head)
        return 0

    def _head_dim(self) -> int:
        return self._get(KA.KEY_LENGTH) or self._get(KL.EMBEDDING_LENGTH) // self._get(
            KA.HEAD_COUNT
        )

    def _split_qkv(self, name, layer, suffix, shape, dtype) -> dict[str, _Recipe]:
        n_head = self._get(KA.HEAD_COUNT)
        n_kv = self._get(KA.HEAD_COUNT_KV, n_head)
        q, kv = n_head * self._head_dim(), n_kv * self._head_dim()
        if shape[0] != q + 2 * kv:
            raise ShapeMismatch(
                f"{name}: {shape[0]} rows, but {n_head} query and {n_kv} "
                f"key/value heads need {q + 2 * kv}"
            )
        out = {}
        for proj, start, stop, kind in (
            ("q_proj", 0, q, MT.ATTN_Q),
            ("k_proj", q, q + kv, MT.ATTN_K),
            ("v_proj", q + kv, q + 2 * kv, MT.ATTN_V),
        ):
            out[f"{layer}.self_attn.{proj}.{suffix}"] = _Recipe(
                "rows",
                (name,),
                (stop - start, *shape[1:]),
                dtype,
                start=start,
                stop=stop,
                unpermute=self._heads_to_unpermute(kind),
            )
        return out

    def _merge_kv_b(self, bid: int, kb: str) -> _Recipe:
        vb = gguf.TENSOR_NAMES[MT.ATTN_V_B].format(bid=bid) + ".weight"
        if vb not in self._gguf:
            raise MissingTensor(
                f"{self.path.name}: {kb!r} is present but {vb!r} is not; both "
                f"are needed to rebuild model.layers.{bid}.self_attn.kv_b_proj"
            )
        ks, vs = self._shape(kb), self._shape(vb)  # [H, kv_lora, nope], [H, v, kv_lora]
        if len(ks) != 3 or len(vs) != 3 or ks[0] != vs[0] or ks[1] != vs[2]:
            raise ShapeMismatch(
                f"{kb} {ks} and {vb} {vs} are not [heads, kv_lora_rank, "
                "qk_nope_head_dim] and [heads, v_head_dim, kv_lora_rank]"
            )
        dtype = self._gguf[kb].tensor_type.name
        return _Recipe("kv_b", (kb, vb), (ks[0] * (ks[2] + vs[1]), ks[1]), dtype)

    def _check_complete(self) -> None:
        """Every tensor the HF model of this config has must be present."""
        mt = self.model_type
        for name, where in required_tensors(self.config).items():
            if name not in self._recipes:
                raise MissingTensor(
                    f"{self.path.name}: tensor {where} is missing, so this {mt} model has no "
                    f"{name!r}",
                    "the GGUF is incomplete or was cut down; download or convert it again",
                )

    # -- CheckpointSource -------------------------------------------------------

    def tensors(self) -> dict[str, TensorInfo]:
        return {n: TensorInfo(n, r.shape, r.dtype) for n, r in self._recipes.items()}

    def load(self, name: str) -> np.ndarray:
        r = self._recipes.get(name)
        if r is None:
            raise MissingTensor(
                f"{self.path.name} has no tensor {name!r}",
                "check the name against GGUFSource.tensors()",
            )
        t = self._gguf[r.sources[0]]
        if r.op == "kv_b":
            k_b = _dequantize(t).transpose(0, 2, 1)  # [H, nope, kv_lora]
            v_b = _dequantize(self._gguf[r.sources[1]])  # [H, v, kv_lora]
            w = np.concatenate([k_b, v_b], axis=1)
        elif r.op == "expert":
            w = _dequantize(t, r.index)
        elif r.op == "half":
            w = _dequantize(t, r.index)
            n = w.shape[0] // 2
            w = w[r.part * n : (r.part + 1) * n]
        elif r.op == "rows":
            w = _dequantize(t)[r.start : r.stop]
        else:
            w = _dequantize(t)
        w = w.reshape(r.shape)
        if r.unpermute:
            w = _unpermute(w, r.unpermute)
        return np.ascontiguousarray(w, dtype=np.float32)

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor; plain 2-D tensors dequantize only those rows."""
        r = self._recipes.get(name)
        if r is None or r.op not in ("copy", "rows") or r.unpermute or len(r.shape) < 2:
            return np.ascontiguousarray(self.load(name)[start:stop])
        t = self._gguf[r.sources[0]]
        if r.op == "copy" and self._shape(t.name) != r.shape:
            return np.ascontiguousarray(self.load(name)[start:stop])
        start, stop, _ = slice(start, stop).indices(r.shape[0])
        base = r.start if r.op == "rows" else 0
        # quantized blocks never straddle rows, so a row slice of the bytes is exact
        raw = np.asarray(t.data[base + start : base + max(start, stop)])
        try:
            out = gguf.quants.dequantize(raw, t.tensor_type)
        except NotImplementedError:
            return _dequantize(t)[base + start : base + max(start, stop)]
        return np.array(out, dtype=np.float32).reshape(-1, *r.shape[1:])

    def close(self) -> None:
        # dropping the readers releases the memory maps once no loaded view remains
        self._readers = self._gguf = self._fields = None
