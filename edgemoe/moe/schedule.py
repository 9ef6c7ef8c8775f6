"""One layer's schedule: which experts are hits, which are read, in what waves, what is evicted.

Both the runtime (`LocalExecutor`) and the simulator (`routing.replay`, behind
`edgemoe plan`) run this one function, so the simulator cannot drift from the
runtime: they differ only in what a read is (a real O_DIRECT read, or nothing).

The protocol, for the keys a layer needs (in dispatch order, ascending expert):
1. every key is acquired: a hit is held until the consumer has computed it;
2. the first wave reserves what fits beside the held hits, so its reads are in
   flight while the hits (and, in the model, the shared expert) compute;
3. the consumer releases everything it was given; each later wave evicts what
   it needs and reserves at least one key (a key that cannot get room is read
   and computed without a slot: the cache holds less than one expert).

Each key is read at most once per call, however many tokens route to it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from edgemoe.cache import Entry, ExpertCache, Key


@dataclass
class Wave:
    """Keys to read now; `entries[i]` is key i's reserved slot, or None (no room: uncached)."""

    keys: list[Key]
    entries: list[Entry | None]


@dataclass
class LayerSchedule:
    hits: list[tuple[Key, Entry]]  # acquired: held until the consumer releases them
    first: Wave  # reserved beside the held hits (possibly empty)
    rest: Iterator[Wave]  # each drawn after everything before it was released


def wave_size(cache: ExpertCache, waiting: int, size: int) -> int:
    """Evict for the next wave of `waiting` missed experts of `size` bytes; how many to read now.

    At least one: an expert bigger than the free room is computed without a cache slot.
    """
    cache.make_room(min(size * waiting, cache.capacity))
    return max(1, min(waiting, cache.free // size))


def schedule(cache: ExpertCache, keys: list[Key], size: int) -> LayerSchedule:
    """Acquire the hits among `keys` and plan the reads of the rest (`size`: bytes per expert)."""
    hits, misses = [], []
    for key in keys:
        entry = cache.acquire(key)
        if entry is None:
            misses.append(key)
        else:
            hits.append((key, entry))
    size = max(1, size)
    # the first wave: free room and room evictable beside the held hits, possibly none
    cache.make_room(min(size * len(misses), cache.capacity))
    n = min(len(misses), cache.free // size)
    first = Wave(misses[:n], [cache.reserve(k, size) for k in misses[:n]])
    return LayerSchedule(hits, first, _rest(cache, misses[n:], size))


def _rest(cache: ExpertCache, misses: list[Key], size: int) -> Iterator[Wave]:
    while misses:
        n = wave_size(cache, len(misses), size)
        wave, misses = misses[:n], misses[n:]
        yield Wave(wave, [cache.reserve(k, size) for k in wave])


def simulate(cache: ExpertCache, keys: list[Key], size: int = 1) -> None:
    """Run one layer's schedule with reads that complete at once (the replay's executor)."""
    s = schedule(cache, keys, size)
    for key, _ in s.hits:
        cache.release(key)
    for wave in itertools.chain([s.first], s.rest):  # each drawn after the last is released
        for key, entry in zip(wave.keys, wave.entries):
            if entry is not None:
                cache.fill(key, True)
                cache.release(key)
