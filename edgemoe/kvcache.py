"""The KV cache: a pool of sequence slots, each with its own length.

Shape legend: N slots, B rows of one forward pass, S new tokens per row,
L keys attended (the longest row's cached + new), Hkv key/value heads.

A forward pass names the slots its rows write (`begin(valid, slots)`); each
slot keeps its own length, so sequences of different lengths share a pass
and join or leave the running batch between passes (what a server's
continuous batching and a scheduler's batches need). Rows are right-padded:
row b's first valid_b tokens are real; pad tokens are written past the
slot's length, never counted, and overwritten by its next tokens.

Storage is allocated once for N x max_len and zero-filled lazily by the
kernel (pages are touched as positions fill), so the planner's byte count
is an upper bound that a short run does not reach.
"""

from __future__ import annotations

import torch


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

    @property
    def length(self) -> int:
        """The longest slot's length (a single sequence's length)."""
        return int(self.lengths.max()) if self.slots else 0

    def reset(self, slot: int) -> None:
        """Free a slot for a new sequence (its old keys are overwritten as the new one fills)."""
        self.lengths[slot] = 0

    def begin(
        self, valid_new: torch.Tensor, slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [B, S] and the attention mask [B, 1, S, L] for a pass over `slots`.

        Args:
            valid_new: [B, S] bool, row b's first n_b entries True (right padding).
            slots: [B] int64 slot of each row (default: slots 0..B-1).
        Raises:
            ValueError: a row would pass the cache's max_len.
        """
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
        first = rows_l[0] if b else 0
        self._contiguous = (
            (first, first + b) if b and rows_l == list(range(first, first + b)) else None
        )
        self._start = start
        self._where = (rows[:, None], positions)  # [B, 1], [B, S]: where this pass's k/v go
        self._one = (rows_l[0], start_l[0]) if b == 1 else None
        self.keep = None if everything else valid_new.reshape(-1).nonzero()[:, 0]
        return positions, mask

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, S, *] at each row's next slots; return all [B, Hkv, L, *]."""
        kc, vc = self.k[layer], self.v[layer]
        if self._one is not None:  # one row: a slice copy
            (row, a), s = self._one, k.shape[2]
            kc[row, :, a : a + s] = k[0]
            vc[row, :, a : a + s] = v[0]
        else:  # every row at once (a Python loop over rows cost more than the copies)
            rows, pos = self._where
            kc[rows, :, pos] = k.transpose(1, 2)  # [B, S, Hkv, *] at (slot, position)
            vc[rows, :, pos] = v.transpose(1, 2)
        if self._contiguous is not None:  # the common case: a view, no copy
            lo, hi = self._contiguous
            return kc[lo:hi, :, : self._span], vc[lo:hi, :, : self._span]
        span, rows = self._span, self._rows  # index_select: 3x faster than kc[rows, :, :span]
        return kc[:, :, :span].index_select(0, rows), vc[:, :, :span].index_select(0, rows)

    def commit(self) -> None:
        """Advance each row's slot by its real tokens."""
        self.lengths[self._rows] += self.valid.sum(dim=1)
