"""Is a width rounded up to a multiple of 8 or 16 faster in ONNX Runtime (CPU, one thread)? Per kind of
width: the answer decides ``FoldConfig.round_to`` (2-D conv channels) and ``round_to_width`` (every
other width) under ``"auto"``.

For each layer kind, a two-layer model ``op(C_in -> n) -> ReLU -> op(n -> C_in)`` is exported at a
width ``n`` that is not a multiple of 8 and at ``n`` rounded up to 8 and to 16, and the three are timed
side by side (``compare_latency``: alternating, the quietest block). A rounded width that runs faster
than the unrounded one is worth keeping closed units for; one that runs as fast or slower is not.

    python tools/bench_rounding.py [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine, write_section  # noqa: E402

from hyperflux_fx.analysis.runtime import nchwc_block  # noqa: E402
from hyperflux_fx.export.latency import compare_latency  # noqa: E402

# (kind, input shape without the channel/feature width, the width C_in around the varied one)
CASES = [
    ("linear (16 rows)", "linear", (16,), 256),
    ("linear (256 tokens)", "linear", (256,), 256),
    ("conv1d (batch 16, length 40)", "conv", (16, 40), 32),
    ("conv2d (batch 16, 16x16)", "conv", (16, 16, 16), 32),
    ("conv3d (batch 4, 8x8x8)", "conv", (4, 8, 8, 8), 16),
]
WIDTHS = (13, 25, 41, 57, 100)


def _model(kind: str, shape: tuple[int, ...], c_in: int, n: int) -> bytes:
    rng = np.random.default_rng(0)
    if kind == "linear":
        w1, w2 = rng.standard_normal((c_in, n)), rng.standard_normal((n, c_in))
        ops, x_shape = ("MatMul", {}), [shape[0], c_in]
    else:
        k = [3] * (len(shape) - 1)
        w1, w2 = rng.standard_normal((n, c_in, *k)), rng.standard_normal((c_in, n, *k))
        ops, x_shape = ("Conv", {"pads": [1] * 2 * len(k)}), [shape[0], c_in, *shape[1:]]
    op, attrs = ops
    inits = [numpy_helper.from_array(w.astype(np.float32), name) for w, name in ((w1, "w1"), (w2, "w2"))]
    nodes = [helper.make_node(op, ["x", "w1"], ["a"], **attrs), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node(op, ["r", "w2"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "rounding", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def measure(seconds: float) -> list[tuple[str, int, float, float]]:
    """(case, n, ms at n rounded to 8 / ms at n, ms at n rounded to 16 / ms at n) per case and width."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kind, shape, c_in in CASES:
            for n in WIDTHS:
                paths = []
                for width in (n, math.ceil(n / 8) * 8, math.ceil(n / 16) * 16):
                    path = Path(tmp) / f"{kind}{len(shape)}_{width}.onnx"
                    path.write_bytes(_model(kind, shape, c_in, width))
                    paths.append(path)
                plain, r8, r16 = compare_latency(paths, batch=shape[0], seconds=seconds)
                rows.append((label, n, r8["median_ms"] / plain["median_ms"], r16["median_ms"] / plain["median_ms"]))
                print(f"  {label:<30} n={n:<4} x8 {rows[-1][2]:.2f}  x16 {rows[-1][3]:.2f}", flush=True)
    return rows


def table(rows: list[tuple[str, int, float, float]]) -> str:
    lines = ["| layer | n | ms at ⌈n⌉₈ / ms at n | ms at ⌈n⌉₁₆ / ms at n |", "|---|---|---|---|"]
    lines += [f"| {label} | {n} | {r8:.2f} | {r16:.2f} |" for label, n, r8, r16 in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=1.5, help="timing per triple (compare_latency)")
    p.add_argument("--write", default=None, help="write the section into this markdown file")
    args = p.parse_args(argv)
    rows = measure(args.seconds)
    best = {}
    for label, _, r8, r16 in rows:
        best[label] = min(best.get(label, 9.0), r8, r16)
    faster = [label for label, b in best.items() if b < 0.95]
    verdict = ("Rounding up pays for " + ", ".join(faster) if faster else "Rounding up never pays here") + (
        "; for every other kind the rounded width is as fast or slower (best ratio "
        + ", ".join(f"{label} {b:.2f}" for label, b in best.items() if label not in faster) + ").")
    text = (f"## Rounding widths up, per layer kind (tools/bench_rounding.py)\n\n"
            f"Machine: {machine()}, ONNX Runtime NCHWc block {nchwc_block()}. Below 1.00 the rounded width "
            f"(more channels) runs faster than the unrounded one.\n\n{table(rows)}\n\n{verdict} "
            f"So `round_to_width=\"auto\"` (linear widths) is 1. `round_to=\"auto\"` (the NCHWc block) "
            f"applies to conv channels: on 2-D convs for speed; on 1-D/3-D convs it is not faster; the "
            f"narrowest conv layer is set apart from it, by `min_conv_channels` (16 on every CPU: docs/folding.md)."
            f"\n\nReproduce: `python tools/bench_rounding.py --write docs/BENCHMARKS.md`\n")
    print(text)
    if args.write:
        write_section(Path(args.write), "bench_rounding", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
