"""Whether INT8 dense weights cost quality: the demo model's held-out perplexity with its dense
weights (attention, router, embeddings, head) stored bf16 against INT8, experts INT8 in both,
computed by the runtime's own kernels. The evidence for `edgemoe convert --dense`'s default.

    python tools/heldout_text.py /tmp/heldout.txt
    python tools/dense_quality.py --text /tmp/heldout.txt [--max-tokens 20000] [--out DIR]

The source is the bundled demo decoded to float32 (tools/quality_table.export_hf); both files are
converted from it, so the only difference is the dense codec. Writes a section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_doc import machine, write_section  # noqa: E402
from quality_table import export_hf  # noqa: E402

from edgemoe.demo import DEMO  # noqa: E402
from edgemoe.eval import evaluate_file  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dense-quality")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    hf = export_hf(DEMO, a.out / "hf")
    rows = []
    for dense in ("f32", "bf16", "int8"):
        path = a.out / f"demo-dense-{dense}.emoe"
        if not path.exists():
            subprocess.run(
                [sys.executable, "-m", "edgemoe.cli", "convert", str(hf), str(path)]
                + ["--dense", dense, "--experts", "int8", "-q"],
                check=True,
            )
        r = evaluate_file(path, a.text, ctx=a.ctx, max_tokens=a.max_tokens, dtype="f32")
        rows.append((dense, r.perplexity, r.tokens, path.stat().st_size))
        print(f"dense {dense}: perplexity {r.perplexity:.3f} over {r.tokens} tokens", flush=True)
    ref = rows[0][1]
    lines = [
        "### Dense weights INT8 against bf16 (demo model, experts INT8)",
        "",
        f"`python tools/dense_quality.py --text heldout.txt --max-tokens {a.max_tokens}` on "
        f"{machine()}: the bundled demo decoded to f32 and converted with each dense codec "
        f"(experts INT8 in all), teacher-forced perplexity over the held-out text "
        f"(tools/heldout_text.py), windows of {a.ctx} tokens, computed as `edgemoe run` computes "
        "(the Q8 kernel for INT8).",
        "",
        "| dense codec | perplexity | vs f32 dense | file |",
        "|---|---|---|---|",
    ]
    for dense, ppl, _, size in rows:
        lines.append(f"| {dense} | {ppl:.3f} | {100 * (ppl / ref - 1):+.2f}% | {size / 2**20:.1f} MiB |")
    if a.no_doc:
        print("\n".join(lines))
    else:
        write_section("dense-quality", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
