"""Generation as steps over per-request sequence state.

    seqs = [Sequence(Request(ids, max_tokens=32), slot) for ...]
    records = prefill(model, cache, seqs)       # the prompts; each sequence's first token
    while any(not s.done for s in seqs):
        records = decode_step(model, cache, seqs)  # one token for every running sequence

    records = step(model, cache, new, running)  # both in one pass: newcomers' prompts
                                                # beside the running sequences' next tokens

`stream` does that loop for a fixed set of requests; a server steps a running
batch itself, adding sequences (prefill of the newcomers, then decode with the
rest) and dropping finished ones between steps: every sequence owns a slot of
the KV cache with its own length (edgemoe/kvcache.py).

Everything per request (sampling generator, tokens, text shown, stats) lives
in its `Sequence`, never on the shared model, so two generations at once do
not touch each other's numbers. The model object only has to offer
`forward`, `logits`, `tokenizer` and `executor_stats` (EdgeModel does).

Shape legend: B rows of a pass, S tokens per row, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edgemoe.kvcache import KVCache, Packed
from edgemoe.moe.executor import ExecutorStats
from edgemoe.sampling import Sampling, sample

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds the activations of a long prompt


class Steppable(Protocol):
    tokenizer: object

    def forward(self, tokens, cache, valid=None, slots=None) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def executor_stats(self) -> ExecutorStats: ...


@dataclass(frozen=True)
class Request:
    """One prompt's generation settings.

    ids: the prompt's token ids. logprobs: None for none; 0 for the chosen token's log
    probability; n > 0 for that and the n most likely alternatives at every step.
    """

    ids: tuple[int, ...]
    max_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None


@dataclass
class SeqStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    queued_at: float = field(default_factory=time.perf_counter)
    # the executor's figures while this sequence ran (shared with sequences in the same passes)
    executor: ExecutorStats = field(default_factory=ExecutorStats)


@dataclass(frozen=True)
class Record:
    """What one step gave one sequence.

    token: the new token id (None when the step ended the sequence on an end-of-sequence token).
    text: new text since the last record (held back while it could be half a UTF-8 character
    or the start of a stop string). finish_reason: None, "stop" or "length".
    """

    seq: Sequence
    token: int | None
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None


class Sequence:
    """A request being generated in one KV cache slot.

    cached: how many of the prompt's first tokens the slot already holds (a chat's earlier
    turns kept for the next one); prefill computes only the rest (at least the last token).
    prefilled: prompt tokens in the slot so far (cached, then what passes have computed: a
    step with a token budget computes a long prompt over several passes).
    """

    def __init__(
        self, request: Request, slot: int, tokenizer, eos_ids=frozenset(), cached: int = 0
    ):
        self.request, self.slot, self.tokenizer = request, slot, tokenizer
        self.cached = max(0, min(cached, len(request.ids) - 1))
        self.prefilled = self.cached
        self.eos_ids = frozenset(eos_ids)
        s = request.sampling
        self.gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        self.out: list[int] = []
        self.logprobs: list[float] = []
        self.shown = ""
        self.finish_reason: str | None = None
        self.stats = SeqStats(prompt_tokens=len(request.ids))
        self._exec0: ExecutorStats | None = None
        self._cut: int | None = None  # the text ends here (a stop string began)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """Part of the prompt is still to be computed (no token yet)."""
        return self.prefilled < len(self.request.ids) and not self.done

    @property
    def text(self) -> str:
        return self.shown

    @property
    def length(self) -> int:
        """Tokens in the KV cache once the last sampled token is fed."""
        return len(self.request.ids) + len(self.out)

    def _accept(self, token: int, logits: torch.Tensor) -> Record:
        """Take a sampled token ([V] float32 logits it came from); the record to yield."""
        req = self.request
        lp = top = None
        if req.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            lp = float(logp[token])
            if req.logprobs > 0:
                v, i = torch.topk(logp, min(req.logprobs, logp.shape[-1]))
                top = tuple(zip(i.tolist(), v.tolist()))
        if token in self.eos_ids:
            return self._finish(None, "stop", lp, top)
        self.out.append(token)
        if lp is not None:
            self.logprobs.append(lp)
        self.stats.new_tokens += 1
        text = self.tokenizer.decode(self.out)
        reason = "length" if len(self.out) >= req.max_tokens else None
        cut = min((text.find(x) for x in req.stop if x and x in text), default=-1)
        if cut >= 0:
            self._cut = cut
            return self._finish(token, "stop", lp, top, text[:cut])
        if reason:
            return self._finish(token, reason, lp, top, text)
        hold = _held_back(text, req.stop)
        new = text[len(self.shown) : len(text) - hold]
        self.shown += new
        return Record(self, token, new, lp, top)

    def _finish(self, token, reason, lp, top, text: str | None = None) -> Record:
        new = "" if text is None else text[len(self.shown) :]
        if text is None:  # end of sequence: show what was held back
            full = self.tokenizer.decode(self.out) if self.out else ""
            new = full[len(self.shown) :] if self._cut is None else ""
        self.shown += new
        self.finish_reason = reason
        return Record(self, token, new, lp, top, reason)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of text not to show yet: half a UTF-8 character, or a prefix of a
    stop string (shown once the next tokens prove it is not one)."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


def _sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> list[Record]:
    """logits [B, V] float32, one row per sequence. Greedy rows take one argmax for the
    whole batch; the others draw with their own settings and generator."""
    tokens = [0] * len(seqs)
    best = None
    for i, seq in enumerate(seqs):
        s = seq.request.sampling
        if s.is_greedy:
            if best is None:
                best = logits.argmax(dim=-1).tolist()  # [B]
            tokens[i] = best[i]
            continue
        history = None
        if s.repetition_penalty != 1.0 and s.repeat_last_n > 0:
            history = [_recent(seq, s.repeat_last_n)]
        tokens[i] = int(sample(logits[i : i + 1], s, seq.gen, history)[0])
    return [seq._accept(t, logits[i]) for i, (seq, t) in enumerate(zip(seqs, tokens))]


def _recent(seq: Sequence, n: int) -> list[int]:
    """The last n tokens of a sequence, prompt included (the repetition penalty's window)."""
    tail = seq.out[-n:]
    if len(tail) < n:
        ids = seq.request.ids
        tail = list(ids[max(0, len(ids) - (n - len(tail))) :]) + tail
    return tail


def _by_slot(seqs: list[Sequence]) -> list[Sequence]:
    """Rows in slot order: a batch over consecutive slots reads its keys as a view of the
    cache (kvcache.py), not a copy per layer."""
    return sorted(seqs, key=lambda s: s.slot)


def _in_order(records: list[Record], seqs: list[Sequence]) -> list[Record]:
    """Records in the order of the sequences the caller gave."""
    by_seq = {id(r.seq): r for r in records}
    return [by_seq[id(s)] for s in seqs if id(s) in by_seq]


def _begin(model: Steppable, seqs: list[Sequence]) -> None:
    now = None
    for seq in seqs:
        if seq._exec0 is None:  # its first pass (a prompt may take several)
            now = now or model.executor_stats()
            seq._exec0 = now


def _end(model: Steppable, records: list[Record]) -> None:
    now = None
    for r in records:
        if r.finish_reason is not None:
            now = now or model.executor_stats()
            r.seq.stats.executor = now - r.seq._exec0


def prefill(
    model: Steppable, cache: KVCache, seqs: list[Sequence], chunk: int = PREFILL_CHUNK
) -> list[Record]:
    """Run the prompts of new sequences and sample each one's first token. A sequence's slot
    holds its first `cached` prompt tokens already (0: the slot starts empty)."""
    return step(model, cache, seqs, [], chunk)


def step(
    model: Steppable,
    cache: KVCache,
    new: list[Sequence],
    running: list[Sequence],
    chunk: int = PREFILL_CHUNK,
    budget: int | None = None,
) -> list[Record]:
    """One pass over the prompts of new sequences and the next token of running ones: each
    new sequence's first token and each running one's next (finished ones are skipped).

    The pass is packed (kvcache.Packed): the rows' tokens back to back, no padding, so a
    running row costs its one token beside a newcomer's prompt, and attention reads each
    row's own keys. A prompt longer than `chunk` takes further passes of its next `chunk`
    tokens (the running rows ride in the first).

    budget: at most this many prompt tokens in all (None: every prompt whole), taken by the
    new sequences in the order given; one whose prompt does not fit computes what does
    (its `prefilled` advances) and gets no record until a later step finishes it, so a
    long prompt does not hold up the running rows' next token for its whole length.
    """
    running = [s for s in running if not s.done]
    new = [s for s in new if s.prefilling]
    todo_of: dict[int, tuple[int, ...]] = {}
    left = budget
    for s in new:
        ids = s.request.ids[s.prefilled :]
        if left is not None:
            ids, left = ids[: max(left, 0)], left - len(ids)
        if ids:
            todo_of[id(s)] = ids
    new = [s for s in new if id(s) in todo_of]
    given, rows = new + running, _by_slot(new + running)
    if not rows:
        return []
    _begin(model, new)
    t0 = time.perf_counter()
    for s in new:
        cache.lengths[s.slot] = s.prefilled
    # a running row's next input is its last token; the slot holds everything before
    todo = [todo_of.get(id(s)) or (s.out[-1],) for s in rows]
    last: list[torch.Tensor | None] = [None] * len(rows)
    for a in range(0, max(len(ids) for ids in todo), chunk):
        live = [i for i, ids in enumerate(todo) if len(ids) > a]
        pieces = [todo[i][a : a + chunk] for i in live]
        counts = [len(x) for x in pieces]
        tokens = torch.tensor([[t for x in pieces for t in x]])  # [1, T]
        layout = Packed(tuple(rows[i].slot for i in live), tuple(counts))
        h = model.forward(tokens, cache, None, layout)[0]  # [T, D]
        end = 0
        for i, n in zip(live, counts):
            end += n
            if len(todo[i]) <= a + chunk:  # the row's last token is in this pass
                last[i] = h[end - 1]
    for s in new:
        s.prefilled += len(todo_of[id(s)])
    # rows that sample now: running ones and prompts finished in this pass
    ready = [i for i, s in enumerate(rows) if not s.prefilling]
    records = []
    if ready:
        logits = model.logits(torch.stack([last[i] for i in ready]))  # [B, V]
        records = _sample_rows(logits, [rows[i] for i in ready])
    now = time.perf_counter()
    for s in rows:
        if id(s) in todo_of:
            s.stats.prefill_s += now - t0
            if not s.prefilling:
                s.stats.ttft_s = now - s.stats.queued_at
        else:
            s.stats.decode_s += now - t0
    _end(model, records)
    return _in_order(records, given)


def decode_step(model: Steppable, cache: KVCache, seqs: list[Sequence]) -> list[Record]:
    """One token for every running sequence (finished ones are skipped)."""
    return step(model, cache, [], seqs)


def stream(
    model: Steppable, cache: KVCache, requests: list[Request], slots: list[int], tokenizer=None
) -> Iterator[list[Record]]:
    """Generate `requests` together in the given cache slots; yield each step's records."""
    tok = tokenizer or model.tokenizer
    eos = getattr(tok, "eos_ids", ())
    seqs = [Sequence(r, slot, tok, eos) for r, slot in zip(requests, slots)]
    records = prefill(model, cache, seqs)
    yield records
    while not all(s.done for s in seqs):
        yield decode_step(model, cache, seqs)
