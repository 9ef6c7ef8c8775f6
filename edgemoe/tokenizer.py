"""The tokenizer and chat template that travel inside a .emoe.

Both are checked on first use, not at open (reading the tokenizer blob is the
only chunk read it costs): the tokenizer must parse and fit the model's
vocabulary (formats.validate.check_tokenizer), the chat template must compile
and renders in a bounded sandbox (formats.chat_template), so a hostile or
broken template fails with a named error within about a second.
"""

from __future__ import annotations

from formats import constants as C
from formats.chat_template import compile_template, render
from formats.errors import EmoeError
from formats.reader import EmoeReader
from formats.validate import check_tokenizer


class Tokenizer:
    """Encode, decode and render chats with the tokenizer a file carries.

    Raises:
        EmoeError: the file carries no tokenizer.
        BadTokenizer: its tokenizer.json does not load, or has ids the model has no row for.
    """

    def __init__(self, reader: EmoeReader):
        ci = reader.blobs.get(C.BLOB_TOKENIZER)
        if ci is None:
            raise EmoeError(
                f"{reader.path} carries no tokenizer.json",
                "re-convert from a checkpoint folder that has tokenizer.json",
            )
        cfg = reader.config
        vocab = cfg.get("vocab_size")
        vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
        self.tok = check_tokenizer(reader.read_chunk(ci), vocab, str(reader.path))
        source = reader.chat_template
        self.template = source if isinstance(source, str) else None
        self._compiled = None
        gen = reader.metadata.get(C.M_GENERATION_CONFIG)
        gen = gen if isinstance(gen, dict) else {}
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {t for t in eos if isinstance(t, int) and not isinstance(t, bool)}
        for special in ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"):
            tid = self.tok.token_to_id(special)
            if tid is not None and self.template and special in self.template:
                self.eos_ids.add(tid)
        self.bos = cfg.get("bos_token_id")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        """A conversation rendered with the file's chat template, ready for the reply.

        Raises:
            EmoeError: the model has no chat template.
            BadChatTemplate: the template does not compile or raises.
            ChatTemplateLimit: rendering ran past the sandbox's time, output or loop limits.
        """
        if not self.template:
            raise EmoeError("this model has no chat template", "use --prompt without --chat")
        if self._compiled is None:
            self._compiled = compile_template(self.template, "the file's chat template")
        return render(
            self._compiled,
            {"messages": messages, "add_generation_prompt": True, "bos_token": "", "eos_token": ""},
        )

    def chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the file's chat template (see render_chat)."""
        return self.encode(self.render_chat(messages))
