"""The KV cache: a pool of sequence slots, each with its own length.

Shape legend: N slots, B rows of one forward pass, S new tokens per row,
L keys attended (the longest row's cached + new), Hkv key/value heads.

A forward pass names the slots its rows write (`begin(valid, slots)`); each
slot keeps its own length, so sequences of different lengths share a pass
and join or leave the running batch between passes (what a server's
continuous batching and a scheduler's batches need). Rows are right-padded:
row b's first valid_b tokens are real; pad tokens are written past the
slot's length, never counted, and overwritten by its next tokens.

A packed pass (`Packed`) puts its rows' new tokens back to back in one row of
T tokens instead: no pads anywhere, and attention runs over each row's own
keys (`runs`), so a row of 10 keys beside one of 400 reads 10, and a
newcomer's prompt shares a pass with the running rows' single tokens at the
cost of its own tokens only.

Storage is allocated once for N x max_len and zero-filled lazily by the
kernel (pages are touched as positions fill), so the planner's byte count
is an upper bound that a short run does not reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# What one attention call costs beyond its work, in cached numbers read (keys and values):
# one SDPA call of a decode row took ~11 us more than its keys' share (f32, AVX2, 1 thread,
# the demo's 2 x 96 numbers a position: ~250 positions). Decode rows of neighbouring slots
# share a call (their keys padded to the longest) when that costs less than a call each.
RUN_COST = 48_000


@dataclass(frozen=True)
class Packed:
    """The layout of a packed pass: row b has counts[b] new tokens, in slot slots[b]; the
    pass's tokens [1, T] are the rows' tokens back to back (T = sum(counts))."""

    slots: tuple[int, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True)
class Run:
    """Rows of a packed pass attended in one call: tokens t0:t1 of the pass, slots lo:hi,
    keys 0:length.

    Either decode rows of consecutive slots (one token each: q is [hi - lo, H, 1, Dh]) or a
    single row of any count (q [1, H, t1 - t0, Dh]). mask: [b, 1, s, length] bool, or None
    when every query sees all its keys (causal: a fresh prompt, top-left causal is right).
    """

    t0: int
    t1: int
    lo: int
    hi: int
    length: int
    mask: torch.Tensor | None = None
    causal: bool = False

    def bool_mask(self) -> torch.Tensor | None:
        """The mask as a [b, 1, s, length] tensor (None: attend everything)."""
        if not self.causal:
            return self.mask
        s = self.t1 - self.t0
        return torch.ones(s, self.length, dtype=torch.bool).tril()[None, None]


class Runs(list):
    """The attention calls of a packed pass (a list of Run), returned by begin as its mask."""


def plan_runs(slots: list[int], starts: list[int], counts: list[int], run_cost: float) -> Runs:
    """Group a packed pass's rows (in slot order) into attention calls.

    A row with several new tokens is a call of its own. Decode rows of consecutive slots are
    split into stretches (a view of the cache each, no copy) that minimise run_cost per call
    plus the padded keys each call reads (rows x its longest): the cheapest split by dynamic
    programming over the stretch, n <= batch rows.
    """
    runs, t, i, n = Runs(), 0, 0, len(slots)
    while i < n:
        if counts[i] > 1:
            a, c = starts[i], counts[i]
            mask = None
            if a:  # query j sees keys 0..a + j
                mask = (torch.arange(a + c)[None, :] <= a + torch.arange(c)[:, None])[None, None]
            runs.append(Run(t, t + c, slots[i], slots[i] + 1, a + c, mask, causal=not a))
            t, i = t + c, i + 1
            continue
        j = i + 1  # a stretch of decode rows in consecutive slots: i..j-1
        while j < n and counts[j] == 1 and slots[j] == slots[j - 1] + 1:
            j += 1
        ends = [starts[k] + 1 for k in range(i, j)]  # keys each row attends
        best, cut = [0.0] * (j - i + 1), [0] * (j - i + 1)
        for b in range(1, j - i + 1):
            best[b], longest = float("inf"), 0
            for a in range(b - 1, -1, -1):
                longest = max(longest, ends[a])
                cost = best[a] + run_cost + (b - a) * longest
                if cost < best[b]:
                    best[b], cut[b] = cost, a
        pieces, b = [], j - i
        while b:
            pieces.append((cut[b], b))
            b = cut[b]
        for a, b in reversed(pieces):
            length = max(ends[a:b])
            mask = None
            if min(ends[a:b]) < length:
                have = torch.tensor(ends[a:b])
                mask = (torch.arange(length)[None, :] < have[:, None])[:, None, None, :]
            runs.append(Run(t + a, t + b, slots[i + a], slots[i + a] + b - a, length, mask))
        t, i = t + j - i, j
    return runs


def kv_nbytes(
    n_layers: int, slots: int, max_len: int, kv_heads: int, k_dim: int, v_dim: int, item: int
) -> int:
    """Bytes a cache of `slots` x `max_len` positions holds (`item`: bytes per number)."""
    return n_layers * slots * max_len * kv_heads * (k_dim + v_dim) * item


class KVCache:
    """Keys and values of every layer for a pool of sequence slots.

    Attributes:
        lengths: [N] positions filled in each slot.
        valid: [B, S] this pass's real tokens (set by begin).
        keep: flat indices of this pass's real tokens in [B * S], or None if all are real
            (MoE layers skip pads: a pad routed to an expert would cost a read).
    """

    def __init__(
        self,
        n_layers: int,
        slots: int,
        max_len: int,
        kv_heads: int,
        k_dim: int,
        v_dim: int,
        dtype: torch.dtype,
    ):
        self.max_len, self.slots, self.dtype = max_len, slots, dtype
        shape = (slots, kv_heads, max_len)
        self.k = [torch.zeros(*shape, k_dim, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(*shape, v_dim, dtype=dtype) for _ in range(n_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.int64)
        self._rows: torch.Tensor = torch.arange(0)
        self._contiguous: tuple[int, int] | None = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool)
        self.keep: torch.Tensor | None = None
        self._span = 0
        self._one: tuple[int, int] | None = None
        self._added = torch.zeros(0, dtype=torch.int64)
        # a call's cost in positions of this cache (RUN_COST numbers, keys and values)
        self.run_cost = RUN_COST / (kv_heads * (k_dim + v_dim))

    @property
    def length(self) -> int:
        """The longest slot's length (a single sequence's length)."""
        return int(self.lengths.max()) if self.slots else 0

    def token_slots(self) -> torch.Tensor:
        """The slot of each token of this pass, shaped as begin's positions."""
        rows, positions = self._where
        return torch.broadcast_to(rows, positions.shape)

    @property
    def one(self) -> tuple[int, int] | None:
        """(slot, first position) when this pass is one row, else None."""
        return self._one

    def reset(self, slot: int) -> None:
        """Free a slot for a new sequence (its old keys are overwritten as the new one fills)."""
        self.lengths[slot] = 0

    def begin(
        self, valid_new: torch.Tensor, slots: torch.Tensor | Packed | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | Runs]:
        """Positions [B, S] and the attention mask [B, 1, S, L] for a pass over `slots`.

        Args:
            valid_new: [B, S] bool, row b's first n_b entries True (right padding).
            slots: [B] int64 slot of each row (default: slots 0..B-1), or a Packed layout:
                then valid_new is [1, T], all True, and the mask is the pass's Runs.
        Raises:
            ValueError: a row would pass the cache's max_len.
        """
        if isinstance(slots, Packed):
            return self._begin_packed(valid_new, slots)
        b, s = valid_new.shape
        rows = torch.arange(b) if slots is None else slots.to(torch.int64)
        start = self.lengths[rows]  # [B]
        rows_l, start_l = rows.tolist(), start.tolist()  # a decode pass is small: plain ints
        span = max(start_l, default=0) + s  # keys 0..span-1 cover every row's cached + new
        everything = bool(valid_new.all())  # no pads (a decode step, a lone prompt)
        if span > self.max_len:
            n_new = valid_new.sum(dim=1)
            raise ValueError(
                f"context of {int((start + n_new).max())} tokens exceeds the cache's {self.max_len}"
            )
        positions = start[:, None] + torch.arange(s)[None, :]  # [B, S]
        key_pos = torch.arange(span)[None, None, :]  # [1, 1, L]
        causal = key_pos <= positions[:, :, None]  # [B, S, L]
        if everything:  # each row's keys past its own end are in no query's past
            mask = causal[:, None]  # [B, 1, S, L]
        else:
            real = key_pos < (start + valid_new.sum(dim=1))[:, None, None]  # [B, 1, L] not pad
            # a pad query attends to the row's first key only, so no row is all -inf
            pad_q = ~valid_new[:, :, None] & (key_pos == 0)
            mask = ((causal & real) | pad_q)[:, None]  # [B, 1, S, L]
        self._rows, self.valid, self._span = rows, valid_new, span
        self._added = valid_new.sum(dim=1)
        first = rows_l[0] if b else 0
        self._contiguous = (
            (first, first + b) if b and rows_l == list(range(first, first + b)) else None
        )
        self._start = start
        self._where = (rows[:, None], positions)  # [B, 1], [B, S]: where this pass's k/v go
        self._one = (rows_l[0], start_l[0]) if b == 1 else None
        self.keep = None if everything else valid_new.reshape(-1).nonzero()[:, 0]
        return positions, mask

    def _begin_packed(self, valid: torch.Tensor, p: Packed) -> tuple[torch.Tensor, Runs]:
        slots, counts = list(p.slots), list(p.counts)
        t = sum(counts)
        if valid.shape != (1, t) or len(slots) != len(counts) or min(counts, default=1) < 1:
            raise ValueError(f"a packed pass of {counts} tokens got tokens of {tuple(valid.shape)}")
        rows = torch.tensor(slots, dtype=torch.int64)
        starts = self.lengths[rows].tolist()
        if max((a + c for a, c in zip(starts, counts)), default=0) > self.max_len:
            longest = max(a + c for a, c in zip(starts, counts))
            raise ValueError(f"context of {longest} tokens exceeds the cache's {self.max_len}")
        if t == len(slots):  # one token a row: a decode pass
            positions = torch.tensor(starts, dtype=torch.int64)[None]  # [1, T]
            token_rows = rows[None]
        else:
            positions = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts)])[None]
            token_rows = torch.tensor(slots).repeat_interleave(torch.tensor(counts))[None]
        self._rows, self.valid, self._span = rows, valid, 0
        self._added = torch.tensor(counts, dtype=torch.int64)
        self._contiguous = None
        self._where = (token_rows, positions)  # [1, T], [1, T]
        self._one = (slots[0], starts[0]) if len(slots) == 1 else None
        self.keep = None
        return positions, plan_runs(slots, starts, counts, self.run_cost)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [B, Hkv, S, *] at each row's next positions (begin said where)."""
        kc, vc = self.k[layer], self.v[layer]
        if self._one is not None:  # one row: a slice copy
            (row, a), s = self._one, k.shape[2]
            kc[row, :, a : a + s] = k[0]
            vc[row, :, a : a + s] = v[0]
        else:  # every row at once (a Python loop over rows cost more than the copies)
            rows, pos = self._where
            kc[rows, :, pos] = k.transpose(1, 2)  # [B, S, Hkv, *] at (slot, position)
            vc[rows, :, pos] = v.transpose(1, 2)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, S, *] at each row's next slots; return all [B, Hkv, L, *]
        (a padded pass; a packed one reads its keys by run: base.attend_runs)."""
        self.store(layer, k, v)
        kc, vc = self.k[layer], self.v[layer]
        if self._contiguous is not None:  # the common case: a view, no copy
            lo, hi = self._contiguous
            return kc[lo:hi, :, : self._span], vc[lo:hi, :, : self._span]
        span, rows = self._span, self._rows  # index_select: 3x faster than kc[rows, :, :span]
        return kc[:, :, :span].index_select(0, rows), vc[:, :, :span].index_select(0, rows)

    def commit(self) -> None:
        """Advance each row's slot by its real tokens."""
        self.lengths.index_add_(0, self._rows, self._added)
