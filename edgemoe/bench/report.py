"""The bench's arithmetic, all pure functions of run records: caps, the run
schedule, medians, paired ratios, the markdown table and the plot.

Tests call these on fabricated records; nothing here runs a model.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from edgemoe.units import Bytes

OK, OOM, REFUSED, TIMEOUT, FAILED, NA = "ok", "oom", "refused", "timeout", "failed", "n/a"


@dataclass(frozen=True)
class Cap:
    """A memory cap: `none`, a percent of the reference file, or an absolute size."""

    label: str
    percent: float | None = None
    size: Bytes | None = None

    def bytes(self, base: int) -> Bytes | None:
        """The cap in bytes; None for no cap. `base` is what percents are of."""
        if self.size is not None:
            return self.size
        if self.percent is None:
            return None
        return Bytes(base * self.percent / 100)


@dataclass
class Run:
    """One run of one system at one cap: what the bench records.

    Rates are tokens/s; None when the run did not produce them (see status).
    bytes_read is what the process tree read from block devices; expert_bytes
    and hit_rate come from edgemoe's own record.
    """

    system: str
    cap: str
    repeat: int
    batch: int = 1
    position: int = 0  # 0: ran first in its pair
    status: str = OK
    note: str = ""
    limit: int | None = None
    decode_tok_s: float | None = None
    prefill_tok_s: float | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    tokens: int | None = None  # every token forwarded (batch, prompts, warm-ups): per-token divisor
    peak: int | None = None
    bytes_read: int | None = None
    expert_bytes: int | None = None
    hit_rate: float | None = None
    wall_s: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_caps(text: str) -> list[Cap]:
    """Parse --caps: `none,100,75,50,25` (percents) or sizes such as `2GiB`.

    Raises:
        ValueError: an empty list, a repeated cap, a percent outside (0, 1000], or a bad size.
    """
    caps: list[Cap] = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            raise ValueError(f"--caps {text!r} has an empty item; write e.g. none,100,50,25")
        if raw.lower() == "none":
            cap = Cap("none")
        elif raw.rstrip("%").replace(".", "", 1).isdigit():
            pct = float(raw.rstrip("%"))
            if not 0 < pct <= 1000:
                raise ValueError(f"--caps: {raw} is not a percent in (0, 1000]")
            cap = Cap(f"{pct:g}%", percent=pct)
        else:
            cap = Cap(raw, size=Bytes.parse(raw))
        if any(c.label == cap.label for c in caps):
            raise ValueError(f"--caps lists {cap.label} twice")
        caps.append(cap)
    return caps


def parse_ints(text: str, flag: str) -> list[int]:
    """Parse a comma list of positive ints (--batch 1,8).

    Raises:
        ValueError: naming the flag and the bad item.
    """
    out = []
    for raw in text.split(","):
        try:
            v = int(raw)
        except ValueError:
            raise ValueError(f"{flag}: {raw!r} is not a whole number; write e.g. 1,8") from None
        if v < 1:
            raise ValueError(f"{flag}: {v} must be at least 1")
        out.append(v)
    return out


def schedule(systems: list[str], caps: list[Cap], batches: list[int], repeats: int):
    """The run order: for each repeat, cap and batch, every system back to back
    (a pair), the pair's order reversed every other time so neither system always
    runs first (after the other has warmed the machine, or on a quieter minute).

    Returns:
        A list of (repeat, cap, batch, [systems in run order]).
    """
    out = []
    k = 0
    for r in range(repeats):
        for cap in caps:
            for b in batches:
                order = list(systems) if k % 2 == 0 else list(reversed(systems))
                out.append((r, cap, b, order))
                k += 1
    return out


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


@dataclass
class Cell:
    """One system at one cap and batch, summarized over repeats."""

    runs: int
    ok: int
    status: str  # OK when any run succeeded, else the most common failure
    note: str
    decode: float | None
    prefill: float | None
    peak: float | None
    limit: int | None
    read_per_token: float | None
    expert_per_token: float | None
    hit_rate: float | None
    failures: str = ""  # how the runs that failed ended, e.g. "OOM-killed"


def summarize(runs: list[Run]) -> dict[tuple[str, int, str], Cell]:
    """Medians over repeats of the successful runs, keyed by (cap, batch, system)."""
    groups: dict[tuple[str, int, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.cap, run.batch, run.system), []).append(run)
    out = {}
    for key, rs in groups.items():
        good = [r for r in rs if r.status == OK]
        if good:
            status, note = OK, ""
        else:
            statuses = [r.status for r in rs]
            status = max(set(statuses), key=statuses.count)
            note = next(r.note for r in rs if r.status == status)

        def per_token(r: Run, attr: str) -> float | None:
            v = getattr(r, attr)
            return v / r.tokens if v is not None and r.tokens else None

        out[key] = Cell(
            runs=len(rs),
            ok=len(good),
            status=status,
            note=note,
            decode=_median([r.decode_tok_s for r in good]),
            prefill=_median([r.prefill_tok_s for r in good]),
            peak=_median([r.peak for r in good]),
            limit=rs[0].limit,
            read_per_token=_median([per_token(r, "bytes_read") for r in good]),
            expert_per_token=_median([per_token(r, "expert_bytes") for r in good]),
            hit_rate=_median([r.hit_rate for r in good]),
            failures=", ".join(sorted({r.note or r.status for r in rs if r.status != OK})),
        )
    return out


def paired_ratio(runs: list[Run], system: str, baseline: str, cap: str, batch: int) -> float | None:
    """Median over repeats of system / baseline decode rate, each from the same pair."""
    by = {
        (r.system, r.repeat): r
        for r in runs
        if r.cap == cap and r.batch == batch and r.status == OK
    }
    ratios = [
        by[(system, rep)].decode_tok_s / by[(baseline, rep)].decode_tok_s
        for (s, rep) in list(by)
        if s == system and (baseline, rep) in by and by[(baseline, rep)].decode_tok_s
    ]
    return statistics.median(ratios) if ratios else None


def _rate(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.status != OK:
        return cell.note or cell.status
    rate = f"{cell.decode:.2f}" if cell.decode is not None else "-"
    if cell.ok < cell.runs:  # a median of the runs that finished: say how many did not
        rate += f" ({cell.runs - cell.ok} of {cell.runs} {cell.failures})"
    return rate


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "rate":
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    if kind == "bytes":
        return Bytes(v).human()
    if kind == "pct":
        return f"{100 * v:.0f}%"
    raise AssertionError(kind)


def table(
    runs: list[Run], systems: list[str], baseline: str | None, caps: list[Cap], batches: list[int]
) -> list[str]:
    """The markdown table: one row per cap (and batch when several).

    Columns: each system's decode tok/s; each other system / the baseline (median of
    paired ratios); prefill tok/s per system; disk bytes read per token per system;
    edgemoe's expert hit rate; peak memory / cap per system. A run that failed shows
    why (refused, with the budget the planner needs; OOM-killed; timeout).
    """
    cells = summarize(runs)
    ours = [s for s in systems if s != baseline]
    many = len(batches) > 1
    both = " / ".join(systems)
    head = ["cap"] + (["batch"] if many else [])
    head += [f"{s} decode tok/s" for s in systems]
    head += [f"{s} / {baseline}" for s in ours] if baseline in systems else []
    head += [f"prefill tok/s ({both})", f"disk read / token ({both})"]
    head += [f"hit rate ({' / '.join(ours)})", f"peak / cap ({both})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cap in caps:
        for b in batches:
            cs = [cells.get((cap.label, b, s)) for s in systems]
            row = [cap.label] + ([str(b)] if many else [])
            row += [_rate(c) for c in cs]
            if baseline in systems:
                row += [_fmt_ratio(paired_ratio(runs, s, baseline, cap.label, b)) for s in ours]

            def joined(attr: str, kind: str, which=systems, cap=cap, b=b) -> str:
                vals = []
                for s in which:
                    c = cells.get((cap.label, b, s))
                    vals.append(_fmt(getattr(c, attr), kind) if c and c.status == OK else "-")
                return " / ".join(vals)

            row += [joined("prefill", "rate"), joined("read_per_token", "bytes")]
            row += [joined("hit_rate", "pct", ours)]
            peaks = []
            for c in cs:
                if c is None or c.status != OK or c.peak is None:
                    peaks.append("-")
                elif c.limit:
                    peaks.append(f"{100 * c.peak / c.limit:.0f}%")
                else:
                    peaks.append(Bytes(c.peak).human())
            row.append(" / ".join(peaks))
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def plot(runs: list[Run], systems: list[str], caps: list[Cap], base: int, out) -> str | None:
    """Three panels against the cap (MiB; no cap drawn at the right edge): decode
    tok/s, disk bytes read per token, edgemoe's hit rate; one line per system.

    Returns:
        None when written, else why not (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'); no plot"
    cells = summarize(runs)
    batch = min(r.batch for r in runs)
    sized = [(c, c.bytes(base)) for c in caps]
    top = max([b for _, b in sized if b] + [base]) * 1.15
    xs = {c.label: (b if b else top) / 2**20 for c, b in sized}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
    colors = {s: f"C{i}" for i, s in enumerate(systems)}  # one colour per system in every panel
    panels = [
        ("decode", "decode tok/s", 1),
        ("read_per_token", "disk read per token (MiB)", 2**20),
        ("hit_rate", "expert hit rate", 1),
    ]
    for ax, (attr, title, scale) in zip(axes, panels):
        for s in systems:
            pts = sorted(
                (xs[c.label], getattr(cells[(c.label, batch, s)], attr) / scale)
                for c in caps
                if (c.label, batch, s) in cells
                and cells[(c.label, batch, s)].status == OK
                and getattr(cells[(c.label, batch, s)], attr) is not None
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[s], label=s)
        ax.set_ylim(0, 1.02 if attr == "hit_rate" else None)
        if any(c.bytes(base) is None for c in caps):
            ax.axvline(top / 2**20, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("memory cap (MiB; dotted line: no cap)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return None
