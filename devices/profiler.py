"""`edgemoe profile`: measure this machine and write a device profile.

Measures, with a progress bar and in under two minutes by default:
flash read bandwidth, sequential and random at expert-sized reads (O_DIRECT
on a scratch file that is removed afterwards, also on Ctrl-C), memory
bandwidth, cores and memory, the time of one expert's SwiGLU at each stored
precision level for batch 1, 4 and 16 (the shapes of `--model FILE`, or a
default set), and the zstd decode rate. Refuses, before writing anything,
when the scratch folder is missing, read-only or too small.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import psutil

from edgemoe.units import Bytes
from formats.errors import EmoeError

EXPERT_READS = (256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
DEFAULT_SHAPES = ((1024, 2816), (2048, 1408))  # (hidden, expert width)
BATCHES = (1, 4, 16)


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
    """Sequential (4 MiB reads, whole file) and random (expert-sized, aligned) O_DIRECT read rates."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    out = {}
    try:
        buf = mmap.mmap(-1, max(EXPERT_READS))
        t0, done = time.perf_counter(), 0
        for off in range(0, size, 4 << 20):
            done += os.preadv(fd, [memoryview(buf)[: min(4 << 20, size - off)]], off)
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


def expert_times(model: Path | None, shapes=DEFAULT_SHAPES) -> dict:
    """Milliseconds of one expert's SwiGLU at each level and batch, on the kernels the runtime uses."""
    import torch

    from edgemoe.kernels import make_linear
    from edgemoe.moe.experts import ExpertWeights, expert_forward
    from formats.codecs import codec_by_name

    cases = []  # (label, hidden, ExpertWeights)
    if model is not None:
        from edgemoe.prepare import prepare_expert
        from formats.reader import EmoeReader

        r = EmoeReader(model)
        e = next(iter(r.experts.values()))
        codec = r.tensors[e.tensors["gate"]].codec.name
        hidden = r.tensors[e.tensors["gate"]].shape[1]
        for k in range(1, len(e.levels) + 1):
            payloads = [r.read_chunk(ci) for ci in e.levels[:k]]
            cases.append((f"{codec}_l{k}", hidden, prepare_expert(r, e, payloads, torch.bfloat16)))
    else:
        rng = np.random.default_rng(0)
        for d, i in shapes:
            mats = {"gate": (i, d), "up": (i, d), "down": (d, i)}
            ws = {
                role: (rng.standard_normal(s) * 0.02).astype(np.float32) for role, s in mats.items()
            }
            for name, levels in (("bf16", 1), ("int8", 1), ("int4", 1), ("mwq", 3)):
                c = codec_by_name(name)
                params = {
                    role: c.default_params(s) if name != "bf16" else {} for role, s in mats.items()
                }
                segs = {role: c.encode(ws[role], params[role]) for role in mats}
                for k in range(1, levels + 1):
                    lin = {
                        role: make_linear(
                            c.id, mats[role], params[role], segs[role][:k], torch.bfloat16
                        )
                        for role in mats
                    }
                    label = f"{name}_l{k}" if levels > 1 else name
                    cases.append(
                        (
                            f"{label}_{d}x{i}",
                            d,
                            ExpertWeights(lin["gate"], lin["up"], lin["down"], k),
                        )
                    )
    out = {}
    for label, hidden, ew in cases:
        for b in BATCHES:
            x = torch.randn(b, hidden, dtype=torch.bfloat16)
            expert_forward(x, ew)
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.15:
                expert_forward(x, ew)
                n += 1
            out[f"expert_ms.{label}.b{b}"] = 1e3 * (time.perf_counter() - t0) / n
    return out


def profile(
    scratch: Path, scratch_size: int, model: Path | None = None, progress: bool = True
) -> dict:
    """Measure this machine; the scratch file is removed whatever happens."""
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
    result.update(expert_times(model))
    result["compute_factor"] = compute_factor(expert_times(None) if model is not None else result)
    steps.update()
    steps.close()
    return result


REFERENCE = Path(__file__).parent / "reference_expert_ms.json"  # the devbox's expert_times(None)


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
        f"flash_seq_read = {int(result['flash_seq_read'])}  # O_DIRECT 4 MiB sequential reads",
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
