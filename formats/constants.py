"""The single source of truth for the .emoe container's fixed values.

Reader, writer and codecs derive every magic number from here; SPEC.md gives
the meaning of each. Changing a value here is a format change: bump VERSION.
"""

from __future__ import annotations

import enum
import struct

MAGIC = b"EMOE"
VERSION_MAJOR = 1
VERSION_MINOR = 0

# Preamble: magic, major, minor, header_length, data_offset, header_crc32, reserved.
PREAMBLE = struct.Struct("<4sHHQQII")
PREAMBLE_SIZE = PREAMBLE.size  # 32 bytes
assert PREAMBLE_SIZE == 32

ALIGNMENT = 4096
MAX_HEADER_SIZE = 64 * 1024 * 1024
# A zstd chunk may not claim to inflate by more than this; bounds the memory a
# hostile file can make a reader allocate per stored byte.
MAX_ZSTD_RATIO = 256
# zstd must save at least this share of a chunk's bytes, else it is stored raw.
MIN_ZSTD_SAVING = 0.05
# Expert chunks are read again and again while a model runs: inflating one costs more than
# reading the bytes zstd saves (here: a 33 MB INT8 expert saves 10%, ~3 ms of a 1 GB/s read,
# and takes ~90-300 ms to inflate), so they are compressed only when zstd halves them.
MIN_ZSTD_SAVING_EXPERT = 0.5
ZSTD_LEVEL = 3
MAX_NDIM = 8


class Compression(enum.IntEnum):
    NONE = 0
    ZSTD = 1


class CodecId(enum.IntEnum):
    """Fixed codec ids; a registered codec class carries exactly one."""

    F32 = 0
    F16 = 1
    BF16 = 2
    INT8 = 8
    INT4 = 9
    MWQ = 16
    BITPLANE = 17


# Header keys (top level).
KEY_METADATA = "metadata"
KEY_CHUNKS = "chunks"
KEY_TENSORS = "tensors"
KEY_EXPERTS = "experts"
KEY_BLOBS = "blobs"
HEADER_KEYS = (KEY_METADATA, KEY_CHUNKS, KEY_TENSORS, KEY_EXPERTS, KEY_BLOBS)

# Tensor entry keys.
T_CODEC = "codec"
T_SHAPE = "shape"
T_PARAMS = "params"
T_PARTS = "parts"
T_SRC_DTYPE = "src_dtype"

# Expert entry keys.
E_LAYER = "layer"
E_EXPERT = "expert"
E_LEVELS = "levels"
E_TENSORS = "tensors"
EXPERT_ROLES = ("gate", "up", "down")

# Metadata keys.
M_FAMILY = "edgemoe.family"
M_CONFIG = "edgemoe.config"
M_GENERATION_CONFIG = "edgemoe.generation_config"
M_CHAT_TEMPLATE = "edgemoe.chat_template"
M_SOURCE = "edgemoe.source"
M_WRITER = "edgemoe.writer"
M_ROUTING_STATS = "edgemoe.routing_stats"

# Blob names.
BLOB_TOKENIZER = "tokenizer.json"
# The routing trace (SPEC.md §4, described by M_ROUTING_STATS): its blob and element type.
BLOB_ROUTING_TRACE = "routing_trace"
ROUTING_TRACE_DTYPE = "<u2"  # little-endian uint16 expert indices
# Bit policies (edgemoe/bitstored.py), each a msgpack map: the per-expert level table of
# `edgemoe calibrate --bits` (EdgeMoE) and the trained per-layer bit router (D²MoE).
BLOB_BITS_TABLE = "bits_calibrated"
BLOB_BITS_ROUTER = "bits_router"


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """Round n up to a multiple of alignment."""
    return (n + alignment - 1) // alignment * alignment
