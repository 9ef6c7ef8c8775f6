"""Quality of every expert codec at every level on the trained demo model: perplexity of the
held-out text through `edgemoe eval`, against the full-precision (f32) checkpoint.

The demo's bundled .emoe stores INT8 experts, so codecs are compared from the
full-precision Hugging Face checkpoint tools/train_demo.py saves (retrain it
with the command in edgemoe/demo/TRAINING.json, or a --steps run). Each codec
is one `edgemoe convert` of that checkpoint with f32 dense weights, so only the
routed experts differ between rows; every row computes in f32 over the same
tokens of the held-out split (tools/heldout_text.py).

    python tools/heldout_text.py /work/demo-train/heldout.txt
    python tools/quality_table.py --hf /work/demo-train/hf --text /work/demo-train/heldout.txt

Writes the "quality" section of docs/BENCHMARKS.md, docs/quality.png (perplexity
against average bits per weight) and a JSON of every row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

# (label, --experts codec); the first is the reference every ratio is taken against
CODECS = (
    ("f32", "f32"),
    ("bf16", "bf16"),
    ("int8 (RTN)", "int8"),
    ("int4 (RTN)", "int4"),
    ("mwq 5-6-7-8", "mwq:5,6,7,8"),
    ("mwq 2-3-4", "mwq:2,3,4"),
    ("bitplane 2-4-8", "bitplane:2,4,8"),
)
# bit policies (edgemoe/bits.py) evaluated on a nested file: (codec label, policy spec)
POLICIES = (
    ("mwq 5-6-7-8", "gate:q=0.5"),
    ("mwq 2-3-4", "gate:q=0.5"),
    ("mwq 2-3-4", "gate:q=0.9"),
    ("bitplane 2-4-8", "gate:q=0.5"),
)


def convert(hf: Path, codec: str, out: Path) -> Path:
    """The checkpoint converted with f32 dense weights and `codec` experts (kept if present)."""
    path = out / f"demo-{codec.replace(':', '-').replace(',', '')}.emoe"
    if not path.exists():
        subprocess.run(
            [sys.executable, "-m", "edgemoe.cli", "convert", str(hf), str(path)]
            + ["--dense", "f32", "--experts", codec, "-q"],
            check=True,
            cwd=REPO,
        )
    return path


def export_hf(emoe: Path, folder: Path) -> Path:
    """A Hugging Face folder of a .emoe's weights decoded to float32 (its highest level), its
    config and tokenizer: a source for codecs when no full-precision checkpoint is left."""
    import numpy as np
    from safetensors.numpy import save_file

    from formats import constants as C
    from formats.reader import EmoeReader

    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with EmoeReader(emoe) as r:
        weights = {n: np.ascontiguousarray(r.tensor(n), dtype=np.float32) for n in r.tensors}
        save_file(weights, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(r.config, indent=1))
        tok = r.read_chunk(r.blobs[C.BLOB_TOKENIZER])
        (folder / "tokenizer.json").write_bytes(bytes(tok))
    return folder


def levels_of(path: Path) -> int:
    from formats.reader import EmoeReader

    with EmoeReader(path) as r:
        return min(len(e.levels) for e in r.experts.values())


def run(args) -> list[dict]:
    from edgemoe.eval import evaluate_file

    rows: list[dict] = []
    if args.json.exists() and not args.fresh:  # resume: rows measured the same way are kept
        old = json.loads(args.json.read_text())
        same = all(old["setup"].get(k) == getattr(args, k) for k in ("ctx", "max_tokens"))
        rows = old["rows"] if same else []
    done = {(r["codec"], r["level"], r["policy"]) for r in rows}
    files = {}

    def measure(label: str, codec: str, level: int | None, policy: str | None) -> None:
        if (label, level, policy) in done:
            return
        path = files[label]
        t0 = time.time()
        r = evaluate_file(
            path,
            args.text,
            level=level,
            bits=policy,
            ctx=args.ctx,
            max_tokens=args.max_tokens,
            dtype="f32",
            fused=False,  # the codec's dequantized weights: same values, f32 int4 kernels are slow
        )
        rows.append(
            {
                "codec": label,
                "experts": codec,
                "level": level,
                "policy": policy,
                "avg_bits": r.avg_bits,
                "nominal_bits": r.nominal_bits,
                "level_share": r.level_share,
                "perplexity": r.perplexity,
                "tokens": r.tokens,
                "bytes": path.stat().st_size,
                "seconds": round(time.time() - t0, 1),
            }
        )
        print(
            f"{label:16s} {policy or f'level {level}':12s} {r.avg_bits:6.3f} bits "
            f"ppl {r.perplexity:9.3f}  ({r.seconds:.0f} s)",
            flush=True,
        )
        save(args, rows)

    for label, codec in CODECS:
        files[label] = convert(args.hf, codec, args.out)
        for level in range(1, levels_of(files[label]) + 1):
            measure(label, codec, level, None)
    for label, spec in POLICIES:
        measure(label, dict(CODECS)[label], None, spec)
    return rows


def save(args, rows: list[dict]) -> None:
    args.json.write_text(json.dumps({"setup": setup(args), "rows": rows}, indent=1) + "\n")


def setup(args) -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    training = args.hf.parent / "TRAINING.json"
    train = json.loads(training.read_text()) if training.exists() else {}
    return {
        "command": shlex.join(["python", "tools/quality_table.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} cores of {cpu}, {platform.platform()}",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "ctx": args.ctx,
        "max_tokens": args.max_tokens,
        "note": args.note,
        "title": args.title,
        "training": {k: train.get(k) for k in ("command", "training", "heldout", "date")},
    }


def reference(rows: list[dict]) -> float:
    return next(r["perplexity"] for r in rows if r["codec"] == CODECS[0][0])


def table(rows: list[dict], setup_: dict, plot_name: str = "quality.png") -> list[str]:
    ref = reference(rows)
    t = setup_["training"] or {}
    tr = t.get("training") or {}
    lines = [
        "## Quality: every expert codec at every level, demo model (trained)"
        + (f", {setup_['title']}" if setup_.get("title") else ""),
        "",
        f"`{setup_['command']}` on {setup_['machine']}, {setup_['date']}.",
        "",
        "Model: the demo Qwen3-MoE (4 layers, 16 experts top-2, 9.4M of its 11.5M parameters in "
        "routed experts)"
        + (
            f", retrained with `{t.get('command')}` ({tr.get('steps')} steps,"
            f" {tr.get('tokens_seen', 0) / 1e6:.2f}M tokens, held-out perplexity"
            f" {t.get('heldout', {}).get('perplexity')} in training)"
            if tr
            else ""
        )
        + (f". {setup_['note']}" if setup_.get("note") else "")
        + ". Each codec is `edgemoe convert --dense f32 --experts CODEC` of its f32 checkpoint, "
        "so only routed experts differ; `edgemoe eval --dtype f32` (experts on their dequantized "
        "weights, `fused=False`) with `--ctx "
        f"{setup_['ctx']}` over the first {rows[0]['tokens']} tokens of the held-out split "
        "(every 50th document, tools/heldout_text.py), the same tokens for every row. Bits: "
        "encoded bits per expert weight actually computed, scales and zero points included "
        "(nominal codec width in brackets), averaged over every (token, expert) pair.",
        "",
        "| codec | level / policy | bits per weight | perplexity | vs f32 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        what = r["policy"] or (f"{r['level']}" if r["level"] else "top")
        if r["policy"]:
            share = ", ".join(f"L{k} {100 * v:.0f}%" for k, v in r["level_share"].items())
            what += f" ({share})"
        lines.append(
            f"| {r['codec']} | {what} | {r['avg_bits']:.2f} ({r['nominal_bits']:.2f}) | "
            f"{r['perplexity']:.3f} | {100 * (r['perplexity'] / ref - 1):+.2f}% |"
        )
    lines += ["", f"![perplexity against bits per weight]({plot_name})", ""]
    return lines


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = reference(rows)

    def pct(r: dict) -> float:
        return 100 * (r["perplexity"] / ref - 1)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colour = {}
    for label, _ in CODECS:
        pts = sorted(
            (r["avg_bits"], pct(r)) for r in rows if r["codec"] == label and not r["policy"]
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            (line,) = ax.plot(xs, ys, "o-" if len(xs) > 1 else "s", label=label)
            colour[label] = line.get_color()
    for r in (r for r in rows if r["policy"]):
        ax.scatter(
            r["avg_bits"],
            pct(r),
            marker="*",
            s=160,
            color=colour.get(r["codec"], "k"),
            edgecolors="k",
            zorder=5,
            label=f"{r['codec']}, {r['policy']}",
        )
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    top = max(pct(r) for r in rows)
    for target in (0.5, 3.0):
        if target < 1.5 * top:
            ax.axhline(target, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 3, 4, 5, 6, 8, 12, 16, 32], ["2", "3", "4", "5", "6", "8", "12", "16", "32"])
    ax.set_xlabel("bits per expert weight computed (scales included)")
    ax.set_ylabel(f"perplexity over f32 ({ref:.1f}), %")
    ax.set_title("demo model: held-out perplexity against bits per weight (stars: bit policies)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", type=Path, default=Path("/work/demo-train/hf"))
    ap.add_argument(
        "--from-emoe",
        type=Path,
        help="take the source weights from this .emoe instead (decoded to f32 into --hf)",
    )
    ap.add_argument("--text", type=Path, default=Path("/work/demo-train/heldout.txt"))
    ap.add_argument("--out", type=Path, default=Path("/work/demo-train/quality"), help="files")
    ap.add_argument("--ctx", type=int, default=128, help="tokens per window (training's seq)")
    ap.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens scored")
    ap.add_argument("--json", type=Path, default=None, help="default: OUT/quality.json")
    ap.add_argument("--title", default="", help="words added to the section's heading")
    ap.add_argument("--note", default="", help="a sentence on the model's provenance")
    ap.add_argument("--fresh", action="store_true", help="measure every row again")
    ap.add_argument(
        "--section", default="quality", help="docs/BENCHMARKS.md section and docs/SECTION.png"
    )
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/")
    args = ap.parse_args(argv)
    if args.from_emoe is not None:
        export_hf(args.from_emoe, args.hf)
    if not (args.hf / "config.json").exists():
        print(
            f"{args.hf} has no checkpoint; retrain the demo with tools/train_demo.py (the "
            "command in edgemoe/demo/TRAINING.json)",
            file=sys.stderr,
        )
        return 2
    if not args.text.exists():
        print(f"{args.text}: run python tools/heldout_text.py {args.text}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.json = args.json or args.out / "quality.json"
    rows = run(args)
    if not args.no_doc:
        from bench_doc import write_section

        plot_name = f"{args.section}.png"
        plot(rows, REPO / "docs" / plot_name)
        write_section(args.section, table(rows, setup(args), plot_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
