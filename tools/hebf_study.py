"""What each D²MoE lever adds to decode, measured paired: nesting with a bit policy, HEBF
read order, and the budget rule, at batch 1 and 8.

    python tools/hebf_study.py MODEL.emoe [--batches 1,8] [--repeats 5] [--cache 25%]
        [--bits gate] [--tokens 16] [--device rpi5-8gb-nvme]

MODEL must store experts bit-nested (mwq:2,3,4, bitplane). Each repeat runs every
configuration once, in a rotated order (so drift on a shared machine lands on all alike),
each in a fresh load with the expert cache sized by --cache:

    fixed   every pair at the top level, LFU, FIFO reads (one per expert): no lever
    +bits   the bit policy (--bits), LFU, FIFO: nesting and dual routing
    +hebf   the same, slices read hottest first, computed as they land
    +d2     the same, with the budget rule (high levels of the previous layers go first)

It prints, per batch, each configuration's median decode tok/s, flash MiB per decode step,
average bits per expert weight and I/O wait, and the median of the paired ratios of each
configuration to the one before it (what the lever adds).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import edgemoe
from edgemoe.engine import RunStats
from edgemoe.sampling import Sampling

PROMPTS = [
    "The history of the city begins",
    "Once upon a time there was",
    "The function returns the",
    "In the beginning the committee",
    "Water boils when the",
    "She opened the door and",
    "The theorem states that every",
    "After the storm the village",
]

CONFIGS = [  # name, bits (None: the fixed top level), cache policy, read order
    ("fixed", None, "lfu", "fifo"),
    ("+bits", "BITS", "lfu", "fifo"),
    ("+hebf", "BITS", "lfu", "hebf"),
    ("+d2", "BITS", "d2", "hebf"),
]


def run_once(path, batch, bits, policy, order, cache, tokens, device) -> dict:
    def factory(ctx):
        return dataclasses.replace(ctx, order=order).local()

    kw = {"device": device} if device else {}
    with edgemoe.load(
        path, ctx=256, batch=batch, bits=bits, policy=policy, expert_cache=cache,
        executor=factory, **kw,
    ) as m:  # fmt: skip
        st = RunStats()
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        t0 = time.perf_counter()
        m.generate(prompts, max_tokens=tokens, sampling=Sampling(temperature=0), stats=st)
        wall = time.perf_counter() - t0
        d = st.decode_executor
        steps = max(1, (st.new_tokens - st.batch) // st.batch)
        decode_tokens = st.new_tokens - st.batch
        return {
            "tok_s": decode_tokens / st.decode_s if st.decode_s else 0.0,
            "mib_step": d.bytes_read / steps / 2**20,
            "bits": st.executor.average_bits or 0.0,
            "io_s": d.io_wait_s,
            "hit": d.hit_rate,
            "upgrades": d.upgrades,
            "downgrades": d.downgrades,
            "wall": wall,
        }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", default="25%", help="expert cache: a size or a share of all experts")
    ap.add_argument("--bits", default="gate", help="the bit policy of +bits/+hebf/+d2")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per sequence")
    ap.add_argument("--device", help="emulate a device profile's flash and compute")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    a = ap.parse_args()
    configs = [c for c in CONFIGS if c[0] in a.configs.split(",")]
    print(
        f"# tools/hebf_study.py {a.model} --cache {a.cache} --bits {a.bits} --tokens {a.tokens}"
        f" --repeats {a.repeats}" + (f" --device {a.device}" if a.device else "")
    )
    for batch in (int(b) for b in a.batches.split(",")):
        runs: dict[str, list[dict]] = {c[0]: [] for c in configs}
        for r in range(a.repeats):
            for i in range(len(configs)):
                name, bits, policy, order = configs[(i + r) % len(configs)]
                bits = a.bits if bits == "BITS" else None
                runs[name].append(
                    run_once(a.model, batch, bits, policy, order, a.cache, a.tokens, a.device)
                )
        print(f"\nbatch {batch}: median of {a.repeats} (ratio: paired, to the row above)")
        print(
            "| config | decode tok/s | ratio | MiB/step | bits/weight | I/O wait s | hits | upgrades | downgrades |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        prev = None
        for name, *_ in configs:
            rs = runs[name]
            med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            ratio = (
                statistics.median(x["tok_s"] / y["tok_s"] for x, y in zip(rs, runs[prev]))
                if prev
                else 1.0
            )
            print(
                f"| {name} | {med['tok_s']:.2f} | {ratio:.2f}x | {med['mib_step']:.1f} | "
                f"{med['bits']:.2f} | {med['io_s']:.2f} | {100 * med['hit']:.0f}% | "
                f"{med['upgrades']:.0f} | {med['downgrades']:.0f} |"
            )
            prev = name


if __name__ == "__main__":
    main()
