"""What the cluster reads from a .emoe: its expert shape, routing statistics, header CRC.

Only the header is read (no weights), so `edgemoe cluster plan` is quick on any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.types import ModelMismatch, ModelShape, RoutingStats
from edgemoe.facts import ModelFacts, resolve_dtype
from edgemoe.moe.api import RoutingTrace
from formats import constants as C
from formats.reader import EmoeReader


def header_crc(path: str | Path) -> int:
    """The CRC32 of a .emoe's header, as its preamble stores it: two files with the same
    header CRC hold the same chunks with the same checksums (the header lists them)."""
    with open(path, "rb") as f:
        pre = f.read(C.PREAMBLE_SIZE)
    return C.PREAMBLE.unpack(pre)[5]


def check_same_model(path: str | Path, expected: int, where: str) -> None:
    """Raise ModelMismatch unless the file at path has header CRC `expected`."""
    got = header_crc(path)
    if got != expected:
        raise ModelMismatch(
            f"{where}: {path} has header CRC {got:#010x}, the coordinator's model has "
            f"{expected:#010x}: a different model or conversion"
        )


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    family: str
    dtype: str  # "f32" or "bf16": the compute dtype every host must use
    level: int
    shape: ModelShape
    stats: RoutingStats
    crc: int
    largest_span: int  # bytes of the longest expert read (for a host's I/O buffers)


def model_info(path: str | Path, dtype: str = "auto", level: int | None = None) -> ModelInfo:
    """Read a .emoe's header: the figures placement and the hosts need.

    Raises:
        EmoeError: the file is not a valid .emoe (named by formats/).
    """
    with EmoeReader(path, check_model=True) as r:
        # placement needs no geometry beyond the expert table, so no model args are parsed
        facts = ModelFacts(r, None, resolve_dtype(dtype, r))
        lv = level or facts.levels
        trace = RoutingTrace.load(r)
        stats = (
            RoutingStats() if trace is None else RoutingStats.from_trace(trace.ids, trace.layers)
        )
        name = "f32" if str(facts.dtype) == "torch.float32" else "bf16"
        return ModelInfo(
            Path(path),
            r.family,
            name,
            lv,
            ModelShape.from_facts(facts, lv),
            stats,
            header_crc(path),
            facts.largest_span(),
        )
