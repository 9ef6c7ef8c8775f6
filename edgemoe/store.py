"""ExpertStore: reads (layer, expert, level) slices of a .emoe from flash.

One read per request: levels have+1..level of an expert lie back to back on
disk (SPEC.md §3.2), so an upgrade reads only the extra bytes. Reads go
through O_DIRECT into page-aligned buffers (one per reader thread, reused),
on a small thread pool that also checks CRCs and inflates zstd, so the
calling thread only waits on futures. Where O_DIRECT is refused (tmpfs, some
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

from edgemoe.units import Bytes
from formats.constants import align_up
from formats.reader import EmoeReader


class ExpertStore:
    """Reads expert level slices on a thread pool.

    Args:
        reader: the open file (its header gives every chunk's place).
        threads: reader threads (each owns one aligned buffer).
        direct: try O_DIRECT first.
        throttle: called with each read's byte count before it is issued
            (device emulation plugs a token bucket in here).
    """

    def __init__(
        self,
        reader: EmoeReader,
        threads: int = 2,
        direct: bool = True,
        throttle: Callable[[int], None] | None = None,
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
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edgemoe-io")
        self._lock = threading.Lock()
        self.threads = threads
        self.bytes_read = Bytes(0)
        self.reads = 0

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
        self, layer: int, expert: int, level: int, have: int = 0, then: Callable | None = None
    ) -> Future:
        """Future of the raw (checked, inflated) payloads of levels have+1..level, or of
        then(payloads) computed on the reader thread (so the payloads are freed there, and
        never wait in memory for the computing thread)."""
        if then is None:
            return self._pool.submit(self._read, layer, expert, level, have)
        return self._pool.submit(lambda: then(self._read(layer, expert, level, have)))

    def _buffer(self, n: int) -> mmap.mmap:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = mmap.mmap(-1, max(n, self.max_span))  # page-aligned, as O_DIRECT needs
            self._local.buf = buf
        return buf

    def _read(self, layer: int, expert: int, level: int, have: int) -> list[bytes]:
        start, length = self._span(layer, expert, have, level)
        if self.throttle is not None:
            self.throttle(length)
        buf = self._buffer(length)
        view = memoryview(buf)[:length]
        got = self._pread(view, start)
        with self._lock:
            self.bytes_read = self.bytes_read + got
            self.reads += 1
        e = self.reader.expert(layer, expert)
        out = []
        for ci in e.levels[have:level]:
            c = self.reader.chunks[ci]
            rel = self.reader.data_offset + c.offset - start
            payload = self.reader.payload(ci, view[rel : rel + c.length])
            out.append(bytes(payload))  # copy out: the buffer is reused by the next read
        view.release()
        return out

    def _pread(self, view: memoryview, offset: int) -> int:
        if self.direct:
            try:
                return os.preadv(self._fd, [view], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._fall_back()
        n = os.preadv(self._fd, [view], offset)
        os.posix_fadvise(self._fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        return n

    def _fall_back(self) -> None:
        with self._lock:
            if self.direct:
                os.close(self._fd)
                self._fd = os.open(self.reader.path, os.O_RDONLY)
                self.direct = False

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
