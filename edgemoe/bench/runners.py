"""Run one system once, inside a memory cgroup, from a cold page cache.

Systems are data: a name and how to run it. `edgemoe` is the engine as
shipped; `edgemoe-naive` is the same command plus the argv that selects
today's (pre-cache-policy) behaviour, run only when `edgemoe run` offers it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgemoe import fastkernels, memcap
from edgemoe.bench.report import FAILED, NA, OK, OOM, REFUSED, TIMEOUT, Run
from edgemoe.bound import SEQUENTIAL_READ
from edgemoe.units import Bytes

LLAMA_CPP = "llama.cpp"


@dataclass(frozen=True)
class System:
    """One contender. `argv` is appended to `edgemoe run` (edgemoe systems only);
    `needs` is the `edgemoe run` flag that must exist for the system to run."""

    name: str
    kind: str  # "llama.cpp" or "edgemoe"
    argv: tuple[str, ...] = ()
    needs: str | None = None
    about: str = ""
    env: tuple[tuple[str, str], ...] = ()  # environment the system's runs add


SYSTEMS = {
    s.name: s
    for s in (
        System(LLAMA_CPP, LLAMA_CPP, ("-lm", "mmap"), about="llama-bench, Q8_0 GGUF, mmap"),
        System(
            "edgemoe-naive",
            "edgemoe",
            ("--engine", "naive"),
            "--engine",
            "edgemoe before the fast path: its paging, torch's INT8 kernel",
            (("EDGEMOE_INT8_KERNEL", "0"),),
        ),
        System("edgemoe", "edgemoe", about="edgemoe as shipped"),
    )
}


def edgemoe_run_flags() -> str:
    """`edgemoe run --help`, to tell which systems this edgemoe can run."""
    p = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "run", "--help"], capture_output=True, text=True
    )
    return p.stdout


def _mem_total() -> Bytes:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return Bytes(int(line.split()[1]) * 1024)
    raise OSError("no MemTotal in /proc/meminfo")


def evict(files: list[Path]) -> bool:
    """Drop the model files from the page cache, and every clean page if root may.

    Returns:
        True when the whole page cache was dropped too (/proc/sys/vm/drop_caches).
    """
    for f in files:
        memcap.evict_page_cache(f)
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


@dataclass
class Settings:
    """What every run shares."""

    prompt_tokens: int = 128
    new_tokens: int = 32
    threads: int = 2
    timeout: float = 1800
    drop_caches: bool = True
    env: dict = field(default_factory=dict)
    bound: str | None = None  # device profile edgemoe's decode bound is computed on
    replay: str | None = None  # a .emoe whose routing trace edgemoe's runs replay
    fresh_bound: bool = True  # the bound's rates re-measured beside each run (fresh_bound)

    def environ(self) -> dict:
        return dict(
            os.environ,
            OMP_WAIT_POLICY="PASSIVE",
            OMP_NUM_THREADS=str(self.threads),
            **self.env,
        )


def fresh_bound(profile: str, model: Path, out: Path) -> dict:
    """Write to `out` the profile `profile` with its memory and flash rates measured now: the
    profiler's memory copy and O_DIRECT reads of the model file itself (its first 512 MiB
    in 32 MiB reads, then expert-sized random reads for a second). The rates here move from
    hour to hour (this VM's disk 0.65-2.2 GB/s, its memory 15-29 GB/s, measured), so a bound
    from a profile taken earlier is off by as much; measured beside each run it is not.

    The rate the bound gives a read of 4 MiB or more (bound.flash_rate's "sequential" one)
    is measured as such reads are made: reads of the file's largest expert span at random
    places over the whole file (devices.profiler.large_read_rate); `flash_seq_32m` keeps the
    32 MiB sequential figure. Returns the rates (bytes/s)."""
    from devices.profile import load_profile
    from devices.profiler import flash_bandwidth, large_read_rate, memory_bandwidth

    p = load_profile(profile)
    size = max(4096, min(model.stat().st_size, 512 << 20) // 4096 * 4096)
    flash = flash_bandwidth(model, size, seconds=1.0)
    span = _largest_span(model)
    seq = large_read_rate(model, span) if span >= SEQUENTIAL_READ else flash["flash_seq_read"]
    rates = {
        "memory_bandwidth": int(memory_bandwidth()),
        "flash_seq_read": int(seq),
        "flash_rand_read": int(flash["flash_rand_read"]),
        "flash_seq_32m": int(flash["flash_seq_read"]),
    }
    fields = {
        "name": p.name,
        "memory": int(p.memory),
        "os_reserve": int(p.os_reserve),
        **{k: v for k, v in rates.items() if k != "flash_seq_32m"},
        "cores": p.cores,
        "compute_factor": p.compute_factor,
    }
    out.write_text("".join(f"{k} = {v}\n" for k, v in fields.items()), encoding="utf-8")
    return rates


@functools.cache
def _largest_span(model: Path) -> int:
    """The largest aligned read of one expert (all its levels) in a .emoe, 0 for another file."""
    from formats.reader import EmoeReader

    try:
        with EmoeReader(model) as r:
            return max(
                (r.expert_span(e.layer, e.expert, len(e.levels))[1] for e in r.experts.values()),
                default=0,
            )
    except Exception:  # noqa: BLE001 (not a .emoe: the 32 MiB sequential figure stands)
        return 0


def _rerate(run: Run, summary: dict, after: dict) -> None:
    """The run's bound on the means of the rates measured just before and just after it (in
    place of the before rates the run itself used): the disk here drifts by 20-30% within
    minutes, and one measurement before a run put a 25% cap run at 109% of its "bound"."""
    from edgemoe.bound import rerated

    before = run.extra["bound_rates"]
    run.extra["bound_rates_after"] = after
    run.extra["bound_tok_s_before"] = summary["bound_tok_s"]
    mean = {k: (before[k] + after[k]) / 2 for k in before if k in after}
    summary["bound_tok_s"] = rerated(
        summary["bound_memory_bytes_per_step"],
        summary["bound_flash_bytes_per_step"],
        memory_bandwidth=mean["memory_bandwidth"],
        flash_rand_read=mean["flash_rand_read"],
        flash_seq_read=mean["flash_seq_read"],
        read_bytes=summary["plan"]["largest_expert"],
        batch=max(1, run.batch),
    )


def _capped(run: Run, cmd: list[str], limit: Bytes | None, files: list[Path], s: Settings, env=()):
    """Run cmd cold inside the cap and record the cgroup's figures in `run`: the CapResult, or
    None when it timed out or was OOM-killed (run.status and run.note say which)."""
    dropped = evict(files) if s.drop_caches else False
    if not s.drop_caches:
        for f in files:
            memcap.evict_page_cache(f)
    run.extra["dropped_caches"] = dropped
    try:
        res = memcap.run_capped(
            cmd, limit or _mem_total(), timeout=s.timeout, env=dict(s.environ(), **dict(env))
        )
    except subprocess.TimeoutExpired:
        run.status, run.note = TIMEOUT, f"timeout ({s.timeout:.0f} s)"
        return None
    run.peak, run.bytes_read, run.wall_s = int(res.peak), int(res.bytes_read), res.wall_s
    if res.oom_killed:
        run.status, run.note = OOM, "OOM-killed"
        return None
    return res


def run_llamacpp(
    bench: Path, gguf: Path, cap: str, limit: Bytes | None, repeat: int, batch: int, s: Settings
) -> Run:
    """llama-bench once: prefill of prompt_tokens (pp), cold, then decode of new_tokens (tg)
    in the same process, with mmap (`-lm mmap`, what its default `auto` picks on a CPU),
    -r 1 and no warm-up runs."""
    run = Run(LLAMA_CPP, cap, repeat, batch, limit=limit)
    if batch != 1:
        run.status, run.note = NA, "n/a (llama-bench decodes one sequence)"
        return run
    cmd = [str(bench), "-m", str(gguf), "-p", str(s.prompt_tokens), "-n", str(s.new_tokens)]
    # --no-warmup: its prefill (pp) reads the weights cold, as edgemoe's does; its decode (tg)
    # follows in the same process, after that prefill, as edgemoe's does.
    cmd += ["-r", "1", "-t", str(s.threads), "-o", "json", "--no-warmup", *SYSTEMS[LLAMA_CPP].argv]
    res = _capped(run, cmd, limit, [gguf], s)
    if res is not None and res.returncode == -signal.SIGSEGV and "--repack" not in cmd:
        # llama.cpp's AMX matmul (the extra buffer type its weight repacking picks on CPUs
        # with AMX-INT8) segfaults on some machines (ggml-org/llama.cpp#20824): run it
        # again without repacking, its AVX-512 path, and say so in the table.
        run.extra["repack_off"] = "llama.cpp's AMX path segfaulted (llama.cpp#20824): --repack 0"
        res = _capped(run, cmd + ["--repack", "0"], limit, [gguf], s)
    if res is None:
        return run
    try:
        tests = json.loads(res.stdout)
    except ValueError:
        tests = None
    if res.returncode != 0 or not tests:
        run.status, run.note = FAILED, f"failed (exit {res.returncode})"
        run.extra["stderr"] = res.stderr[-2000:]
        return run
    for t in tests:
        if t.get("n_gen", 0) > 0:
            run.decode_tok_s, run.new_tokens = float(t["avg_ts"]), int(t["n_gen"])
        elif t.get("n_prompt", 0) > 0:
            run.prefill_tok_s, run.prompt_tokens = float(t["avg_ts"]), int(t["n_prompt"])
    run.tokens = (run.prompt_tokens or 0) + (run.new_tokens or 0)
    first = tests[0]
    run.extra.update(
        {
            k: first.get(k)
            for k in (
                "build_commit",
                "build_number",
                "cpu_info",
                "model_type",
                "model_size",
                "n_threads",
            )
        }
    )
    return run


_NEEDS = re.compile(r"smallest budget that works is ([0-9.]+ ?[KMGT]?i?B)")


def prompts_of(emoe: Path, n_tokens: int, batch: int) -> list[str]:
    """`batch` different texts of n_tokens tokens each under the file's tokenizer
    (or as near below as whole words allow; the run records the real count)."""
    from edgemoe.tokenizer import Tokenizer
    from formats.reader import EmoeReader

    words = (
        "the memory budget holds every dense weight and a cache of experts while the rest "
        "stay on flash and each token reads the few it routes to so a model larger than "
        "memory still runs at a speed set by how often the cache misses and how fast the "
        "disk answers a read of one expert in one request"
    ).split()
    with EmoeReader(emoe) as r:
        tok = Tokenizer(r)
        out = []
        for b in range(batch):
            text, k = "", 0
            while True:
                nxt = (text + " " if text else "") + words[(7 * b + k) % len(words)]
                if len(tok.encode(nxt)) > n_tokens:
                    break
                text, k = nxt, k + 1
            out.append(text)
    return out


def _planner_needs(cmd: list[str], s: Settings) -> str | None:
    """The budget the planner names when it refuses cmd's --mem, asked outside any
    cgroup with 2 new tokens; None when it accepts (then the cap itself was too small)."""
    short = list(cmd)
    short[short.index("-n") + 1] = "2"
    try:
        p = subprocess.run(
            short, capture_output=True, text=True, timeout=s.timeout, env=s.environ()
        )
    except subprocess.TimeoutExpired:
        return None
    m = _NEEDS.search(p.stderr) if p.returncode != 0 else None
    return m.group(1) if m else None


def run_edgemoe(
    system: System,
    emoe: Path,
    prompts: list[str],
    cap: str,
    limit: Bytes | None,
    repeat: int,
    s: Settings,
    trace: Path | None = None,
) -> Run:
    """`edgemoe run --json` once, with --mem equal to the cgroup's cap (and `--trace trace`
    when given: a traced run runs the per-layer path, so its speed is not the table's)."""
    batch = len(prompts)
    run = Run(system.name, cap, repeat, batch, limit=limit)
    cmd = [sys.executable, "-m", "edgemoe.cli", "run", str(emoe), "--json", "-q"]
    cmd += [
        "-n",
        str(s.new_tokens),
        "--temperature",
        "0",
        "--ctx",
        str(s.prompt_tokens + s.new_tokens),
    ]
    for p in prompts:
        cmd += ["-p", p]
    if limit is not None:
        cmd += ["--mem", str(int(limit))]
    if s.bound:
        bound = s.bound
        if s.fresh_bound:  # the rates as they are now, beside this run
            bound = str(Path(tempfile.gettempdir()) / f"edgemoe-bench-{os.getpid()}.profile")
            run.extra["bound_rates"] = fresh_bound(s.bound, emoe, Path(bound))
        cmd += ["--bound", bound]
    if s.replay:
        cmd += ["--replay-routing", s.replay]
    if trace is not None:
        cmd += ["--trace", str(trace)]
    cmd += list(system.argv)
    fastkernels.library()  # compiled here, outside the cap, before the first capped run
    res = _capped(run, cmd, limit, [emoe], s, system.env)
    if res is None:
        if run.status == OOM and limit is not None and (needs := _planner_needs(cmd, s)):
            # Killed before the planner could answer (a cap below torch's imports):
            # it would have refused; say what it needs, as a refusal does.
            run.status, run.note = REFUSED, f"refused (needs {needs})"
            run.extra["oom_before_plan"] = True
        return run
    if res.returncode != 0:
        m = _NEEDS.search(res.stderr)
        if m:
            run.status, run.note = REFUSED, f"refused (needs {m.group(1)})"
        else:
            run.status, run.note = FAILED, f"failed (exit {res.returncode})"
        run.extra["stderr"] = res.stderr[-2000:]
        return run
    summary = json.loads(res.stdout)["summary"]
    if s.bound and s.fresh_bound and summary.get("bound_tok_s"):
        _rerate(run, summary, fresh_bound(s.bound, emoe, Path(bound)))
    run.decode_tok_s = summary.get("decode_tok_s")
    run.prefill_tok_s = summary.get("prefill_tok_s")
    run.prompt_tokens = summary.get("prompt_tokens")
    run.new_tokens = summary.get("new_tokens")
    run.hit_rate = summary.get("hit_rate")
    run.expert_bytes = summary.get("bytes_read")
    run.tokens = (run.prompt_tokens or 0) + (run.new_tokens or 0)  # totals over the batch
    run.extra.update(
        {
            k: summary.get(k)
            for k in (
                "peak_rss",
                "floor",
                "expert_cache",
                "expert_slots",
                "o_direct",
                "bits_policy",
                "average_bits",
                "bound_tok_s",
                "bound_memory_bytes_per_step",
                "bound_flash_bytes_per_step",
            )
        }
    )
    run.extra["largest_expert"] = summary["plan"]["largest_expert"]
    run.status = OK
    return run
