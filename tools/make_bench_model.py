"""Make a seeded random-weight bench model (a Hugging Face folder) for `edgemoe bench`.

    python tools/make_bench_model.py mixtral-2b scratch/bench/mixtral-2b
    edgemoe bench scratch/bench/mixtral-2b --caps none,100,50,25

Shapes (edgemoe/bench/models.py): mixtral-2b (hidden 2048, 8 layers, 8 experts
top-2, intermediate 5632, vocab 8192: 2.33 B parameters, the reference
measurement), mixtral-2b-fg (the same bytes as 64 experts top-8: where caching
and prefetch matter most) and mixtral-tiny (a pipeline check). `edgemoe bench
--make NAME` does the same into ~/.cache/edgemoe/bench/models/NAME.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from edgemoe.bench.models import SHAPES, make_model


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    make_model(a.shape, a.out, seed=a.seed)
    s = SHAPES[a.shape]
    print(
        f"wrote {a.out}: {a.shape} ({s.about}), {s.params / 1e9:.2f} B parameters, "
        f"{time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
