"""Named errors for every way a .emoe file or a checkpoint can be bad.

Each error's message says what is wrong, where (tensor, expert, chunk, byte
offset) and what the user can do about it.
"""

from __future__ import annotations


class EmoeError(Exception):
    """Base of every error the formats package raises on bad input."""

    fix = "re-create the file with `edgemoe convert`"

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix_hint = fix or self.fix
        super().__init__(f"{what}; {self.fix_hint}")


class BadMagic(EmoeError):
    fix = "this is not a .emoe file; convert a checkpoint with `edgemoe convert`"


class UnsupportedVersion(EmoeError):
    fix = "upgrade edgemoe, or re-convert the model with this version"


class HeaderTooLarge(EmoeError):
    pass


class HeaderCorrupt(EmoeError):
    pass


class TruncatedFile(EmoeError):
    fix = "the file is incomplete (interrupted copy or download?); copy or convert it again"


class OffsetOutOfRange(EmoeError):
    pass


class OverlappingChunks(EmoeError):
    pass


class ChecksumMismatch(EmoeError):
    fix = "the file is corrupt on disk; copy or convert it again (`edgemoe verify` lists every bad chunk)"


class UnknownCodec(EmoeError):
    fix = "upgrade edgemoe, or re-convert with a codec this version knows (see `edgemoe convert --help`)"


class CodecError(EmoeError):
    """A codec cannot encode or decode the given tensor or bytes."""


class UnsupportedArchitecture(EmoeError):
    fix = "edgemoe converts mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2 and deepseek_v3 checkpoints"


class MissingTensor(EmoeError):
    fix = "the checkpoint is incomplete; download all of its shards again"


class ShapeMismatch(EmoeError):
    fix = "the checkpoint does not match its config.json; check that both come from the same model"


class CheckpointError(EmoeError):
    """A checkpoint folder or GGUF file cannot be read as a model."""

    fix = "point `edgemoe convert` at a Hugging Face model folder (config.json + *.safetensors) or a .gguf file"


class NotARegularFile(EmoeError):
    """The path is a folder, a FIFO, a device or a socket: reading it could block or never end."""

    fix = "give the path of a .emoe file (a regular file)"


class BadConfig(EmoeError):
    """A config value the runtime reads is missing, of the wrong type, out of range, or
    contradicts another value."""

    fix = "the model's config is inconsistent; re-convert it from the model's own config.json with `edgemoe convert`"


class ExpertTableMismatch(EmoeError):
    """The routed experts stored do not match the config's MoE layers x experts."""

    fix = "the file's config and its experts disagree; re-convert it with `edgemoe convert`"


class BadTokenizer(EmoeError):
    """The tokenizer.json that travels with a model does not parse or does not fit the model."""

    fix = "re-convert from a checkpoint whose tokenizer.json loads with Hugging Face tokenizers"


class BadChatTemplate(EmoeError):
    """The chat template does not compile, or raises while rendering."""

    fix = "fix the chat template (chat_template.jinja or tokenizer_config.json) and re-convert, or run without --chat"


class ChatTemplateLimit(BadChatTemplate):
    """Rendering the chat template ran past the sandbox's time, output or loop limits."""

    fix = "the chat template loops without end or builds huge text; fix it and re-convert, or run without --chat"
