"""The container itself: golden bytes, layout rules, compression, atomic writes."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from formats import constants as C
from formats.codecs import codec_by_name
from formats.reader import EmoeReader
from formats.writer import EmoeWriter

GOLDEN = Path(__file__).parent / "golden" / "tiny.emoe"
META = {C.M_FAMILY: "mixtral", C.M_CONFIG: {"model_type": "mixtral", "hidden_size": 8}}


def write_golden(path: Path) -> Path:
    """A deterministic tiny file: f32, bf16 and int8 tensors, one 1-level expert, a blob."""
    w8 = np.arange(64, dtype=np.float32).reshape(8, 8) / 10 - 3
    with EmoeWriter(path, META, header_reserve=512, compress=False) as w:
        w.add_tensor("a", np.array([1.0, -2.0, 0.5, 3.25], np.float32), C.CodecId.F32)
        w.add_tensor("b", w8, C.CodecId.BF16)
        w.add_tensor("c", w8, C.CodecId.INT8, codec_by_name("int8").default_params(w8.shape))
        w.add_expert(
            0,
            0,
            {
                r: (f"e.{r}", w8 * (i + 1), C.CodecId.F16, {}, "F32")
                for i, r in enumerate(C.EXPERT_ROLES)
            },
        )
        w.add_blob(C.BLOB_TOKENIZER, b"{}")
    return path


def test_golden_bytes(tmp_path):
    """The writer's bytes for a fixed input are pinned: a change here is a format change."""
    fresh = write_golden(tmp_path / "tiny.emoe").read_bytes()
    if os.environ.get("EDGEMOE_REGEN_GOLDEN"):
        GOLDEN.write_bytes(fresh)
    assert fresh == GOLDEN.read_bytes(), (
        "format drift: bump the version or set EDGEMOE_REGEN_GOLDEN=1 on purpose"
    )
    assert fresh[:4] == b"EMOE" and fresh[4:8] == b"\x01\x00\x00\x00"
    _, _, _, hlen, doff, hcrc, res = C.PREAMBLE.unpack(fresh[:32])
    assert doff == 4096 and res == 0 and zlib.crc32(fresh[32 : 32 + hlen]) == hcrc
    assert fresh[32 + hlen : doff] == b"\0" * (doff - 32 - hlen)
    assert len(fresh) % 4096 == 0
    with EmoeReader(GOLDEN) as r:
        np.testing.assert_array_equal(r.tensor("a"), [1.0, -2.0, 0.5, 3.25])
        w8 = np.arange(64, dtype=np.float32).reshape(8, 8) / 10 - 3
        np.testing.assert_allclose(r.tensor("b"), w8, rtol=2**-8)
        np.testing.assert_allclose(r.tensor("c"), w8, atol=3.3 / 127)
        np.testing.assert_array_equal(r.tensor("e.down"), (w8 * 3).astype(np.float16))
        assert r.read_chunk(r.blobs[C.BLOB_TOKENIZER]) == b"{}"


def _nested_file(path, compress=True, reserve=65536, experts=4):
    rng = np.random.default_rng(0)
    mwq = codec_by_name("mwq")
    with EmoeWriter(path, META, header_reserve=reserve, compress=compress) as w:
        w.add_tensor("zeros", np.zeros((64, 64), np.float32), C.CodecId.F32)
        w.add_tensor(
            "steps",
            np.repeat(rng.integers(0, 4, 256), 16).astype(np.float32).reshape(64, 64),
            C.CodecId.F32,
        )
        # random bit patterns: incompressible bytes
        w.add_tensor(
            "noise",
            rng.integers(0, 2**32, (64, 64), dtype=np.uint32).view(np.float32),
            C.CodecId.F32,
        )
        for e in range(experts):
            t = {}
            for role, shape in (("gate", (32, 64)), ("up", (32, 64)), ("down", (64, 32))):
                t[role] = (
                    f"x.{e}.{role}",
                    rng.standard_normal(shape).astype(np.float32),
                    mwq.id,
                    mwq.default_params(shape),
                    "F32",
                )
            w.add_expert(1, e, t)
    return path


def test_layout_alignment_and_nesting(tmp_path):
    p = _nested_file(tmp_path / "n.emoe")
    with EmoeReader(p) as r:
        assert r.data_offset % C.ALIGNMENT == 0 and r.file_size % C.ALIGNMENT == 0
        assert all(c.offset % C.ALIGNMENT == 0 for c in r.chunks)
        for e in r.experts.values():
            spans = [r.expert_span(e.layer, e.expert, k) for k in (1, 2, 3)]
            assert len({s[0] for s in spans}) == 1 and spans[0][1] < spans[1][1] < spans[2][1]
            # one contiguous read of level k decodes exactly like the reader does
            off, n = spans[1]
            with open(p, "rb") as f:
                f.seek(off)
                blob = f.read(n)
            segs = {}
            for k, ci in enumerate(e.levels[:2]):
                c = r.chunks[ci]
                start = c.offset - r.chunks[e.levels[0]].offset
                raw = r.payload(ci, blob[start : start + c.length])
                for role, name in e.tensors.items():
                    _, o, ln = r.tensors[name].parts[k]
                    segs.setdefault(role, []).append(memoryview(raw)[o : o + ln])
            for role, name in e.tensors.items():
                t = r.tensors[name]
                np.testing.assert_array_equal(
                    t.codec.decode(segs[role], t.shape, t.params), r.tensor(name, 2)
                )


def test_zstd_only_where_it_pays(tmp_path):
    p = _nested_file(tmp_path / "z.emoe", compress=True)
    with EmoeReader(p) as r:
        steps = r.chunks[r.tensors["steps"].parts[0][0]]
        zeros = r.chunks[r.tensors["zeros"].parts[0][0]]
        noise = r.chunks[r.tensors["noise"].parts[0][0]]
        assert steps.compression == C.Compression.ZSTD and steps.length < steps.raw_length // 4
        assert noise.compression == C.Compression.NONE  # zstd saves < 5%
        # all zeros would inflate > 256x: stored raw so no chunk can be a zstd bomb
        assert zeros.compression == C.Compression.NONE
        np.testing.assert_array_equal(
            r.tensor("steps"),
            np.repeat(np.random.default_rng(0).integers(0, 4, 256), 16).reshape(64, 64),
        )
        assert all(c.raw_length <= C.MAX_ZSTD_RATIO * c.length for c in r.chunks)
        np.testing.assert_array_equal(r.tensor("zeros"), 0)


def test_header_outgrowing_its_reserve_relocates(tmp_path):
    small = _nested_file(tmp_path / "s.emoe", reserve=1, experts=40)
    ref = _nested_file(tmp_path / "r.emoe", reserve=1 << 20, experts=40)
    with EmoeReader(small) as a, EmoeReader(ref) as b:
        assert a.data_offset < b.data_offset
        for name in b.tensors:
            np.testing.assert_array_equal(a.tensor(name), b.tensor(name))


def test_failure_leaves_nothing_and_keeps_old_file(tmp_path):
    dst = tmp_path / "m.emoe"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with EmoeWriter(dst, META) as w:
            w.add_tensor("a", np.ones((4, 4), np.float32), C.CodecId.F32)
            raise RuntimeError("interrupted")
    assert dst.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["m.emoe"]


def test_writer_refuses_misuse(tmp_path):
    with EmoeWriter(tmp_path / "m.emoe", META) as w:
        w.add_tensor("a", np.ones(4, np.float32), C.CodecId.F32)
        with pytest.raises(ValueError, match="written twice"):
            w.add_tensor("a", np.ones(4, np.float32), C.CodecId.F32)
        with pytest.raises(ValueError, match="roles"):
            w.add_expert(
                0, 0, {"gate": ("g", np.ones((8, 8), np.float32), C.CodecId.F32, {}, None)}
            )
    with pytest.raises(ValueError, match="edgemoe.family"):
        EmoeWriter(tmp_path / "x.emoe", {})


def test_missing_path_and_folder_errors(tmp_path):
    from formats.errors import EmoeError

    with pytest.raises(EmoeError, match="no such file"):
        EmoeReader(tmp_path / "nope.emoe")
    with pytest.raises(EmoeError, match="is a folder"):
        EmoeReader(tmp_path)
