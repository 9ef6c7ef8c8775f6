"""ExpertCache: prepared experts against a byte budget, eviction behind one interface.

One entry per expert, keyed (layer, expert), holding the nested levels it has
(`Entry.level`): a .emoe stores experts bit-nested, so level k is a prefix of
level k+1 and an entry grows in place (`grow`: an upgrade read appends levels)
and shrinks without I/O (`downgrade`: top levels dropped). Callers may pass
(layer, expert, level) keys as before: the level is ignored, the entry is the
expert's, and `keys()` lists (layer, expert, level held).

Entries in use (held by the layer being computed, or reserved for a read in
flight) are never evicted. The policy decides only which unpinned key goes
first: LFU by default, LRU, Belady (which needs the future) bounds what any
policy could do on a recorded trace. A policy with `downgrade_first` (D2,
D²MoE's budget rule) frees high levels before whole experts: when room is
short the entries whose layer comes back last (the previous layer's) drop to
their base level first, and only then does the policy evict.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from edgemoe.units import Bytes

Key = tuple  # (layer, expert); a trailing level, as older callers pass, is ignored


class EvictionPolicy(Protocol):
    def touch(self, key: Key) -> None:
        """The key was used (hit or insert)."""

    def remove(self, key: Key) -> None:
        """The key left the cache."""

    def victim(self, pinned: set[Key]) -> Key | None:
        """The next key to evict, never a pinned one; None if none can go."""


class LRU:
    def __init__(self):
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key):
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key):
        self._order.pop(key, None)

    def victim(self, pinned):
        return next((k for k in self._order if k not in pinned), None)


class LFU:
    """Evicts the least used key (uses decay by half every `half_life` touches), the most
    recently used among equals. On a cycle longer than the cache (a model's layers are one)
    LRU evicts exactly the key the cycle needs next and hits nothing; here the often used
    stay, and among equals the one just used goes, which is what Belady does on a cycle.

    Decay without touching every key: a use adds 2 ** (half-lives so far), so older uses
    weigh half as much per half-life (scores are rebased when they grow large). A min-heap on
    (score, -last touch) keeps a victim O(log n); entries made stale by a later touch or a
    removal are dropped when they surface.
    """

    def __init__(self, half_life: int = 4096):
        self._score: dict[Key, float] = {}  # kept after removal: a key that comes back is known
        self._last: dict[Key, int] = {}  # held keys -> their last touch
        self._heap: list[tuple[float, int, Key]] = []
        self._tick = self._base = 0
        self._half = half_life

    def touch(self, key):
        self._tick += 1
        # whole half-lives only: uses within one weigh alike, so ties (a cycle) fall to recency
        weight = 2.0 ** ((self._tick - self._base) // self._half)
        if weight > 1e200:  # rebase every score (order is unchanged) and rebuild the heap
            self._score = {k: v / weight for k, v in self._score.items()}
            self._heap = [(self._score[k], -t, k) for k, t in self._last.items()]
            heapq.heapify(self._heap)
            self._base, weight = self._tick, 1.0
        self._score[key] = self._score.get(key, 0.0) + weight
        self._last[key] = self._tick
        heapq.heappush(self._heap, (self._score[key], -self._tick, key))
        if len(self._heap) > 4 * len(self._last) + 1024:  # drop the stale entries
            self._heap = [(self._score[k], -t, k) for k, t in self._last.items()]
            heapq.heapify(self._heap)

    def remove(self, key):
        self._last.pop(key, None)

    def victim(self, pinned):
        held_back, found = [], None
        while self._heap:
            entry = heapq.heappop(self._heap)
            score, neg_last, key = entry
            if self._last.get(key) != -neg_last or self._score.get(key) != score:
                continue  # stale: removed, or touched again since
            held_back.append(entry)  # stays until the cache calls remove()
            if key not in pinned:
                found = key
                break
        for entry in held_back:
            heapq.heappush(self._heap, entry)
        return found


class D2(LFU):
    """LFU, plus D²MoE's budget rule in the cache: high levels go before anyone's base."""

    downgrade_first = True


class LayerDistance:
    """EdgeMoE's eviction score: how often a key was used, over how soon its layer comes
    round again. Decode walks the layers in a cycle, so an expert of the layer just computed
    waits a whole cycle for its next chance while one of the next layer may be needed at
    once: score = uses / (layers until its layer's turn + 1), the lowest goes, the one
    furthest from its turn among equals. The current layer is the last touched key's; the
    cycle's length the most layers seen. A victim is a scan over the held keys (a few
    hundred at most; a miss costs a read of megabytes)."""

    def __init__(self):
        self._uses: dict[Key, int] = {}  # kept after removal: a key that comes back is known
        self._held: set[Key] = set()
        self._layer = 0
        self._layers = 1

    def touch(self, key):
        self._uses[key] = self._uses.get(key, 0) + 1
        self._held.add(key)
        self._layer = key[0]
        self._layers = max(self._layers, key[0] + 1)

    def remove(self, key):
        self._held.discard(key)

    def _rank(self, key) -> tuple[float, int]:
        wait = (key[0] - self._layer - 1) % self._layers  # 0: the next layer
        return self._uses[key] / (wait + 1), -wait

    def victim(self, pinned):
        free = [k for k in self._held if k not in pinned]
        return min(free, key=self._rank) if free else None


POLICIES = {"lru": LRU, "lfu": LFU, "d2": D2, "layer": LayerDistance}
# LFU: on the demo's routing trace it keeps 0.59-0.98 of Belady's hits from 4 to 32 slots
# where LRU keeps 0.0-0.97 (0 at 4 slots: the layers' cycle), tools/cache_study.py
DEFAULT_POLICY = "lfu"


class Belady:
    """Evicts the key whose next use is furthest away: the fewest misses any policy can have.

    It needs the future, so it serves studies and bounds (replaying a recorded trace),
    never a live run. `future` lists the keys of each step in order; the caller sets
    `now` to the index of the step being served. A max-heap on next use keeps a victim
    O(log n) (a scan was O(slots) per miss: minutes for a large model's plan); entries
    made stale by a later touch or a removal are dropped when they surface.
    """

    def __init__(self, future: list[set[Key]]):
        self._uses: dict[Key, deque[int]] = {}
        for i, keys in enumerate(future):
            for k in keys:
                self._uses.setdefault(k, deque()).append(i)
        self._next: dict[Key, float] = {}  # held key -> its next use after the step it was touched
        self._heap: list[tuple[float, int, Key]] = []  # (-next use, tie-break, key)
        self._tick = 0
        self.now = 0

    def touch(self, key):
        uses = self._uses.get(key)
        while uses and uses[0] <= self.now:  # the current step counts as used, not as next
            uses.popleft()
        nxt = uses[0] if uses else math.inf
        self._next[key] = nxt
        self._tick += 1
        heapq.heappush(self._heap, (-nxt, self._tick, key))

    def remove(self, key):
        self._next.pop(key, None)

    def victim(self, pinned):
        held_back, found = [], None
        while self._heap:
            entry = heapq.heappop(self._heap)
            key = entry[2]
            if self._next.get(key) != -entry[0]:
                continue  # stale: removed, or touched again since
            if key in pinned:
                held_back.append(entry)
                continue
            found = key
            held_back.append(entry)  # still held until the cache calls remove()
            break
        for entry in held_back:
            heapq.heappush(self._heap, entry)
        return found


@dataclass
class Entry:
    """One cached expert: a value (or the future of one while its read is in flight), its
    bytes, how many users hold it, and the levels it has (or will have once its reads
    land). An entry with pins is never evicted or downgraded."""

    value: object
    nbytes: int
    pins: int = 0
    level: int = 0

    @property
    def in_flight(self) -> bool:
        return isinstance(self.value, Future)


class ExpertCache:
    """Holds values with known sizes under `capacity` bytes.

    Reservations: `reserve` takes room for a value not read yet (held, in flight), `fill`
    gives it its value, `release` drops a hold. A prefetched expert is reserved by the
    prefetch and held until the layer that wanted it acquires it, so the layers in
    between cannot evict it. Every call comes from the thread that computes.
    """

    def __init__(
        self,
        capacity: Bytes | int,
        policy: EvictionPolicy | None = None,
        on_evict: Callable[[object], None] | None = None,
        shrink: Callable[[Key, Entry, int], int | None] | None = None,
    ):
        self.capacity = Bytes(capacity)
        self.policy = policy or POLICIES[DEFAULT_POLICY]()
        self.on_evict = on_evict  # told each evicted value (a read buffer goes back to its pool)
        # (key, entry, level) -> the value's bytes once cut to `level` in place, or None (it
        # cannot be); the executor's, as only it knows values (the budget rule calls it)
        self.shrink = shrink
        self._items: dict[Key, Entry] = {}
        self._pinned: set[Key] = set()
        self.used = Bytes(0)
        self.version = 0  # bumped by every change of what is cached (fused.py's pointer tables)
        self.hits = self.misses = self.evictions = self.downgrades = 0
        self.now = 0  # the layer being served (the budget rule frees the one back last first)
        self._period = 1  # layers in the cycle (the highest layer seen + 1)

    def __contains__(self, key: Key) -> bool:
        return key[:2] in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[tuple[int, int, int]]:
        """(layer, expert, levels held) of every entry."""
        return [(*k, e.level) for k, e in self._items.items()]

    def peek(self, key: Key) -> Entry | None:
        """The entry without counting, holding or touching it."""
        return self._items.get(key[:2])

    def get(self, key: Key):
        """The value, or None (counted as a hit or a miss); no hold is taken."""
        entry = self.acquire(key)
        if entry is None:
            return None
        self.release(key)
        return entry.value

    def acquire(self, key: Key) -> Entry | None:
        """The entry, held (counted as a hit, whatever levels it has), or None (a miss)."""
        key = key[:2]
        entry = self._items.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.policy.touch(key)
        self._hold(key, entry)
        return entry

    def reserve(self, key: Key, nbytes: int, evict: bool = True, level: int = 0) -> Entry | None:
        """Room for a value about to be read (to `level`), held by the caller; None if it
        cannot fit (larger than the cache, or the room is held; evict=False: only free room)."""
        key = key[:2]
        self._period = max(self._period, key[0] + 1)
        if key in self._items:
            raise KeyError(f"{key} is already cached")
        if nbytes > self.capacity:
            return None
        if not evict and self.used + nbytes > self.capacity:
            return None
        if not self.make_room(nbytes):
            return None
        entry = Entry(None, nbytes, level=level)
        self._items[key] = entry
        self.version += 1
        self.used = self.used + nbytes
        self.policy.touch(key)
        self._hold(key, entry)
        return entry

    def fill(self, key: Key, value, nbytes: int | None = None) -> None:
        """Give a reserved entry its value (and its true size, if it differs)."""
        entry = self._items[key[:2]]
        self.version += 1
        if nbytes is not None and nbytes != entry.nbytes:
            self.used = self.used + nbytes - entry.nbytes
            entry.nbytes = nbytes
        entry.value = value

    def hold(self, key: Key) -> bool:
        """Hold a cached entry without counting a use (a prediction that it will be used)."""
        key = key[:2]
        entry = self._items.get(key)
        if entry is None:
            return False
        self._hold(key, entry)
        return True

    def release(self, key: Key) -> None:
        key = key[:2]
        entry = self._items.get(key)
        if entry is None or entry.pins == 0:
            return
        entry.pins -= 1
        if entry.pins == 0:
            self._pinned.discard(key)

    def _hold(self, key: Key, entry: Entry) -> None:
        entry.pins += 1
        self._pinned.add(key)

    def make_room(self, nbytes: int) -> bool:
        """Free room until nbytes fit (the budget rule's downgrades first, if the policy has
        it, then evictions of unheld entries); False if holds prevent it."""
        downgrade = getattr(self.policy, "downgrade_first", False) and self.shrink is not None
        while self.used + nbytes > self.capacity:
            if downgrade and self._downgrade_one():
                continue
            key = self.policy.victim(self._pinned)
            if key is None:
                return False
            self.evict(key)
        return True

    def set_aside(self, nbytes: int) -> bool:
        """Take nbytes of the cache's room for a value outside it (a read ahead's slab,
        moe/local.py), evicting as `make_room` does; False (nothing taken) if holds prevent
        it. `give_back` returns the room."""
        if not self.make_room(nbytes):
            return False
        self.used = self.used + nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.used = Bytes(max(0, self.used - nbytes))

    def _downgrade_one(self) -> bool:
        """Cut the unheld entry whose layer comes back last (the previous layer's first), its
        highest level first, to its base level; False if none can be cut."""
        ranked = sorted(
            (((key[0] - self.now) % self._period, e.level), key)
            for key, e in self._items.items()
            if e.level > 1 and e.pins == 0 and not e.in_flight and e.value is not None
        )
        return any(self.downgrade(key, 1) for _, key in reversed(ranked))

    def grow(self, key: Key, nbytes: int, level: int) -> bool:
        """Room for `nbytes` more on a held entry an upgrade read raises to `level`; False
        (and nothing changed) if there is none beside what is held."""
        entry = self._items[key[:2]]
        if not self.make_room(nbytes):
            return False
        self.used = self.used + nbytes
        entry.nbytes += nbytes
        entry.level = level
        self.version += 1
        return True

    def downgrade(self, key: Key, level: int) -> bool:
        """Drop an unheld entry's levels above `level` in place, no I/O (the value is cut by
        `shrink`); False if it cannot be (held, in flight, or its value cannot be cut)."""
        key = key[:2]
        entry = self._items[key]
        if entry.pins or entry.in_flight or entry.level <= level or self.shrink is None:
            return False
        n = self.shrink(key, entry, level)
        if n is None:
            return False
        self.used = self.used - entry.nbytes + n
        entry.nbytes, entry.level = n, level
        self.downgrades += 1
        self.version += 1
        return True

    def put(self, key: Key, value, nbytes: int) -> bool:
        """Insert (evicting as needed), not held; False, and nothing stored, if it cannot fit."""
        if key in self:
            self.evict(key)
        if self.reserve(key, nbytes, level=getattr(value, "level", 0)) is None:
            return False
        self.fill(key, value)
        self.release(key)
        return True

    def evict(self, key: Key) -> None:
        key = key[:2]
        entry = self._items.pop(key)
        self.version += 1
        self.policy.remove(key)
        self._pinned.discard(key)
        if entry.in_flight:  # a prefetch nobody came for: stop it if it has not started
            fut = entry.value
            # else wait for it: the caller takes its room next, and until the read lands its
            # value would stand beside what fills that room, counted nowhere
            if not fut.cancel() and fut.exception() is None and self.on_evict is not None:
                self.on_evict(fut.result())
        elif entry.value is not None and self.on_evict is not None:
            self.on_evict(entry.value)
        # an Entry kept by a caller (a layer's schedule) must not keep the value alive beside
        # what takes its room; its bytes leave the count once it is gone
        entry.value = None
        self.used = self.used - entry.nbytes
        self.evictions += 1

    @property
    def held(self) -> int:
        """Entries held now (in use or in flight)."""
        return len(self._pinned)

    @property
    def free(self) -> Bytes:
        return Bytes(max(0, self.capacity - self.used))

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0
