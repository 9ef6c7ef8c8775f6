"""Converters from Hugging Face safetensors folders and GGUF files to .emoe."""

from formats.convert.core import CodecChoice, ConvertOptions, convert, open_source

__all__ = ["CodecChoice", "ConvertOptions", "convert", "open_source"]
