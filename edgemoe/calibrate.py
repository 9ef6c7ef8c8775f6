"""`edgemoe calibrate`: run a model over text and store its routing trace in the file.

It builds a model (EdgeModel), so it sits above the engine; the trace's format,
checks and replay live below it, in routing.py. With `--bits` it stores each
expert's level instead (EdgeMoE's calibrated bit-widths), with `--bit-router` a
trained bit router (D²MoE): fitted by bitfit.py, read back by bitstored.py.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgemoe import bitfit, bitstored
from edgemoe.engine import EdgeModel
from edgemoe.routing import TRACE_BLOB, RoutingTrace
from formats import constants as C
from formats.amend import amend
from formats.errors import EmoeError


class NotEnoughText(EmoeError):
    fix = "give more text (--text FILE ...), or lower --segments or --tokens"


def text_segments(token_ids: list[int], segments: int, tokens: int) -> np.ndarray:
    """[S, T] windows spread evenly over one token stream."""
    need = segments * tokens
    if len(token_ids) < need:
        raise NotEnoughText(
            f"the text has {len(token_ids)} tokens; {segments} segments of {tokens} need {need}"
        )
    stream = np.asarray(token_ids, dtype=np.int64)
    starts = np.linspace(0, len(stream) - tokens, segments).astype(np.int64)
    return np.stack([stream[s : s + tokens] for s in starts])


def record(
    model, segments: np.ndarray, source: str, chunk: int = 512, progress: Callable | None = None
) -> RoutingTrace:
    """Run `model` (an EdgeModel) over [S, T] token segments and keep every routing decision;
    progress(segments done) is called after each segment."""
    layers = sorted({e.layer for e in model.reader.experts.values()})
    pos = {layer: i for i, layer in enumerate(layers)}
    s, t = segments.shape
    k = model.reader.config["num_experts_per_tok"]
    ids = np.zeros((s, t, len(layers), k), dtype=np.uint16)
    at = {"seg": 0, "start": 0}

    def seen(layer: int, expert_ids: torch.Tensor) -> None:  # [n, K] for tokens start..start+n
        a = at["start"]
        ids[at["seg"], a : a + expert_ids.shape[0], pos[layer]] = expert_ids.numpy()

    stop = model.executor.observe(seen)
    try:
        with torch.inference_mode():
            for i in range(s):
                cache = model.model.new_cache(1, t)
                at["seg"] = i
                for a in range(0, t, chunk):
                    at["start"] = a
                    model.forward(torch.from_numpy(segments[i : i + 1, a : a + chunk]), cache)
                if progress is not None:
                    progress(i + 1)
    finally:
        stop()
    return RoutingTrace(ids, layers, source)


def read_text(paths: list[str]) -> str:
    """The text of plain or gzipped files, one after another."""
    parts = []
    for p in paths:
        opener = gzip.open if str(p).endswith(".gz") else open
        try:
            with opener(p, "rt", encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
        except FileNotFoundError:
            raise NotEnoughText(f"{p}: no such file", "check the --text path") from None
    return "\n\n".join(parts)


def calibrate(
    path,
    texts: list[str],
    *,
    segments: int = 8,
    tokens: int = 256,
    mem=None,
    dtype: str = "auto",
    progress: Callable | None = None,
) -> RoutingTrace:
    """Record the routing of `segments` x `tokens` tokens of the given text files and store it in
    the .emoe (rewritten atomically by formats.amend; every other chunk is copied unchanged)."""
    if segments < 1 or tokens < 2:
        raise NotEnoughText(
            f"--segments {segments} --tokens {tokens}", "use at least 1 segment of 2 tokens"
        )
    m = EdgeModel(path, mem, ctx=tokens, dtype=dtype)
    try:
        ids = m.tokenizer.encode(read_text(texts))
        source = ", ".join(Path(t).name for t in texts)
        trace = record(m, text_segments(ids, segments, tokens), source, progress=progress)
    finally:
        m.close()
    amend(m.path, metadata={C.M_ROUTING_STATS: trace.meta()}, blobs={TRACE_BLOB: trace.blob()})
    return trace


def _fitting(path, texts: list[str], segments: int, tokens: int):
    """(model, its FitExecutor, [S, T] calibration tokens, source name)."""
    if segments < 1 or tokens < 2:
        raise NotEnoughText(
            f"--segments {segments} --tokens {tokens}", "use at least 1 segment of 2 tokens"
        )
    m, ex = bitfit.open_for_fitting(path, tokens)
    try:
        ids = m.tokenizer.encode(read_text(texts))
        segs = torch.from_numpy(text_segments(ids, segments, tokens))
    except BaseException:
        m.close()
        raise
    return m, ex, segs, ", ".join(Path(t).name for t in texts)


def calibrate_bits(
    path,
    texts: list[str],
    *,
    tolerance: float = 0.02,
    segments: int = 8,
    tokens: int = 256,
    progress: Callable | None = None,
) -> tuple[dict[int, list[int]], dict]:
    """Fit each expert's level under a perplexity tolerance (bitfit.fit_table) on the text and
    store the table in the .emoe (blob C.BLOB_BITS_TABLE, rewritten atomically).

    Returns:
        (layer -> [E] levels, the fit's info as stored).
    """
    m, ex, segs, source = _fitting(path, texts, segments, tokens)
    try:
        table, info = bitfit.fit_table(m, ex, segs, tolerance, progress)
    finally:
        m.close()
    info = {**info, "source": source, "tokens": int(segs.numel())}
    amend(m.path, blobs={bitstored.TABLE_BLOB: bitstored.table_blob(table, info)})
    return table, info


def train_bit_router(
    path,
    texts: list[str],
    *,
    lam: float = bitfit.DEFAULT_LAMBDA,
    steps: int = bitfit.DEFAULT_STEPS,
    segments: int = 8,
    tokens: int = 256,
    progress: Callable | None = None,
) -> dict:
    """Train the bit router (bitfit.fit_router) on the text and store it in the .emoe (blob
    C.BLOB_BITS_ROUTER, rewritten atomically). Returns the fit's info as stored."""
    m, ex, segs, source = _fitting(path, texts, segments, tokens)
    try:
        router, info = bitfit.fit_router(m, ex, segs, lam=lam, steps=steps, progress=progress)
    finally:
        m.close()
    info = {**info, "source": source, "tokens": int(segs.numel())}
    amend(m.path, blobs={bitstored.ROUTER_BLOB: router.blob(info)})
    return info
