"""Rebuild a Hugging Face tokenizer.json from a GGUF's `tokenizer.ggml.*` metadata.

"gpt2" (byte-level BPE) vocabularies get the pre-tokenizer named by
`tokenizer.ggml.pre` (gpt-2/default/olmo, qwen2, llama-bpe, deepseek-llm,
deepseek-v3, deepseek-coder; others fall back to GPT-2's regex with a
warning); "llama" (SentencePiece) vocabularies become a byte-fallback BPE
whose merges come from the token scores.
"""

from __future__ import annotations

import json

import gguf

KT = gguf.Keys.Tokenizer
TT = gguf.TokenType


# -- tokenizer ----------------------------------------------------------------

# Pre-tokenizer regexes by `tokenizer.ggml.pre`, as the models' tokenizer.json
# files have them (llama.cpp's src/llama-vocab.cpp keeps the same lists).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_LLM = [
    "[\r\n]",
    (
        "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
        "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8"
        "-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-"
        "\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-"
        "\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-"
        "\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-"
        "\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
        "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
        "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13"
        "-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
        "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
        "\U0001e900-\U0001e943]+"
    ),
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
]
_DEEPSEEK_V3 = [
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]
_DEEPSEEK_CODER = [
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}",
]
_GPT2_PRES = {"default", "gpt-2", "gpt2", "olmo", "mpt", "phi-2"}
_SPLIT_PRES = {  # name -> (regexes, NFC normalizer, ignore_merges)
    "llama-bpe": ([_LLAMA3], False, True),
    "llama3": ([_LLAMA3], False, True),
    "llama-v3": ([_LLAMA3], False, True),
    "dbrx": ([_LLAMA3], False, False),
    "smaug-bpe": ([_LLAMA3], False, False),
    "qwen2": ([_QWEN2], True, False),
    "deepseek-r1-qwen": ([_QWEN2], True, False),
    "deepseek-llm": (_DEEPSEEK_LLM, False, False),
    "deepseek-v3": (_DEEPSEEK_V3, False, False),
    "deepseek-coder": (_DEEPSEEK_CODER, False, False),
}


def _byte_level(use_regex: bool) -> dict:
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": use_regex,
    }


def tokenizer_json(get) -> tuple[bytes | None, str | None]:
    """HF tokenizer.json bytes rebuilt from `tokenizer.ggml.*`, and a warning or None."""
    model = get(KT.MODEL)
    tokens = get(KT.LIST)
    if model is None or not tokens:
        return None, "the GGUF has no tokenizer.ggml vocabulary; supply a tokenizer.json"
    types = get(KT.TOKEN_TYPE) or [int(TT.NORMAL)] * len(tokens)
    added = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": types[i] == TT.USER_DEFINED,
            "special": types[i] != TT.USER_DEFINED,
        }
        for i, tok in enumerate(tokens)
        if types[i] in (TT.CONTROL, TT.USER_DEFINED, TT.UNKNOWN)
    ]
    warning = None
    if model == "gpt2":
        pre = get(KT.PRE) or "default"
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if types[i] != TT.UNUSED:  # [PADn] fillers llama.cpp adds past the HF vocab
                vocab.setdefault(tok, i)
        merges = [m.split(" ", 1) for m in get(KT.MERGES) or []]
        normalizer, ignore_merges = None, False
        if pre in _SPLIT_PRES:
            regexes, nfc, ignore_merges = _SPLIT_PRES[pre]
            pre_tok = {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": {"Regex": r},
                        "behavior": "Isolated",
                        "invert": False,
                    }
                    for r in regexes
                ]
                + [_byte_level(False)],
            }
            normalizer = {"type": "NFC"} if nfc else None
        else:
            if pre not in _GPT2_PRES:
                warning = (
                    f"tokenizer.ggml.pre {pre!r} is not one edgemoe knows; used GPT-2's "
                    "byte-level pre-tokenizer, so ids may differ around digits, "
                    "whitespace and CJK text; supply the model's tokenizer.json"
                )
            pre_tok = _byte_level(True)
        bpe = {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        }
        decoder = {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        }
    elif model == "llama":
        scores = get(KT.SCORES) or [0.0] * len(tokens)
        vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
        unk = next((tokens[i] for i, t in enumerate(types) if t == TT.UNKNOWN), None)
        bpe = {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": any(t == TT.BYTE for t in types),
            "ignore_merges": False,
            "vocab": vocab,
            "merges": _spm_merges(tokens, scores, types),
        }
        prefix = get(KT.ADD_PREFIX, True)
        steps = [{"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
        normalizer = {
            "type": "Sequence",
            "normalizers": ([{"type": "Prepend", "prepend": "\u2581"}] if prefix else []) + steps,
        }
        pre_tok = None
        decoder = {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ]
            + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else []),
        }
    else:
        return None, (
            f"tokenizer.ggml.model {model!r} is not rebuilt (only 'gpt2' byte-level "
            "BPE and 'llama' SentencePiece are); supply the model's tokenizer.json"
        )
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tok,
        "post_processor": _post_processor(get, tokens),
        "decoder": decoder,
        "model": bpe,
    }
    return json.dumps(doc, ensure_ascii=False).encode("utf-8"), warning


def _post_processor(get, tokens: list[str]) -> dict | None:
    """BOS/EOS insertion as `tokenizer.ggml.add_{bos,eos}_token` ask (llama vocabs add BOS)."""
    spm = get(KT.MODEL) == "llama"
    bos, eos = get(KT.BOS_ID), get(KT.EOS_ID)
    add_bos = get(KT.ADD_BOS, spm) and bos is not None and bos < len(tokens)
    add_eos = get(KT.ADD_EOS, False) and eos is not None and eos < len(tokens)
    if not (add_bos or add_eos):
        return None
    pre = [(tokens[bos], bos)] if add_bos else []
    post = [(tokens[eos], eos)] if add_eos else []

    def seq(name, type_id):
        return (
            [{"SpecialToken": {"id": t, "type_id": type_id}} for t, _ in pre]
            + [{"Sequence": {"id": name, "type_id": type_id}}]
            + [{"SpecialToken": {"id": t, "type_id": type_id}} for t, _ in post]
        )

    return {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in pre + post},
    }


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """BPE merges for a SentencePiece vocabulary, ranked by the merged piece's score.

    Every split of a normal piece into two pieces of the vocabulary is a merge;
    higher-scoring results merge first. SentencePiece (and llama.cpp) break a
    tie in score by merging the leftmost pair, which a merge list cannot say;
    ranking the longer result first reproduces it on runs of one character, the
    tie Llama's tokenizer.model has (its whitespace-only pieces all score -1e9).
    Where every score is equal (llama.cpp's converter writes -1000 for all when
    it had no tokenizer.model), the ids, SentencePiece's merge order, rank
    instead. Remaining ties go by the ids of the result and its two halves.
    """
    ids = {}
    for i, tok in enumerate(tokens):
        if types[i] in (TT.NORMAL, TT.USER_DEFINED):
            ids.setdefault(tok, i)
    ranked = len({scores[i] for i in ids.values()}) > 1
    found = []
    for tok, i in ids.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids:
                longer = -len(tok) if ranked else 0
                found.append((-scores[i], longer, i, ids[left], ids[right], left, right))
    found.sort(key=lambda m: m[:5])
    return [[left, right] for *_, left, right in found]
