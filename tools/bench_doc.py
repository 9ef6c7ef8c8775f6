"""docs/BENCHMARKS.md sections that a tool owns: each between its own start and end markers,
replaced in place when the tool runs again (appended the first time)."""

from __future__ import annotations

import datetime
import os
import platform
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


def machine(load: bool = True) -> str:
    """The CPU's model name and cores, the load (the machine is shared: it says how noisy the
    times are), torch's version and the date, for a section's record."""
    import torch

    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    busy = f" (load average {os.getloadavg()[0]:.1f})" if load else ""
    return f"{name}, {os.cpu_count()} cores{busy}, torch {torch.__version__}, {when}"
