"""docs/BENCHMARKS.md sections that a tool owns: each between its own start and end markers,
replaced in place when the tool runs again (appended the first time)."""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def write_section(name: str, lines: list[str]) -> None:
    """Put `lines` between <!-- name:start --> and <!-- name:end --> in docs/BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    table = "\n".join([start, *lines, end])
    print(table)
    text = BENCH.read_text()
    if start in text:
        head, rest = text.split(start, 1)
        text = head + table + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    BENCH.write_text(text)
