"""What distillation from the dense model costs per training step, measured in the trainer itself.

For each architecture a dense model is built (random init: the cost does not depend on the weights),
gated with channel gates and trained by ``hf.train`` for one pruning epoch (MAC target 0.5, the CLI's
schedule otherwise), once with ``distill="off"`` and once with distillation (the defaults: the dense
model as the teacher, alpha and T of ``hyperflux_fx.config``). The two runs alternate ``--repeats``
times in this one process (CPU, one thread); the median seconds per step of each are compared.

Usage: python tools/bench_distill_overhead.py [--archs mnist1d_cnn,digits_cnn] [--repeats 3] [--write FILE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common

import hyperflux_fx as hf


def _seconds_per_step(arch: str, distill: str) -> float:
    ex = common.example_module(arch)
    torch.manual_seed(0)
    dense = ex.build_model().eval()
    gated = hf.insert_gates(copy.deepcopy(dense), hf.GateConfig(granularity="channel", seed=0, cost="macs"),
                            example_inputs=ex.example_inputs()).graph_module
    loader = common.loaders(arch)[0]
    res = hf.train(gated, loader, None, hf.TrainConfig(target_sparsity=0.5, epochs=1, regrowth_epochs=0,
                                                       target_measure="macs", distill=distill, seed=0),
                   teacher=dense)
    return res.seconds / res.steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="mnist1d_cnn,digits_cnn")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = [f"Machine: {common.machine()}. One pruning epoch of `hf.train` (channel gates, MAC target 0.5), "
             f"median of {args.repeats} alternating runs.", "",
             "| arch | ms per step, distill off | ms per step, distillation | overhead |", "|---|---|---|---|"]
    for arch in args.archs.split(","):
        times: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.repeats):
            for mode in ("off", "on"):
                times[mode].append(_seconds_per_step(arch, mode))
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        lines.append(f"| {arch} | {1e3 * off:.2f} | {1e3 * on:.2f} | {on / off:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        common.write_section(Path(args.write), "bench_distill_overhead",
                             "## What distillation costs per step (tools/bench_distill_overhead.py)\n\n" + text
                             + "\n\nReproduce: `python tools/bench_distill_overhead.py --write docs/BENCHMARKS.md`")


if __name__ == "__main__":
    main()
