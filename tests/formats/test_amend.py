"""amend: new metadata and blobs in an existing file, every other chunk copied byte for byte."""

from __future__ import annotations

import errno
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest

import formats.amend as amend_mod
from formats import constants as C
from formats.amend import amend
from formats.codecs import codec_by_name
from formats.errors import EmoeError, HeaderCorrupt
from formats.reader import EmoeReader
from formats.writer import EmoeWriter

META = {
    C.M_FAMILY: "mixtral",
    C.M_CONFIG: {"model_type": "mixtral", "hidden_size": 64},
    C.M_CHAT_TEMPLATE: "{{ messages }}",
}
# random bytes: zstd cannot shrink them, so they are stored as they are
OLD_NOTES = np.random.default_rng(1).bytes(3000)


def _expert(rng, e: int, codec: str) -> dict:
    c = codec_by_name(codec)
    roles = {}
    for role, shape in (("gate", (32, 64)), ("up", (32, 64)), ("down", (64, 32))):
        w = rng.standard_normal(shape).astype(np.float32)
        roles[role] = (f"l0.e{e}.{role}", w, c.id, c.default_params(shape), "BF16")
    return roles


def _build(path):
    """Dense tensors (one zstd chunk, one nested), two 3-level experts, blobs between them."""
    rng = np.random.default_rng(0)
    steps = np.repeat(rng.integers(0, 4, 256), 16).astype(np.float32).reshape(64, 64)
    w8 = rng.standard_normal((64, 64)).astype(np.float32)
    mwq = codec_by_name("mwq")
    with EmoeWriter(path, META, header_reserve=1) as w:
        w.add_tensor("embed", steps, C.CodecId.F32, src_dtype="F32")
        w.add_tensor("norm", w8[0], C.CodecId.BF16)
        w.add_tensor("attn", w8, C.CodecId.INT8, codec_by_name("int8").default_params(w8.shape))
        w.add_tensor("dense", w8, mwq.id, mwq.default_params(w8.shape))
        w.add_expert(0, 0, _expert(rng, 0, "mwq"))
        w.add_blob(C.BLOB_TOKENIZER, b'{"model": {"type": "BPE"}}' * 20)
        w.add_blob("notes.bin", OLD_NOTES)
        w.add_expert(0, 1, _expert(rng, 1, "bitplane"))
    return path


def _row(c) -> tuple:
    """A chunk row less its offset: what a byte-for-byte copy keeps."""
    return c.length, c.raw_length, c.compression, c.crc32


def _snapshot(path) -> SimpleNamespace:
    with EmoeReader(path) as r:
        return SimpleNamespace(
            tensors={
                (n, k): r.tensor(n, k) for n, t in r.tensors.items() for k in range(1, t.levels + 1)
            },
            experts={
                key: [(r.read_stored(ci), _row(r.chunks[ci])) for ci in e.levels]
                for key, e in r.experts.items()
            },
            blobs={n: bytes(r.read_chunk(ci)) for n, ci in r.blobs.items()},
            metadata=dict(r.metadata),
            n_chunks=len(r.chunks),
        )


def _assert_copied(path, before) -> EmoeReader:
    """Every tensor and expert of `before` is in the file unchanged; returns the open reader."""
    r = EmoeReader(path)
    assert [str(e) for _, e in r.verify() if e] == []
    assert set(r.tensors) == {n for n, _ in before.tensors}
    for (name, k), w in before.tensors.items():
        np.testing.assert_array_equal(r.tensor(name, k), w)
    with open(path, "rb") as f:
        for (layer, idx), levels in before.experts.items():
            e = r.expert(layer, idx)
            assert [(r.read_stored(ci), _row(r.chunks[ci])) for ci in e.levels] == levels
            # all levels are one contiguous read, each chunk at align4096 of the last's end
            start, n = r.expert_span(layer, idx, len(e.levels))
            f.seek(start)
            span = f.read(n)
            pos = 0
            for stored, _ in levels:
                assert span[pos : pos + len(stored)] == stored
                pos = C.align_up(pos + len(stored))
    return r


def test_amend_sets_metadata_adds_blob_and_copies_the_rest(tmp_path):
    p = _build(tmp_path / "m.emoe")
    before = _snapshot(p)
    stats = {"blob": "routing_trace", "dtype": "<u2", "shape": [1, 4, 1, 2], "layers": [0]}
    trace = np.arange(8, dtype="<u2").tobytes()
    out = amend(
        p,
        metadata={C.M_ROUTING_STATS: stats, C.M_CHAT_TEMPLATE: None, "absent.key": None},
        blobs={"routing_trace": trace},
    )
    assert out == p.resolve()
    with _assert_copied(p, before) as r:
        assert {n: bytes(r.read_chunk(ci)) for n, ci in r.blobs.items()} == {
            **before.blobs,
            "routing_trace": trace,
        }
        want = {k: v for k, v in META.items() if k != C.M_CHAT_TEMPLATE}
        assert r.metadata == {**want, C.M_ROUTING_STATS: stats}
        assert len(r.chunks) == before.n_chunks + 1
    assert os.listdir(tmp_path) == ["m.emoe"]


def test_replacing_a_blob_drops_its_old_chunk(tmp_path):
    p = _build(tmp_path / "m.emoe")
    before = _snapshot(p)
    assert OLD_NOTES in p.read_bytes()
    amend(p, blobs={"notes.bin": b"new notes"})
    # the reader refuses unreferenced chunks, so opening proves none was left
    with _assert_copied(p, before) as r:
        assert len(r.chunks) == before.n_chunks
        assert bytes(r.read_chunk(r.blobs["notes.bin"])) == b"new notes"
        assert r.read_chunk(r.blobs[C.BLOB_TOKENIZER]) == before.blobs[C.BLOB_TOKENIZER]
    assert OLD_NOTES not in p.read_bytes()


def test_amending_twice_and_again_unchanged(tmp_path):
    p = _build(tmp_path / "m.emoe")
    before = _snapshot(p)
    amend(p, metadata={"a": 1}, blobs={"x": b"x" * 5000})
    amend(p, metadata={"a": None, "b": [1, 2]}, blobs={"x": b"y", "notes.bin": b"z"})
    with _assert_copied(p, before) as r:
        assert "a" not in r.metadata and r.metadata["b"] == [1, 2]
        assert bytes(r.read_chunk(r.blobs["x"])) == b"y"
        assert bytes(r.read_chunk(r.blobs["notes.bin"])) == b"z"
    # an empty amendment neither grows the header room nor changes a byte
    amend(p)
    settled = p.read_bytes()
    amend(p)
    assert p.read_bytes() == settled


def _boom(*a, **k):
    raise RuntimeError("interrupted")


@pytest.mark.parametrize("where", ["adopt", "add_blob", "close", "_finish", "os.replace"])
def test_failure_mid_amend_keeps_the_original(tmp_path, monkeypatch, where):
    p = _build(tmp_path / "m.emoe")
    original = p.read_bytes()
    if where == "os.replace":
        monkeypatch.setattr(os, "replace", _boom)
    else:
        monkeypatch.setattr(EmoeWriter, where, _boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        amend(p, metadata={"a": 1}, blobs={"x": b"x"})
    assert p.read_bytes() == original
    assert os.listdir(tmp_path) == ["m.emoe"]


@pytest.mark.parametrize(
    "metadata, match",
    [
        ({C.M_ROUTING_STATS: {0: [1, 2]}}, "cannot be stored"),  # int keys: unreadable header
        ({"x": object()}, "cannot be stored"),
        ({C.M_FAMILY: None}, "edgemoe.family"),
    ],
)
def test_metadata_the_reader_would_refuse_is_refused(tmp_path, metadata, match):
    p = _build(tmp_path / "m.emoe")
    original = p.read_bytes()
    with pytest.raises(ValueError, match=match):
        amend(p, metadata=metadata)
    with pytest.raises(ValueError, match="empty"):
        amend(p, blobs={"x": b""})
    assert p.read_bytes() == original and os.listdir(tmp_path) == ["m.emoe"]


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    p = _build(tmp_path / "m.emoe")
    original = p.read_bytes()
    monkeypatch.setattr(
        amend_mod.os, "statvfs", lambda _: SimpleNamespace(f_bavail=2, f_frsize=4096)
    )
    monkeypatch.setattr(EmoeWriter, "__init__", _boom)  # nothing may be written
    with pytest.raises(EmoeError, match="free space on") as info:
        amend(p, blobs={"x": b"x" * 10_000})
    need = int(re.search(r"(\d+) bytes needed, 8192 free", str(info.value)).group(1))
    assert need >= len(original) + 10_000
    assert p.read_bytes() == original and os.listdir(tmp_path) == ["m.emoe"]


def test_corrupt_file_is_refused_with_the_readers_error(tmp_path):
    p = _build(tmp_path / "m.emoe")
    data = bytearray(p.read_bytes())
    data[C.PREAMBLE_SIZE + 10] ^= 0xFF
    p.write_bytes(data)
    with pytest.raises(HeaderCorrupt, match="checksum"):
        amend(p, metadata={"a": 1})
    assert p.read_bytes() == data and os.listdir(tmp_path) == ["m.emoe"]


def _refuse(*a, **k):
    raise OSError(errno.EXDEV, "cross-device")


def _short(src, dst, count, offset_src, offset_dst, _real=os.copy_file_range):
    return _real(src, dst, min(count, 1000), offset_src, offset_dst)


@pytest.mark.parametrize("copy", [_refuse, _short], ids=["fallback", "short-copies"])
def test_copy_without_or_with_short_copy_file_range(tmp_path, monkeypatch, copy):
    p = _build(tmp_path / "m.emoe")
    before = _snapshot(p)
    monkeypatch.setattr(os, "copy_file_range", copy)
    amend(p, metadata={"a": 1})
    _assert_copied(p, before).close()


def test_adopt_after_own_chunks_and_refuses_clashes(tmp_path):
    src = _build(tmp_path / "m.emoe")
    before = _snapshot(src)
    with EmoeReader(src) as r:
        with EmoeWriter(tmp_path / "n.emoe", META) as w:
            w.add_blob("first", b"f" * 100)  # adopted chunks go after the writer's own
            w.adopt(r, drop_blobs=["notes.bin", "not-there"])
        with pytest.raises(ValueError, match="tensor 'embed' written twice"):
            with EmoeWriter(tmp_path / "o.emoe", META) as w:
                w.add_tensor("embed", np.ones(4, np.float32), C.CodecId.F32)
                w.adopt(r)
    with _assert_copied(tmp_path / "n.emoe", before) as n:
        assert set(n.blobs) == {"first", C.BLOB_TOKENIZER}
    assert sorted(os.listdir(tmp_path)) == ["m.emoe", "n.emoe"]


def test_symlink_is_followed_and_mode_kept(tmp_path):
    p = _build(tmp_path / "m.emoe")
    p.chmod(0o640)
    link = tmp_path / "link.emoe"
    link.symlink_to(p.name)
    amend(link, metadata={"a": 1})
    assert link.is_symlink() and (p.stat().st_mode & 0o777) == 0o640
    with EmoeReader(p) as r:
        assert r.metadata["a"] == 1


def test_writer_close_failure_leaves_no_temp_file(tmp_path):
    """close() itself cleans up (the header cannot pack here), not only an exception in the block."""
    dst = tmp_path / "m.emoe"
    dst.write_bytes(b"old")
    with pytest.raises(TypeError):
        with EmoeWriter(dst, {**META, "x": object()}) as w:
            w.add_blob("a", b"a")
    assert dst.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.emoe"]
