"""Byte counts: `Bytes` (defined in formats.units, the ground floor every package shares)."""

from formats.units import MAX_BYTES, Bytes

__all__ = ["MAX_BYTES", "Bytes"]
