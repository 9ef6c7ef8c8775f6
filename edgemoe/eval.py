"""`edgemoe eval`: teacher-forced perplexity over held-out text, through the real runtime.

The text is tokenized with the file's tokenizer into one stream and cut into
windows of ctx + 1 tokens that overlap by one (window w scores tokens
w*ctx+1 .. w*ctx+ctx from a fresh context), as tools/train_demo.py measures the
demo's held-out perplexity. Each window is one forward pass of EdgeModel (the
same model, executor and expert kernels `edgemoe run` uses); a few windows go
through together as a batch.

Bits per expert weight are those actually computed: every (token, chosen
expert) pair counts the encoded bytes of the levels it computed at (codec
payload, scales and zero points included) over the expert's weight count,
averaged over all pairs of the run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from formats.errors import EmoeError

DEFAULT_CTX = 512
WINDOWS_PER_PASS = 8  # windows computed together: larger expert matmuls, same results
LOGIT_ROWS = 256  # positions turned into [rows, vocab] float32 logits at a time


class EvalError(EmoeError):
    """A bad input to `edgemoe eval` (no text file, too little text, a bad setting)."""

    fix = "see `edgemoe eval --help`"


class NoText(EvalError):
    fix = "give a text file with at least two tokens of text (--text FILE)"


@dataclass(frozen=True)
class EvalResult:
    model: str
    text: str
    perplexity: float
    tokens: int  # tokens scored (each predicted from the ones before it in its window)
    windows: int
    ctx: int
    level: int | None  # the fixed level asked for (None: the highest stored, or a policy's)
    bits_policy: str | None
    avg_bits: float  # encoded bits per expert weight computed (scales, zero points included),
    # averaged over every (token, chosen expert) pair
    nominal_bits: float  # the same pairs' codec widths alone (2 for mwq's INT2 level)
    level_share: dict[int, float]  # level -> share of the pairs computed at it
    expert_codecs: tuple[str, ...]
    dtype: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        what = self.bits_policy or (f"level {self.level}" if self.level else "top level")
        share = ", ".join(f"L{lv} {100 * x:.0f}%" for lv, x in self.level_share.items())
        return (
            f"perplexity {self.perplexity:.3f} over {self.tokens} tokens "
            f"({self.windows} windows of {self.ctx}) | {what}: {self.avg_bits:.3f} bits per "
            f"expert weight with scales, {self.nominal_bits:.3f} nominal ({share}; "
            f"{', '.join(self.expert_codecs)}) | {self.dtype} | {self.seconds:.1f} s"
        )


def read_text(path) -> str:
    """The text of a plain or gzipped file; NoText when it is missing, unreadable or blank."""
    import gzip

    p = Path(path)
    if not p.is_file():
        raise NoText(f"{p}: no such file" if not p.exists() else f"{p} is not a file")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise NoText(f"{p}: {e.strerror or e}") from None
    if not text.strip():
        raise NoText(f"{p} is empty")
    return text


def expert_bits(reader) -> Callable[[int, int, int], float]:
    """(layer, expert, level) -> encoded bits per weight of that expert's levels 1..level."""
    memo: dict[tuple[int, int, int], float] = {}

    def bits(layer: int, expert: int, level: int) -> float:
        key = (layer, expert, level)
        if key not in memo:
            ts = [reader.tensors[n] for n in reader.expert(layer, expert).tensors.values()]
            nbytes = sum(t.nbytes(level) for t in ts)
            memo[key] = 8.0 * nbytes / sum(math.prod(t.shape) for t in ts)
        return memo[key]

    return bits


class _BitsUsed:
    """Counts, per (layer, expert, level), the (token, expert) pairs the runtime computed: the
    levels its bit policy answered (EdgeModel.bits), or one level for all (an observer)."""

    def __init__(self, model, level: int | None):
        from edgemoe.bits import Fixed, weight_bits

        self.encoded, self.nominal = expert_bits(model.reader), weight_bits(model.reader)
        self.pairs: dict[tuple[int, int, int], int] = {}
        policy = getattr(model, "bits", None)
        if policy is not None:  # wrap the policy the executor asks: its answers are the levels
            asked = policy.levels

            def levels(layer, expert_ids, weights, hidden):
                out = asked(layer, expert_ids, weights, hidden)
                self.add(layer, expert_ids, out)
                return out

            policy.levels = levels
            self.stop = lambda: vars(policy).pop("levels", None)
        else:
            fixed = Fixed(model.reader, level)
            self.stop = model.executor.observe(
                lambda layer, ids: self.add(layer, ids, fixed.levels(layer, ids, None, None))
            )

    def add(self, layer: int, expert_ids, levels) -> None:  # [T, K] each
        import torch

        keys = torch.stack([expert_ids.reshape(-1), levels.reshape(-1).to(expert_ids.dtype)], 1)
        uniq, counts = torch.unique(keys, dim=0, return_counts=True)
        for (e, lv), n in zip(uniq.tolist(), counts.tolist(), strict=True):
            k = (layer, e, lv)
            self.pairs[k] = self.pairs.get(k, 0) + n

    def average(self, bits: Callable[[int, int, int], float]) -> float:
        n = sum(self.pairs.values())
        return sum(bits(*k) * c for k, c in self.pairs.items()) / n if n else 0.0

    def level_share(self) -> dict[int, float]:
        """Share of pairs computed at each level."""
        n = sum(self.pairs.values()) or 1
        out: dict[int, float] = {}
        for (_, _, lv), c in self.pairs.items():
            out[lv] = out.get(lv, 0.0) + c / n
        return dict(sorted(out.items()))


def perplexity(
    path,
    text: str,
    *,
    level: int | None = None,
    bits: str | None = None,
    ctx: int = DEFAULT_CTX,
    max_tokens: int | None = None,
    dtype: str = "auto",
    mem=None,
    fused: bool = True,
    text_name: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Teacher-forced perplexity of `text` under the .emoe at `path`, through EdgeModel.

    Args:
        level: compute every expert at this stored level (default: the highest).
        bits: a bit policy spec instead (edgemoe/bits.py: "fixed:L", "gate:q=0.5", ...).
        ctx: tokens per window (each window starts from an empty context).
        max_tokens: score at most this many tokens (the text's first ones).
        dtype, mem: as for edgemoe.load (mem None: every expert stays cached).
        fused: False computes experts on their dequantized weights (the same values; in f32
            much faster here than torch's int4 kernel, which took 15x as long on the demo).
        progress: called with (tokens scored so far, tokens to score).
    Returns:
        EvalResult.
    Raises:
        NoText: the text has fewer than two tokens.
        EvalError: ctx or max_tokens out of range.
        BadRequest (param "level", "bits", "ctx", "dtype"): as edgemoe.load raises them.
    """
    import torch
    import torch.nn.functional as F

    from edgemoe.engine import EdgeModel

    if not isinstance(ctx, int) or ctx < 1:
        raise EvalError(f"ctx={ctx!r}", "use a context of at least 1 token")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise EvalError(f"max_tokens={max_tokens!r}", "score at least 1 token, or leave it unset")
    t0 = time.perf_counter()
    kw = {"bits": bits} if bits is not None else {}
    m = EdgeModel(
        path, mem, ctx=ctx, batch=WINDOWS_PER_PASS, dtype=dtype, level=level, fused=fused, **kw
    )
    try:
        ids = m.tokenizer.encode(text)
        if max_tokens is not None:
            ids = ids[: max_tokens + 1]
        if len(ids) < 2:
            raise NoText(f"the text has {len(ids)} token(s); perplexity needs at least 2")
        stream = torch.tensor(ids, dtype=torch.int64)
        total = len(ids) - 1
        starts = list(range(0, total, ctx))
        # full windows go WINDOWS_PER_PASS at a time; a short last one alone, so no pass has
        # padding (whose tokens would be routed and counted in the bits)
        full = [s for s in starts if s + ctx <= total]
        groups = [full[i : i + WINDOWS_PER_PASS] for i in range(0, len(full), WINDOWS_PER_PASS)]
        groups += [[s] for s in starts if s + ctx > total]
        used = _BitsUsed(m, level)
        nll, scored = 0.0, 0
        try:
            for group in groups:
                n = min(ctx, total - group[0])  # tokens scored per window of this pass
                x = torch.stack([stream[s : s + n] for s in group])  # [B, S]
                hidden = m.forward(x, m.model.new_cache(len(group), n))  # [B, S, D]
                for b, s in enumerate(group):
                    for a in range(0, n, LOGIT_ROWS):
                        z = min(n, a + LOGIT_ROWS)
                        logits = m.logits(hidden[b, a:z])  # [rows, V] float32
                        target = stream[s + a + 1 : s + z + 1]
                        nll += float(F.cross_entropy(logits, target, reduction="sum"))
                    scored += n
                if progress is not None:
                    progress(scored, total)
        finally:
            used.stop()
        codecs = sorted({m.reader.tensors[n].codec.name for n in _expert_tensors(m.reader)})
        return EvalResult(
            model=str(m.path),
            text=text_name,
            perplexity=math.exp(nll / scored),
            tokens=scored,
            windows=len(starts),
            ctx=ctx,
            level=level,
            bits_policy=bits,
            avg_bits=used.average(used.encoded),
            nominal_bits=used.average(used.nominal),
            level_share=used.level_share(),
            expert_codecs=tuple(codecs),
            dtype=str(m.dtype).replace("torch.", ""),
            seconds=time.perf_counter() - t0,
        )
    finally:
        m.close()


def _expert_tensors(reader) -> list[str]:
    return [n for e in reader.experts.values() for n in e.tensors.values()]


def evaluate_file(path, text_file, **kw) -> EvalResult:
    """perplexity() of the text in a file (plain or .gz); NoText names a missing or empty one."""
    return perplexity(path, read_text(text_file), text_name=str(text_file), **kw)


# ---------------------------------------------------------------- command line


def add_parser(sub) -> None:
    """Register `edgemoe eval` on the CLI's subparsers."""
    from edgemoe.cli_args import count, size

    ev = sub.add_parser(
        "eval", help="teacher-forced perplexity of held-out text, and the bits per expert weight"
    )
    ev.add_argument("model", nargs="?", help="the .emoe (default: the bundled demo model)")
    ev.add_argument("--text", required=True, help="text file (plain or .gz) to score")
    ev.add_argument(
        "--level", type=count(1, 64), help="expert precision level (default: the highest stored)"
    )
    ev.add_argument(
        "--bits-policy",
        metavar="SPEC",
        help="the level of each (token, expert) instead: fixed:L, gate:q=0.5, calibrated, "
        "trained (edgemoe/bits.py)",
    )
    ev.add_argument(
        "--ctx",
        type=count(1),
        default=DEFAULT_CTX,
        help=f"tokens per window; each starts from an empty context (default {DEFAULT_CTX})",
    )
    ev.add_argument(
        "-n", "--max-tokens", type=count(1), help="score at most this many tokens of the text"
    )
    ev.add_argument(
        "--dtype", default="auto", help="auto (f32 for f32 files, else bf16), f32, bf16"
    )
    ev.add_argument("--mem", type=size, help="memory budget (default: unlimited)")
    ev.add_argument("--json", action="store_true", help="print one JSON record")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(fn=_cmd_eval)


def _cmd_eval(args) -> int:
    import json
    import sys

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(desc="eval", unit="tok", file=sys.stderr, disable=None)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        r = evaluate_file(
            args.model,
            args.text,
            level=args.level,
            bits=args.bits_policy,
            ctx=args.ctx,
            max_tokens=args.max_tokens,
            dtype=args.dtype,
            mem=args.mem,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(r.as_dict()) if args.json else r.line())
    return 0
