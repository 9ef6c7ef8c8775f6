"""What a missed expert costs against its bare O_DIRECT read (issue 14 §2).

    python tools/miss_cost.py MODEL.emoe [--experts 16] [--reps 2]

For each of the first N experts: the bare O_DIRECT read of its span, and a
miss as the runtime takes it (the store's read, into a slab when the expert
computes in place, then preparing the kernels), alternating which goes first.
The first pass (unmeasured) checks each chunk's CRC once and touches the
slabs. Prints the medians and the median paired ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from edgemoe.facts import ModelFacts
from edgemoe.models import parse_args
from edgemoe.moe.api import ExecutorContext
from edgemoe.store import ExpertStore
from formats.reader import EmoeReader


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    r = EmoeReader(a.model)
    st = ExpertStore(r, threads=1)
    f = ModelFacts(r, parse_args(r.family, r.config), torch.bfloat16)
    ctx = ExecutorContext(
        r, None, st, torch.bfloat16, lambda layer, e: 1, lambda layer: f.expert_nbytes(layer, 1),
        True, f.borrows,
    )  # fmt: skip
    keys = list(r.experts)[: a.experts]

    def miss(layer, e):
        t = time.perf_counter()
        p = st._read(layer, e, 1, 0, own=f.borrows(layer, e, 1))
        ew = ctx.prepare(layer, e, p)
        d = time.perf_counter() - t
        if ew.slab is not None:
            st.recycle(ew.slab)
        return d

    def bare(layer, e):
        start, length = st._span(layer, e, 0, 1)
        view = memoryview(st._buffer(length))[:length]
        t = time.perf_counter()
        st._pread(view, start)
        d = time.perf_counter() - t
        view.release()
        return d

    for layer, e in keys:
        miss(layer, e)
    rows = []
    for _ in range(a.reps):
        for i, (layer, e) in enumerate(keys):
            if i % 2:
                rows.append((bare(layer, e), miss(layer, e)))
            else:
                m = miss(layer, e)
                rows.append((bare(layer, e), m))
    span = st._span(*keys[0], 0, 1)[1]
    b = statistics.median(x[0] for x in rows) * 1000
    m = statistics.median(x[1] for x in rows) * 1000
    ratio = statistics.median(x[1] / x[0] for x in rows)
    print(
        f"{span / 2**20:.1f} MiB expert, in place: {f.borrows(*keys[0], 1)}: O_DIRECT read alone "
        f"{b:.1f} ms, a miss {m:.1f} ms, paired ratio (median of {len(rows)}) {ratio:.2f}"
    )


if __name__ == "__main__":
    main()
