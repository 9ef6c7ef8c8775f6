"""ExpertStore: reads (layer, expert, level) slices of a .emoe from flash.

One read per request: levels have+1..level of an expert lie back to back on
disk (SPEC.md §3.2), so an upgrade reads only the extra bytes. Reads go
through O_DIRECT into page-aligned buffers on a small thread pool that also
checks CRCs and inflates zstd, so the calling thread only waits on futures.

A read of raw (uncompressed) chunks can land in a slab the result keeps
(`own=True`): the payloads are views into it and the kernels may use them in
place, so a missed expert is neither copied nor given fresh pages (a fresh
page costs ~4 ms/MB here, a 33 MB expert 130 ms). Slabs come back through
`recycle` when the cache evicts their expert and are reused. An owned read of
more than PART bytes goes to the reader threads in parts queued in order, so the
first of a layer's experts lands before the second, and an expert's gate and
up (an INT8 expert's first two thirds) are computed while the rest of its down
is still being read (`head`; edgemoe/moe/local.py). A chunk's CRC
is checked the first time this process reads it; `edgemoe verify` checks
every chunk (CRC-32 of a 33 MB expert costs 30-55 ms here, more than reading it). Where O_DIRECT is refused (tmpfs, some
filesystems) the store falls back to buffered reads and drops the pages it
read with posix_fadvise(DONTNEED): the page cache never quietly holds the
model, and never counts against a budget.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from edgemoe import trace
from edgemoe.units import Bytes
from formats.constants import align_up
from formats.reader import EmoeReader


def anon(n: int, huge: bool = False) -> mmap.mmap:
    """n bytes of private anonymous memory, page-aligned as O_DIRECT needs (private, not
    mmap's default MAP_SHARED, which is shmem: never in huge pages, and counted apart), in
    2 MiB pages (madvise) when `huge`, where the kernel gives them."""
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # not Linux, or THP off: 4 KiB pages
            pass
    return m


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14


def populate(m: mmap.mmap) -> None:
    """Fault every page of m in, writable (one system call where the kernel has it)."""
    try:
        m.madvise(MADV_POPULATE_WRITE)
    except OSError:
        for i in range(0, len(m), 4096):
            m[i] = 0


# An owned raw read larger than this goes to the reader threads in parts of this size (see
# ExpertStore._fetch_parts). Measured here (2 threads, O_DIRECT into 4 KiB pages, two 33 MB
# experts, medians of 12): in 4 MiB parts the first expert's gate and up rows (its first 2/3)
# landed at 17.9 ms, all of it at 23.5 ms (25.5 ms read whole), the second at 44.1 (45.6);
# the rate was the same within noise for parts of 2 to 16 MiB.
PART = 4 << 20

# Slabs in huge pages when the expert cache holds less than this share of the experts.
HUGE_SLABS_BELOW = 1 / 5


def huge_slabs(cached_share: float, arena: bool = False) -> bool:
    """Whether read slabs go in 2 MiB pages, for an expert cache that holds `cached_share` of
    all experts, or whose slabs are made at load (`arena`: their faults are paid there, not
    in a prefill) (EDGEMOE_HUGE_SLABS=1 or 0 decides instead).

    Measured here (a VM on virtio-blk): an O_DIRECT read into 2 MiB pages runs at 2.1-2.2
    GB/s, into 4 KiB pages at 1.2-1.3 (the block layer's 254 segments make 1 MiB requests of
    4 KiB pages, 4 MiB ones of huge pages; more threads do not help). But a fresh huge page
    costs 1.3-2.9 ms/MB to fault (the VM hands freed 2 MiB blocks back to its host), and a
    cold prefill faults in every slab of the cache. A slab pays for its huge pages after a
    few reads: on the bench model the 25% cap (the cache holds 8% of the experts, each slab
    read about 3 times a token) decodes at 2.94 against 2.41 tok/s with the same prefill; at
    the 50% cap (26%, a slab read every other token) decode gains 5% in a 32-token run and
    the cold prefill fell from 47-58 to 34-47 tok/s; with every expert cached, 18-20
    against 53-56."""
    env = os.environ.get("EDGEMOE_HUGE_SLABS")
    if env in ("0", "1"):
        return env == "1"
    return arena or cached_share < HUGE_SLABS_BELOW


def _pages(ranges: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Byte ranges widened to whole 4 KiB pages (O_DIRECT's unit) within [0, length),
    sorted and merged."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted((lo // 4096 * 4096, min(length, align_up(hi))) for lo, hi in ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """[0, length) less sorted, disjoint ranges."""
    out, at = [], 0
    for lo, hi in ranges:
        if lo > at:
            out.append((at, lo))
        at = max(at, hi)
    if at < length:
        out.append((at, length))
    return out


def _split(ranges: list[tuple[int, int]], part: int | None = None) -> list[tuple[int, int]]:
    """Ranges cut into (offset, size) parts of at most `part` bytes (PART), in order."""
    part = part or PART
    return [(o, min(part, hi - o)) for lo, hi in ranges for o in range(lo, hi, part)]


def _close(slab: mmap.mmap) -> None:
    """Unmap a free slab now; one whose views are still alive goes when they do."""
    try:
        slab.close()
    except BufferError:
        pass


class Payloads(list):
    """The raw bytes of an expert's level chunks, one item per level; `slab` is the buffer
    the items are views of (an owned read), or None."""

    slab: mmap.mmap | None = None


# A read ahead goes in parts this small, so a demanded read waits little behind one.
AHEAD_PART = 2 << 20


class _Read:
    """An owned raw read split into parts (ExpertStore._fetch_parts, ExpertStore.ahead); its
    counters are the store's lock's."""

    def __init__(self, store, layer, expert, level, have, start, length, head, part):
        self.layer, self.expert, self.level, self.have = layer, expert, level, have
        self.start = start
        self.buf = store._slab(length)
        self.view = memoryview(self.buf)[:length]
        first = [] if head is None else _pages(head[0], length)
        self.parts = [(o, n, True) for o, n in _split(first, part)]
        self.parts += [(o, n, False) for o, n in _split(_complement(first, length), part)]
        self.n_head = self.head_left = sum(1 for p in self.parts if p[2])
        self.issued = 0  # parts handed to the threads
        self.left = len(self.parts)  # parts not landed
        self.inflight = 0  # parts handed to the threads, not landed
        self.got = 0  # bytes landed
        self.error: BaseException | None = None
        self.out: Future | None = None  # set once demanded
        self.then = self.build = None
        self.cancelled = False
        self.freed = False  # cancelled and its slab recycled
        self.head_fired = self.head_fired_ok = self.landed = False

    def recut(self, part: int) -> None:
        """Cut the parts not yet issued again, at most `part` bytes each (a read ahead,
        demanded: small parts cost ~12% of the rate here, 2 MiB against 4 MiB)."""
        tail = self.parts[self.issued :]
        runs: list[list] = []  # [lo, hi, in_head]
        for o, n, h in tail:
            if runs and runs[-1][2] == h and runs[-1][1] == o:
                runs[-1][1] = o + n
            else:
                runs.append([o, o + n, h])
        new = [(o, n, h) for lo, hi, h in runs for o, n in _split([(lo, hi)], part)]
        self.parts = self.parts[: self.issued] + new
        self.left += len(new) - len(tail)
        self.head_left += sum(p[2] for p in new) - sum(p[2] for p in tail)

    def ready(self) -> tuple[bool, bool]:
        """(set the head future now, land now), each true once only (under the store's lock)."""
        if self.out is None:
            return False, False
        fire_head = False
        if self.n_head and not self.head_fired and self.head_left == 0 and self.error is None:
            self.head_fired = self.head_fired_ok = fire_head = True
        fire_land = False
        if self.left == 0 and not self.landed:
            self.landed = fire_land = True
        return fire_head, fire_land


class Ahead:
    """A read ahead (ExpertStore.ahead): which expert, and at what level."""

    def __init__(self, read: _Read):
        self.read = read
        self.key = (read.layer, read.expert)
        self.level = read.level

    @property
    def freed(self) -> bool:
        """Dropped, and its slab back in the store's free list (a part in flight when it was
        dropped lands first)."""
        return self.read.freed


class ExpertStore:
    """Reads expert level slices on a thread pool.

    Args:
        reader: the open file (its header gives every chunk's place).
        threads: reader threads (each owns one aligned buffer).
        direct: try O_DIRECT first.
        throttle: called with each read's byte count before it is issued
            (device emulation plugs a token bucket in here).
        check_every_read: check a chunk's CRC on every read, not only on the first.
    """

    def __init__(
        self,
        reader: EmoeReader,
        threads: int = 2,
        direct: bool = True,
        throttle: Callable[[int], None] | None = None,
        check_every_read: bool = False,
    ):
        self.reader, self.throttle = reader, throttle
        self.max_span = max(
            (self._span(e.layer, e.expert, 0, len(e.levels))[1] for e in reader.experts.values()),
            default=0,
        )
        self.direct = False
        self._fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(reader.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:
                self._fd = -1
        if self._fd < 0:
            self._fd = os.open(reader.path, os.O_RDONLY)
        self._local = threading.local()
        self._retired: list[int] = []  # descriptors replaced by _fall_back
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edgemoe-io")
        self._lock = threading.Lock()
        self.threads = threads
        self.bytes_read = Bytes(0)
        self.reads = 0
        self._verified: set[int] = set()  # chunks whose CRC this process has checked
        self.check_every_read = check_every_read
        self._slabs: dict[int, list[mmap.mmap]] = {}  # free slabs by size (a read's span)
        self.slabs_made = 0
        self.huge_slabs = huge_slabs(1.0)  # the engine sets it from its plan (huge_slabs)
        self._wanted = 0  # demanded parts queued or in flight
        self._ahead: list[_Read] = []  # reads ahead with parts not yet issued
        self._ahead_inflight = 0

    def recycle(self, slab: mmap.mmap) -> None:
        """Give back a slab from an `own` read once nothing uses its views."""
        with self._lock:
            self._slabs.setdefault(len(slab), []).append(slab)

    def _slab(self, n: int) -> mmap.mmap:
        """A slab of exactly n bytes (the read's aligned span: the levels it holds, so an
        expert read at a low level of a nested codec holds no room for its higher ones).
        A free slab is the room of an expert evicted for a read; when none has this read's
        size, the free ones of other sizes are unmapped before a new one is made, or they
        would pile up outside every budget (gate:q=1 was OOM-killed at the 50% cap)."""
        stale = []
        with self._lock:
            free = self._slabs.get(n)
            if free:
                return free.pop()
            for other in self._slabs.values():
                stale += other
            self._slabs = {}
            self.slabs_made += 1
        for old in stale:
            _close(old)
        return anon(n, self.huge_slabs)

    def reserve_slabs(self, count: int, length: int) -> None:
        """Make `count` free slabs of `length` bytes now, their pages faulted in (the expert
        cache's arena, made at load): reads then land in memory that is already there, in
        huge pages, and neither a cold prefill nor a decode pays a fault."""
        made = []
        for _ in range(count):
            m = anon(length, self.huge_slabs)
            populate(m)
            made.append(m)
        with self._lock:
            self._slabs.setdefault(length, []).extend(made)
            self.slabs_made += count

    @property
    def buffer_bytes(self) -> Bytes:
        """Memory the I/O buffers take at most (one per thread)."""
        return Bytes(self.threads * self.max_span)

    def _span(self, layer: int, expert: int, have: int, level: int) -> tuple[int, int]:
        """(aligned file offset, aligned length) covering levels have+1..level."""
        e = self.reader.expert(layer, expert)
        first = self.reader.chunks[e.levels[have]]
        last = self.reader.chunks[e.levels[level - 1]]
        start = self.reader.data_offset + first.offset
        return start, align_up(last.offset + last.length - first.offset)

    def fetch(
        self,
        layer: int,
        expert: int,
        level: int,
        have: int = 0,
        then: Callable | None = None,
        own: bool = False,
        head: tuple[list[tuple[int, int]], Callable] | None = None,
    ) -> Future:
        """Future of the raw (checked, inflated) payloads of levels have+1..level, or of
        then(payloads) computed on the reader thread (so the payloads are freed there, and
        never wait in memory for the computing thread).

        own: read into a slab the payloads keep (`payloads.slab`, None when the chunks are
        compressed and were inflated into fresh bytes); give it back with `recycle`.
        head: (ranges, build) for an owned raw read of more than one part (PART): the byte
            ranges of the read (from its start) are read first, and the future has `head`, a
            future of build(a view of the read) set on a reader thread as soon as they have
            landed, before the rest. Those bytes are not checked yet: a corrupt chunk fails
            the read's own future, so what was computed on them is never used.
        """
        if own and not self.compressed(layer, expert, level):
            start, length = self._span(layer, expert, have, level)
            if length > PART:
                return self._fetch_parts(layer, expert, level, have, then, head, start, length)

        def job():
            with trace.span(f"read L{layer} E{expert}", "io", level=level):
                out = self._read(layer, expert, level, have, own)
            if then is None:
                return out
            with trace.span(f"prepare L{layer} E{expert}", "prepare"):
                return then(out)

        return self._pool.submit(job)

    def _fetch_parts(self, layer, expert, level, have, then, head, start, length) -> Future:
        """An owned raw read as parts of PART bytes queued in order on the reader threads (the
        head's ranges first): the threads share one expert's read before they start the next
        one's, so the first expert of a layer lands whole while the second is read (and is
        computed meanwhile), and its head lands before the rest."""
        r = _Read(self, layer, expert, level, have, start, length, head, PART)
        return self._demand(r, then, head)

    def _demand(self, r: _Read, then, head) -> Future:
        """Make r a demanded read: its future, and its parts not yet issued on the threads."""
        out: Future = Future()
        out.set_running_or_notify_cancel()
        if head is None or not r.n_head:
            r.n_head = 0  # none, or parts ordered for a head no one asks for now
        else:
            out.head = Future()
            out.head.set_running_or_notify_cancel()
        with self._lock:
            r.out, r.then, r.build = out, then, None if head is None else head[1]
            todo = list(range(r.issued, len(r.parts)))
            r.issued = len(r.parts)
            r.inflight += len(todo)
            self._wanted += len(todo)
            fire_head, fire_land = r.ready()
            self.reads += fire_land
        for i in todo:
            self._pool.submit(self._part, r, i, True)
        self._settle(r, fire_head, fire_land, inline=False)
        return out

    def _part(self, r: _Read, i: int, demanded: bool) -> None:
        """Read one part of r on a reader thread; the last part settles the read."""
        o, n, in_head = r.parts[i]
        try:
            if self.throttle is not None:
                self.throttle(n)
            kind = {} if demanded else {"ahead": 1}
            with trace.span(
                f"read L{r.layer} E{r.expert}", "io", level=r.level, part=i, bytes=n, **kind
            ):
                got = self._pread(r.view[o : o + n], r.start + o)
        except BaseException as e:  # noqa: BLE001 (handed to the read's future)
            got, error = 0, e
        else:
            error = None
        with self._lock:
            self.bytes_read = self.bytes_read + got
            r.got += got
            if error is not None and r.error is None:
                r.error = error
            r.left -= 1
            r.inflight -= 1
            if in_head:
                r.head_left -= 1
            if demanded:
                self._wanted -= 1
            else:
                self._ahead_inflight -= 1
            fire_head, fire_land = r.ready()
            self.reads += fire_land
            free = r.cancelled and r.inflight == 0
        if free:
            self.recycle(r.buf)
            r.freed = True
        self._settle(r, fire_head, fire_land, inline=True)
        self._pump()

    def _settle(self, r: _Read, fire_head: bool, fire_land: bool, inline: bool) -> None:
        """Set r's head future and land r, where ready() said so (once each)."""
        if fire_head:
            try:
                r.out.head.set_result(r.build(r.view))
            except BaseException as e:  # noqa: BLE001
                r.out.head.set_exception(e)
        if fire_land:
            if inline:
                self._land(r)
            else:  # checks and prepares off the calling thread, as a read's last part does
                self._pool.submit(self._land, r)

    def _land(self, r: _Read) -> None:
        """The last part of a split read has landed: check the chunks, build the payloads,
        prepare them, and settle the read's futures."""
        error, out = r.error, r.out
        if error is None:
            try:
                payloads = self._payloads(
                    r.layer, r.expert, r.level, r.have, r.view, r.start, own=True
                )
                payloads.slab = r.buf
                if r.then is None:
                    result = payloads
                else:
                    with trace.span(f"prepare L{r.layer} E{r.expert}", "prepare"):
                        result = r.then(payloads)
            except BaseException as e:  # noqa: BLE001
                error = e
        h = getattr(out, "head", None)
        if error is not None:
            if h is not None and not r.head_fired_ok:
                h.set_exception(error)
            out.set_exception(error)  # the slab is not recycled: the head's views may be in use
        else:
            out.set_result(result)

    # ---- reads ahead: in the disk's idle time, given up the moment a demanded read comes
    def ahead(self, layer: int, expert: int, level: int, head=None) -> Ahead | None:
        """Start reading an expert a later layer will probably want, in its own slab, only
        while no demanded read is queued or in flight, one part at a time (a demanded read
        waits at most one AHEAD_PART behind it). `take` turns it into the demanded read;
        `drop` stops it. None where the read could not be owned (compressed chunks)."""
        if self.compressed(layer, expert, level):
            return None
        start, length = self._span(layer, expert, 0, level)
        r = _Read(self, layer, expert, level, 0, start, length, head, AHEAD_PART)
        with self._lock:
            self._ahead.append(r)
        self._pump()
        return Ahead(r)

    def take(self, a: Ahead, then=None, head=None) -> Future | None:
        """The future fetch(own=True) would give for a's expert, its parts already read kept;
        None where a was dropped or failed (read it afresh)."""
        r = a.read
        with self._lock:
            failed = r.error is not None
            if r.cancelled or r.out is not None or failed:
                gone = True
            else:
                gone = False
                if r in self._ahead:
                    self._ahead.remove(r)
                r.recut(PART)  # no longer issued by _pump: its parts left are demanded ones
        if gone:
            if failed:
                self.drop(a)  # its slab back; the demanded read tries afresh
            return None
        return self._demand(r, then, head)

    def drop(self, a: Ahead) -> int:
        """Stop a read ahead nobody will take; its slab comes back once no part is in
        flight. Returns the bytes it had read (wasted)."""
        r = a.read
        with self._lock:
            if r.out is not None or r.cancelled:
                return 0
            r.cancelled = True
            r.issued = len(r.parts)
            if r in self._ahead:
                self._ahead.remove(r)
            free = r.inflight == 0
            got = r.got
        if free:
            self.recycle(r.buf)
            r.freed = True
        return got

    def _pump(self) -> None:
        """Issue the next part read ahead when the threads have no demanded read."""
        with self._lock:
            if self._wanted or self._ahead_inflight or not self._ahead:
                return
            r = self._ahead[0]
            i = r.issued
            r.issued += 1
            r.inflight += 1
            if r.issued == len(r.parts):
                self._ahead.pop(0)
            self._ahead_inflight += 1
        self._pool.submit(self._part, r, i, False)

    def compressed(self, layer: int, expert: int, level: int) -> bool:
        """Whether any of the expert's first `level` chunks is stored compressed."""
        e = self.reader.expert(layer, expert)
        return any(self.reader.chunks[ci].compression for ci in e.levels[:level])

    def _buffer(self, n: int) -> mmap.mmap:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = anon(max(n, self.max_span), self.huge_slabs)
            self._local.buf = buf
        return buf

    def _read(self, layer: int, expert: int, level: int, have: int, own: bool = False) -> Payloads:
        start, length = self._span(layer, expert, have, level)
        if self.throttle is not None:
            self.throttle(length)
        own = own and not self.compressed(layer, expert, level)
        buf = self._slab(length) if own else self._buffer(length)
        view = memoryview(buf)[:length]
        got = self._pread(view, start)
        with self._lock:
            self.bytes_read = self.bytes_read + got
            self.reads += 1
        out = self._payloads(layer, expert, level, have, view, start, own)
        if own:
            out.slab = buf
        else:
            view.release()
        return out

    def _payloads(self, layer, expert, level, have, view, start, own) -> Payloads:
        """The level chunks' payloads from a read's bytes (view, from file offset start): each
        chunk's CRC checked the first time this process reads it; owned, views into the
        read's slab, else copies (the buffer serves the next read)."""
        e = self.reader.expert(layer, expert)
        out = Payloads()
        for ci in e.levels[have:level]:
            c = self.reader.chunks[ci]
            rel = self.reader.data_offset + c.offset - start
            payload = self.reader.payload(
                ci, view[rel : rel + c.length], check=ci not in self._verified
            )
            if not self.check_every_read:
                self._verified.add(ci)
            out.append(payload if own else bytes(payload))
        return out

    def _pread(self, view: memoryview, offset: int) -> int:
        fd = self._fd  # read once: another thread may swap it in _fall_back
        if self.direct:
            try:
                return os.preadv(fd, [view], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                fd = self._fall_back()
        n = os.preadv(fd, [view], offset)
        os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        return n

    def _fall_back(self) -> int:
        """Switch to buffered reads; the O_DIRECT descriptor stays open until close(),
        as other reader threads may be inside a read on it."""
        with self._lock:
            if self.direct:
                self._retired.append(self._fd)
                self._fd = os.open(self.reader.path, os.O_RDONLY)
                self.direct = False
            return self._fd

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._retired:
            os.close(fd)
        self._retired = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
