"""Print a markdown table of each quantization codec level's error against plain RTN.

    python tools/codec_error_table.py [--rows 1024 --cols 1024 --seed 0]

For Gaussian and Student-t (df=4, heavy-tailed like real LLM weights) weights,
every level of mwq ([2,3,4] and [5,6,7,8], without calibration, with
calibration-weighted fitting, with GPTQ-like compensation, and with
joint_clip: the base's clipping chosen for all levels together), bitplane
[2,4,8], int4 and int8 is compared with round-to-nearest asymmetric group
quantization (RTN, min-max range, integer zero point, float16 scale and zero:
b + 32/group bits per weight) at the same nominal width. Columns:
    bits/w   stored bits per weight up to this level, scales and zeros included
             (from the codec's level_nbytes)
    w err    ||W - Wq||_F / ||W||_F
    out err  ||(W - Wq) X^T||_F / ||W X^T||_F on held-out activations drawn
             like the calibration set (correlated channels, uneven scales)
    / RTN    the codec's error divided by RTN's at the same nominal width
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from formats.codecs import codec_by_name  # noqa: E402

# (label, codec name, default_params options, use calibration)
CONFIGS = [
    ("mwq 2-3-4", "mwq", {"bits": [2, 3, 4]}, False),
    ("mwq 2-3-4 calib", "mwq", {"bits": [2, 3, 4]}, True),
    ("mwq 2-3-4 calib+comp", "mwq", {"bits": [2, 3, 4], "compensate": True}, True),
    ("mwq 2-3-4 joint", "mwq", {"bits": [2, 3, 4], "joint_clip": True}, False),
    ("mwq 2-3-4 calib+joint", "mwq", {"bits": [2, 3, 4], "joint_clip": True}, True),
    (
        "mwq 2-3-4 calib+comp+joint",
        "mwq",
        {"bits": [2, 3, 4], "compensate": True, "joint_clip": True},
        True,
    ),
    ("mwq 5-6-7-8", "mwq", {"bits": [5, 6, 7, 8]}, False),
    ("mwq 5-6-7-8 calib", "mwq", {"bits": [5, 6, 7, 8]}, True),
    ("mwq 5-6-7-8 calib+comp", "mwq", {"bits": [5, 6, 7, 8], "compensate": True}, True),
    ("mwq 5-6-7-8 joint", "mwq", {"bits": [5, 6, 7, 8], "joint_clip": True}, False),
    ("mwq 5-6-7-8 calib+joint", "mwq", {"bits": [5, 6, 7, 8], "joint_clip": True}, True),
    ("bitplane 2-4-8", "bitplane", {"bits": [2, 4, 8]}, False),
    ("int4", "int4", {}, False),
    ("int8 (per row)", "int8", {}, False),
]


def rtn(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Round-to-nearest asymmetric group quantization, float16 scale and zero."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group).astype(np.float32)
    lo = np.minimum(wg.min(axis=2, keepdims=True), 0)
    hi = np.maximum(wg.max(axis=2, keepdims=True), 0)
    maxq = 2**bits - 1
    s = ((hi - lo) / maxq).astype(np.float16).astype(np.float32)
    s = np.where(s > 0, s, 1.0)
    z = np.round(-lo / s)
    q = np.clip(np.round(wg / s + z), 0, maxq)
    return ((q - z) * s).reshape(n, k)


def weights(dist: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if dist == "gaussian":
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    # Student-t df=4 has variance 2; scale to the same std as the Gaussian
    return (rng.standard_t(4, size=(rows, cols)) * 0.02 / np.sqrt(2)).astype(np.float32)


def activations(tokens: int, mix: np.ndarray, scale: np.ndarray, rng) -> np.ndarray:
    """X = (Z A + 0.1 Z) * scale: correlated channels with uneven magnitudes."""
    z = rng.standard_normal((tokens, mix.shape[0]))
    return ((z @ mix + 0.1 * z) * scale).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1024, help="out_features N")
    ap.add_argument("--cols", type=int, default=1024, help="in_features K")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens")
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    n, k, g = args.rows, args.cols, args.group
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    scale = np.exp(rng.standard_normal(k) * 0.5)
    x_fit = activations(args.tokens, mix, scale, rng)
    x_eval = activations(args.tokens, mix, scale, rng)
    t0 = time.time()

    print(f"W [{n}, {k}], group {g}, {args.tokens} calibration + {args.tokens} held-out tokens")
    print()
    print(
        "| weights | codec | level | bits | bits/w | w err | out err | w err / RTN | out err / RTN |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for dist in ("gaussian", "student-t4"):
        w = weights(dist, n, k, rng)
        out_ref = np.linalg.norm(w @ x_eval.T)

        def errors(wq, w=w, out_ref=out_ref):
            return (
                float(np.linalg.norm(w - wq) / np.linalg.norm(w)),
                float(np.linalg.norm((w - wq) @ x_eval.T) / out_ref),
            )

        ref = {b: errors(rtn(w, b, g)) for b in range(2, 9)}
        for b, (we, oe) in ref.items():
            bpw = b + 32 / g
            print(f"| {dist} | RTN | 1 | {b} | {bpw:.3f} | {we:.4f} | {oe:.4f} | 1.00 | 1.00 |")
        for label, name, opts, use_calib in CONFIGS:
            codec = codec_by_name(name)
            # int8 keeps its default, one scale per row (what the fused int8 matmul takes)
            grouping = {} if name == "int8" else {"group": g}
            params = codec.default_params(w.shape, **grouping, **opts)
            segs = codec.encode(w, params, calib=x_fit if use_calib else None)
            sizes = codec.level_nbytes(w.shape, params)
            for level, bits in enumerate(codec.level_bits(params), start=1):
                we, oe = errors(codec.decode(segs[:level], w.shape, params))
                bpw = 8 * sum(sizes[:level]) / w.size
                rw, ro = ref[bits]
                print(
                    f"| {dist} | {label} | {level} | {bits} | {bpw:.3f} | {we:.4f} | {oe:.4f} "
                    f"| {we / rw:.2f} | {oe / ro:.2f} |"
                )
    print()
    print(f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
