"""Run a command inside a real memory cgroup and report what it used.

This is how edgemoe proves a memory budget: the kernel enforces the cap
(page cache included), so a process that overruns it is reclaimed or
OOM-killed, not merely reported. Linux cgroup v1 (memory controller at
/sys/fs/cgroup/memory) and v2 (unified hierarchy, memory.max) are supported.

Public API, for benchmarks (`edgemoe bench`, tools/), the tests' `memory_cap`
fixture and users who want to check a budget themselves:

    from edgemoe import memcap
    if memcap.available() is None:
        r = memcap.run_capped(["edgemoe", "run", "model.emoe", "-p", "hi"], "2GiB")
        print(r.ok, r.peak, r.oom_killed)

Everything in `__all__` keeps its name and meaning across minor versions;
the rest is private. Needs root (or a delegated cgroup) to create cgroups.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from edgemoe.units import Bytes

__all__ = [
    "CapResult",
    "CgroupUnavailable",
    "available",
    "evict_page_cache",
    "own_peak",
    "run_capped",
]

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CapResult:
    """What one capped run did.

    Attributes:
        returncode: the command's exit status (negative: killed by that signal).
        limit: the cap.
        peak: the cgroup's peak usage (RSS + page cache + kernel memory it was charged).
        oom_killed: the kernel's OOM killer fired inside the cgroup.
        bytes_read: bytes the command read from block devices (rusage inblock).
        wall_s: wall-clock seconds.
        stdout, stderr: the command's output, as text.
    """

    returncode: int
    limit: Bytes
    peak: Bytes
    oom_killed: bool
    bytes_read: Bytes
    wall_s: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """The command exited 0 and the OOM killer never fired."""
        return self.returncode == 0 and not self.oom_killed


class CgroupUnavailable(RuntimeError):
    """No writable memory cgroup here; the message says why."""


def _v1_writable() -> bool:
    return (V1_ROOT / "memory.limit_in_bytes").exists() and os.access(V1_ROOT, os.W_OK)


def _v2_writable() -> bool:
    return (
        (V2_ROOT / "cgroup.controllers").exists()
        and os.access(V2_ROOT, os.W_OK)
        and "memory" in (V2_ROOT / "cgroup.subtree_control").read_text()
    )


def available() -> str | None:
    """Whether run_capped works on this machine.

    Returns:
        None when it does, else the reason it does not (for a skip or an error message).
    """
    if _v1_writable() or _v2_writable():
        return None
    return "no writable memory cgroup (need root and cgroup v1 /sys/fs/cgroup/memory or v2 with +memory)"


def evict_page_cache(path: str | os.PathLike) -> None:
    """Drop a file's pages from the page cache, so the next run reads it cold.

    Args:
        path: the file (its dirty pages are written back first).
    Raises:
        OSError: the file cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def own_rss_peak() -> Bytes:
    """This process's peak resident memory: /proc/self/status VmHWM, which starts anew at exec.
    Not ru_maxrss: Linux carries it across fork and exec, so a process started from a large
    one (a test runner of 1.4 GiB) reports its parent's peak as its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return Bytes(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return Bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # not Linux: KiB


def own_peak() -> Bytes | None:
    """The peak memory of the capped cgroup this process runs in (what the cap counts: RSS,
    page cache and every process in it), or None when no memory limit applies to it."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrl, path = line.split(":", 2)
        if path in ("/", ""):
            continue
        if "memory" in ctrl.split(","):  # v1
            d, limit, peak = (
                V1_ROOT / path.lstrip("/"),
                "memory.limit_in_bytes",
                "memory.max_usage_in_bytes",
            )
        elif ctrl == "":  # v2 unified
            d, limit, peak = V2_ROOT / path.lstrip("/"), "memory.max", "memory.peak"
        else:
            continue
        try:
            cap = (d / limit).read_text().strip()
            if cap == "max" or int(cap) >= 1 << 60:
                return None
            return Bytes(int((d / peak).read_text()))
        except (OSError, ValueError):
            return None
    return None


class _Cgroup:
    def __init__(self, limit: Bytes):
        self.v1 = _v1_writable()
        if not self.v1 and not _v2_writable():
            raise CgroupUnavailable(available())
        root = V1_ROOT if self.v1 else V2_ROOT
        self.path = root / f"edgemoe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        if self.v1:
            (self.path / "memory.limit_in_bytes").write_text(str(int(limit)))
            sw = self.path / "memory.memsw.limit_in_bytes"
            if sw.exists():  # no swapping our way under the cap
                try:
                    sw.write_text(str(int(limit)))
                except OSError:
                    pass
        else:
            (self.path / "memory.max").write_text(str(int(limit)))
            (self.path / "memory.swap.max").write_text("0")

    def peak(self) -> int:
        f = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        p = self.path / f
        return int(p.read_text()) if p.exists() else 0

    def oom_kills(self) -> int:
        f = "memory.oom_control" if self.v1 else "memory.events"
        for line in (self.path / f).read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_capped(
    cmd: list[str],
    limit: Bytes | str | int,
    *,
    timeout: float = 600,
    env: dict | None = None,
    cwd: str | os.PathLike | None = None,
    evict: list[str | os.PathLike] = (),
) -> CapResult:
    """Run cmd with its whole process tree inside a memory cgroup capped at `limit`.

    The command enters the cgroup before exec, so its imports count too.

    Args:
        cmd: argv.
        limit: the cap, a Bytes or anything Bytes.parse reads ("512MiB").
        timeout: seconds before the command is killed (TimeoutExpired is raised).
        env, cwd: as for subprocess.
        evict: files to drop from the page cache first (a cold start).
    Returns:
        A CapResult: exit status, peak usage, whether the OOM killer fired, bytes read.
    Raises:
        CgroupUnavailable: no writable memory cgroup on this machine.
        ValueError: `limit` is not a size.
        subprocess.TimeoutExpired: the command ran past `timeout` (it is killed first).
    """
    limit = Bytes.parse(limit)
    for f in evict:
        evict_page_cache(f)
    cg = _Cgroup(limit)
    procs = cg.path / "cgroup.procs"
    wrapper = ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "memcap"]
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
    try:
        p = subprocess.Popen(
            wrapper + list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise
        wall = time.perf_counter() - t0
        # The reaped child's block reads (512-byte units, O_DIRECT included) land in
        # RUSAGE_CHILDREN; callers run one capped command at a time.
        inblock = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - before
        return CapResult(
            p.returncode,
            limit,
            Bytes(cg.peak()),
            cg.oom_kills() > 0,
            Bytes(512 * inblock),
            wall,
            out,
            err,
        )
    finally:
        cg.remove()
