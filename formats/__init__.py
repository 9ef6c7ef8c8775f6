"""The .emoe container: spec (SPEC.md), codecs, reader, writer and converters."""

from formats.constants import VERSION_MAJOR, VERSION_MINOR
from formats.errors import EmoeError
from formats.reader import EmoeReader
from formats.writer import EmoeWriter

__all__ = ["EmoeError", "EmoeReader", "EmoeWriter", "VERSION_MAJOR", "VERSION_MINOR"]
