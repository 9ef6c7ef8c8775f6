"""The codec interface and registry.

A codec turns one float32 weight tensor into one or more *level segments* of
bytes and back. Level k's segment holds only what level k adds, so a reader
decodes level k from the first k segments: a lower precision is a prefix of a
higher one. Plain codecs have exactly one level.

Every codec has a fixed id (formats.constants.CodecId); the reader looks
codecs up by id and refuses unknown ids with UnknownCodec.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from formats.constants import CodecId
from formats.errors import CodecError, UnknownCodec

_REGISTRY: dict[int, type[Codec]] = {}
_BY_NAME: dict[str, type[Codec]] = {}


class Codec:
    """Base of all codecs. Subclasses are stateless; all methods are classmethods.

    Params are a small msgpack-able dict stored in the tensor's header entry
    (group size, bits per level...). Settings live there, never in names.
    """

    id: ClassVar[CodecId]
    name: ClassVar[str]
    nested: ClassVar[bool] = False

    @classmethod
    def default_params(cls, shape: Sequence[int], **options) -> dict:
        """Params for a tensor of this shape; options override defaults."""
        return dict(options)

    @classmethod
    def check_params(cls, shape: Sequence[int], params: dict) -> None:
        """Raise CodecError if params cannot describe a tensor of this shape."""

    @classmethod
    def level_bits(cls, params: dict) -> list[int]:
        """Nominal bits per weight at each level (a table for inspect and planners)."""
        raise NotImplementedError  # each codec defines its own

    @classmethod
    def num_levels(cls, params: dict) -> int:
        return len(cls.level_bits(params))

    @classmethod
    def level_nbytes(cls, shape: Sequence[int], params: dict) -> list[int]:
        """Byte length of each level's segment (not cumulative)."""
        return [sum(fields) for fields in cls.level_fields(shape, params)]

    @classmethod
    def level_fields(cls, shape: Sequence[int], params: dict) -> list[list[int]]:
        """Byte sizes of the fields that make up each level's segment, in order.

        Every field is row-major over the tensor's first dimension (codes, a
        bit plane, scales...), so a segment for a block of rows splits into the
        same fields and the whole tensor's field is the blocks' fields joined.
        This is what lets encode_blocked stream a large tensor by rows.
        """
        raise NotImplementedError  # each codec defines its own

    @classmethod
    def encode(cls, w: np.ndarray, params: dict, calib: np.ndarray | None = None) -> list[bytes]:
        """Encode a float32 tensor into one bytes segment per level.

        Args:
            w: the weight, float32, with the shape the params were made for.
            params: the codec's params (from default_params).
            calib: optional calibration activations [T, in_features] for codecs
                that fit scales to the output error; others ignore it.
        """
        raise NotImplementedError  # each codec defines its own

    @classmethod
    def decode(
        cls, segments: Sequence[bytes | memoryview], shape: Sequence[int], params: dict
    ) -> np.ndarray:
        """Decode the level len(segments) from the first len(segments) segments.

        Returns:
            float32 array of the given shape.
        Raises:
            CodecError: a segment has the wrong length or too many are given.
        """
        raise NotImplementedError  # each codec defines its own

    # helpers shared by codecs
    @classmethod
    def _check_segments(cls, segments, shape, params) -> list[int]:
        sizes = cls.level_nbytes(shape, params)
        if not 1 <= len(segments) <= len(sizes):
            raise CodecError(
                f"{cls.name}: asked to decode {len(segments)} levels of a {len(sizes)}-level tensor"
            )
        for k, (seg, n) in enumerate(zip(segments, sizes, strict=False)):
            if len(seg) != n:
                raise CodecError(
                    f"{cls.name}: level {k + 1} segment has {len(seg)} bytes, expected {n}"
                )
        return sizes


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: add a codec to the registry under its fixed id."""
    if int(cls.id) in _REGISTRY:
        raise ValueError(f"codec id {int(cls.id)} registered twice")
    _REGISTRY[int(cls.id)] = cls
    _BY_NAME[cls.name] = cls
    return cls


def get_codec(codec_id: int, where: str = "") -> type[Codec]:
    """Look a codec up by its fixed id; UnknownCodec names the id and the place."""
    try:
        return _REGISTRY[int(codec_id)]
    except (KeyError, TypeError, ValueError):
        at = f" for {where}" if where else ""
        raise UnknownCodec(f"unknown codec id {codec_id!r}{at}") from None


def codec_by_name(name: str) -> type[Codec]:
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(_BY_NAME))
        raise UnknownCodec(f"unknown codec {name!r}", f"choose one of: {known}") from None


def registered() -> dict[int, type[Codec]]:
    return dict(_REGISTRY)


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def pick_group(in_features: int, preferred: int) -> int:
    """Largest power-of-two group <= preferred that divides in_features (min 8).

    Checkpoints with odd widths (tiny test models, some vocab sizes) still get
    group quantization instead of a refusal.
    """
    g = preferred
    while g >= 8:
        if in_features % g == 0:
            return g
        g //= 2
    raise CodecError(
        f"in_features={in_features} is not divisible by 8 or more; group quantization needs that",
        "store this tensor with a raw codec (f32/f16/bf16)",
    )


def finite(cls: type[Codec], w: np.ndarray) -> np.ndarray:
    """w as float32, refusing NaN and infinity (a scale computed from them poisons a group)."""
    w = np.asarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise CodecError(f"{cls.name}: the weight contains NaN or infinity")
    return w


def fp16_scales(cls: type[Codec], x: np.ndarray) -> np.ndarray:
    """Scales or offsets rounded to the float16 they are stored as (float32 values); refuses
    weights so large that they overflow it."""
    with np.errstate(over="ignore"):
        h = np.asarray(x).astype(np.float16).astype(np.float32)
    if not np.isfinite(h).all():
        raise CodecError(
            f"{cls.name}: weights exceed the float16 range of the scales",
            "store this tensor with f32 or bf16",
        )
    return h


def check_matrix(cls: type[Codec], shape: Sequence[int], params: dict) -> tuple[int, int, int]:
    """Common check for group-quantized 2-D weights; returns (rows, cols, group)."""
    if len(shape) != 2:
        raise CodecError(f"{cls.name} quantizes 2-D weights, got shape {list(shape)}")
    rows, cols = int(shape[0]), int(shape[1])
    if rows <= 0 or cols <= 0:
        raise CodecError(f"{cls.name}: shape {list(shape)} has a non-positive dimension")
    g = params.get("group")
    if not isinstance(g, int) or g <= 0 or cols % g or g % 8:
        raise CodecError(
            f"{cls.name}: group {g!r} must be a positive multiple of 8 that divides in_features={cols}"
        )
    return rows, cols, g


def encode_blocked(
    codec: type[Codec], shape: Sequence[int], params: dict, load_rows, block_bytes: int = 32 << 20
) -> list[bytes]:
    """Encode a tensor a block of rows at a time; same layout as codec.encode.

    Holds one block of float32 rows plus the encoded output, never the whole
    float32 tensor: how a converter stores a 2 GB embedding on a small box.
    Per-group codecs give the same bytes as encoding the tensor whole.

    Args:
        load_rows: (start, stop) -> float32 array of rows [start, stop).
        block_bytes: float32 bytes per block (rounded to whole rows).
    """
    rows = int(shape[0])
    row_bytes = 4 * max(1, numel(shape) // max(rows, 1))
    step = max(1, block_bytes // row_bytes)
    if len(shape) > 1:
        step = max(8, step - step % 8)  # 8 rows keep bit planes byte-aligned for any K
    pieces: list[list[list[bytes]]] = [[[] for _ in lv] for lv in codec.level_fields(shape, params)]
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = load_rows(r0, r1)
        segs = codec.encode(block, params)
        for lv, (seg, sizes) in enumerate(
            zip(segs, codec.level_fields(block.shape, params), strict=True)
        ):
            pos = 0
            for f, n in enumerate(sizes):
                pieces[lv][f].append(bytes(seg[pos : pos + n]))
                pos += n
        del block, segs
    return [b"".join(b"".join(field) for field in lv) for lv in pieces]
