"""Compare the bit policies (gate, calibrated, trained) on the demo model: held-out perplexity and
average bits per expert weight, against INT8 and bf16 experts converted from the same checkpoint.

    python tools/bit_policies.py --hf /work/demo-train/hf --work /tmp/bit-policies --doc

1. Convert the checkpoint four times (dense bf16 as the demo; experts bf16, int8, mwq:2,3,4 and
   mwq:5,6,7,8). Without a full-precision checkpoint, `--from-emoe FILE` first writes one from
   a .emoe's decoded tensors (the shipped demo's INT8 experts: say so when quoting).
2. Texts: calibration = training documents of tools/train_demo.py (every 50th from the 25th;
   never held out), evaluation = the held-out documents (tools/heldout_text.py's rule).
3. Fit on calibration text, in process (edgemoe/bitfit.py, as `edgemoe calibrate --bits` and
   `--bit-router` do): the calibrated table at each --tolerances (one ranking per codec) and
   the trained router at each --lambdas, each stored in its own copy of the file.
4. Score every row on the first --eval-tokens held-out tokens through `edgemoe eval`'s
   perplexity() (the runtime, bits_policy=SPEC) when it takes a policy, else through bitfit's
   teacher-forced loop (float32, labelled in the output).
5. Write results.json in --work and, with --doc, the "bit-policies" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from edgemoe import bitfit, bitstored  # noqa: E402
from edgemoe.calibrate import text_segments  # noqa: E402
from formats.amend import amend  # noqa: E402

CODECS = ("bf16", "int8", "mwq:2,3,4", "mwq:5,6,7,8")
NESTED = ("mwq:2,3,4", "mwq:5,6,7,8")
GATE_Q = (0.25, 0.5, 0.75, 1.0)
TARGETS = (("INT8-equivalent", 0.005), ("INT4-equivalent", 0.03))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- inputs


def hf_from_emoe(emoe: Path, out: Path) -> Path:
    """A Hugging Face folder (config, f32 safetensors, tokenizer, chat template) of a .emoe's
    decoded tensors: the stand-in checkpoint when no full-precision one exists."""
    from safetensors.torch import save_file

    from formats import constants as C
    from formats.reader import EmoeReader

    out.mkdir(parents=True, exist_ok=True)
    with EmoeReader(emoe) as r:
        tensors = {n: torch.from_numpy(r.tensor(n)).contiguous() for n in r.tensors}
        save_file(tensors, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(r.config, indent=1))
        gen = r.metadata.get(C.M_GENERATION_CONFIG)
        if gen:
            (out / "generation_config.json").write_text(json.dumps(gen))
        (out / "tokenizer.json").write_bytes(bytes(r.read_chunk(r.blobs[C.BLOB_TOKENIZER])))
        if r.chat_template:
            (out / "chat_template.jinja").write_text(r.chat_template)
    return out


def texts(work: Path, heldout: Path | None, calib_chars: int) -> tuple[Path, Path]:
    """(calibration text, evaluation text), written once into work/."""
    calib, held = work / "calib.txt", work / "heldout.txt"
    if heldout is not None and not held.exists():
        shutil.copy(heldout, held)
    if calib.exists() and held.exists():
        return calib, held
    from train_demo import documents, missing_packages, split

    if missing_packages():
        sys.exit(f"missing Debian packages: {' '.join(missing_packages())}")
    docs = documents()
    train, held_docs = split(docs, 50)
    if not held.exists():
        held.write_text("\n\n".join(t for _, t in held_docs))
    picked, n = [], 0
    for i, (_, t) in enumerate(docs):
        if i % 50 == 24 and n < calib_chars:  # a training document, never a held-out one
            picked.append(t)
            n += len(t)
    calib.write_text("\n\n".join(picked))
    return calib, held


def convert_all(hf: Path, work: Path) -> dict[str, Path]:
    from formats.convert import ConvertOptions, convert, open_source

    out = {}
    for codec in CODECS:
        p = work / f"demo-{codec.replace(':', '').replace(',', '')}.emoe"
        if not p.exists():
            t0 = time.perf_counter()
            with open_source(hf) as src:
                convert(src, p, ConvertOptions(dense="bf16", experts=codec, progress=False))
            log(f"converted {codec} -> {p.name} in {time.perf_counter() - t0:.0f} s")
        out[codec] = p
    return out


# ---------------------------------------------------------------- scoring


def runtime_eval_takes_policies() -> bool:
    try:
        from edgemoe.eval import perplexity
    except ImportError:
        return False
    return "bits" in inspect.signature(perplexity).parameters


def score(path: Path, spec: str, text: str, ctx: int, max_tokens: int, runtime: bool) -> dict:
    """{"ppl", "bits", "tokens", "seconds"} of one file under one policy spec."""
    t0 = time.perf_counter()
    if runtime:
        from edgemoe.eval import perplexity

        r = perplexity(path, text, bits=spec, ctx=ctx, max_tokens=max_tokens)
        return {"ppl": r.perplexity, "bits": r.nominal_bits, "encoded_bits": r.avg_bits,
                "level_share": {str(k): v for k, v in r.level_share.items()},
                "tokens": r.tokens, "seconds": time.perf_counter() - t0}  # fmt: skip
    from edgemoe.bits import make

    m, ex = bitfit.open_for_fitting(path, ctx)
    try:
        ex.use_levels(make(spec, m.reader).levels)
        ids = m.tokenizer.encode(text)[: max_tokens + 1]
        n = (len(ids) - 1) // ctx
        segs = torch.tensor(ids[: n * ctx + 1])
        windows = torch.stack([segs[i * ctx : i * ctx + ctx + 1] for i in range(n)])  # [W, ctx+1]
        ex.reset()
        nll, count = 0.0, 0
        with torch.no_grad():
            for a in range(0, n, 8):
                w = windows[a : a + 8]
                lg = bitfit.logits(m, w[:, :-1])
                nll += float(
                    torch.nn.functional.cross_entropy(
                        lg.reshape(-1, lg.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
                    )
                )
                count += w[:, 1:].numel()
        return {"ppl": math.exp(nll / count), "bits": ex.reset().average_bits, "tokens": count,
                "seconds": time.perf_counter() - t0}  # fmt: skip
    finally:
        m.close()


# ---------------------------------------------------------------- fitting


def fit(path: Path, codec: str, work: Path, calib: Path, a) -> list[tuple[str, Path, dict]]:
    """(label, file, fit info) for every calibrated tolerance and trained lambda of one codec."""
    out = []
    tag = path.stem
    m, ex = bitfit.open_for_fitting(path, a.calib_tokens)
    try:
        ids = m.tokenizer.encode(calib.read_text())
        segs = torch.from_numpy(text_segments(ids, a.calib_segments, a.calib_tokens))
        t0 = time.perf_counter()
        rk = bitfit.rank_experts(m, ex, segs)
        log(f"{codec}: ranked {len(rk.delta)} experts in {rk.passes} passes, {rk.seconds:.0f} s")
        for tol in a.tolerances:
            table, info = bitfit.fit_table(m, ex, segs, tol, ranking=rk)
            info = {**info, "source": calib.name, "tokens": int(segs.numel())}
            p = work / f"{tag}-cal{tol:g}.emoe"
            shutil.copy(path, p)
            amend(p, blobs={bitstored.TABLE_BLOB: bitstored.table_blob(table, info)})
            log(f"{codec}: calibrated tol {tol:g}: {info['average_bits']:.2f} bits on calib text")
            out.append((f"calibrated, tolerance {100 * tol:g}%", p, info))
        for lam in a.lambdas:
            t0 = time.perf_counter()
            router, info = bitfit.fit_router(m, ex, segs, lam=lam, steps=a.steps)
            info = {**info, "source": calib.name, "tokens": int(segs.numel())}
            p = work / f"{tag}-lam{lam:g}.emoe"
            shutil.copy(path, p)
            amend(p, blobs={bitstored.ROUTER_BLOB: router.blob(info)})
            log(
                f"{codec}: trained lambda {lam:g}: {info['average_bits']:.2f} bits on calib text "
                f"in {time.perf_counter() - t0:.0f} s"
            )
            out.append((f"trained, lambda {lam:g}", p, info))
    finally:
        m.close()
    return out


# ---------------------------------------------------------------- the report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", type=Path, default=Path("/work/demo-train/hf"))
    ap.add_argument("--from-emoe", type=Path, help="no checkpoint: decode this .emoe into one")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bit-policies"))
    ap.add_argument("--heldout", type=Path, help="held-out text already written (else made here)")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-segments", type=int, default=8)
    ap.add_argument("--calib-tokens", type=int, default=256)
    ap.add_argument("--calib-chars", type=int, default=400_000)
    ap.add_argument("--tolerances", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.005, 0.01, 0.02, 0.05])  # fmt: skip
    ap.add_argument("--lambdas", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.005, 0.02, 0.05])  # fmt: skip
    ap.add_argument("--steps", type=int, default=bitfit.DEFAULT_STEPS)
    ap.add_argument("--codecs", default="mwq:2,3,4",
                    help="nested codecs to score and fit, ';'-separated (mwq:2,3,4;mwq:5,6,7,8)")  # fmt: skip
    ap.add_argument("--doc", action="store_true", help="write the docs/BENCHMARKS.md section")
    ap.add_argument("--from-results", type=Path, help="only write the section of a results.json")
    a = ap.parse_args(argv)
    if a.from_results is not None:
        from bench_doc import write_section

        write_section("bit-policies", doc_lines(json.loads(a.from_results.read_text())))
        return 0
    torch.manual_seed(0)
    a.work.mkdir(parents=True, exist_ok=True)
    t_start, commit = time.perf_counter(), _commit()  # the code that ran, not HEAD at the end
    hf, source = a.hf, str(a.hf)
    if a.from_emoe is not None:
        hf = hf_from_emoe(a.from_emoe, a.work / "hf-from-emoe")
        source = f"{a.from_emoe} decoded (its experts are INT8: not full precision)"
    calib, held = texts(a.work, a.heldout, a.calib_chars)
    files = convert_all(hf, a.work)
    runtime = runtime_eval_takes_policies()
    how = "edgemoe eval (the runtime)" if runtime else "bitfit's float32 teacher-forced loop"
    log(f"scoring through {how}")
    text = held.read_text()
    rows = []

    def row(codec, label, path, spec, info=None):
        r = score(path, spec, text, a.ctx, a.eval_tokens, runtime)
        rows.append({"codec": codec, "policy": label, "spec": spec, "file": path.name, **r,
                     "fit": info})  # fmt: skip
        log(
            f"{codec:<12} {label:<28} ppl {r['ppl']:.3f}  bits {r['bits']:.3f}  ({r['seconds']:.0f} s)"
        )

    row("bf16", "fixed (top)", files["bf16"], "fixed")
    row("int8", "fixed (top)", files["int8"], "fixed")
    for codec in a.codecs.split(";"):
        path = files[codec]
        levels = len(codec.split(":")[1].split(","))
        for lv in range(1, levels + 1):
            row(codec, f"fixed:{lv}", path, f"fixed:{lv}")
        for q in GATE_Q:
            row(codec, f"gate, q={q:g}", path, f"gate:q={q:g}")
        for label, p, info in fit(path, codec, a.work, calib, a):
            row(codec, label, p, label.split(",")[0], info)
    res = {
        "source": source,
        "scored_by": how,
        "eval_text": f"held-out documents, first {a.eval_tokens} tokens, ctx {a.ctx}",
        "calib_text": f"training documents, {a.calib_segments} x {a.calib_tokens} tokens",
        "rows": rows,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python tools/bit_policies.py " + " ".join(argv or sys.argv[1:]),
        "edgemoe": commit,
        "wall_s": round(time.perf_counter() - t_start),
    }
    (a.work / "results.json").write_text(json.dumps(res, indent=1))
    if a.doc:
        from bench_doc import write_section

        write_section("bit-policies", doc_lines(res))
    return 0


def machine() -> str:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor() or platform.machine(),
    )  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        return "?"


def best_under(rows: list[dict], limit: float) -> dict | None:
    """The row with the fewest bits whose perplexity is at most `limit` (bit-nested rows only)."""
    ok = [r for r in rows if r["codec"] in NESTED and r["ppl"] <= limit]
    return min(ok, key=lambda r: r["bits"]) if ok else None


def doc_lines(res: dict) -> list[str]:
    rows = res["rows"]
    int8 = next(r for r in rows if r["codec"] == "int8")
    bf16 = next(r for r in rows if r["codec"] == "bf16")
    lines = [
        "## Bit policies: perplexity against average bits (demo model)",
        "",
        f"`{res['command']}` (edgemoe {res['edgemoe']}, {res['date']}, {res['machine']}, "
        f"{res['wall_s']} s). Source checkpoint: {res['source']}. Evaluation: "
        f"{res['eval_text']}, scored by {res['scored_by']}; fitting: {res['calib_text']}. "
        "Avg bits: the codec width per expert weight actually computed, averaged over every "
        "(token, chosen expert) pair; encoded bits add the scales and zero points. "
        "Perplexity is relative to INT8 experts converted from the same checkpoint.",
        "",
        "| experts | policy | perplexity | vs INT8 | avg bits | encoded bits | pairs per level |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = 100 * (r["ppl"] / int8["ppl"] - 1)
        enc = f"{r['encoded_bits']:.2f}" if "encoded_bits" in r else "-"
        share = ", ".join(f"L{k} {100 * v:.0f}%" for k, v in (r.get("level_share") or {}).items())
        lines.append(
            f"| {r['codec']} | {r['policy']} | {r['ppl']:.3f} | {rel:+.2f}% | {r['bits']:.2f} "
            f"| {enc} | {share or '-'} |"
        )
    lines += ["", f"bf16 experts: perplexity {bf16['ppl']:.3f}.", ""]
    for name, share in TARGETS:
        b = best_under(rows, int8["ppl"] * (1 + share))
        per = {}
        for kind in ("fixed", "gate", "calibrated", "trained"):
            k = best_under(
                [r for r in rows if r["policy"].startswith(kind)], int8["ppl"] * (1 + share)
            )
            per[kind] = f"{k['bits']:.2f} ({k['codec']}, {k['policy']})" if k else "none"
        head = (
            f"fewest bits: {b['bits']:.2f} by {b['policy']} on {b['codec']}"
            if b
            else "no row meets it"
        )
        lines.append(
            f"- {name} (within {100 * share:g}% of INT8's perplexity): {head}. Per policy: "
            + "; ".join(f"{k} {v}" for k, v in per.items())
            + "."
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
