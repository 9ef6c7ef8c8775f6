"""The tokenizer and chat template that travel inside a .emoe."""

from __future__ import annotations

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from formats import constants as C
from formats.errors import EmoeError
from formats.reader import EmoeReader


class Tokenizer:
    def __init__(self, reader: EmoeReader):
        ci = reader.blobs.get(C.BLOB_TOKENIZER)
        if ci is None:
            raise EmoeError(
                f"{reader.path} carries no tokenizer.json",
                "re-convert from a checkpoint folder that has tokenizer.json",
            )
        self.tok = HFTokenizer.from_str(bytes(reader.read_chunk(ci)).decode("utf-8"))
        self.template = reader.chat_template
        gen = reader.metadata.get(C.M_GENERATION_CONFIG) or {}
        cfg = reader.config
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for special in ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"):
            tid = self.tok.token_to_id(special)
            if tid is not None and self.template and special in self.template:
                self.eos_ids.add(tid)
        self.bos = cfg.get("bos_token_id")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the file's chat template, ready for the reply."""
        if not self.template:
            raise EmoeError("this model has no chat template", "use --prompt without --chat")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined
        )
        text = env.from_string(self.template).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
        )
        return self.encode(text)
