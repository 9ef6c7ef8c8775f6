"""The `edgemoe` command line.

Every subcommand turns a bad input into one line on stderr that names the
problem and the fix, and exits with status 2; `--debug` (anywhere on the
line) shows the traceback. Argument types and the error wording shared by
every subcommand live in edgemoe/cli_args.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from edgemoe.cli_args import (
    EXIT_BAD_INPUT,
    SAMPLING_FLAGS,
    Parser,
    count,
    flag_message,
    sampling_flags,
    size,
    utf8_args,
    utf8_text,
)
from edgemoe.units import Bytes

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `... | head -1`


def _cmd_convert(args) -> int:
    from formats.convert import ConvertOptions, convert, open_source
    from formats.errors import EmoeError

    out = (
        Path(args.output)
        if args.output
        else Path(str(Path(args.source).resolve()).rstrip("/") + ".emoe")
    )
    if out.exists() and not args.force:
        raise EmoeError(
            f"{out} already exists", "pass --force to replace it, or choose another output path"
        )
    opts = ConvertOptions(
        dense=args.dense,
        experts=args.experts,
        compress=not args.no_compress,
        progress=not args.quiet,
        jobs=args.jobs,
    )
    with open_source(args.source) as src:
        for warning in filter(None, [getattr(src, "tokenizer_warning", None)]):
            print(f"edgemoe: warning: {warning}", file=sys.stderr)
        path = convert(src, out, opts)
    print(f"wrote {path} ({Bytes(path.stat().st_size)})")
    if args.calibrate:
        _calibrate(path, args.calibrate)
    return 0


def _cmd_inspect(args) -> int:
    from formats.reader import EmoeReader
    from formats.summary import summarize

    with EmoeReader(args.file) as r:
        s = summarize(r)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['path']}: .emoe {s['version']}, {s['family']} (from {s['source']}, {s['writer']})")
    print("config: " + ", ".join(f"{k}={v}" for k, v in s["config"].items()))
    print(
        f"file {Bytes(s['file_bytes'])}: header {Bytes(s['header_bytes'])}, {s['chunks']} chunks "
        f"({s['zstd_chunks']} zstd, {Bytes(s['raw_bytes'])} raw -> {Bytes(s['stored_bytes'])} stored)"
    )
    print(
        f"{s['tensors']} tensors, resident (dense) {Bytes(s['dense_bytes'])}, {s['experts']} routed experts"
    )
    rs = s["routing_stats"]
    if isinstance(rs, dict) and isinstance(rs.get("shape"), list) and len(rs["shape"]) == 4:
        print(
            f"routing statistics: {rs['shape'][0]} x {rs['shape'][1]} tokens of {rs.get('source')}"
        )
    else:
        print(
            "routing statistics: none (`edgemoe calibrate` stores them; `edgemoe plan` uses them)"
        )
    print(
        "\ncodec               tensors      params  bits/level         bytes per level (cumulative)"
    )
    for name, row in s["codecs"].items():
        cum = [sum(row["level_bytes"][: k + 1]) for k in range(len(row["level_bytes"]))]
        bits = "/".join(map(str, row["bits"]))
        print(
            f"{name:<19} {row['tensors']:>7} {row['params']:>11}  {bits:<17}  "
            + " | ".join(str(Bytes(b)) for b in cum)
        )
    if s["expert_layers"]:
        print("\nlayer  experts  levels  one expert at each level      stored (all experts)")
        for row in s["expert_layers"]:
            per = " | ".join(str(Bytes(b)) for b in row["level_bytes"])
            print(
                f"{row['layer']:>5}  {row['experts']:>7}  {row['levels']:>6}  {per:<28}  {Bytes(row['stored_bytes'])}"
            )
    if s["blobs"]:
        print(
            "\nblobs: "
            + ", ".join(f"{k} ({Bytes(v)})" for k, v in s["blobs"].items())
            + ("; chat template present" if s["chat_template"] else "")
        )
    return 0


def _cmd_verify(args) -> int:
    from formats.reader import EmoeReader

    bad = []
    with EmoeReader(args.file) as r:
        total = sum(c.length for c in r.chunks)
        bar = None
        if not args.quiet:
            from tqdm import tqdm

            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="verify",
                file=sys.stderr,
                disable=None,
            )
        for chunk, err in r.verify():
            if bar:
                bar.update(chunk.length)
            if err is not None:
                bad.append(err)
                if not args.all:
                    break
        if bar:
            bar.close()
        if not bad:
            bad = _model_problems(r)
        if bad:
            for e in bad:
                print(f"edgemoe: error: {e}", file=sys.stderr)
            return 1
        print(
            f"{r.path}: OK, {len(r.chunks)} chunks, {Bytes(total)} checked; "
            "config, tensors, tokenizer and chat template consistent"
        )
    return 0


def _model_problems(r) -> list:
    """What the runtime would refuse in a file whose chunks are sound: the model check,
    the tokenizer, the chat template (compiled, and rendered once in the sandbox)."""
    from formats import constants as C
    from formats.chat_template import compile_template, render
    from formats.errors import EmoeError
    from formats.validate import check_file, check_tokenizer

    problems = []
    try:
        d = check_file(r)
    except EmoeError as e:
        return [e]
    try:
        if C.BLOB_TOKENIZER in r.blobs:
            check_tokenizer(r.read_chunk(r.blobs[C.BLOB_TOKENIZER]), d.V, str(r.path))
    except EmoeError as e:
        problems.append(e)
    try:
        if r.chat_template is not None:
            t = compile_template(r.chat_template, "the file's chat template")
            render(
                t, {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True}
            )
    except EmoeError as e:
        problems.append(e)
    return problems


def _cmd_run(args) -> int:
    from edgemoe.engine import RunStats, load
    from edgemoe.sampling import Sampling

    given = {k: getattr(args, k) for k in SAMPLING_FLAGS}
    sampling = Sampling(**{k: v for k, v in given.items() if v is not None})
    prompts = args.prompt or []
    batch = args.batch or max(1, len(prompts))
    m = load(
        args.model,
        args.mem,
        ctx=args.ctx,
        batch=batch,
        dtype=args.dtype,
        level=args.level,
        threads=args.threads,
        device=args.device,
        bound_device=args.bound,
        expert_cache=args.expert_cache,
        engine=args.engine,
        **({"policy": args.cache_policy} if args.cache_policy else {}),
        prefetch=args.prefetch,
        bits=args.bits_policy,
        replay=args.replay_routing,
    )
    kw = dict(
        max_tokens=args.max_tokens, sampling=sampling, stop=tuple(args.stop or ()), chat=args.chat
    )
    if args.trace:
        from edgemoe import trace

        tracer = trace.Tracer()
        trace.install(tracer)
    try:
        if not prompts:
            return _interactive(m, kw, args)
        st = RunStats()
        if args.json:
            texts = m.generate(prompts, **kw, stats=st)
            print(
                json.dumps(
                    {"prompts": prompts, "outputs": texts, "summary": m.summary(st)}, indent=1
                )
            )
            return 0
        if len(prompts) == 1:
            if not args.quiet:
                print(prompts[0], end="", flush=True)
            for piece in m.stream(prompts[0], **kw, stats=st):
                print(piece, end="", flush=True)
            print()
        else:
            for p, text in zip(prompts, m.generate(prompts, **kw, stats=st)):
                print(f"--- {p}\n{text}")
        print(m.summary_line(st), file=sys.stderr)
        return 0
    finally:
        if args.trace:
            trace.install(None)
            print(f"edgemoe: trace written to {tracer.write(args.trace)}", file=sys.stderr)
        m.close()


def _interactive(m, kw, args) -> int:
    """A prompt loop on stdin; with --chat the conversation is kept."""
    from edgemoe.engine import RunStats

    history: list[dict] = []
    if hasattr(
        sys.stdin, "reconfigure"
    ):  # bytes that are not UTF-8 arrive escaped, not as an error
        sys.stdin.reconfigure(errors="surrogateescape")
    print("edgemoe: type a prompt, Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = utf8_text(input("> " if sys.stdin.isatty() else ""), "the input line")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        st = RunStats()
        if args.chat:
            history.append({"role": "user", "content": line})
            reply = "".join(_echo(m.stream(list(history), **{**kw, "chat": False}, stats=st)))
            history.append({"role": "assistant", "content": reply})
        else:
            "".join(_echo(m.stream(line, **kw, stats=st)))
        print()
        print(m.summary_line(st), file=sys.stderr)


def _echo(pieces):
    for piece in pieces:
        print(piece, end="", flush=True)
        yield piece


def _cmd_profile(args) -> int:
    from devices.profile import parse_profile, user_profile_dir
    from devices.profiler import profile, profile_text
    from edgemoe.kernel_timing import expert_times

    out = Path(args.out) if args.out else user_profile_dir() / f"{args.name}.profile"
    if out.exists() and not args.force:
        raise ValueError(
            f"{out} already exists; pass --force to replace it, or another --name / --out"
        )
    result = profile(
        Path(args.scratch),
        Bytes.parse(args.scratch_size),
        args.model,
        progress=not args.quiet,
        expert_timer=expert_times,
    )
    text = profile_text(result, args.name)
    parse_profile(text, str(out))  # what we write must read back
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text, end="")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_plan(args) -> int:
    from devices.profile import load_profile
    from edgemoe.planning import make_plan

    dev = load_profile(args.device)
    rep = make_plan(args.model, dev, args.mem, ctx=args.ctx, batch=args.batch)
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    p = rep["plan"]
    print(
        f"{rep['model']} on {rep['device']}: budget {Bytes(p['budget'])}, ctx {rep['ctx']}, batch {rep['batch']}"
    )
    for key in ("floor", "resident", "kv_cache", "io_buffers", "workspace", "expert_cache"):
        print(f"  {key.replace('_', ' '):<13} {Bytes(p[key])}")
    slots = ", ".join(f"level {k}: {v}" for k, v in rep["slots_per_level"].items())
    print(f"  expert slots  {slots} (of {Bytes(p['all_experts'])} for all experts)")
    rc = rep["reachable"]
    more = "and the top levels of" if rc["base"] == rc["experts"] else "or the top level of"
    print(
        f"  nested        the base level of {rc['base']} of {rc['experts']} experts, "
        f"{more} {rc['top']}"
    )
    per = f"per step of {rep['batch']}" if rep["batch"] > 1 else "per token"
    print(
        f"decode bound {rep['bound_tok_s']:.1f} tok/s: {Bytes(int(rep['memory_bytes_per_token']))} from memory "
        f"and {Bytes(int(rep['flash_bytes_per_token']))} from flash {per}, hit rate {100 * rep['hit_rate']:.0f}%"
    )
    rt = rep["routing"]
    if rt == "uniform":
        print(
            "  misses assume uniform routing: the file has no routing statistics "
            "(store them with `edgemoe calibrate MODEL --text FILE`)"
        )
        return 0
    print(
        f"  misses: the fewest any cache policy could have on the file's routing trace "
        f"({rt['segments']} sequences, {rt['decode_tokens']} decode steps of {rt['source']}): "
        f"{rt['fewest_misses_per_step']:.1f} of {rt['uses_per_step']:.1f} expert uses {per}"
    )
    print(
        f"expected {rep['expected_tok_s']:.1f} tok/s with the runtime's cache ({rep['policy']}): "
        f"{rt['misses_per_step']:.1f} misses {per}, hit rate {100 * rep['expected_hit_rate']:.0f}%"
    )
    return 0


def _cmd_calibrate(args) -> int:
    if args.bits or args.bit_router:
        return _calibrate_bits(args)
    _calibrate(
        args.model, args.text, args.segments, args.tokens, args.mem, args.dtype, not args.quiet
    )
    return 0


def _calibrate_bits(args) -> int:
    """--bits: each expert's level under --tolerance; --bit-router: the trained bit router."""
    import math

    from edgemoe.calibrate import calibrate_bits, train_bit_router

    def progress(stage: str, done: int, total: int) -> None:
        if not args.quiet:
            print(f"\r{stage} {done}/{total}", end="", file=sys.stderr, flush=True)

    kw = dict(segments=args.segments, tokens=args.tokens, progress=progress)
    if args.bits:
        table, i = calibrate_bits(args.model, args.text, tolerance=args.tolerance, **kw)
        counts = {}
        for row in table.values():
            for lv in row:
                counts[lv] = counts.get(lv, 0) + 1
        print(
            f"\nstored each expert's level in {args.model} (calibrated): experts per level "
            f"{dict(sorted(counts.items()))}; {i['average_bits']:.2f} bits per expert weight "
            f"(top {i['bits_top']:.2f}), perplexity {math.exp(i['loss']):.2f} vs "
            f"{math.exp(i['loss_top']):.2f} at the top level, tolerance "
            f"{100 * args.tolerance:g}%, {i['passes']} passes in {i['seconds']:.0f} s"
        )
    if args.bit_router:
        if args.bit_lambda is not None:
            kw["lam"] = args.bit_lambda
        if args.bit_steps is not None:
            kw["steps"] = args.bit_steps
        i = train_bit_router(args.model, args.text, **kw)
        print(
            f"\nstored the bit router in {args.model} (trained, lambda {i['lambda']:g}): "
            f"{i['average_bits']:.2f} bits per expert weight (top {i['bits_top']:.2f}), "
            f"perplexity {math.exp(i['loss']):.2f} vs {math.exp(i['loss_top']):.2f} at the top "
            f"level, {i['steps']} steps in {i['seconds']:.0f} s"
        )
    return 0


def _calibrate(model, text, segments=8, tokens=256, mem=None, dtype="auto", progress=True) -> None:
    import numpy as np
    import psutil

    from edgemoe.calibrate import calibrate
    from edgemoe.routing import locality
    from formats.reader import EmoeReader

    mem = mem or Bytes(int(psutil.virtual_memory().available * 0.8))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=segments, desc="calibrate", unit="segment", file=sys.stderr, disable=None)
    try:
        t = calibrate(
            model,
            text,
            segments=segments,
            tokens=tokens,
            mem=mem,
            dtype=dtype,
            progress=bar and (lambda done: bar.update(done - bar.n)),
        )
    finally:
        if bar is not None:
            bar.close()
    s, n, _, _ = t.ids.shape
    with EmoeReader(model) as r:
        experts = len(r.experts) // len(t.layers)
    busiest = np.sort(t.counts(experts), axis=1)[:, ::-1]  # [L, E] descending
    top = busiest[:, : max(1, experts // 4)].sum(axis=1) / busiest.sum(axis=1)
    print(
        f"stored the routing of {s} x {n} tokens in {model}: the busiest quarter of a layer's "
        f"experts takes {100 * top.min():.0f}-{100 * top.max():.0f}% of its tokens; "
        f"{100 * locality(t):.0f}% of a token's experts were the previous token's too"
    )


def _cmd_devices(args) -> int:
    from devices.profile import known_devices, load_profile

    print(
        f"{'device':<26} {'memory':>9} {'usable':>9} {'mem bw/s':>9} {'seq read/s':>10} {'rand read/s':>11} {'x slower':>8}"
    )
    for name in known_devices():
        p = load_profile(name)
        print(
            f"{name:<26} {p.memory.human():>9} {p.usable_memory.human():>9} {p.memory_bandwidth.human():>9} "
            f"{p.flash_seq_read.human():>10} {p.flash_rand_read.human():>11} {p.compute_factor:>8.2f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from edgemoe import __version__

    # --debug on every subparser too, so it works before or after the subcommand; SUPPRESS
    # keeps a subparser from resetting a --debug given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    p = Parser(prog="edgemoe", description="Run MoE LLMs from flash inside a memory budget.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"edgemoe {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    r = command("run", help="generate text from a .emoe inside a memory budget")
    r.add_argument("model", nargs="?", help="the .emoe (default: the bundled demo model)")
    r.add_argument(
        "--mem",
        type=size,
        help="memory budget for the whole process, e.g. 4GB, 512MiB, 0.5G (default: unlimited)",
    )
    r.add_argument(
        "-p", "--prompt", action="append", help="a prompt; repeat for a batch; none: interactive"
    )
    r.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    r.add_argument(
        "-n", "--max-tokens", type=count(1), default=64, help="new tokens per prompt (default 64)"
    )
    sampling_flags(r)
    r.add_argument("--stop", action="append", help="stop at this string; repeatable")
    r.add_argument(
        "--ctx", type=count(1), help="longest context to plan for (default: min(model, 2048))"
    )
    r.add_argument(
        "--batch",
        type=count(1, 4096),
        help="largest batch to plan for (default: the number of prompts)",
    )
    r.add_argument(
        "--dtype", default="auto", help="auto (f32 for f32 files, else bf16), f32 or bf16"
    )
    r.add_argument(
        "--level", type=count(1, 64), help="expert precision level (default: the highest stored)"
    )
    r.add_argument(
        "--bits-policy",
        metavar="SPEC",
        help="level of each (token, expert): fixed:L, gate (the gate weight decides; "
        "gate:q=0.5, higher q fewer bits), ... (edgemoe/bits.py)",
    )
    r.add_argument("--threads", type=count(1, 256), default=2, help="I/O threads (default 2)")
    r.add_argument(
        "--device",
        help="emulate a device profile: its memory as the budget, its flash and compute speed",
    )
    r.add_argument(
        "--bound",
        metavar="PROFILE",
        help="report the decode bound for the bytes this run moved on this device profile "
        "(e.g. this machine's, from `edgemoe profile`) without emulating it",
    )
    r.add_argument(
        "--expert-cache",
        metavar="SIZE",
        help="size the expert cache (e.g. 3MiB, or 33%% of all experts) instead of giving it "
        "all the room --mem leaves: shows paging on any machine",
    )
    r.add_argument(
        "--engine",
        choices=("fast", "naive"),
        default="fast",
        help="naive: the engine before the fast path (LRU, no prefetch, copies, CRC on every "
        "read), kept for comparison (default fast)",
    )
    r.add_argument(
        "--cache-policy",
        choices=("lfu", "lru", "d2", "layer"),
        help="expert eviction (default lfu; d2: lfu, but cut high levels of the previous "
        "layers' experts before evicting any; layer: EdgeMoE's uses over layer distance)",
    )
    r.add_argument(
        "--prefetch",
        nargs="?",
        const="idle",
        default="off",
        choices=("off", "idle", "eager"),
        help="predict the next layer's experts with its router (default off). idle (the flag "
        "alone): read the likeliest uncached one into room of its own while the disk would "
        "idle, drop it if unused; eager: read every predicted one into the cache at once",
    )
    r.add_argument(
        "--replay-routing",
        metavar="EMOE",
        help="route by this .emoe's recorded routing trace instead of the model's routers (a "
        "model with as many experts and the same top-k): real routing on a bench model; the "
        "text is meaningless",
    )
    r.add_argument(
        "--trace",
        metavar="FILE",
        help="write a Chrome/Perfetto trace: compute, reads per thread, stalls, prefetches",
    )
    r.add_argument(
        "--json", action="store_true", help="print one JSON record: outputs and the run summary"
    )
    r.add_argument("-q", "--quiet", action="store_true", help="do not echo the prompt")
    r.set_defaults(fn=_cmd_run)

    c = command("convert", help="convert a Hugging Face folder or a GGUF file to .emoe")
    c.add_argument("source", help="model folder (config.json + *.safetensors) or a .gguf file")
    c.add_argument("output", nargs="?", help="the .emoe to write (default: SOURCE.emoe)")
    c.add_argument(
        "--dense",
        default="int8",
        help="codec for non-expert weights: f32, f16, bf16, int8, int4 (default int8: within "
        "0.2%% perplexity of f32 on the trained demo)",
    )
    c.add_argument(
        "--experts",
        default="mwq:2,3,4",
        help="codec for routed experts: NAME[:BITS,...][@GROUP], e.g. mwq:2,3,4 (default), "
        "mwq:5,6,7,8, bitplane:2,4,8, int4@128, int8, bf16, f32",
    )
    c.add_argument("--no-compress", action="store_true", help="never zstd chunks")
    c.add_argument(
        "--jobs",
        type=count(1, 256),
        default=1,
        help="processes encoding experts (default 1: the least memory; each holds a few "
        "experts as float32)",
    )
    c.add_argument(
        "--calibrate",
        nargs="+",
        metavar="TEXT",
        help="then store routing statistics from these text files (as `edgemoe calibrate`)",
    )
    c.add_argument("--force", action="store_true", help="replace an existing output file")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=_cmd_convert)

    pr = command("profile", help="measure this machine and write a device profile")
    pr.add_argument("--name", default="measured", help="profile name (default: measured)")
    pr.add_argument(
        "--out",
        help="file to write (default: NAME.profile in $XDG_CONFIG_HOME/edgemoe/profiles, "
        "~/.config/edgemoe/profiles, where --device NAME finds it)",
    )
    pr.add_argument(
        "--scratch", default=tempfile.gettempdir(), help="folder for the read test's scratch file"
    )
    pr.add_argument(
        "--scratch-size",
        type=size,
        default=Bytes.parse("256MiB"),
        help="size of the scratch file (default 256MiB)",
    )
    pr.add_argument(
        "--model", help="time the expert kernels of this .emoe instead of a default set"
    )
    pr.add_argument("--force", action="store_true", help="replace an existing profile")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(fn=_cmd_profile)

    pl = command("plan", help="what fits on a device and the decode-speed bound there")
    pl.add_argument("model", nargs="?", help="the .emoe (default: the bundled demo model)")
    pl.add_argument(
        "--device",
        required=True,
        help="a device profile name (`edgemoe devices`) or a .profile path",
    )
    pl.add_argument("--mem", type=size, help="budget (default: the device's usable memory)")
    pl.add_argument("--ctx", type=count(1), default=2048)
    pl.add_argument("--batch", type=count(1, 4096), default=1)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=_cmd_plan)

    cb = command(
        "calibrate", help="record which experts the model routes text to, and store it in the file"
    )
    cb.add_argument("model", help="the .emoe (rewritten in place, atomically)")
    cb.add_argument(
        "--text", nargs="+", required=True, help="text files (plain or .gz) to run the model on"
    )
    cb.add_argument(
        "--segments", type=count(1, 4096), default=8, help="sequences to record (default 8)"
    )
    cb.add_argument(
        "--tokens", type=count(2), default=256, help="tokens per sequence (default 256)"
    )
    cb.add_argument("--mem", type=size, help="memory budget (default: 80%% of available memory)")
    cb.add_argument("--dtype", default="auto", help="auto, f32 or bf16")
    cb.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    from edgemoe.cli_args import number  # the bit flags' defaults live in edgemoe/bitfit.py

    cb.add_argument(
        "--bits",
        action="store_true",
        help="instead of routing, store each expert's level: the lowest that keeps perplexity "
        "on the text within --tolerance of the top level's (EdgeMoE; `--bits-policy calibrated`)",
    )
    cb.add_argument(
        "--tolerance",
        type=number(0, 10, rule="a share from 0 to 10 (0.02 is 2%)"),
        default=0.02,
        help="with --bits: perplexity allowed above the top level's, as a share (default 0.02)",
    )
    cb.add_argument(
        "--bit-router",
        action="store_true",
        help="instead of routing, train and store a bit router: a level per token and expert "
        "from the hidden state (D²MoE; `--bits-policy trained`)",
    )
    cb.add_argument(
        "--bit-lambda",
        type=number(0, rule="a number of 0 or more"),
        help="with --bit-router: loss per bit per weight; higher saves more bits (default 0.02)",
    )
    cb.add_argument(
        "--bit-steps",
        type=count(1, 100000),
        help="with --bit-router: training steps (default 150)",
    )
    cb.set_defaults(fn=_cmd_calibrate)

    dv = command("devices", help="list the device profiles: the user's and the shipped ones")
    dv.set_defaults(fn=_cmd_devices)

    i = command("inspect", help="show a .emoe file's config, tensors, codecs and expert table")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print a JSON record")
    i.set_defaults(fn=_cmd_inspect)

    v = command(
        "verify",
        help="check every chunk's checksum, then the model (config, tensors, tokenizer, chat "
        "template); exit 1 naming the first problem",
    )
    v.add_argument("file")
    v.add_argument("--all", action="store_true", help="list every bad chunk, not just the first")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    v.set_defaults(fn=_cmd_verify)
    from edgemoe.serve.cli import add_parser  # `edgemoe serve` (issue 17)

    add_parser(sub)
    from edgemoe.bench.cli import add_parser as add_bench  # `edgemoe bench` (issue 14)

    add_bench(sub)
    from cluster.cli import add_parser as add_cluster  # `edgemoe cluster` (issue 16)

    add_cluster(sub)
    from edgemoe.eval import add_parser as add_eval  # `edgemoe eval` (issue 15)

    add_eval(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # never a traceback for a character the terminal lacks
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    # --debug anywhere before a `--`, for every subcommand (those added by hooks too)
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for i, a in enumerate(argv) if i >= end or a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
    except BrokenPipeError:  # --help or --version into `head`
        return _broken_pipe()
    from formats.errors import EmoeError

    try:
        utf8_args(args)
        return args.fn(args)
    except BrokenPipeError:  # the reader went away (`edgemoe inspect FILE | head -1`): stop quietly
        return _broken_pipe()
    except (EmoeError, ValueError, OSError) as e:
        if debug:
            raise
        print(f"edgemoe: error: {flag_message(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("edgemoe: interrupted", file=sys.stderr)
        return 130


def _broken_pipe() -> int:
    """Point stdout at /dev/null, so the interpreter's last flush cannot fail and print."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):  # a stdout without a descriptor (in-process callers)
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
