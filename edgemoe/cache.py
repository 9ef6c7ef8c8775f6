"""ExpertCache: prepared expert slices against a byte budget, eviction behind one interface.

Keys are (layer, expert, level). Entries in use by the layer being computed
are pinned and never evicted. The policy decides only which unpinned key
goes first; LRU over whole experts is the default, Belady (which needs the
future) bounds what any policy could do on a recorded trace, and the
scheduling issue will bring others (EdgeMoE's layer-distance score).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from typing import Protocol

from edgemoe.units import Bytes

Key = tuple[int, int, int]


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


class ExpertCache:
    """Holds values with known sizes under `capacity` bytes."""

    def __init__(self, capacity: Bytes | int, policy: EvictionPolicy | None = None):
        self.capacity = Bytes(capacity)
        self.policy = policy or LRU()
        self._items: dict[Key, tuple[object, int]] = {}
        self._pinned: set[Key] = set()
        self.used = Bytes(0)
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Key):
        """The value, or None (counted as a hit or a miss)."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self.policy.touch(key)
        return item[0]

    def make_room(self, nbytes: int) -> bool:
        """Evict unpinned entries until nbytes fit; False if pins prevent it."""
        while self.used + nbytes > self.capacity:
            key = self.policy.victim(self._pinned)
            if key is None:
                return False
            self.evict(key)
        return True

    def put(self, key: Key, value, nbytes: int) -> bool:
        """Insert (evicting as needed); False, and nothing stored, if it cannot fit."""
        if key in self._items:
            self.evict(key)
        if nbytes > self.capacity or not self.make_room(nbytes):
            return False
        self._items[key] = (value, nbytes)
        self.used = self.used + nbytes
        self.policy.touch(key)
        return True

    def evict(self, key: Key) -> None:
        _, n = self._items.pop(key)
        self.used = self.used - n
        self.policy.remove(key)
        self._pinned.discard(key)
        self.evictions += 1

    def pin(self, key: Key) -> None:
        if key in self._items:
            self._pinned.add(key)

    def unpin_all(self) -> None:
        self._pinned.clear()

    @property
    def free(self) -> Bytes:
        return Bytes(max(0, self.capacity - self.used))

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0
