"""Byte counts: one type to parse, add, compare and print them.

It lives on the ground floor (formats/) so that every package above, devices/
included, counts bytes with the same type; edgemoe.units re-exports it.

`Bytes` is an int subclass whose arithmetic stays Bytes, so budgets, sizes
and reads never mix with bare ints by accident. Parsing follows the usual
split: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB and the bare
K/M/G/T are powers of 1024 (a phone's "8 GB" of RAM is 8 GiB).
"""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KIB": 1024,
    "KB": 1000,
    "M": 1024**2,
    "MIB": 1024**2,
    "MB": 1000**2,
    "G": 1024**3,
    "GIB": 1024**3,
    "GB": 1000**3,
    "T": 1024**4,
    "TIB": 1024**4,
    "TB": 1000**4,
}
_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
# An exabyte: past any device's memory or disk; a bigger number is a typo, not a size.
MAX_BYTES = 2**60


class Bytes(int):
    """A non-negative byte count."""

    def __new__(cls, value: int | float = 0):
        v = int(value)
        if v < 0:
            raise ValueError(f"a byte count cannot be negative ({v})")
        return super().__new__(cls, v)

    @classmethod
    def parse(cls, text: str | int | Bytes) -> Bytes:
        """Parse "4GB", "512MiB", "0.5G", "1048576".

        Raises:
            ValueError: the text is not a size (the message shows valid forms), or it is
                over MAX_BYTES.
        """
        if isinstance(text, int):
            if text > MAX_BYTES:
                raise ValueError(
                    f"{text} bytes is too large a size (the limit is 1 EiB, 2**60 bytes)"
                )
            return cls(text)
        m = _RE.match(str(text))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(
                f"cannot read {str(text)[:40]!r} as a size; write it like 4GB, 512MiB, 0.5G or 1048576"
            )
        whole, _, frac = m.group(1).partition(".")
        if len(whole.lstrip("0")) > 19:  # 2**60 has 19 digits: never parse a 400-digit number
            raise ValueError(f"{str(text)[:40]!r}... is too large a size (the limit is 1 EiB)")
        # exact, no float rounding; digits past a billionth of a unit change nothing
        value = int(Fraction(f"{whole or 0}.{frac[:18] or 0}") * _UNITS[unit])
        if value > MAX_BYTES:
            raise ValueError(f"{text!r} is too large a size (the limit is 1 EiB, 2**60 bytes)")
        return cls(value)

    def __add__(self, other):
        return Bytes(int(self) + int(other))

    __radd__ = __add__

    def __sub__(self, other):
        return Bytes(int(self) - int(other))

    def __mul__(self, k):
        return Bytes(int(self) * k)

    __rmul__ = __mul__

    def human(self) -> str:
        """Binary units with three significant digits: 1.50 GiB, 812 KiB, 12 B."""
        v = float(self)
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if v < 1024 or unit == "TiB":
                if unit == "B":
                    return f"{int(v)} B"
                return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
            v /= 1024
        raise AssertionError("unreachable")

    def __str__(self) -> str:
        return self.human()

    def __repr__(self) -> str:
        return f"Bytes({int(self)})"
