"""Byte counts: one type to parse, add, compare and print them.

`Bytes` is an int subclass whose arithmetic stays Bytes, so budgets, sizes
and reads never mix with bare ints by accident. Parsing follows the usual
split: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB and the bare
K/M/G/T are powers of 1024 (a phone's "8 GB" of RAM is 8 GiB).
"""

from __future__ import annotations

import re

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
            ValueError: the text is not a size; the message shows valid forms.
        """
        if isinstance(text, int):
            return cls(text)
        m = _RE.match(str(text))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(
                f"cannot read {text!r} as a size; write it like 4GB, 512MiB, 0.5G or 1048576"
            )
        return cls(float(m.group(1)) * _UNITS[unit])

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
