"""Fold time and size: fold_masks on resnet50 (torchvision, 3x32x32) and deit_small (timm, 3x224x224).

Channel gates inserted, random masks closing about ``--closed`` of every group, then ``fold_masks``
timed (median of ``--repeats``; target <= 1 s each) with parameters and MACs before and after.

Usage: python tools/bench_fold.py [--closed 0.5] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common

import hyperflux_fx as hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--closed", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import timm
    import torchvision

    rows = []
    for label, build, size in (("torchvision:resnet50", lambda: torchvision.models.resnet50(), 32),
                               ("timm:deit_small_patch16_224", lambda: timm.create_model("deit_small_patch16_224"),
                                224)):
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(1, 3, size, size)
        t0 = time.perf_counter()
        gated = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=x).graph_module
        t_insert = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for g in hf.gates(gated):
                g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - args.closed)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            folded = hf.fold_masks(gated)
            times.append(time.perf_counter() - t0)
        p0, m0 = hf.count_params_and_macs(model, x)
        p1, m1 = hf.count_params_and_macs(folded.graph_module, x)
        rep = folded.report
        rows.append((label, t_insert, statistics.median(times), p0, p1, m0, m1, rep.closed_units, rep.deleted_units))
    lines = [(f"Random masks closing ~{args.closed:.0%} of every channel group (channel granularity). "
             f"Machine: {common.machine()}."), "",
             ("| model | insert_gates s | fold_masks s (median) | params before | params after | MMACs before | "
             "MMACs after | closed units | deleted units |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:,} | {r[4]:,} | {r[5] / 1e6:,.1f} | "
                     f"{r[6] / 1e6:,.1f} | {r[7]} | {r[8]} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        common.write_section(Path(args.write), "bench_fold", "## Fold time and size (tools/bench_fold.py)\n\n" + text
                             + f"\n\nReproduce: `python tools/bench_fold.py --write {args.write}`")


if __name__ == "__main__":
    main()
