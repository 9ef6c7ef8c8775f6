"""`edgemoe bench`: edgemoe against llama.cpp under memory caps.

Converts what it needs (cached by content), runs each system in a fresh
process inside a memory cgroup equal to the cap after evicting every file,
pairs the systems cap by cap with alternating order, and reports medians
over repeats: a table, a plot and a section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from edgemoe import memcap, trace
from edgemoe.bench import report
from edgemoe.bench.models import SHAPES, make_model
from edgemoe.bench.prepare import (
    CACHE,
    BenchInputError,
    find_llama_bench,
    prepare,
    to_emoe,
)
from edgemoe.bench.report import OK, Run
from edgemoe.bench.runners import (
    LLAMA_CPP,
    SYSTEMS,
    Settings,
    System,
    edgemoe_run_flags,
    prompts_of,
    run_edgemoe,
    run_llamacpp,
)
from edgemoe.units import Bytes

REPO = Path(__file__).resolve().parents[2]
CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
    "neon",
    "asimd",
)


def add_parser(sub) -> None:
    """Add `bench` to the `edgemoe` subcommands."""
    b = sub.add_parser(
        "bench",
        help="edgemoe vs llama.cpp under memory caps (table, plot, docs/BENCHMARKS.md)",
        description=__doc__,
    )
    b.add_argument(
        "model", nargs="?", help="a Hugging Face folder, a .gguf, or a .emoe (with --gguf)"
    )
    b.add_argument(
        "--make",
        choices=sorted(SHAPES),
        help="make this seeded random-weight bench model and bench it",
    )
    b.add_argument(
        "--caps",
        default="none,100,75,50,25",
        help="none, percents of the reference file, or sizes (default none,100,75,50,25)",
    )
    b.add_argument(
        "--baseline", default=LLAMA_CPP, choices=(LLAMA_CPP, "none"), help="(default llama.cpp)"
    )
    b.add_argument(
        "--systems",
        default="edgemoe-naive,edgemoe",
        help="edgemoe systems (default edgemoe-naive,edgemoe; naive runs where `edgemoe run` offers --engine)",
    )
    b.add_argument(
        "--bits",
        default="",
        help="D²MoE levers: bit policies (edgemoe run --bits-policy), comma-separated, each run as "
        "a system `edgemoe+SPEC` on a bit-nested .emoe of the same model (--lever-experts)",
    )
    b.add_argument(
        "--lever-experts",
        default="mwq:2,3,4",
        help="codec of routed experts for the --bits systems' .emoe (default mwq:2,3,4)",
    )
    b.add_argument("--lever-emoe", help="the --bits systems' .emoe as is (a .emoe MODEL needs it)")
    b.add_argument(
        "--batch", default="1", help="batch sizes, e.g. 1,8 (llama-bench runs batch 1 only)"
    )
    b.add_argument(
        "--repeats", type=int, default=3, help="runs of each system at each cap (default 3)"
    )
    b.add_argument(
        "--replay",
        metavar="EMOE",
        help="edgemoe systems route by this .emoe's recorded routing trace (`edgemoe run "
        "--replay-routing`; a model with as many experts and the same top-k): real routing "
        "on the bench model; llama.cpp routes by the model's own routers",
    )
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--timeout", type=float, default=1800, help="seconds per run (default 1800)")
    b.add_argument(
        "--gguf", help="the GGUF llama.cpp runs (default: made by llama.cpp's converter)"
    )
    b.add_argument(
        "--experts",
        default="int8",
        help="codec of routed experts in the .emoe made here (default int8)",
    )
    b.add_argument(
        "--dense",
        default="int8",
        help="codec of dense weights in the .emoe made here (default int8, as convert's and "
        "as the Q8_0 GGUF's)",
    )
    b.add_argument("--outtype", default="q8_0", help="llama.cpp converter --outtype (default q8_0)")
    b.add_argument("--llama-bench", help="llama-bench binary (default: PATH or the build cache)")
    b.add_argument("--llama-convert", help="llama.cpp's convert_hf_to_gguf.py")
    b.add_argument("--json", help="write every raw run here")
    b.add_argument(
        "--from-json",
        metavar="RUNS",
        help="run nothing: redo the table, plot and doc from a --json file of a bench with "
        "these same options",
    )
    b.add_argument("--plot", help="write the plot here (default with the doc: docs/bench-NAME.png)")
    b.add_argument(
        "--traces",
        help="after the measured runs, one more cold run of each edgemoe system at each cap "
        "with `--trace`, kept here as SYSTEM-CAP-bBATCH.json and summed up in the doc (default: "
        "the cache's bench/traces/NAME)",
    )
    b.add_argument("--no-traces", action="store_true", help="skip the traced runs")
    b.add_argument("--no-doc", action="store_true", help="do not write docs/BENCHMARKS.md")
    b.add_argument(
        "--doc",
        default=str(REPO / "docs" / "BENCHMARKS.md"),
        help="the BENCHMARKS.md whose section this bench replaces (default: the checkout's)",
    )
    b.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="evict only the model files, not the whole page cache",
    )
    b.add_argument(
        "--bound",
        metavar="PROFILE",
        help="a profile of this machine (`edgemoe profile`): each edgemoe run reports its "
        "decode bound for the bytes it moved, and the doc the share of it reached",
    )
    b.set_defaults(fn=cmd_bench)


def _validate(a) -> tuple[list, list[int], list[str]]:
    caps = report.parse_caps(a.caps)
    batches = report.parse_ints(a.batch, "--batch")
    if a.repeats < 1:
        raise ValueError(f"--repeats {a.repeats}: must be at least 1")
    if a.prompt_tokens < 1 or a.new_tokens < 2:
        raise ValueError("--prompt-tokens must be at least 1 and --new-tokens at least 2")
    if (a.model is None) == (a.make is None):
        raise BenchInputError("give a MODEL or --make NAME (one of them)")
    names = [s.strip() for s in a.systems.split(",") if s.strip()]
    for s in names:
        if s not in SYSTEMS or SYSTEMS[s].kind != "edgemoe":
            ours = ", ".join(k for k, v in SYSTEMS.items() if v.kind == "edgemoe")
            raise ValueError(f"--systems: no edgemoe system {s!r}; choose from {ours}")
    if not names:
        raise ValueError("--systems is empty")
    for spec in _bit_specs(a):
        if "," in spec or " " in spec:
            raise ValueError(f"--bits: {spec!r} is not one bit policy")
    return caps, batches, names


def _bit_specs(a) -> list[str]:
    return [b.strip() for b in a.bits.split(",") if b.strip()] if a.bits else []


def lever_systems(a) -> dict[str, System]:
    """One system per --bits policy, on the bit-nested .emoe."""
    return {
        f"edgemoe+{spec}": System(
            f"edgemoe+{spec}",
            "edgemoe",
            ("--bits-policy", spec),
            "--bits-policy",
            f"edgemoe, bit policy {spec} on {a.lever_experts} experts",
        )
        for spec in _bit_specs(a)
    }


def machine() -> str:
    """CPU model, cores, SIMD flags, memory, torch version."""
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
        platform.processor(),
    )
    flags = set(
        next(
            (
                ln.split(":", 1)[1].split()
                for ln in info.splitlines()
                if ln.startswith(("flags", "Features"))
            ),
            [],
        )
    )
    simd = [f for f in CPU_FLAGS if f in flags] or ["none of avx2/avx512"]
    mem = Bytes(
        int(
            next(
                ln.split()[1]
                for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")
            )
        )
        * 1024
    )
    return f"{model}, {os.cpu_count()} cores ({' '.join(simd)}), {mem.human()} RAM, torch {torch.__version__}"


def _git_head() -> str:
    """The edgemoe commit measured: $EDGEMOE_BENCH_COMMIT (for an exported tree) or HEAD."""
    if os.environ.get("EDGEMOE_BENCH_COMMIT"):
        return os.environ["EDGEMOE_BENCH_COMMIT"]
    p = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return p.stdout.strip() or "unknown"


def cmd_bench(a) -> int:
    caps, batches, wanted = _validate(a)
    if not a.from_json and (why := memcap.available()) is not None:
        raise OSError(f"edgemoe bench runs every system inside a memory cgroup, and here is {why}")
    baseline = None if a.baseline == "none" else LLAMA_CPP
    bench_bin = find_llama_bench(a.llama_bench) if baseline and not a.from_json else None
    help_text = edgemoe_run_flags()
    levers = lever_systems(a)
    known = {**SYSTEMS, **levers}
    wanted = wanted + list(levers)
    skipped = [s for s in wanted if known[s].needs and known[s].needs not in help_text]
    systems = ([baseline] if baseline else []) + [s for s in wanted if s not in skipped]
    for s in skipped:
        print(f"bench: skipping {s}: `edgemoe run` has no {known[s].needs} yet", file=sys.stderr)

    model = a.model or make_model(a.make, CACHE / "bench" / "models" / a.make)
    prep = prepare(
        model,
        baseline=baseline is not None,
        gguf=a.gguf,
        experts=a.experts,
        dense=a.dense,
        outtype=a.outtype,
        converter=a.llama_convert,
    )
    lever_emoe = None
    if levers:
        if a.lever_emoe:
            lever_emoe = Path(a.lever_emoe)
        elif Path(model).suffix == ".emoe":
            raise BenchInputError(
                "--bits with a .emoe MODEL: give the bit-nested one (--lever-emoe)"
            )
        else:
            lever_emoe = to_emoe(Path(model).expanduser(), a.lever_experts, a.dense)
    ref = prep.gguf or prep.emoe
    base = ref.stat().st_size
    settings = Settings(a.prompt_tokens, a.new_tokens, a.threads, a.timeout, not a.no_drop_caches)
    settings.bound = a.bound
    settings.replay = str(Path(a.replay).resolve()) if a.replay else None
    prompts = {b: prompts_of(prep.emoe, a.prompt_tokens, b) for b in batches}
    runs: list[Run] = []
    plan = report.schedule(systems, caps, batches, a.repeats)
    when = datetime.datetime.now(datetime.UTC)
    if a.from_json:
        record = json.loads(Path(a.from_json).read_text())
        runs = [Run(**r) for r in record["runs"]]
        systems, plan = record["systems"], []
        skipped = [s for s in wanted if s not in systems]
        stamp = record.get("date") or Path(a.from_json).stat().st_mtime
        a.commit = record.get("commit")  # the doc names the code that ran, not this one
        when = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    for i, (rep, cap, b, order) in enumerate(plan):
        limit = cap.bytes(base)
        for pos, name in enumerate(order):
            if name == LLAMA_CPP:
                run = run_llamacpp(bench_bin, prep.gguf, cap.label, limit, rep, b, settings)
            else:
                emoe = lever_emoe if name in levers else prep.emoe
                run = run_edgemoe(known[name], emoe, prompts[b], cap.label, limit, rep, settings)
            run.position = pos
            run.extra["loadavg"] = os.getloadavg()[0]  # the machine is shared: say how busy it was
            runs.append(run)
            if run.status == report.FAILED:
                print(
                    f"bench: {name} failed: {run.extra.get('stderr', '')[-600:]}", file=sys.stderr
                )
            rate = f"{run.decode_tok_s:.2f} tok/s" if run.decode_tok_s else run.note
            print(
                f"bench: [{i + 1}/{len(plan)}] cap {cap.label} batch {b} repeat {rep + 1}: {name} {rate}",
                file=sys.stderr,
                flush=True,
            )
            if a.json:
                _dump(a.json, prep, systems, caps, base, runs, when)
    traces = record.get("traces", {}) if a.from_json else {}
    for t in traces.values():  # summed up again by this code, where the file is still there
        if Path(t.get("file", "")).is_file():
            t.update(trace.summarize(t["file"]))
    if not (a.no_traces or a.from_json):
        traces = _traced_runs(a, prep, plan, known, levers, lever_emoe, prompts, base, settings)
    if a.json and traces:
        _dump(a.json, prep, systems, caps, base, runs, when, traces)
    lines = report.table(runs, systems, baseline, caps, batches)
    print("\n".join(lines))
    plot_path = a.plot or (
        None if a.no_doc else str(Path(a.doc).parent / f"bench-{_section(a, prep)}.png")
    )
    plot_note = None
    if plot_path:
        plot_note = report.plot(runs, systems, caps, base, plot_path)
        print(
            f"bench: {plot_note}" if plot_note else f"bench: plot -> {plot_path}", file=sys.stderr
        )
    if not a.no_doc:
        _write_doc(
            a, prep, systems, skipped, caps, base, runs, lines, plot_path, plot_note, when, traces
        )
    return 0


def _traced_runs(a, prep, plan, known, levers, lever_emoe, prompts, base, settings) -> dict:
    """One more cold, capped run of each edgemoe system at each cap and batch, traced (the
    same path as an untraced run: the decode chain is one span); "SYSTEM at CAP[, batch B]"
    -> its trace's file and trace.summarize's figures."""
    folder = Path(a.traces or CACHE / "bench" / "traces" / _section(a, prep)).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    seen = set()
    for _, cap, b, order in plan:
        for name in order:
            if name == LLAMA_CPP or (name, cap.label, b) in seen:
                continue
            seen.add((name, cap.label, b))
            emoe = lever_emoe if name in levers else prep.emoe
            safe = re.sub(r"[^A-Za-z0-9.=+-]", "_", f"{name}-{cap.label}-b{b}")
            path = folder / f"{safe}.json"
            run = run_edgemoe(
                known[name], emoe, prompts[b], cap.label, cap.bytes(base), 0, settings, path
            )
            label = f"{name} at {cap.label}" + (f", batch {b}" if b != 1 else "")
            if run.status != OK or not path.is_file():
                print(f"bench: traced run of {label}: {run.note or run.status}", file=sys.stderr)
                continue
            out[label] = {"file": str(path), **trace.summarize(path)}
            print(f"bench: trace of {label} -> {path}", file=sys.stderr, flush=True)
    return out


def _dump(path, prep, systems, caps, base, runs, when, traces=None) -> None:
    record = {
        "date": when.timestamp(),
        "commit": _git_head(),
        "model": prep.name,
        "emoe": str(prep.emoe),
        "gguf": str(prep.gguf) if prep.gguf else None,
        "cap_base": base,
        "caps": {c.label: c.bytes(base) for c in caps},
        "systems": systems,
        "runs": [r.to_dict() for r in runs],
    }
    if traces:
        record["traces"] = traces
    Path(path).write_text(json.dumps(record, indent=1))


def _section_writer(doc: Path):
    path = REPO / "tools" / "bench_doc.py"
    if not path.is_file():
        raise OSError(f"{path} is missing: write the doc from a source checkout, or pass --no-doc")
    spec = importlib.util.spec_from_file_location("bench_doc", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.BENCH = doc
    return mod.write_section


def _llama_source(a) -> str:
    """Where llama-bench came from: the llama-cpp-python sdist folder it was built in."""
    path = str(find_llama_bench(a.llama_bench)) if a.baseline != "none" else ""
    m = re.search(r"llama-bench-([0-9.]+)", path)
    return f"llama-bench built from the llama-cpp-python {m.group(1)} sdist" if m else path


def _measured_args(args: list[str]) -> list[str]:
    """The command line less the output paths (--json, --plot, --doc, --traces), which change
    nothing."""
    out, skip = [], False
    paths = ("--json", "--plot", "--doc", "--from-json", "--traces")
    for arg in args:
        if skip:
            skip = False
        elif arg in paths:
            skip = True
        elif not arg.startswith(tuple(f"{p}=" for p in paths)):
            out.append(arg)
    return out


def _rates_range(runs) -> str:
    """The re-measured bound rates of the runs, as ranges."""
    got = [r.extra["bound_rates"] for r in runs if r.extra.get("bound_rates")]
    got += [r.extra["bound_rates_after"] for r in runs if r.extra.get("bound_rates_after")]
    parts = []
    for key, label in (
        ("memory_bandwidth", "memory"),
        (
            "flash_seq_read",
            "flash, reads of an expert's span at random places"
            if any("flash_seq_32m" in g for g in got)
            else "flash sequential (32 MiB reads)",
        ),
        ("flash_rand_read", "flash random"),
    ):
        v = [g[key] / 1e9 for g in got if key in g]
        parts.append(f"{label} {min(v):.2f}-{max(v):.2f} GB/s, median {statistics.median(v):.2f}")
    return "; ".join(parts)


def _section(a, prep) -> str:
    """The doc section (and plot) a bench writes: a replayed one is a section of its own."""
    return prep.name + ("-replay" if a.replay else "")


def _idle_text(idle: dict | None) -> str:
    """', disk idle 29 ms (chain 14, moe 7.9, ...)' from trace.summarize's figures."""
    if not idle:
        return ""
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(idle.items(), key=lambda kv: -kv[1]) if v)
    return f", disk idle {sum(idle.values()):.1f} ms ({parts})"


def _bound_shares(runs) -> dict:
    """(system, cap) -> the median of decode tok/s over its bound, where runs report one."""
    got: dict = {}
    for r in runs:
        b = r.extra.get("bound_tok_s")
        if r.status == OK and b and r.decode_tok_s and r.batch == 1:
            got.setdefault((r.system, r.cap), []).append(r.decode_tok_s / b)
    return {k: statistics.median(v) for k, v in got.items()}


def _write_doc(
    a, prep, systems, skipped, caps, base, runs, lines, plot_path, plot_note, when, traces=None
):
    now = when.strftime("%Y-%m-%d %H:%M UTC")
    argv = " ".join(shlex.quote(x) for x in ["edgemoe", "bench", *_measured_args(sys.argv[2:])])
    llama = next(
        (r.extra for r in runs if r.system == LLAMA_CPP and r.extra.get("build_commit")), {}
    )
    ref = "the GGUF llama.cpp runs" if prep.gguf else "the .emoe"
    emoe_size = Bytes(prep.emoe.stat().st_size)
    gguf_size = (
        f"GGUF ({a.outtype}) {Bytes(prep.gguf.stat().st_size).human()}, " if prep.gguf else ""
    )
    codecs = "" if str(a.model).endswith(".emoe") else f" ({a.experts} experts, {a.dense} dense)"
    out = [
        f"### edgemoe bench: {_section(a, prep)} under memory caps",
        "",
        f"`{argv}` on {machine()}, edgemoe {getattr(a, 'commit', None) or _git_head()}"
        + (
            ", llama.cpp"
            + (f" {llama['build_commit']}" if llama.get("build_commit") != "unknown" else "")
            + f" ({_llama_source(a)}, GGML_NATIVE)"
            if llama
            else ""
        )
        + f", {now}.",
        f"Model: {prep.about}; {gguf_size}.emoe{codecs} {emoe_size.human()}."
        + (
            f" Routing: the edgemoe systems replay the routing trace recorded in "
            f"`{Path(a.replay).name}` (`--replay-routing`: each slot one of its segments, each "
            "token the experts recorded at its position, MoE layer i its layer i mod L; the "
            "router's probabilities there, renormalised, as weights), so their reads and hits "
            "follow a trained model's real routing; llama.cpp routes by the bench model's own "
            "random routers, and the generated text means nothing (labelled replay)."
            if a.replay
            else ""
        )
        + (
            f" The edgemoe+POLICY systems run `--bits-policy POLICY` on the same model converted "
            f"with `--experts {a.lever_experts}`."
            if a.bits
            else ""
        ),
        f"Caps are percents of {ref} ({Bytes(base).human()}). Each run is a fresh process inside a memory "
        "cgroup whose limit is the cap (page cache included; `none`: no limit, peak still measured), "
        "after the model files were evicted from the page cache"
        + (" and the whole page cache dropped" if not a.no_drop_caches else "")
        + f"; edgemoe gets `--mem` equal to the cap. Prompt {a.prompt_tokens} tokens, {a.new_tokens} new, greedy, "
        f"{a.threads} threads. "
        + (
            f"llama-bench: `-p {a.prompt_tokens} -n {a.new_tokens} -r 1 -lm mmap --no-warmup`: its "
            "prefill (pp) reads the weights cold, as edgemoe's does, and its decode (tg, depth 0) "
            "follows in the same process; edgemoe decodes after its prompt. "
            if prep.gguf
            else ""
        )
        + f"Medians over {a.repeats} repeat(s); within a repeat the systems run back to back at each cap, "
        "their order alternating; the ratio is the median of the paired ratios. Disk read / token: the "
        "process tree's block reads over every token it forwarded (warm-ups included; edgemoe's include "
        "torch's libraries when the page cache was dropped). Peak: the cgroup's, page cache included, "
        "so a run that streams the model fills it to the cap (edgemoe's own peak RSS is in the JSON).",
        "",
        *lines,
    ]
    if skipped:
        out += [
            "",
            f"Not run: {', '.join(skipped)} (`edgemoe run` lacks the flag it needs).",
        ]
    shares = _bound_shares(runs)
    if shares:
        out += [
            "",
            f"Decode against its bound (`edgemoe run --bound`: the bytes each run moved, from "
            "memory at the memory bandwidth, from flash at the read rate for an expert's size, "
            f"on the profile {a.bound} of this machine by `edgemoe profile`"
            + (
                " with its memory and flash rates measured again just before and just after "
                "each run, the bound on their means (the profiler's memory copy and O_DIRECT "
                "reads of the model file: "
                + _rates_range(runs)
                + "), since they move by 20-30% within minutes here"
                if any(r.extra.get("bound_rates") for r in runs)
                else ""
            )
            + "; medians): "
            + "; ".join(f"{name} at {cap}: {share:.0%}" for (name, cap), share in shares.items())
            + ".",
        ]
    if any(t.get("decode_steps") for t in (traces or {}).values()):
        out += [
            "",
            "Where decode time goes, from one more cold run of each edgemoe system and cap with "
            "`--trace` (the same path as the table's runs; its trace is kept "
            f"in {Path(next(iter(traces.values()))['file']).parent}): per decode step, its time, "
            "the share of it with an expert read in flight (disk busy), the stalls on reads, "
            "the reads begun, and the disk's idle time by what the computing thread did "
            "meanwhile (trace.summarize): "
            + "; ".join(
                f"{label} {t['ms_per_step']:.1f} ms, disk busy {t['disk_busy']:.0%}, stalls "
                f"{t['stall_ms_per_step']:.1f} ms, {t['reads_per_step']:.1f} reads"
                + _idle_text(t.get("disk_idle_ms_per_step"))
                for label, t in traces.items()
                if t.get("decode_steps")
            )
            + ".",
        ]
    repack = [r.extra["repack_off"] for r in runs if r.extra.get("repack_off")]
    if repack:
        n = sum(r.system == LLAMA_CPP and r.batch == 1 for r in runs)
        out += ["", f"llama.cpp on this machine: {repack[0]}, in {len(repack)} of its {n} runs."]
    planned = len(systems) * len(caps) * len({r.batch for r in runs} or {1}) * a.repeats
    if len(runs) < planned:
        out += ["", f"Stopped early: {len(runs)} of the {planned} planned runs were made."]
    loads = sorted(r.extra["loadavg"] for r in runs if "loadavg" in r.extra)
    if loads:
        out += [
            "",
            f"The machine is shared: 1-minute load average at the start of each run {loads[0]:.1f} to "
            f"{loads[-1]:.1f}, median {loads[len(loads) // 2]:.1f}, on {os.cpu_count()} cores "
            "(the bench's previous run counts too).",
        ]
    if plot_path and not plot_note:
        rel = Path(plot_path).resolve()
        try:
            rel = rel.relative_to(Path(a.doc).resolve().parent)
        except ValueError:
            pass
        out += ["", f"![decode tok/s, disk read per token and hit rate against the cap]({rel})"]
    elif plot_note:
        out += ["", f"No plot: {plot_note}."]
    _section_writer(Path(a.doc))(f"bench-{_section(a, prep)}", out)
