"""Streaming writer of .emoe files (see SPEC.md).

Chunks are written as they come, each at a 4096-byte boundary of the data
region, so a converter holds only the tensors of one expert at a time. The
header goes in front at the end: the writer reserves room for it up front
(the caller's estimate) and, if the header outgrows that room, moves the
data region once with copy_file_range. Everything goes to a temporary file
beside the destination that is renamed into place only after fsync, so an
interrupted write leaves no .emoe behind. adopt() copies the chunks of an
existing file byte for byte, which is how formats.amend edits one.
"""

from __future__ import annotations

import glob
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import numpy as np
import zstandard

from formats import constants as C
from formats.codecs import get_codec
from formats.errors import CodecError, EmoeError, TruncatedFile

if TYPE_CHECKING:
    from formats.reader import Chunk, EmoeReader, TensorEntry

DEFAULT_HEADER_RESERVE = 64 * 1024
_COPY_BLOCK = 16 * 1024 * 1024  # buffer of the pread/pwrite fallback of _copy_range


def _copy_range(src_fd: int, dst_fd: int, length: int, src_off: int, dst_off: int) -> int:
    """Copy bytes between two files at given offsets; returns the count (short only at EOF).

    copy_file_range keeps the bytes in the kernel (or shares extents where the
    filesystem can); where it is refused (EXDEV, ENOSYS...) the rest goes
    through a buffer.
    """
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src_fd, dst_fd, length - done, src_off + done, dst_off + done)
            if n == 0:
                return done
            done += n
    except OSError:
        while done < length:
            data = os.pread(src_fd, min(length - done, _COPY_BLOCK), src_off + done)
            if not data:
                return done
            done += os.pwrite(dst_fd, data, dst_off + done)  # a short write is re-read
    return done


def _tensor_record(t: TensorEntry, remap: Mapping[int, int]) -> dict:
    """A reader's tensor as the header record _entry writes, its chunks renumbered."""
    record = {
        C.T_CODEC: int(t.codec.id),
        C.T_SHAPE: list(t.shape),
        C.T_PARAMS: dict(t.params),
        C.T_PARTS: [[remap[ci], off, length] for ci, off, length in t.parts],
    }
    if t.src_dtype:
        record[C.T_SRC_DTYPE] = t.src_dtype
    return record


def encode_tensor(name, w, codec_id, params, calib=None) -> list[bytes]:
    """One tensor's level segments, checked against the codec's size table."""
    codec = get_codec(codec_id, name)
    w = np.ascontiguousarray(w, dtype=np.float32)
    codec.check_params(w.shape, params)
    try:
        segments = codec.encode(w, params, calib=calib)
    except CodecError as e:
        raise CodecError(f"{name}: {e.what}", e.fix_hint) from None
    expected = codec.level_nbytes(w.shape, params)
    if [len(s) for s in segments] != expected:
        raise EmoeError(
            f"codec {codec.name} produced wrong segment sizes for {name}", "report this bug"
        )
    return segments


def encode_expert(
    tensors: Mapping[str, tuple], calib: Mapping[str, np.ndarray] | None = None
) -> dict[str, tuple]:
    """The CPU-heavy half of EmoeWriter.add_expert, a plain function so a converter can run it
    in worker processes: role -> (name, shape, codec_id, params, src_dtype, segments)."""
    if set(tensors) != set(C.EXPERT_ROLES):
        raise ValueError(f"an expert needs roles {C.EXPERT_ROLES}, got {sorted(tensors)}")
    encoded = {}
    for role in C.EXPERT_ROLES:
        name, w, codec_id, params, src_dtype = tensors[role]
        segs = encode_tensor(name, w, codec_id, dict(params), (calib or {}).get(role))
        encoded[role] = (name, tuple(w.shape), codec_id, dict(params), src_dtype, segs)
    return encoded


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files of earlier writes of `path` whose process is gone (SIGKILL and the
    OOM killer leave no chance to clean up); a live writer's file is left alone."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -4]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            tmp.with_suffix(".move").unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


class EmoeWriter:
    """Write one .emoe file chunk by chunk.

    Use as a context manager; an exception inside the block removes the
    temporary file and leaves any existing file at `path` untouched.

    Args:
        path: destination file.
        metadata: the header's metadata map (family and config are required).
        header_reserve: bytes to reserve for the header (an estimate is fine).
        compress: try zstd on every chunk (kept only when it saves >= 5%, or half of an
            expert chunk: those are read on the hot path).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: Mapping,
        *,
        header_reserve: int = DEFAULT_HEADER_RESERVE,
        compress: bool = True,
        zstd_level: int = C.ZSTD_LEVEL,
    ):
        for key in (C.M_FAMILY, C.M_CONFIG):
            if key not in metadata:
                raise ValueError(f"metadata needs {key!r}")
        self.path = Path(path)
        self.metadata = dict(metadata)
        self.compress = compress
        self._zstd = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True)
        self._chunks: list[list[int]] = []
        self._tensors: dict[str, dict] = {}
        self._experts: list[dict] = []
        self._expert_keys: set[tuple[int, int]] = set()
        self._blobs: dict[str, int] = {}
        self._data_offset = C.align_up(C.PREAMBLE_SIZE + max(header_reserve, 1024))
        self._end = 0  # end of the last chunk, relative to the data region
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        _remove_stale_temps(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp_path, "wb+")
        self._done = False

    # ---- chunks
    def _write_chunk(self, raw: bytes, min_saving: float = C.MIN_ZSTD_SAVING) -> int:
        stored, comp = raw, C.Compression.NONE
        if self.compress and len(raw) >= 64:
            z = self._zstd.compress(raw)
            saves = len(z) <= (1 - min_saving) * len(raw)
            if saves and len(raw) <= C.MAX_ZSTD_RATIO * len(z):
                stored, comp = z, C.Compression.ZSTD
        offset = C.align_up(self._end)
        self._f.seek(self._data_offset + offset)
        self._f.write(stored)
        self._end = offset + len(stored)
        self._chunks.append([offset, len(stored), len(raw), int(comp), zlib.crc32(stored)])
        return len(self._chunks) - 1

    def _entry(self, name, shape, codec_id, params, src_dtype) -> dict:
        if name in self._tensors:
            raise ValueError(f"tensor {name!r} written twice")
        entry = {
            C.T_CODEC: int(codec_id),
            C.T_SHAPE: [int(d) for d in shape],
            C.T_PARAMS: dict(params),
            C.T_PARTS: [],
        }
        if src_dtype:
            entry[C.T_SRC_DTYPE] = str(src_dtype)
        self._tensors[name] = entry
        return entry

    # ---- public API
    def add_tensor(
        self,
        name: str,
        w: np.ndarray,
        codec_id: int,
        params: Mapping | None = None,
        *,
        src_dtype: str | None = None,
        calib: np.ndarray | None = None,
    ) -> None:
        """Add a dense tensor; each level becomes a chunk of its own."""
        params = dict(params or {})
        segments = encode_tensor(name, w, codec_id, params, calib)
        self.add_encoded(name, w.shape, codec_id, params, segments, src_dtype=src_dtype)

    def add_encoded(
        self,
        name: str,
        shape,
        codec_id: int,
        params: Mapping,
        segments: list[bytes],
        *,
        src_dtype: str | None = None,
    ) -> None:
        """Add a dense tensor already encoded (e.g. by encode_blocked), one chunk per level."""
        codec = get_codec(codec_id, name)
        params = dict(params)
        codec.check_params(shape, params)
        if [len(s) for s in segments] != codec.level_nbytes(shape, params):
            raise EmoeError(
                f"{name}: segment sizes do not match codec {codec.name}", "report this bug"
            )
        entry = self._entry(name, shape, codec_id, params, src_dtype)
        for seg in segments:
            entry[C.T_PARTS].append([self._write_chunk(seg), 0, len(seg)])

    def add_expert(
        self,
        layer: int,
        expert: int,
        tensors: Mapping[str, tuple],
        *,
        calib: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Add one routed expert: its level-k segments of all roles share chunk k.

        Args:
            tensors: role ("gate", "up", "down") -> (name, weight, codec_id, params, src_dtype).
            calib: optional role -> calibration activations for fitted codecs.
        """
        self._check_new_expert(layer, expert)
        self.add_encoded_expert(layer, expert, encode_expert(tensors, calib))

    def _check_new_expert(self, layer: int, expert: int) -> tuple[int, int]:
        key = (int(layer), int(expert))
        if key in self._expert_keys:
            raise ValueError(f"expert {key} written twice")
        return key

    def add_encoded_expert(self, layer: int, expert: int, encoded: Mapping[str, tuple]) -> None:
        """Add one routed expert from encode_expert's output (possibly made in another process)."""
        key = self._check_new_expert(layer, expert)
        if set(encoded) != set(C.EXPERT_ROLES):
            raise ValueError(f"expert {key} needs roles {C.EXPERT_ROLES}, got {sorted(encoded)}")
        n_levels = {len(v[5]) for v in encoded.values()}
        if len(n_levels) != 1:
            raise ValueError(f"expert {key}: roles have different level counts {n_levels}")
        entries = {role: self._entry(*v[:5]) for role, v in encoded.items()}
        levels = []
        for k in range(n_levels.pop()):
            raw, offs = bytearray(), {}
            for role in C.EXPERT_ROLES:
                offs[role] = len(raw)
                raw += encoded[role][5][k]
            chunk = self._write_chunk(bytes(raw), C.MIN_ZSTD_SAVING_EXPERT)
            levels.append(chunk)
            for role in C.EXPERT_ROLES:
                entries[role][C.T_PARTS].append([chunk, offs[role], len(encoded[role][5][k])])
        self._expert_keys.add(key)
        self._experts.append(
            {
                C.E_LAYER: key[0],
                C.E_EXPERT: key[1],
                C.E_LEVELS: levels,
                C.E_TENSORS: {r: encoded[r][0] for r in C.EXPERT_ROLES},
            }
        )

    def adopt(self, reader: EmoeReader, *, drop_blobs: Iterable[str] = ()) -> None:
        """Copy every chunk, tensor, expert and blob of an open file into this one.

        Stored bytes are copied as they are (compressed chunks stay compressed,
        chunk rows keep their lengths and CRCs), in the source's file order so
        an expert's level chunks stay back to back. Metadata is not copied:
        the caller sets this writer's.

        Args:
            reader: the source file, open (and so validated).
            drop_blobs: blobs to leave out, e.g. the ones the caller replaces;
                names the reader lacks are ignored. A chunk only they use is
                not copied (the reader refuses unreferenced chunks).
        Raises:
            ValueError: a tensor, expert or blob of reader is already written here.
            TruncatedFile: the source file shrank during the copy.
        """
        drop = set(drop_blobs)
        blobs = {name: ci for name, ci in reader.blobs.items() if name not in drop}
        clash = (
            [f"tensor {n!r}" for n in reader.tensors if n in self._tensors]
            + [f"expert {k}" for k in reader.experts if k in self._expert_keys]
            + [f"blob {n!r}" for n in blobs if n in self._blobs]
        )
        if clash:
            raise ValueError(f"{clash[0]} written twice (adopted from {reader.path})")
        used = set(blobs.values())  # expert level chunks are tensor parts too
        used.update(ci for t in reader.tensors.values() for ci, _, _ in t.parts)
        self._f.flush()  # the copies write through the descriptor, past the buffer
        remap = {
            c.index: self._copy_chunk(reader, c)
            for c in sorted(reader.chunks, key=lambda ch: ch.offset)
            if c.index in used
        }
        for name, t in reader.tensors.items():
            self._tensors[name] = _tensor_record(t, remap)
        for key, e in reader.experts.items():
            self._expert_keys.add(key)
            self._experts.append(
                {
                    C.E_LAYER: e.layer,
                    C.E_EXPERT: e.expert,
                    C.E_LEVELS: [remap[ci] for ci in e.levels],
                    C.E_TENSORS: {r: e.tensors[r] for r in C.EXPERT_ROLES},
                }
            )
        for name, ci in blobs.items():
            self._blobs[name] = remap[ci]

    def _copy_chunk(self, reader: EmoeReader, c: Chunk) -> int:
        """Copy one stored chunk to the next aligned offset, as _write_chunk places it."""
        offset = C.align_up(self._end)
        got = _copy_range(
            reader.fileno(),
            self._f.fileno(),
            c.length,
            reader.data_offset + c.offset,
            self._data_offset + offset,
        )
        if got != c.length:
            raise TruncatedFile(
                f"{reader.path}: {reader.owner(c.index)} (chunk {c.index}) was cut short while copied"
            )
        self._end = offset + c.length
        self._chunks.append([offset, c.length, c.raw_length, c.compression, c.crc32])
        return len(self._chunks) - 1

    def add_blob(self, name: str, data: bytes) -> None:
        if name in self._blobs:
            raise ValueError(f"blob {name!r} written twice")
        if not len(data):  # the format has no empty chunks; a reader would refuse the file
            raise ValueError(f"blob {name!r} is empty")
        self._blobs[name] = self._write_chunk(bytes(data))

    def set_metadata(self, key: str, value) -> None:
        self.metadata[key] = value

    def header_bytes(self) -> bytes:
        header = {
            C.KEY_METADATA: self.metadata,
            C.KEY_CHUNKS: self._chunks,
            C.KEY_TENSORS: self._tensors,
            C.KEY_EXPERTS: self._experts,
            C.KEY_BLOBS: self._blobs,
        }
        return msgpack.packb(header, use_bin_type=True)

    def close(self) -> Path:
        """Write the header, sync and rename into place. Returns the final path.

        If any step fails (metadata msgpack cannot pack, a full disk...) the
        temporary file is removed and any file at `path` is left as it was.
        """
        if self._done:
            return self.path
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        return self.path

    def _finish(self) -> None:
        header = self.header_bytes()
        if len(header) > C.MAX_HEADER_SIZE:
            raise EmoeError(
                f"header of {len(header)} bytes exceeds the {C.MAX_HEADER_SIZE}-byte limit",
                "store fewer, larger tensors (or raise MAX_HEADER_SIZE in a new format version)",
            )
        need = C.align_up(C.PREAMBLE_SIZE + len(header))
        if need > self._data_offset:
            self._relocate(need)
        pre = C.PREAMBLE.pack(
            C.MAGIC,
            C.VERSION_MAJOR,
            C.VERSION_MINOR,
            len(header),
            self._data_offset,
            zlib.crc32(header),
            0,
        )
        self._f.seek(0)
        self._f.write(pre + header)
        self._f.write(b"\0" * (self._data_offset - C.PREAMBLE_SIZE - len(header)))
        self._f.truncate(self._data_offset + C.align_up(self._end))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.path)
        self._done = True

    def _relocate(self, new_offset: int) -> None:
        """Move the data region to new_offset (header outgrew its reserve)."""
        size = C.align_up(self._end)
        self._f.flush()
        moved = self.tmp_path.with_suffix(".move")
        with open(moved, "wb") as dst:
            dst.truncate(new_offset)
            _copy_range(self._f.fileno(), dst.fileno(), size, self._data_offset, new_offset)
        self._f.close()
        os.replace(moved, self.tmp_path)
        self._f = open(self.tmp_path, "rb+")
        self._data_offset = new_offset

    def abort(self) -> None:
        """Drop the temporary file; nothing is left behind."""
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)
            self.tmp_path.with_suffix(".move").unlink(missing_ok=True)  # a failed _relocate's

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
