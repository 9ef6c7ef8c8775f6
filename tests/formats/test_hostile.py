"""Hostile files and fuzzing: the reader fails only with its named errors.

The folder tests/formats/hostile/ holds one file per failure the spec names
(MANIFEST.json gives the expected error); hostile_gen.py rebuilds it. The
hypothesis tests throw random bytes, mutated headers and random header
values at the parser: nothing but an EmoeError may come out, no input may
hang it, and opening may not allocate more than a bounded multiple of what
the file holds.
"""

from __future__ import annotations

import copy
import json
import os
import tracemalloc
from pathlib import Path

import msgpack
import pytest
from hostile_gen import EXPECTED_BITROT_OWNER, assemble, split, variants, write_base
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats.errors as E
from formats import constants as C
from formats.reader import EmoeReader

HOSTILE = Path(__file__).parent / "hostile"
MANIFEST = json.loads((HOSTILE / "MANIFEST.json").read_text())


def _exercise(path: Path) -> None:
    """Open a file and read every tensor, as a runtime would."""
    with EmoeReader(path) as r:
        for name in r.tensors:
            r.tensor(name)
        for name in r.blobs:
            r.read_chunk(r.blobs[name])


def _check(path: Path, error: str | None, when: str) -> None:
    if error is None:
        _exercise(path)
        return
    cls = getattr(E, error)
    if when == "open":
        with pytest.raises(cls) as info:
            EmoeReader(path)
    else:
        r = EmoeReader(path)
        with pytest.raises(cls) as info:
            _exercise(path)
        r.close()
    msg = str(info.value)
    assert ";" in msg and len(msg.split(";")[-1].strip()) > 10, f"no fix hint in {msg!r}"


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_committed_hostile_file(name):
    _check(HOSTILE / name, MANIFEST[name]["error"], MANIFEST[name]["when"])


_BASE: list[bytes] = []


def _base() -> bytes:
    """The valid base file's bytes (built once; not a fixture, so hypothesis never prints it)."""
    if not _BASE:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            _BASE.append(write_base(Path(d) / "base.emoe").read_bytes())
    return _BASE[0]


def test_fresh_hostile_variants(tmp_path):
    made = variants(_base())
    assert set(made) | {"valid.emoe"} == set(MANIFEST), (
        "hostile/ is stale: run tests/formats/hostile_gen.py"
    )
    for name, (blob, err, when) in made.items():
        p = tmp_path / name
        p.write_bytes(blob)
        _check(p, err, when)


def test_bitrot_names_the_expert_and_level():
    with EmoeReader(HOSTILE / "bitrot_expert.emoe") as r:
        bad = [err for _, err in r.verify() if err is not None]
    assert len(bad) == 1 and isinstance(bad[0], E.ChecksumMismatch)
    assert EXPECTED_BITROT_OWNER in str(bad[0])


def test_zstd_chunks_are_validated(tmp_path):
    p = write_base(tmp_path / "z.emoe", expert_codec="f32", compress=False)
    h, data, doff = split(p.read_bytes())
    # a zstd chunk whose frame says a different size than the header does
    import zstandard

    payload = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 4096)
    h = copy.deepcopy(h)
    ci = h[C.KEY_BLOBS][C.BLOB_TOKENIZER]
    c = h[C.KEY_CHUNKS][ci]
    data = bytearray(data)
    data[c[0] : c[0] + len(payload)] = payload
    import zlib

    c[1], c[2], c[3], c[4] = len(payload), 17, int(C.Compression.ZSTD), zlib.crc32(payload)
    q = tmp_path / "zbad.emoe"
    q.write_bytes(assemble(h, bytes(data), data_offset=doff))
    with EmoeReader(q) as r, pytest.raises(E.HeaderCorrupt, match="zstd frame holds 4096 bytes"):
        r.read_chunk(ci)


# ---- fuzzing

FUZZ = settings(
    max_examples=int(os.environ.get("EDGEMOE_FUZZ_EXAMPLES", "300")),
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _open_only_named_errors(path: Path, blob: bytes) -> None:
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        _exercise(path)
    except E.EmoeError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # Parsed header objects cost more than their msgpack bytes, but never in
    # proportion to sizes the file merely claims.
    assert peak <= 64 * 1024 + 32 * len(blob), (peak, len(blob))


@FUZZ
@given(st.binary(max_size=8192))
def test_fuzz_random_bytes(tmp_path, blob):
    _open_only_named_errors(tmp_path / "f.emoe", blob)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_header_after_valid_preamble(tmp_path, blob):
    _open_only_named_errors(tmp_path / "f.emoe", assemble(None, b"", header_bytes=blob or b"\x80"))


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_header_bytes(tmp_path, data):
    h, payload, doff = split(_base())
    hb = bytearray(msgpack.packb(h, use_bin_type=True))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(hb) - 1))
        hb[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        hb = hb[: data.draw(st.integers(1, len(hb)))]
    _open_only_named_errors(
        tmp_path / "f.emoe", assemble(None, payload, header_bytes=bytes(hb), data_offset=doff)
    )


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(data=st.data())
def test_fuzz_header_values(tmp_path, data):
    h, payload, doff = split(_base())
    paths = [p for p in _paths(h) if p]
    h = copy.deepcopy(h)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = h
        try:
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = data.draw(_values)
        except (KeyError, IndexError, TypeError):
            continue
    try:
        hb = msgpack.packb(h, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    _open_only_named_errors(
        tmp_path / "f.emoe", assemble(None, payload, header_bytes=hb, data_offset=doff)
    )
