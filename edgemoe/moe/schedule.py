"""One layer's schedule: which experts are hits, which level slices are read, in what order
and waves, and what room they take.

Both the runtime (`LocalExecutor`) and the simulator (`routing.replay`, behind
`edgemoe plan`) run this one function, so the simulator cannot drift from the
runtime: they differ only in what a read is (a real O_DIRECT read, or nothing).

A cache entry is one expert, (layer, expert), holding the nested levels it has
(edgemoe/cache.py). A layer needs each of its experts at the highest level any
of its (token, expert) pairs computes at (edgemoe/bits.py); what the entry
lacks is read as slices, level k of an expert after level k-1 (its chunks lie
back to back: one read, `store.fetch(have=k-1)`), appended to the entry in place.

Read order (`order`):
- "hebf", D²MoE's hottest-expert-bit-first: one queue per expert holding its
  missing levels in ascending order, one slice each; the next read is the queue
  head with the most tokens waiting on it (pairs needing that expert at that
  level or above); ties go to the slice that completes the most pairs (those at
  exactly its level), then to the lower expert, so an expert's levels run on and
  its tokens compute while the next expert is read. The consumer computes an
  (expert, level) group as soon as its level's slice lands, so a token at level
  1 never waits for another's level-3 read. Slices of one expert that come next
  to each other in this order are read as one (nothing would be read between
  them; a read costs a syscall and a thread hand-off here).
- "fifo": one read per expert, ascending expert, of all its missing levels (the
  order before nesting); its tokens compute once the whole read lands.

The protocol, for the experts a layer needs:
1. every expert is acquired: a cached one (whatever levels it has) is held until
   the consumer has computed it and read all its slices;
2. the first wave reserves (or grows the held entry by) what fits beside what is
   held, so its reads are in flight while the hits (and, in the model, the
   shared expert) compute;
3. the consumer releases an expert once its last slice landed and its tokens are
   computed; each later wave evicts what it needs and takes at least one slice
   (a slice that cannot get room is read and computed without a slot: the
   cache holds less than it needs, e.g. hits held for their upgrades; that
   slice reads all the levels the expert still needs, so the one expert without
   a slot is done with, and dropped, before the next wave is drawn: the plan
   counts one such expert, edgemoe/budget.py).

Each level of an expert is read at most once per call, however many tokens need it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edgemoe.cache import Entry, ExpertCache, Key

ORDERS = ("hebf", "fifo")


@dataclass(frozen=True)
class Slice:
    """One read: levels have+1..level of an expert (a miss when have is 0)."""

    key: Key  # (layer, expert)
    have: int
    level: int
    waiting: int  # pairs that need the expert at level have+1 or above


@dataclass
class Wave:
    """Slices to read now; `entries[i]` is slice i's slot (reserved or grown), or None
    (no room: read and computed without one)."""

    slices: list[Slice]
    entries: list[Entry | None]


@dataclass
class LayerSchedule:
    hits: list[tuple[Key, Entry]]  # acquired: held until the consumer releases them
    have: dict[Key, int]  # levels each needed expert had when acquired (0: a miss)
    pending: dict[Key, int]  # slices each expert will read in this call (lowered as later
    # waves are drawn, where an expert without a slot reads its levels as one slice)
    first: Wave  # reserved beside the held hits (possibly empty)
    rest: Iterator[Wave]  # each drawn after the consumer released what it was done with


def order_slices(need: dict[Key, dict[int, int]], have: dict[Key, int], order: str) -> list[Slice]:
    """The reads that raise each expert from `have` to the highest level in `need`.

    Args:
        need: (layer, expert) -> {level: pairs at that level} (its (token, expert) pairs).
        have: the levels each expert already has.
        order: "hebf" or "fifo" (see the module's docstring).
    """
    if order not in ORDERS:
        raise ValueError(f"unknown read order {order!r}; use one of {ORDERS}")
    # B[key][k]: pairs that need the expert at level k or above
    b: dict[Key, list[int]] = {}
    for key, by_level in need.items():
        top = max(by_level)
        at = [0] * (top + 2)
        for level, n in by_level.items():
            at[level] += n
        for k in range(top, 0, -1):
            at[k] += at[k + 1]
        b[key] = at
    if order == "fifo":
        return [
            Slice(key, have[key], len(b[key]) - 2, b[key][have[key] + 1])
            for key in sorted(need)
            if len(b[key]) - 2 > have[key]
        ]
    rank = {key: i for i, key in enumerate(sorted(need))}

    def head(key: Key, level: int) -> tuple:
        # the most pairs waiting first; among equals, the slice that completes the most pairs
        # (those at exactly its level), then the lower expert, so one expert's levels run on
        done = b[key][level] - b[key][level + 1]
        return (-b[key][level], -done, rank[key], level, key)

    heap = [head(key, have[key] + 1) for key in need if len(b[key]) - 2 > have[key]]
    heapq.heapify(heap)
    out: list[Slice] = []
    while heap:
        neg, _, _, level, key = heapq.heappop(heap)
        if out and out[-1].key == key:  # next in line anyway: one read, not two
            out[-1] = Slice(key, out[-1].have, level, out[-1].waiting)
        else:
            out.append(Slice(key, level - 1, level, -neg))
        if level < len(b[key]) - 2:
            heapq.heappush(heap, head(key, level + 1))
    return out


def schedule(
    cache: ExpertCache,
    need: dict[Key, dict[int, int]],
    size: Callable[[Key, int], int],
    order: str = "hebf",
    worth: Callable[[Slice], bool] | None = None,
) -> LayerSchedule:
    """Acquire the experts in `need` and plan the reads of the levels they lack.

    Args:
        need: (layer, expert) -> {level: its pairs at that level}, ascending expert.
        size: (key, level) -> bytes of that expert prepared at that level (0 at level 0).
        order: "hebf" or "fifo".
        worth: whether an upgrade of an expert in memory (a level above those it has) is
            worth its read (UpgradeCost); a slice that is not, and the expert's later ones,
            are not read: their pairs compute at the level in memory. A miss is read to the
            level it needs (it is read anyway). None: every upgrade is worth it.
    """
    hits, have = [], {}
    for key in need:
        entry = cache.acquire(key)
        if entry is not None:
            hits.append((key, entry))
        have[key] = entry.level if entry is not None else 0
    slices = order_slices(need, have, order)
    if worth is not None:  # each expert's slices come in ascending level
        stopped: set[Key] = set()
        kept = []
        for s in slices:
            if s.key in stopped or (have[s.key] > 0 and not worth(s)):
                stopped.add(s.key)
            else:
                kept.append(s)
        slices = kept
    pending: dict[Key, int] = {}
    for s in slices:
        pending[s.key] = pending.get(s.key, 0) + 1
    state = _Room(cache, size, {k for k, _ in hits})
    # the first wave: free room and room evictable beside the held hits, possibly none
    cache.make_room(min(sum(state.cost(s) for s in slices), cache.capacity))
    n = 0
    free = int(cache.free)
    while n < len(slices) and state.cost(slices[n]) <= free:
        free -= state.cost(slices[n])
        n += 1
    first, rest = _take(state, slices[:n], slices[n:], pending)
    return LayerSchedule(hits, have, pending, first, _rest(state, rest, pending))


class _Room:
    """Takes room for slices in order: a miss reserves, an upgrade grows its held entry;
    after a slice got no room, its expert's later slices get none either."""

    def __init__(self, cache: ExpertCache, size: Callable[[Key, int], int], held: set[Key]):
        self.cache, self.size, self.held = cache, size, held
        self.slotless: set[Key] = set()

    def cost(self, s: Slice) -> int:
        return max(0, self.size(s.key, s.level) - self.size(s.key, s.have))

    def take(self, s: Slice) -> Entry | None:
        c = self.cache
        if s.key in self.slotless:
            return None
        if s.key in self.held:
            ok = c.grow(s.key, self.cost(s), s.level)
            entry = c.peek(s.key) if ok else None
        else:
            entry = c.reserve(s.key, max(1, self.cost(s)), level=s.level)
            if entry is not None:
                self.held.add(s.key)
        if entry is None:
            self.slotless.add(s.key)
        return entry


def _take(
    room: _Room, wave: list[Slice], rest: list[Slice], pending: dict[Key, int]
) -> tuple[Wave, list[Slice]]:
    """Room for a wave's slices, in order; a slice that gets none takes over its expert's
    later slices (in the wave and after it: one read to the top level needed). Returns the
    wave and the slices left for later waves."""
    out, entries = [], []
    while wave:
        s, wave = wave[0], wave[1:]
        entry = room.take(s)
        if entry is None:
            later = [t for t in wave + rest if t.key == s.key]
            if later:
                wave = [t for t in wave if t.key != s.key]
                rest = [t for t in rest if t.key != s.key]
                s = Slice(s.key, s.have, later[-1].level, s.waiting)
                pending[s.key] -= len(later)
        out.append(s)
        entries.append(entry)
    return Wave(out, entries), rest


def _rest(room: _Room, slices: list[Slice], pending: dict[Key, int]) -> Iterator[Wave]:
    c = room.cache
    while slices:
        c.make_room(min(sum(room.cost(s) for s in slices), c.capacity))
        n, free = 1, int(c.free) - room.cost(slices[0])  # at least one
        while n < len(slices) and room.cost(slices[n]) <= free:
            free -= room.cost(slices[n])
            n += 1
        wave, slices = _take(room, slices[:n], slices[n:], pending)
        yield wave


@dataclass(frozen=True)
class UpgradeCost:
    """When an upgrade is worth its read, from a device's flash speed and per-level expert
    times (D²MoE profiles both per device): a slice's pairs could compute now at the level
    in memory, or wait for the slice's read; the read is worth it when it takes no longer
    than the compute it serves (the slice's waiting pairs at its level), so it hides behind
    compute instead of stalling it. On fast flash every upgrade passes; on slow flash (an SD
    card) a slice few tokens wait on is skipped and they compute at the lower level.

    read_bytes: (key, have, level) -> bytes the slice's read moves.
    flash: bytes/s of expert-sized random reads (the profile's flash_rand_read).
    expert_ms: (level, tokens) -> ms of one expert at that level over that many tokens.
    """

    read_bytes: Callable[[Key, int, int], int]
    flash: float
    expert_ms: Callable[[int, int], float]

    def __call__(self, s: Slice) -> bool:
        read_ms = 1e3 * self.read_bytes(s.key, s.have, s.level) / self.flash
        return read_ms <= self.expert_ms(s.level, s.waiting)


def simulate(
    cache: ExpertCache,
    need: dict[Key, dict[int, int]] | list[Key],
    size: Callable[[Key, int], int] | int = 1,
    order: str = "hebf",
) -> None:
    """Run one layer's schedule with reads that complete at once (the replay's executor).

    need: as `schedule` takes it, or a list of keys each needed by one pair at level 1;
    size: as `schedule` takes it, or bytes per level-1 expert (every level alike).
    """
    if not isinstance(need, dict):
        need = {key[:2]: {1: 1} for key in need}
    if not callable(size):
        per = max(1, int(size))
        size = lambda key, level: per if level else 0  # noqa: E731
    s = schedule(cache, need, size, order)
    pending = s.pending
    for key, _ in s.hits:
        if not pending.get(key):
            cache.release(key)
    for wave in itertools.chain([s.first], s.rest):  # each drawn after the last is released
        for sl, entry in zip(wave.slices, wave.entries):
            if entry is not None:
                cache.fill(sl.key, True)
            pending[sl.key] -= 1
            if pending[sl.key] == 0:
                cache.release(sl.key)
