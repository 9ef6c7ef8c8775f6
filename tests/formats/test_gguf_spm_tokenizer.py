"""The "llama" (SentencePiece) tokenizer rebuilt from GGUF metadata, against SentencePiece.

A tiny BPE model is trained with the options Llama's tokenizer.model records
(identity normalization, a dummy prefix, extra whitespace kept, split digits,
whitespace-only pieces, byte fallback, unk/bos/eos 0/1/2). Its vocabulary goes
into GGUF metadata as llama.cpp's _create_vocab_sentencepiece and
_set_vocab_sentencepiece write it (conversion/base.py in the llama.cpp tree
vendored by llama-cpp-python 0.3.36). The tokenizer.json that gguf_tokenizer.py
rebuilds must encode text to BOS + sp.encode(text), as LlamaTokenizerFast and
llama.cpp do, and decode those ids to sp.decode's text.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import sentencepiece
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.convert.gguf import GGUFSource
from formats.convert.gguf_tokenizer import tokenizer_json
from tests.formats import gguf_fixtures

KT = gguf.Keys.Tokenizer
TT = gguf.TokenType
ROOT = Path(__file__).resolve().parents[2]
VOCAB = 800
PAD = 8  # llama.cpp pads to config.json's vocab_size with [PADn] pieces, as some models need
BOS, EOS, UNK = 1, 2, 0
SPECIALS = ("<unk>", "<s>", "</s>")  # sp.encode reads these as text; the rebuild, as tokens
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "many     spaces   between        words",
    "line one\nline two\n\nline four\n",
    "tabs\tand\t\ttabs",
    "\r\nwindows\r\nlines",
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "a",
    "12345678901234567890",
    "pi is 3.14159, e is 2.71828; 1,000,000 > 999_999",
    "mixed 42abc abc42 4x4=16",
    "Punctuation!?... (brackets) [more] {even} \"quotes\" 'single' -- dashes",
    "naïve café — 東京",
    "Ünïcödé 日本語 テスト",
    "Привет, мир",
    "emoji 🦙 and 👍🏽",
    "ñ ğ ş ß ø",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
    "▁ a literal metaspace",
    "def f(x):\n    return x  # comment\n        deeper\n",
]
_WORDS = "naïve café — 東京 Ünïcödé 日本語 テスト résumé Straße ½ € ±3.5% x² 🙂".split()


# -- the oracle ---------------------------------------------------------------


def _training_lines() -> list[str]:
    """~300 KB: the repo's docs and formats/ source, and seeded lines of digits,
    punctuation, runs of spaces and tabs, and non-ASCII words."""
    text = [(ROOT / p).read_text() for p in ("formats/SPEC.md", "README.md", "devices/README.md")]
    text += [p.read_text() for p in sorted((ROOT / "formats").rglob("*.py"))]
    words = " ".join(text).split()
    rng = random.Random(0)
    for _ in range(3000):
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.2:
                parts.append(str(rng.randrange(10 ** rng.randint(1, 9))))
            elif r < 0.35:
                parts.append(rng.choice(_WORDS))
            elif r < 0.5:
                parts.append(rng.choice("!?.,;:'\"()[]{}-_=+*/\\|@#$%^&~`") * rng.randint(1, 3))
            else:
                parts.append(rng.choice(words))
            parts.append(rng.choice([" ", " ", " ", "  ", "    ", "\t", ""]))
        text.append("".join(parts))
    return "\n".join(text).split("\n")


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return _training_lines()


@pytest.fixture(scope="module")
def sp_proto(lines) -> bytes:
    """A serialized SentencePiece BPE model trained with Llama's trainer options."""
    out = io.BytesIO()
    sentencepiece.set_random_generator_seed(0)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="bpe",
        vocab_size=VOCAB,
        character_coverage=0.99995,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        max_sentencepiece_length=16,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


@pytest.fixture(scope="module")
def sp(sp_proto):
    return sentencepiece.SentencePieceProcessor(model_proto=sp_proto)


def _spm_vocab(sp, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types as llama.cpp's _create_vocab_sentencepiece lists them."""
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(TT.UNUSED)] * n_vocab
    kinds = (
        (sp.is_unknown, TT.UNKNOWN),
        (sp.is_control, TT.CONTROL),
        (sp.is_unused, TT.UNUSED),
        (sp.is_byte, TT.BYTE),
    )
    for i in range(sp.get_piece_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = int(next((kind for test, kind in kinds if test(i)), TT.NORMAL))
    return tokens, scores, types


def _metadata(sp, scores: list[float] | None = None) -> dict:
    """The tokenizer.ggml.* keys a Mixtral GGUF carries (SpecialVocab adds ids and add_*)."""
    tokens, sp_scores, types = _spm_vocab(sp, sp.get_piece_size() + PAD)
    return {
        KT.MODEL: "llama",
        KT.PRE: "default",
        KT.LIST: tokens,
        KT.SCORES: sp_scores if scores is None else scores,
        KT.TOKEN_TYPE: types,
        KT.BOS_ID: BOS,
        KT.EOS_ID: EOS,
        KT.UNK_ID: UNK,
        KT.ADD_BOS: True,
        KT.ADD_EOS: False,
    }


def _rebuild(meta: dict) -> tokenizers.Tokenizer:
    doc, warning = tokenizer_json(meta.get)
    assert warning is None
    return tokenizers.Tokenizer.from_str(doc.decode())


@pytest.fixture(scope="module")
def rebuilt(sp) -> tokenizers.Tokenizer:
    return _rebuild(_metadata(sp))


def _mismatches(sp, tok, texts) -> list[tuple[str, list[str], list[str]]]:
    """(text, SentencePiece's pieces, the rebuild's) wherever ids or decoded text differ."""
    bad = []
    for text in texts:
        want = [BOS] + sp.encode(text)
        got = tok.encode(text).ids
        if got != want or tok.decode(got) != sp.decode(want):
            bad.append((text, [sp.id_to_piece(i) for i in want], [tok.id_to_token(i) for i in got]))
    return bad


# -- encoding -----------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_and_decodes_like_sentencepiece(sp, rebuilt, text):
    want = [BOS] + sp.encode(text)
    assert rebuilt.encode(text).ids == want
    assert rebuilt.decode(want) == sp.decode(want)


def test_unseen_characters_fall_back_to_bytes(sp, rebuilt):
    ids = rebuilt.encode("Привет 🦙").ids
    assert ids == [BOS] + sp.encode("Привет 🦙")
    assert any(sp.is_byte(i) for i in ids)  # the texts above do exercise byte fallback


def test_random_text_encodes_like_sentencepiece(sp, rebuilt, lines):
    """400 substrings of the training text and 400 strings of tricky characters."""
    corpus = "\n".join(lines)
    rng = random.Random(1)
    alphabet = list("ab e\n\t 0123456789.,!?-—éï東京Жñ🦙\u2581") + ["the", "  ", "ing", "    "]
    texts = []
    for _ in range(400):
        start = rng.randrange(len(corpus))
        texts.append(corpus[start : start + rng.randint(1, 300)])
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))))
    texts = [t for t in texts if not any(s in t for s in SPECIALS)]
    assert len(texts) >= 790
    assert _mismatches(sp, rebuilt, texts) == []


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_any_text_encodes_like_sentencepiece(sp, rebuilt, text):
    if not any(s in text for s in SPECIALS):
        assert _mismatches(sp, rebuilt, [text]) == []


def test_special_tokens_in_text_split_like_llama_cpp(sp, rebuilt):
    """With specials parsed, llama.cpp encodes each stretch of text on its own, a space
    prefixed after each special (llama-vocab.cpp's is_prev_special); so does the rebuild."""
    assert rebuilt.encode("Hi</s> there<s>x").ids == (
        [BOS] + sp.encode("Hi") + [EOS] + sp.encode(" there") + [BOS] + sp.encode("x")
    )


# -- ties and lost scores -----------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """The varint at buf[i:] and the index after it."""
    n = shift = 0
    while buf[i] & 0x80:
        n |= (buf[i] & 0x7F) << shift
        shift += 7
        i += 1
    return n | buf[i] << shift, i + 1


def _fields(buf: bytes):
    """(field number, the field's bytes, its payload) for each field of a protobuf message."""
    i = 0
    while i < len(buf):
        key, j = _varint(buf, i)
        wire = key & 7
        if wire == 2:
            size, j = _varint(buf, j)
            end = j + size
        else:
            end = {0: _varint(buf, j)[1], 1: j + 8, 5: j + 4}[wire]
        yield key >> 3, buf[i:end], buf[j:end]
        i = end


def _rescored(proto: bytes, score) -> bytes:
    """proto with each piece's score set to score(piece) where that is not None.

    ModelProto field 1 is the repeated SentencePiece {1: piece, 2: float score, 3: type};
    protobuf is not a dependency, so this edits the wire format directly.
    """
    out = bytearray()
    for num, raw, body in _fields(proto):
        piece = next(p for n, _, p in _fields(body) if n == 1) if num == 1 else None
        new = None if piece is None else score(piece.decode())
        if new is None:
            out += raw
            continue
        msg = b"".join(r for n, r, _ in _fields(body) if n != 2) + b"\x15" + struct.pack("<f", new)
        out += b"\x0a"
        size = len(msg)
        while size > 0x7F:
            out.append(size & 0x7F | 0x80)
            size >>= 7
        out += bytes([size]) + msg
    return bytes(out)


def test_tied_whitespace_scores_break_ties_leftmost(sp_proto):
    """Llama's tokenizer.model scores every whitespace-only piece -1e9, so they tie and
    SentencePiece merges the leftmost pair. Ranking tied merges by id split 311 of these
    350 texts (runs of 5+ spaces) differently; ranking longer pieces first agrees."""
    whitespace = {"\u2581" * k for k in range(2, 17)}
    tied = sentencepiece.SentencePieceProcessor(
        model_proto=_rescored(sp_proto, lambda p: -1e9 if p in whitespace else None)
    )
    ids = [i for i in range(tied.get_piece_size()) if tied.id_to_piece(i) in whitespace]
    assert len(ids) >= 5 and {tied.get_score(i) for i in ids} == {-1e9}
    tok = _rebuild(_metadata(tied))
    texts = [
        fmt.format(" " * n)
        for n in range(70)
        for fmt in ("{}", "a{}b", "x\n{}def f():", "{}end  ", "\t{}\t")
    ]
    assert _mismatches(tied, tok, texts) == []


def test_scores_lost_in_conversion_rank_by_id(sp):
    """Without tokenizer.model llama.cpp's _set_vocab_llama_hf writes -1000 for every
    score; a SentencePiece vocabulary's ids keep its merge order, so nothing changes."""
    tok = _rebuild(_metadata(sp, scores=[-1000.0] * (sp.get_piece_size() + PAD)))
    assert _mismatches(sp, tok, TEXTS) == []


# -- decoding -----------------------------------------------------------------


def _decodes_apart(sp, ids: list[int]) -> bool:
    """Whether ids are ones tokenizers' Llama decoder (LlamaTokenizerFast's too) is known
    to decode unlike SentencePiece; no encoding produces them, only a model could.

    A byte run that is not UTF-8 becomes one U+FFFD per byte token, where SentencePiece
    keeps the valid bytes; a leading <0x20> is stripped as if it were the dummy prefix.
    """
    text = [i for i in ids if not sp.is_control(i)]
    if text and sp.id_to_piece(text[0]) == "<0x20>":
        return True
    run = bytearray()
    for i in [*text, None]:
        if i is not None and sp.is_byte(i):
            run.append(int(sp.id_to_piece(i)[3:5], 16))
            continue
        try:
            run.decode("utf-8")
        except UnicodeDecodeError:
            return True
        run.clear()
    return False


def test_decodes_ids_like_sentencepiece(sp, rebuilt):
    """3000 random id sequences (any piece but <unk>, which byte fallback never yields)."""
    rng = random.Random(2)
    n = sp.get_piece_size()
    byte = {sp.id_to_piece(i): i for i in range(n) if sp.is_byte(i)}
    checked = 0
    for _ in range(3000):
        ids = [rng.randrange(1, n) for _ in range(rng.randint(0, 8))]
        ids += [byte[f"<0x{b:02X}>"] for b in rng.choice(["é", "東", "🦙", ""]).encode()]
        if not _decodes_apart(sp, ids):
            assert rebuilt.decode(ids) == sp.decode(ids), [sp.id_to_piece(i) for i in ids]
            checked += 1
    assert checked > 1500
    apart = {(0x70, 0xBE): ("\ufffd" * 2, "p\ufffd"), (0x20,): ("", " ")}
    for seq, want in apart.items():
        ids = [byte[f"<0x{b:02X}>"] for b in seq]
        assert _decodes_apart(sp, ids) and (rebuilt.decode(ids), sp.decode(ids)) == want


# -- through a GGUF file ------------------------------------------------------


def _set_vocab_sentencepiece(w: gguf.GGUFWriter, hf_dir: Path, vocab_size: int, pre) -> None:
    """llama.cpp's _set_vocab_sentencepiece over hf_dir/tokenizer.model."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    tokens, scores, types = _spm_vocab(sp, vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(hf_dir, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


@pytest.fixture(scope="module")
def mixtral_dir(tiny_hf, tmp_path_factory, sp_proto) -> Path:
    """A tiny Mixtral folder with the trained tokenizer.model, vocab_size VOCAB + PAD."""
    hf_dir = tmp_path_factory.mktemp("spm") / "hf"
    shutil.copytree(tiny_hf("mixtral", vocab_size=VOCAB + PAD, num_hidden_layers=1), hf_dir)
    (hf_dir / "tokenizer.model").write_bytes(sp_proto)
    (hf_dir / "tokenizer_config.json").write_text(
        '{"add_bos_token": true, "add_eos_token": false, "bos_token": "<s>", '
        '"eos_token": "</s>", "unk_token": "<unk>"}'
    )
    return hf_dir


def _assert_rebuilt_from(path: Path, sp) -> None:
    with GGUFSource(path) as src:
        assert src.tokenizer_warning is None
        doc = src.tokenizer_json
    assert doc == tokenizer_json(_metadata(sp).get)[0]  # the file lost nothing
    assert _mismatches(sp, tokenizers.Tokenizer.from_str(doc.decode()), TEXTS) == []


@pytest.mark.slow  # builds a tiny Mixtral with transformers
def test_rebuilt_from_a_gguf_file(mixtral_dir, tmp_path, monkeypatch, sp):
    monkeypatch.setattr(gguf_fixtures, "_add_vocab", _set_vocab_sentencepiece)
    _assert_rebuilt_from(
        gguf_fixtures.write_gguf_like_llamacpp(mixtral_dir, tmp_path / "a.gguf"), sp
    )


CONVERT = os.environ.get("EDGEMOE_LLAMACPP_CONVERT")


@pytest.mark.llamacpp
@pytest.mark.skipif(not CONVERT, reason="EDGEMOE_LLAMACPP_CONVERT is not set")
def test_rebuilt_from_llamacpp_converter_output(mixtral_dir, tmp_path, sp):
    """llama.cpp's convert_hf_to_gguf.py itself, its SentencePiece path unpatched
    (tools/llamacpp_convert.sh CACHE_DIR prints the script's path)."""
    out = tmp_path / "mixtral.gguf"
    cmd = [sys.executable, CONVERT, str(mixtral_dir), "--outtype", "f32", "--outfile", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_rebuilt_from(out, sp)
