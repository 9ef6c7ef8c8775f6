"""A plain-data summary of a .emoe file, for `edgemoe inspect` and planners."""

from __future__ import annotations

from collections import defaultdict

from formats import constants as C
from formats.reader import EmoeReader

_CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "num_experts_per_tok",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "n_shared_experts",
    "moe_intermediate_size",
    "intermediate_size",
    "kv_lora_rank",
    "q_lora_rank",
    "torch_dtype",
    "dtype",
)


def summarize(r: EmoeReader) -> dict:
    """Config, sizes per codec and level, and the expert table, as plain data."""
    expert_tensors = {n for e in r.experts.values() for n in e.tensors.values()}
    by_codec: dict[str, dict] = defaultdict(
        lambda: {"tensors": 0, "params": 0, "level_bytes": None, "bits": None}
    )
    dense_bytes = 0
    for t in r.tensors.values():
        key = t.codec.name + ("" if t.name not in expert_tensors else " (experts)")
        row = by_codec[key]
        row["tensors"] += 1
        n = 1
        for d in t.shape:
            n *= d
        row["params"] += n
        sizes = [p[2] for p in t.parts]
        row["level_bytes"] = [
            a + b for a, b in zip(row["level_bytes"] or [0] * len(sizes), sizes, strict=False)
        ]
        row["bits"] = t.codec.level_bits(t.params)
        if t.name not in expert_tensors:
            dense_bytes += t.nbytes()
    layers: dict[int, dict] = {}
    for e in r.experts.values():
        row = layers.setdefault(
            e.layer, {"layer": e.layer, "experts": 0, "level_bytes": None, "stored_bytes": 0}
        )
        row["experts"] += 1
        sizes = [r.chunks[c].raw_length for c in e.levels]
        cum = [sum(sizes[: k + 1]) for k in range(len(sizes))]
        row["level_bytes"] = cum  # per expert, cumulative: bytes to hold level k
        row["stored_bytes"] += sum(r.chunks[c].length for c in e.levels)
        row["levels"] = len(e.levels)
    stored = sum(c.length for c in r.chunks)
    raw = sum(c.raw_length for c in r.chunks)
    return {
        "path": str(r.path),
        "version": f"{r.version[0]}.{r.version[1]}",
        "family": r.family,
        "config": {k: r.config[k] for k in _CONFIG_KEYS if k in r.config},
        "source": r.metadata.get(C.M_SOURCE),
        "writer": r.metadata.get(C.M_WRITER),
        "file_bytes": r.file_size,
        "header_bytes": r.data_offset,
        "chunks": len(r.chunks),
        "zstd_chunks": sum(1 for c in r.chunks if c.compression == C.Compression.ZSTD),
        "raw_bytes": raw,
        "stored_bytes": stored,
        "tensors": len(r.tensors),
        "dense_bytes": dense_bytes,
        "experts": len(r.experts),
        "codecs": dict(sorted(by_codec.items())),
        "expert_layers": [layers[k] for k in sorted(layers)],
        "blobs": {name: r.chunks[ci].raw_length for name, ci in r.blobs.items()},
        "chat_template": r.chat_template is not None,
        "routing_stats": r.metadata.get(C.M_ROUTING_STATS),
    }
