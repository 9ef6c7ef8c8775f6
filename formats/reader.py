"""Validating reader of .emoe files (see SPEC.md).

Opening a file reads and checks the preamble, the header's CRC, its msgpack
syntax and its whole schema before any offset is trusted; every failure is a
named error (formats.errors) that says which chunk, tensor or expert is at
fault. Opening never allocates more than the header's size, which is checked
against the file's size first. Chunk bytes are read only on demand, and each
read is checked against its CRC.
"""

from __future__ import annotations

import os
import stat
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import zstandard

from formats import constants as C
from formats.codecs import get_codec
from formats.codecs.base import Codec
from formats.errors import (
    BadMagic,
    ChecksumMismatch,
    CodecError,
    EmoeError,
    HeaderCorrupt,
    HeaderTooLarge,
    MissingTensor,
    NotARegularFile,
    OffsetOutOfRange,
    OverlappingChunks,
    TruncatedFile,
    UnsupportedVersion,
)


@dataclass(frozen=True)
class Chunk:
    index: int
    offset: int  # relative to the data region
    length: int  # stored bytes
    raw_length: int
    compression: int
    crc32: int

    @property
    def span(self) -> int:
        """Bytes the chunk occupies on disk including its alignment padding."""
        return C.align_up(self.length)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    codec: type[Codec]
    shape: tuple[int, ...]
    params: dict
    parts: tuple[tuple[int, int, int], ...]  # (chunk, offset, length) per level
    src_dtype: str | None

    @property
    def levels(self) -> int:
        return len(self.parts)

    def nbytes(self, level: int | None = None) -> int:
        """Encoded bytes of levels 1..level (all by default)."""
        return sum(p[2] for p in self.parts[: level or len(self.parts)])


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    levels: tuple[int, ...]  # chunk index per level
    tensors: dict[str, str]  # role -> tensor name

    @property
    def label(self) -> str:
        return f"expert {self.expert} of layer {self.layer}"


_NOT_REGULAR = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _require_regular(path: Path, mode: int) -> None:
    """Refuse what is not a regular file: reading a FIFO or /dev/zero blocks or never ends."""
    if stat.S_ISREG(mode):
        return
    kind = next((k for test, k in _NOT_REGULAR if test(mode)), "not a regular file")
    raise NotARegularFile(f"{path} is {kind}, not a .emoe file")


def _schema(cond: bool, what: str) -> None:
    if not cond:
        raise HeaderCorrupt(f"header schema: {what}")


def _is_int(x, lo: int = 0, hi: int = 2**64 - 1) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


class EmoeReader:
    """An open .emoe file.

    Args:
        path: the file.
        check_model: also check the model inside (formats.validate.check_file): config
            values and their types, config against tensor shapes and the expert table.
            The runtime opens files with it; tools that read any container do not.
    Raises:
        NotARegularFile: a folder, FIFO, device or socket (refused before any open that
            could block).
        BadMagic, UnsupportedVersion, HeaderTooLarge, HeaderCorrupt, TruncatedFile,
        OffsetOutOfRange, OverlappingChunks, UnknownCodec: the file is not valid;
        the message names what and where.
        BadConfig, ExpertTableMismatch, MissingTensor, ShapeMismatch: with check_model,
            the model's config and tensors disagree.
    """

    def __init__(self, path: str | os.PathLike, *, check_model: bool = False):
        self.path = Path(path)
        self._fd = -1
        try:
            _require_regular(self.path, os.stat(self.path).st_mode)
            # O_NONBLOCK: should the path turn into a FIFO after the stat, open returns at
            # once and the fstat below refuses it
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise EmoeError(
                f"{self.path}: no such file",
                "check the path, or convert a model with `edgemoe convert`",
            ) from None
        try:
            _require_regular(self.path, os.fstat(self._fd).st_mode)
            os.set_blocking(self._fd, True)
            self._open()
            if check_model:
                from formats.validate import check_file

                check_file(self)
        except BaseException:
            self.close()  # sets _fd to -1 so __del__ cannot close a reused descriptor
            raise
        self._local = threading.local()  # zstd decompressors are not thread-safe: one per thread

    # ---- opening
    def _open(self) -> None:
        self.file_size = os.fstat(self._fd).st_size
        pre = os.pread(self._fd, C.PREAMBLE_SIZE, 0)
        if len(pre) < 4 or pre[:4] != C.MAGIC:
            if len(pre) < 4 and C.MAGIC.startswith(pre):
                raise TruncatedFile(
                    f"{self.path}: {len(pre)} bytes, too short for a .emoe preamble"
                )
            raise BadMagic(f"{self.path}: starts with {pre[:4]!r}, not {C.MAGIC!r}")
        if len(pre) < C.PREAMBLE_SIZE:
            raise TruncatedFile(
                f"{self.path}: {len(pre)} bytes, shorter than the {C.PREAMBLE_SIZE}-byte preamble"
            )
        _, major, minor, hlen, data_offset, hcrc, _ = C.PREAMBLE.unpack(pre)
        if major != C.VERSION_MAJOR:
            raise UnsupportedVersion(
                f"{self.path}: format version {major}.{minor}, this reader reads {C.VERSION_MAJOR}.x"
            )
        self.version = (major, minor)
        if hlen == 0 or hlen > C.MAX_HEADER_SIZE:
            raise HeaderTooLarge(
                f"{self.path}: header length {hlen} outside 1..{C.MAX_HEADER_SIZE}"
            )
        if data_offset % C.ALIGNMENT or data_offset < C.PREAMBLE_SIZE + hlen:
            raise OffsetOutOfRange(
                f"{self.path}: data offset {data_offset} is not a multiple of {C.ALIGNMENT} at or after the header's end ({C.PREAMBLE_SIZE + hlen})"
            )
        if self.file_size < C.PREAMBLE_SIZE + hlen:
            raise TruncatedFile(
                f"{self.path}: {self.file_size} bytes, but the header alone ends at byte {C.PREAMBLE_SIZE + hlen}"
            )
        raw = os.pread(self._fd, hlen, C.PREAMBLE_SIZE)
        if zlib.crc32(raw) != hcrc:
            raise HeaderCorrupt(
                f"{self.path}: header checksum mismatch (stored {hcrc:#010x}, computed {zlib.crc32(raw):#010x})"
            )
        try:
            header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several types for bad bytes
            raise HeaderCorrupt(
                f"{self.path}: header is not valid msgpack ({type(e).__name__}: {e})"
            ) from None
        self.data_offset = data_offset
        self.header_length = hlen
        self._parse(header)

    def _parse(self, h) -> None:
        _schema(isinstance(h, dict), "the header is not a map")
        for key in C.HEADER_KEYS:
            _schema(key in h, f"missing top-level key {key!r}")
        meta, chunks, tensors, experts, blobs = (h[k] for k in C.HEADER_KEYS)
        _schema(isinstance(meta, dict), "metadata is not a map")
        _schema(isinstance(meta.get(C.M_FAMILY), str), f"metadata lacks the string {C.M_FAMILY!r}")
        _schema(isinstance(meta.get(C.M_CONFIG), dict), f"metadata lacks the map {C.M_CONFIG!r}")
        self.metadata: dict = meta
        self.chunks = self._parse_chunks(chunks)
        self.tensors = self._parse_tensors(tensors)
        self.experts = self._parse_experts(experts)
        _schema(isinstance(blobs, dict), "blobs is not a map")
        for name, idx in blobs.items():
            _schema(isinstance(name, str), f"blob name {name!r} is not a string")
            _schema(
                _is_int(idx, 0, len(self.chunks) - 1),
                f"blob {name!r} names chunk {idx!r} of {len(self.chunks)}",
            )
        self.blobs: dict[str, int] = dict(blobs)
        self._owners = self._chunk_owners()
        unused = [i for i in range(len(self.chunks)) if i not in self._owners]
        _schema(
            not unused, f"chunk {unused[0] if unused else ''} is referenced by no tensor or blob"
        )

    def _parse_chunks(self, chunks) -> list[Chunk]:
        _schema(isinstance(chunks, list), "chunks is not an array")
        data_size = self.file_size - self.data_offset
        out = []
        for i, c in enumerate(chunks):
            _schema(
                isinstance(c, list) and len(c) == 5 and all(_is_int(x) for x in c),
                f"chunk {i} is not [offset, length, raw_length, compression, crc32] of unsigned ints",
            )
            off, length, raw_len, comp, crc = c
            _schema(length >= 1, f"chunk {i} has length 0")
            _schema(crc <= 0xFFFFFFFF, f"chunk {i} crc32 {crc} exceeds 32 bits")
            if off % C.ALIGNMENT:
                raise OffsetOutOfRange(f"chunk {i} offset {off} is not a multiple of {C.ALIGNMENT}")
            if comp == C.Compression.NONE:
                _schema(
                    raw_len == length,
                    f"chunk {i} is uncompressed but raw_length {raw_len} != length {length}",
                )
            elif comp == C.Compression.ZSTD:
                _schema(
                    1 <= raw_len <= C.MAX_ZSTD_RATIO * length,
                    f"chunk {i} claims {raw_len} raw bytes from {length} stored (limit x{C.MAX_ZSTD_RATIO})",
                )
            else:
                raise HeaderCorrupt(
                    f"chunk {i} has unknown compression {comp}",
                    "upgrade edgemoe or re-convert the file",
                )
            out.append(Chunk(i, off, length, raw_len, comp, crc))
        by_offset = sorted(out, key=lambda ch: ch.offset)
        for a, b in zip(by_offset, by_offset[1:], strict=False):
            if a.offset + a.span > b.offset:
                raise OverlappingChunks(
                    f"chunk {a.index} [{a.offset}, {a.offset + a.length}) overlaps chunk {b.index} at {b.offset}"
                )
        end = C.align_up(by_offset[-1].offset + by_offset[-1].length) if out else 0
        if by_offset and by_offset[-1].offset + by_offset[-1].length > max(data_size, 0):
            last = by_offset[-1]
            raise TruncatedFile(
                f"{self.path}: chunk {last.index} ends at byte {self.data_offset + last.offset + last.length} of a {self.file_size}-byte file"
            )
        if data_size < end:
            raise TruncatedFile(
                f"{self.path}: {self.file_size} bytes, {self.data_offset + end} expected"
            )
        if data_size > end:
            raise OffsetOutOfRange(
                f"{self.path}: {data_size - end} bytes after the last chunk's padding"
            )
        return out

    def _parse_tensors(self, tensors) -> dict[str, TensorEntry]:
        _schema(isinstance(tensors, dict), "tensors is not a map")
        out = {}
        for name, t in tensors.items():
            _schema(isinstance(name, str), f"tensor name {name!r} is not a string")
            _schema(isinstance(t, dict), f"tensor {name!r} is not a map")
            for key in (C.T_CODEC, C.T_SHAPE, C.T_PARAMS, C.T_PARTS):
                _schema(key in t, f"tensor {name!r} lacks {key!r}")
            codec = get_codec(t[C.T_CODEC], f"tensor {name!r}")
            shape = t[C.T_SHAPE]
            _schema(
                isinstance(shape, list)
                and 1 <= len(shape) <= C.MAX_NDIM
                and all(_is_int(d, 1, 2**40) for d in shape),
                f"tensor {name!r} has bad shape {shape!r}",
            )
            params = t[C.T_PARAMS]
            _schema(isinstance(params, dict), f"tensor {name!r} params is not a map")
            try:
                codec.check_params(shape, params)
                sizes = codec.level_nbytes(shape, params)
            except CodecError as e:
                raise HeaderCorrupt(f"tensor {name!r}: {e.what}") from None
            parts = t[C.T_PARTS]
            _schema(
                isinstance(parts, list) and len(parts) == len(sizes),
                f"tensor {name!r} has {len(parts) if isinstance(parts, list) else parts!r} parts, its codec {codec.name} has {len(sizes)} levels",
            )
            checked = []
            for k, (p, size) in enumerate(zip(parts, sizes, strict=True)):
                _schema(
                    isinstance(p, list) and len(p) == 3 and all(_is_int(x) for x in p),
                    f"tensor {name!r} part {k + 1} is not [chunk, offset, length]",
                )
                ci, off, length = p
                if ci >= len(self.chunks):
                    raise OffsetOutOfRange(
                        f"tensor {name!r} level {k + 1} names chunk {ci} of {len(self.chunks)}"
                    )
                if off + length > self.chunks[ci].raw_length:
                    raise OffsetOutOfRange(
                        f"tensor {name!r} level {k + 1} bytes [{off}, {off + length}) exceed chunk {ci}'s {self.chunks[ci].raw_length}"
                    )
                _schema(
                    length == size,
                    f"tensor {name!r} level {k + 1} has {length} bytes, codec {codec.name} needs {size}",
                )
                checked.append((ci, off, length))
            src = t.get(C.T_SRC_DTYPE)
            out[name] = TensorEntry(
                name,
                codec,
                tuple(shape),
                params,
                tuple(checked),
                src if isinstance(src, str) else None,
            )
        return out

    def _parse_experts(self, experts) -> dict[tuple[int, int], ExpertEntry]:
        _schema(isinstance(experts, list), "experts is not an array")
        out: dict[tuple[int, int], ExpertEntry] = {}
        for i, e in enumerate(experts):
            _schema(
                isinstance(e, dict)
                and all(k in e for k in (C.E_LAYER, C.E_EXPERT, C.E_LEVELS, C.E_TENSORS)),
                f"expert record {i} is not a map with layer, expert, levels, tensors",
            )
            layer, idx, levels, roles = e[C.E_LAYER], e[C.E_EXPERT], e[C.E_LEVELS], e[C.E_TENSORS]
            _schema(
                _is_int(layer, 0, 2**20) and _is_int(idx, 0, 2**20),
                f"expert record {i} has bad layer/expert ids",
            )
            label = f"expert {idx} of layer {layer}"
            _schema((layer, idx) not in out, f"{label} appears twice")
            _schema(
                isinstance(levels, list)
                and levels
                and all(_is_int(c, 0, len(self.chunks) - 1) for c in levels),
                f"{label} has bad level chunks {levels!r}",
            )
            _schema(
                isinstance(roles, dict)
                and set(roles) == set(C.EXPERT_ROLES)
                and all(isinstance(v, str) for v in roles.values()),
                f"{label} needs tensor names for roles {C.EXPERT_ROLES}",
            )
            for role in C.EXPERT_ROLES:
                if roles[role] not in self.tensors:
                    raise MissingTensor(
                        f"{label}: its {role} tensor {roles[role]!r} is not in the file"
                    )
            for k, ci in enumerate(levels):
                pos = 0
                for role in C.EXPERT_ROLES:
                    t = self.tensors[roles[role]]
                    _schema(
                        t.levels == len(levels),
                        f"{label}: {role} has {t.levels} levels, the expert {len(levels)}",
                    )
                    p = t.parts[k]
                    _schema(
                        p[0] == ci and p[1] == pos,
                        f"{label}: {role} level {k + 1} is not at byte {pos} of chunk {ci}",
                    )
                    pos += p[2]
                _schema(
                    pos == self.chunks[ci].raw_length,
                    f"{label}: level {k + 1} chunk {ci} holds {self.chunks[ci].raw_length} bytes, its tensors {pos}",
                )
                if k:
                    prev = self.chunks[levels[k - 1]]
                    _schema(
                        self.chunks[ci].offset == prev.offset + prev.span,
                        f"{label}: level {k + 1} does not follow level {k} on disk",
                    )
            out[(layer, idx)] = ExpertEntry(layer, idx, tuple(levels), dict(roles))
        return out

    def _chunk_owners(self) -> dict[int, str]:
        owners: dict[int, str] = {}
        for e in self.experts.values():
            for k, ci in enumerate(e.levels):
                owners[ci] = f"{e.label}, level {k + 1}"
        for t in self.tensors.values():
            for k, (ci, _, _) in enumerate(t.parts):
                owners.setdefault(
                    ci, f"tensor {t.name!r}" + (f", level {k + 1}" if t.levels > 1 else "")
                )
        for name, ci in self.blobs.items():
            owners.setdefault(ci, f"blob {name!r}")
        return owners

    # ---- properties
    @property
    def family(self) -> str:
        return self.metadata[C.M_FAMILY]

    @property
    def config(self) -> dict:
        return self.metadata[C.M_CONFIG]

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get(C.M_CHAT_TEMPLATE)

    def owner(self, chunk: int) -> str:
        """What a chunk holds, for error messages ("expert 3 of layer 1, level 2")."""
        return self._owners.get(chunk, f"chunk {chunk}")

    # ---- reading
    def read_stored(self, chunk: int) -> bytes:
        """The stored bytes of one chunk (buffered pread; the runtime's store uses O_DIRECT)."""
        c = self.chunks[chunk]
        data = os.pread(self._fd, c.length, self.data_offset + c.offset)
        if len(data) != c.length:
            raise TruncatedFile(f"{self.path}: {self.owner(chunk)} (chunk {chunk}) is cut short")
        return data

    def check_crc(self, chunk: int, stored: bytes | memoryview) -> None:
        c = self.chunks[chunk]
        got = zlib.crc32(stored)
        if got != c.crc32:
            raise ChecksumMismatch(
                f"{self.path}: checksum mismatch in {self.owner(chunk)} (chunk {chunk} at byte {self.data_offset + c.offset}: stored {c.crc32:#010x}, computed {got:#010x})"
            )

    def payload(
        self, chunk: int, stored: bytes | memoryview, check: bool = True
    ) -> bytes | memoryview:
        """Check a chunk's stored bytes (check=False: the caller has verified this chunk
        before) and return its raw (decompressed) bytes."""
        if check:
            self.check_crc(chunk, stored)
        c = self.chunks[chunk]
        if c.compression == C.Compression.NONE:
            return stored
        try:
            size = zstandard.frame_content_size(stored)
            if size != c.raw_length:
                raise HeaderCorrupt(
                    f"{self.owner(chunk)}: zstd frame holds {size} bytes, header says {c.raw_length}"
                )
            dctx = getattr(self._local, "dctx", None)
            if dctx is None:
                dctx = self._local.dctx = zstandard.ZstdDecompressor()
            return dctx.decompress(stored, max_output_size=c.raw_length)
        except zstandard.ZstdError as e:
            raise HeaderCorrupt(
                f"{self.owner(chunk)} (chunk {chunk}): bad zstd data ({e})"
            ) from None

    def read_chunk(self, chunk: int) -> bytes | memoryview:
        """Raw (decompressed) bytes of one chunk, checksum verified."""
        return self.payload(chunk, self.read_stored(chunk))

    def tensor(self, name: str, level: int | None = None) -> np.ndarray:
        """Decode a tensor at a level (1-based; default its highest) as float32."""
        t = self.tensors.get(name)
        if t is None:
            raise MissingTensor(
                f"{self.path}: no tensor {name!r}", "check the name with `edgemoe inspect`"
            )
        level = level or t.levels
        if not 1 <= level <= t.levels:
            raise ValueError(f"tensor {name!r} has levels 1..{t.levels}, asked for {level}")
        segs = []
        cache: dict[int, bytes | memoryview] = {}
        for ci, off, length in t.parts[:level]:
            if ci not in cache:
                cache[ci] = self.read_chunk(ci)
            segs.append(memoryview(cache[ci])[off : off + length])
        return t.codec.decode(segs, t.shape, t.params)

    def expert(self, layer: int, expert: int) -> ExpertEntry:
        e = self.experts.get((layer, expert))
        if e is None:
            raise MissingTensor(
                f"{self.path}: no expert {expert} in layer {layer}", "check `edgemoe inspect`"
            )
        return e

    def expert_span(self, layer: int, expert: int, level: int) -> tuple[int, int]:
        """(absolute file offset, bytes) of one contiguous read holding levels 1..level."""
        e = self.expert(layer, expert)
        first, last = self.chunks[e.levels[0]], self.chunks[e.levels[level - 1]]
        return self.data_offset + first.offset, last.offset + last.length - first.offset

    def iter_chunks(self) -> Iterator[Chunk]:
        return iter(self.chunks)

    def verify(self) -> Iterator[tuple[Chunk, EmoeError | None]]:
        """Check every chunk's checksum; yields (chunk, error or None) in file order."""
        for c in sorted(self.chunks, key=lambda ch: ch.offset):
            try:
                self.read_chunk(c.index)
                yield c, None
            except EmoeError as e:
                yield c, e

    def fileno(self) -> int:
        """The open file's descriptor (EmoeWriter.adopt copies chunks from it)."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
