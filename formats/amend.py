"""Amend an existing .emoe file: set metadata keys, add or replace blobs.

What it is for: `edgemoe calibrate` stores its routing statistics (a metadata
map and a trace blob) in a file converted earlier; a chat template or a fixed
tokenizer can be added the same way, without converting again.

How: the file is opened (so fully validated) and written anew beside itself
by EmoeWriter, whose adopt() copies every chunk's stored bytes in the kernel
(copy_file_range), neither decoding nor recompressing them; only the header
and the new blobs are new. The copy is synced and renamed over the original,
so an error at any point leaves the original as it was and no temporary file.
It is a full copy of the data region: it costs one file's worth of disk
writes and needs that much free space on the file's filesystem, which is
checked before anything is written.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

import msgpack

from formats import constants as C
from formats.errors import EmoeError
from formats.reader import EmoeReader
from formats.writer import EmoeWriter

# Header growth per new blob beyond its name: a chunk row (<= 34 bytes) and
# the blob entry's string header and chunk index (<= 10).
_BLOB_HEADER_BYTES = 64
# Array and map headers of the header that may widen (fix -> 16 -> 32 bit).
_HEADER_SLACK = 64


def amend(
    path: str | os.PathLike,
    *,
    metadata: Mapping | None = None,
    blobs: Mapping[str, bytes] | None = None,
) -> Path:
    """Set metadata keys and add or replace blobs of a .emoe file, atomically.

    Args:
        path: the file; a symlink is followed and the file it names replaced.
        metadata: keys to set; a value of None deletes the key. Maps inside
            values need string keys (the reader refuses others).
        blobs: name -> bytes (not empty) to add, or to replace the blob of that name.
    Returns:
        the amended file's path.
    Raises:
        EmoeError: the file is not a valid .emoe (the reader's named error), or
            its filesystem has too little free space for the copy.
        ValueError: the new metadata could not be read back (family or config
            missing, a non-string key, a value msgpack cannot pack), or a blob is empty.
    """
    path = Path(path).resolve()
    updates = dict(metadata or {})
    new_blobs = {name: bytes(data) for name, data in (blobs or {}).items()}
    for name, data in new_blobs.items():
        if not data:
            raise ValueError(f"blob {name!r} is empty; a .emoe stores no empty blobs")
    with EmoeReader(path) as reader:
        meta = _merged(reader.metadata, updates)
        growth = _header_growth(updates, new_blobs)
        blob_bytes = sum(C.align_up(len(data)) for data in new_blobs.values())
        _check_free_space(path, reader.file_size + C.align_up(growth) + blob_bytes)
        w = EmoeWriter(path, meta, header_reserve=reader.header_length + growth)
        try:
            os.chmod(w.tmp_path, stat.S_IMODE(os.fstat(reader.fileno()).st_mode))
            w.adopt(reader, drop_blobs=new_blobs)
            for name, data in new_blobs.items():
                w.add_blob(name, data)
            return w.close()
        except BaseException:
            w.abort()  # a no-op once close() has renamed the file into place
            raise


def _merged(old: Mapping, updates: Mapping) -> dict:
    """old metadata with updates applied (None deletes), checked to read back as the reader will."""
    meta = dict(old)
    for key, value in updates.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    # the reader unpacks with strict_map_key: int keys (e.g. layer -> counts) would make the file unreadable
    try:
        msgpack.unpackb(msgpack.packb(meta, use_bin_type=True), raw=False, strict_map_key=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"metadata cannot be stored: {e}") from None
    if not isinstance(meta.get(C.M_FAMILY), str) or not isinstance(meta.get(C.M_CONFIG), dict):
        raise ValueError(f"metadata needs the string {C.M_FAMILY!r} and the map {C.M_CONFIG!r}")
    return meta


def _header_growth(updates: Mapping, blobs: Mapping[str, bytes]) -> int:
    """An upper bound on how much the header grows, so the writer never has to relocate."""
    grow = len(msgpack.packb(dict(updates), use_bin_type=True))
    grow += sum(len(name.encode()) + _BLOB_HEADER_BYTES for name in blobs)
    return grow + _HEADER_SLACK


def _check_free_space(path: Path, need: int) -> None:
    """Refuse, before writing, a copy the file's filesystem has no room for."""
    folder = path.parent
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise EmoeError(
            f"amending {path.name} writes a copy of it: {need} bytes needed, {free} free on {folder}",
            f"free space on {folder} or copy the file to a bigger disk",
        )
