"""Builds the valid base file and the hostile variants in tests/formats/hostile/.

Run `python tests/formats/hostile_gen.py` to regenerate the folder; the tests
check both the committed files and freshly generated ones, so a reader change
that lets one through fails either way.
"""

from __future__ import annotations

import copy
import json
import sys
import zlib
from pathlib import Path

import msgpack
import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))

from formats import constants as C  # noqa: E402
from formats.writer import EmoeWriter  # noqa: E402

TINY_CONFIG = {
    "model_type": "mixtral",
    "hidden_size": 16,
    "intermediate_size": 8,
    "num_hidden_layers": 1,
    "num_local_experts": 2,
    "num_experts_per_tok": 1,
    "vocab_size": 8,
}


def write_base(path: Path, expert_codec: str = "mwq", compress: bool = False) -> Path:
    """A small valid file: two dense tensors, two 3-level experts, a tokenizer blob."""
    from formats.codecs import codec_by_name

    rng = np.random.default_rng(1234)
    meta = {C.M_FAMILY: "mixtral", C.M_CONFIG: TINY_CONFIG, C.M_WRITER: "hostile_gen"}
    codec = codec_by_name(expert_codec)
    with EmoeWriter(path, meta, header_reserve=1024, compress=compress) as w:
        w.add_blob(C.BLOB_TOKENIZER, b'{"model": "tiny"}')
        w.add_tensor(
            "model.embed_tokens.weight", rng.standard_normal((8, 16)).astype("f4"), C.CodecId.F32
        )
        w.add_tensor("model.norm.weight", np.ones(16, "f4"), C.CodecId.F32)
        w.add_tensor(
            "lm_head.weight",
            rng.standard_normal((8, 16)).astype("f4"),
            C.CodecId.INT8,
            codec_by_name("int8").default_params((8, 16)),
        )
        for e in range(2):
            tensors = {}
            for role, shape in (("gate", (8, 16)), ("up", (8, 16)), ("down", (16, 8))):
                arr = rng.standard_normal(shape).astype("f4")
                name = f"model.layers.0.block_sparse_moe.experts.{e}.{role}.weight"
                tensors[role] = (name, arr, codec.id, codec.default_params(shape), "F32")
            w.add_expert(0, e, tensors)
    return path


def split(blob: bytes):
    magic, major, minor, hlen, doff, hcrc, res = C.PREAMBLE.unpack(blob[: C.PREAMBLE_SIZE])
    header = msgpack.unpackb(blob[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + hlen], raw=False)
    return header, blob[doff:], doff


def assemble(
    header,
    data: bytes,
    *,
    magic=C.MAGIC,
    major=C.VERSION_MAJOR,
    minor=C.VERSION_MINOR,
    header_bytes: bytes | None = None,
    data_offset: int | None = None,
    crc: int | None = None,
    hlen: int | None = None,
) -> bytes:
    hb = header_bytes if header_bytes is not None else msgpack.packb(header, use_bin_type=True)
    doff = data_offset if data_offset is not None else C.align_up(C.PREAMBLE_SIZE + len(hb))
    pre = C.PREAMBLE.pack(
        magic,
        major,
        minor,
        hlen if hlen is not None else len(hb),
        doff,
        zlib.crc32(hb) if crc is None else crc,
        0,
    )
    body = pre + hb
    return body + b"\0" * max(0, doff - len(body)) + data


def variants(base: bytes) -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, expected error class name, 'open' or 'read')."""
    h, data, doff = split(base)
    out: dict[str, tuple[bytes, str, str]] = {}

    def mutated(fn, **kw):
        hh = copy.deepcopy(h)
        fn(hh)
        return assemble(hh, data, **kw)

    expert0 = h[C.KEY_EXPERTS][0]
    lvl2 = expert0[C.E_LEVELS][1]
    emb_chunk = h[C.KEY_TENSORS]["model.embed_tokens.weight"][C.T_PARTS][0][0]
    out["bad_magic.emoe"] = (b"GGUF" + base[4:], "BadMagic", "open")
    out["empty.emoe"] = (b"", "TruncatedFile", "open")
    out["truncated_preamble.emoe"] = (base[:20], "TruncatedFile", "open")
    out["version_2.emoe"] = (assemble(h, data, major=2), "UnsupportedVersion", "open")
    out["header_too_large.emoe"] = (assemble(h, data, hlen=2**40), "HeaderTooLarge", "open")
    out["header_len_zero.emoe"] = (assemble(h, data, hlen=0), "HeaderTooLarge", "open")
    out["truncated_header.emoe"] = (base[: C.PREAMBLE_SIZE + 40], "TruncatedFile", "open")
    out["header_crc.emoe"] = (assemble(h, data, crc=0xDEADBEEF), "HeaderCorrupt", "open")
    out["header_not_msgpack.emoe"] = (
        assemble(None, data, header_bytes=b"\xc1" * 64),
        "HeaderCorrupt",
        "open",
    )
    out["header_not_map.emoe"] = (assemble([1, 2, 3], data), "HeaderCorrupt", "open")
    out["header_missing_tensors.emoe"] = (
        mutated(lambda x: x.pop(C.KEY_TENSORS)),
        "HeaderCorrupt",
        "open",
    )
    out["data_offset_unaligned.emoe"] = (
        assemble(h, data, data_offset=doff + 100)[:doff] + data,
        "OffsetOutOfRange",
        "open",
    )
    out["truncated_data.emoe"] = (base[:-5000], "TruncatedFile", "open")
    out["trailing_bytes.emoe"] = (base + b"\0" * 4096, "OffsetOutOfRange", "open")

    def unaligned(x):
        x[C.KEY_CHUNKS][0][0] += 8

    out["chunk_unaligned.emoe"] = (mutated(unaligned), "OffsetOutOfRange", "open")

    def part_past_chunk(x):
        x[C.KEY_TENSORS]["model.norm.weight"][C.T_PARTS][0][1] = 64

    out["part_out_of_range.emoe"] = (mutated(part_past_chunk), "OffsetOutOfRange", "open")

    def part_bad_chunk(x):
        x[C.KEY_TENSORS]["model.norm.weight"][C.T_PARTS][0][0] = 10_000

    out["part_bad_chunk_index.emoe"] = (mutated(part_bad_chunk), "OffsetOutOfRange", "open")

    def overlap(x):
        x[C.KEY_CHUNKS][emb_chunk][0] = x[C.KEY_CHUNKS][emb_chunk - 1][0]

    out["overlapping_chunks.emoe"] = (mutated(overlap), "OverlappingChunks", "open")

    def unknown_codec(x):
        x[C.KEY_TENSORS]["model.norm.weight"][C.T_CODEC] = 99

    out["unknown_codec.emoe"] = (mutated(unknown_codec), "UnknownCodec", "open")

    def bad_params(x):
        x[C.KEY_TENSORS]["lm_head.weight"][C.T_PARAMS]["group"] = 3

    out["bad_codec_params.emoe"] = (mutated(bad_params), "HeaderCorrupt", "open")

    def bomb(x):
        c = x[C.KEY_CHUNKS][emb_chunk]
        c[3], c[2] = int(C.Compression.ZSTD), c[1] * 10_000

    out["zstd_ratio_bomb.emoe"] = (mutated(bomb), "HeaderCorrupt", "open")

    def missing_expert_tensor(x):
        x[C.KEY_EXPERTS][1][C.E_TENSORS]["down"] = (
            "model.layers.0.block_sparse_moe.experts.1.nope.weight"
        )

    out["missing_expert_tensor.emoe"] = (mutated(missing_expert_tensor), "MissingTensor", "open")

    def levels_swapped(x):
        lv = x[C.KEY_EXPERTS][0][C.E_LEVELS]
        lv[0], lv[1] = lv[1], lv[0]

    out["expert_levels_swapped.emoe"] = (mutated(levels_swapped), "HeaderCorrupt", "open")

    def dup_expert(x):
        x[C.KEY_EXPERTS][1][C.E_EXPERT] = 0

    out["duplicate_expert.emoe"] = (mutated(dup_expert), "HeaderCorrupt", "open")

    def shape_neg(x):
        x[C.KEY_TENSORS]["model.norm.weight"][C.T_SHAPE] = [-16]

    out["negative_shape.emoe"] = (mutated(shape_neg), "HeaderCorrupt", "open")

    def huge_shape(x):
        x[C.KEY_TENSORS]["model.norm.weight"][C.T_SHAPE] = [2**40, 2**40]

    out["huge_shape.emoe"] = (mutated(huge_shape), "HeaderCorrupt", "open")

    # bit rot inside expert 0's level-2 chunk: opens fine, reading it fails
    c = h[C.KEY_CHUNKS][lvl2]
    pos = doff + c[0] + c[1] // 2
    rot = bytearray(base)
    rot[pos] ^= 0x40
    out["bitrot_expert.emoe"] = (bytes(rot), "ChecksumMismatch", "read")
    return out


EXPECTED_BITROT_OWNER = "expert 0 of layer 0, level 2"


def main() -> None:
    folder = HERE / "hostile"
    folder.mkdir(exist_ok=True)
    base = write_base(folder / "valid.emoe")
    manifest = {"valid.emoe": {"error": None, "when": "open"}}
    for name, (blob, err, when) in variants(base.read_bytes()).items():
        (folder / name).write_bytes(blob)
        manifest[name] = {"error": err, "when": when}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(manifest)} files to {folder}")


if __name__ == "__main__":
    main()
