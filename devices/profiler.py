"""`edgemoe profile`: measure this machine and write a device profile.

Measures, with a progress bar and in under two minutes by default:
flash read bandwidth, sequential and random at expert-sized reads (O_DIRECT
on a scratch file that is removed afterwards, also on Ctrl-C), memory
bandwidth, cores and memory, the time of one expert's SwiGLU at each stored
precision level for batch 1, 4 and 16 (the shapes of `--model FILE`, or a
default set), and the zstd decode rate. Refuses, before writing anything,
when the scratch folder is missing, read-only or too small.

devices/ imports nothing of the runtime: the expert timing is the caller's
`expert_timer` (the CLI passes edgemoe.kernel_timing.expert_times).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from formats.errors import EmoeError
from formats.units import Bytes

EXPERT_READS = (256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
SEQ_READ = 32 << 20  # sequential reads: a large expert is one read of its levels
HUGE = 2 << 20  # a huge page
# (model or None) -> {"expert_ms.<case>.b<batch>": ms}; None asks for the default set, the
# one reference_expert_ms.json holds for the devbox (edgemoe.kernel_timing.expert_times).
ExpertTimer = Callable[[Path | None], dict[str, float]]


class ScratchError(EmoeError):
    fix = "pass --scratch DIR on a writable disk with room, or a smaller --scratch-size"


def check_scratch(folder: Path, size: int) -> None:
    """Refuse before writing anything: missing, read-only or too small."""
    if not folder.is_dir():
        raise ScratchError(f"scratch folder {folder} does not exist")
    probe = folder / f".edgemoe-probe-{os.getpid()}"  # os.access lies for root and read-only mounts
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as e:
        raise ScratchError(f"scratch folder {folder} is read-only ({e.strerror})") from None
    free = shutil.disk_usage(folder).free
    if free < size + (64 << 20):
        raise ScratchError(
            f"scratch folder {folder} has {Bytes(free)} free; the test file needs {Bytes(size)} + 64 MiB"
        )


def _write_scratch(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def flash_bandwidth(path: Path, size: int, seconds: float = 3.0) -> dict:
    """Sequential (32 MiB reads, whole file) and random (expert-sized, aligned) O_DIRECT read rates."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    out = {}
    try:
        # private memory in 2 MiB pages where the kernel gives them: the disk's best (on
        # virtio-blk here reads into 4 KiB pages ran at 1.2-1.3 GB/s, into huge ones 2.1-2.2:
        # 254 segments a request), as the runtime's slabs get when reads reuse them
        room = mmap.mmap(-1, SEQ_READ + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            room.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
        at = -ctypes.addressof(ctypes.c_char.from_buffer(room)) % HUGE  # a 2 MiB boundary
        buf = memoryview(room)[at : at + SEQ_READ]
        t0, done = time.perf_counter(), 0
        for off in range(0, size, SEQ_READ):
            done += os.preadv(fd, [buf[: min(SEQ_READ, size - off)]], off)
        out["flash_seq_read"] = done / (time.perf_counter() - t0)
        rnd = random.Random(0)
        for n in EXPERT_READS:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            view = memoryview(buf)[:n]
            t0, done = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds / len(EXPERT_READS):
                off = rnd.randrange(0, (size - n) // 4096) * 4096
                done += os.preadv(fd, [view], off)
            out[f"flash_rand_read_{n // 1024}k"] = done / (time.perf_counter() - t0)
        out["flash_rand_read"] = min(v for k, v in out.items() if k.startswith("flash_rand_read_"))
    finally:
        os.close(fd)
    return out


def large_read_rate(path: Path, n: int, seconds: float = 1.0) -> float:
    """Bytes/s of O_DIRECT reads of n bytes at random 4 KiB-aligned offsets over the whole
    file, one at a time, into 2 MiB pages: what a miss of an expert whose read is n bytes
    gets from this disk. (Sequential 32 MiB reads of one region ran 4-25% faster here than
    reads of a 33 MB expert at random places in the same minute: the host serves a region
    read again, and a sequential stream, faster.)"""
    n = max(4096, n // 4096 * 4096)
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < n:
            raise ValueError(f"{path} has {size} bytes, fewer than one read of {n}")
        room = mmap.mmap(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            room.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
        at = -ctypes.addressof(ctypes.c_char.from_buffer(room)) % HUGE
        buf = memoryview(room)[at : at + n]
        os.preadv(fd, [buf], 0)  # the buffer's pages faulted in, outside the timing
        rnd = random.Random(0)
        t0, done = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds or done < 2 * n:
            done += os.preadv(fd, [buf], rnd.randrange(0, (size - n) // 4096 + 1) * 4096)
        return done / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def memory_bandwidth(mib: int = 256) -> float:
    """Bytes moved per second by a large copy (read + write), best of 3."""
    a = np.ones(mib << 18, dtype=np.float32)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t0))
    return best


def zstd_decode_rate(mib: int = 16) -> float:
    import zstandard

    w = (np.random.default_rng(0).standard_normal(mib << 18) * 0.02).astype(np.float32)
    raw = (w.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bf16-like weights
    comp = zstandard.ZstdCompressor(level=3).compress(raw)
    d = zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    for _ in range(3):
        d.decompress(comp)
    return 3 * len(raw) / (time.perf_counter() - t0)


def profile(
    scratch: Path,
    scratch_size: int,
    model: Path | None = None,
    progress: bool = True,
    *,
    expert_timer: ExpertTimer,
) -> dict:
    """Measure this machine; the scratch file is removed whatever happens.

    Args:
        scratch: a folder on the disk models will live on (the read test's scratch file).
        scratch_size: bytes of that file.
        model: a .emoe whose expert the timer measures too (None: the default set only).
        progress: show a progress bar.
        expert_timer: times one expert's kernels (devices/ imports no runtime code; the CLI
            passes edgemoe.kernel_timing.expert_times).
    Returns:
        Every measured figure; profile_text turns it into a profile file.
    Raises:
        ScratchError: the scratch folder is missing, read-only or too small.
    """
    from tqdm import tqdm

    scratch = Path(scratch)
    check_scratch(scratch, scratch_size)
    vm = psutil.virtual_memory()
    result = {"cores": os.cpu_count() or 1, "memory": vm.total, "available_memory": vm.available}
    path = scratch / f".edgemoe-profile-{os.getpid()}.bin"
    steps = tqdm(total=5, desc="profile", disable=not progress or None)
    try:
        _write_scratch(path, scratch_size)
        steps.update()
        result.update(flash_bandwidth(path, scratch_size))
        steps.update()
    finally:
        path.unlink(missing_ok=True)
    result["memory_bandwidth"] = memory_bandwidth()
    steps.update()
    result["zstd_decode"] = zstd_decode_rate()
    steps.update()
    result.update(expert_timer(model))
    result["compute_factor"] = compute_factor(expert_timer(None) if model is not None else result)
    steps.update()
    steps.close()
    return result


REFERENCE = Path(__file__).parent / "reference_expert_ms.json"  # the devbox's expert_timer(None)


def compute_factor(times: dict) -> float:
    """How many times slower than the devbox at the default expert kernels (geometric mean)."""
    import json
    import math

    ref = json.loads(REFERENCE.read_text())
    ratios = [times[k] / ref[k] for k in ref if k in times and ref[k] > 0]
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else 1.0


def profile_text(result: dict, name: str) -> str:
    """The profile file for a measurement: the required keys, then every figure as a comment."""
    when = time.strftime("%Y-%m-%d")
    reserve = max(Bytes.parse("512MiB"), Bytes(result["memory"] - result["available_memory"]))
    lines = [
        f"# Measured by `edgemoe profile` on {when} ({os.uname().nodename}).",
        f"name = {name}  # measured on {when}",
        f"memory = {int(result['memory'])}  # psutil.virtual_memory().total",
        f"os_reserve = {int(reserve)}  # total - available at profiling time, at least 512 MiB",
        f"memory_bandwidth = {int(result['memory_bandwidth'])}  # numpy copy of 256 MiB, read + write, best of 3",
        f"flash_seq_read = {int(result['flash_seq_read'])}  # O_DIRECT 32 MiB sequential reads",
        f"flash_rand_read = {int(result['flash_rand_read'])}  # O_DIRECT random aligned reads, slowest size",
        f"cores = {result['cores']}  # os.cpu_count()",
        f"compute_factor = {result['compute_factor']:.3f}  # expert kernels vs devbox (geometric mean)",
        "",
        "# Every measured figure (bytes/s for rates, milliseconds for expert_ms.*):",
    ]
    lines += [
        f"# {k} = {v:.4g}" if isinstance(v, float) else f"# {k} = {v}" for k, v in result.items()
    ]
    return "\n".join(lines) + "\n"
