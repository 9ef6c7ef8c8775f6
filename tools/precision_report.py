"""Logit error and greedy agreement of reduced precisions against the f32 oracle.

For every family: a seeded tiny model (tests/factories.py) run by transformers
in float32 is the reference; edgemoe runs the same weights converted at bf16
and at every level of the nested expert codecs. Reports (does not assert)
the largest logit error relative to the reference's logit range, and the
share of greedy tokens equal to the reference's, teacher-forced on the
reference's own tokens so one early flip does not count for the rest.

    python tools/precision_report.py [--new 32] [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

VARIANTS = [
    ("bf16 everything", "bf16", "bf16", None, "bf16"),
    ("int8 experts", "bf16", "int8", None, "bf16"),
    ("int8 dense and experts", "int8", "int8", None, "bf16"),
    ("int4 experts", "bf16", "int4@32", None, "bf16"),
]
VARIANTS += [(f"mwq 2-3-4 level {k}", "bf16", "mwq:2,3,4@32", k, "bf16") for k in (1, 2, 3)]
VARIANTS += [
    (f"bitplane 2-4-8 level {k}", "bf16", "bitplane:2,4,8@32", k, "bf16") for k in (1, 2, 3)
]
PROMPTS = [[5, 17, 42, 99, 3, 150, 77], [9, 8, 7, 6, 5, 4, 3, 2, 1, 250, 31, 64]]


def forced_logits(model, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """Logits [N, V] for each position of prompt + forced[:-1], one forward (teacher forcing)."""
    seq = torch.tensor([prompt + forced[:-1]])
    with torch.inference_mode():
        h = model.forward(seq, model.new_cache(1, seq.shape[1]))
        return model.logits(h[0, len(prompt) - 1 :])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument(
        "--families", default="mixtral,qwen2_moe,qwen3_moe,olmoe,deepseek_v2,deepseek_v3"
    )
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    a = ap.parse_args()
    from factories import make_tiny_hf

    from formats.convert import ConvertOptions, convert, open_source
    from tests.models.harness import greedy_hf, load_ours

    work = Path(tempfile.mkdtemp(prefix="edgemoe-precision-"))
    fams = a.families.split(",")
    table = {}
    for fam in fams:
        hf = make_tiny_hf(fam, work / fam)
        refs = [greedy_hf(hf, p, a.new) for p in PROMPTS]
        for name, dense, experts, level, dtype in VARIANTS:
            out = work / f"{fam}-{dense}-{experts.replace(':', '_')}.emoe"
            if not out.exists():
                with open_source(hf) as src:
                    convert(src, out, ConvertOptions(dense=dense, experts=experts, progress=False))
            model = load_ours(out, torch.bfloat16 if dtype == "bf16" else torch.float32, level)
            errs, agree, total = [], 0, 0
            for p, (toks, logits) in zip(PROMPTS, refs):
                ref = torch.stack(logits)  # [N, V]
                got = forced_logits(model, p, toks)
                errs.append(((got - ref).abs().max() / (ref.max() - ref.min())).item())
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                total += len(toks)
            table[(fam, name)] = (max(errs), agree / total)
            print(fam, name, f"{max(errs):.4f}", f"{agree / total:.2f}", flush=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### Reduced precision against the f32 oracle (tiny random models, {a.new} teacher-forced tokens)",
        "",
        f"`python tools/precision_report.py {' '.join(sys.argv[1:])}`, {when}. Cell: max logit error / the "
        "reference's logit range, then greedy agreement. Random weights are harder on quantization than "
        "trained ones (no outliers to protect, no redundancy); read these as relative, not absolute.",
        "",
        "| variant | " + " | ".join(fams) + " |",
        "|---|" + "---|" * len(fams),
    ]
    for name, *_ in VARIANTS:
        cells = [f"{table[(f, name)][0]:.3f} / {100 * table[(f, name)][1]:.0f}%" for f in fams]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
