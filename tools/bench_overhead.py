"""Overhead of gating: training-step time of a gated vs the dense model, and trace + insert_gates time.

Training step: torchvision resnet18 (10 classes) at 3x32x32, batch 64, CPU, one thread. Dense: SGD
(momentum 0.9, weight decay 5e-4) forward/backward/step with cross-entropy. Gated: the same plus
the flow parameters' Adam step (fused: one pass over the flows, as the trainer uses it), with
pressure on (the hooks add gamma/N). Both run in this process,
alternating step by step after warm-up; medians are compared.

Gating time: torchvision resnet50 and timm deit_small_patch16_224, wall time of ``hf.trace`` and of
``hf.insert_gates`` on the traced module (warm: one untimed run first pays one-time imports).

Usage: python tools/bench_overhead.py [--steps 12] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import hyperflux_fx as hf


def _step_fn(model, optimisers, x, y):
    def step() -> float:
        t0 = time.perf_counter()
        for opt in optimisers:
            opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        for opt in optimisers:
            opt.step()
        return time.perf_counter() - t0
    return step


def bench_training_step(steps: int, warmup: int = 2) -> dict[str, float]:
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).train()
    gated = hf.insert_gates(dense, hf.GateConfig(seed=0)).graph_module.train()
    hf.set_pressure(gated, 1.0)
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    flows = [g.flow for g in hf.gates(gated)]
    flow_ids = {id(f) for f in flows}
    weights = [p for p in gated.parameters() if id(p) not in flow_ids]
    gated_opts = [torch.optim.SGD(weights, lr=0.01, momentum=0.9, weight_decay=5e-4),
                  torch.optim.Adam(flows, lr=1e-3, fused=True)]
    run_dense = _step_fn(dense, [dense_opt], x, y)
    run_gated = _step_fn(gated, gated_opts, x, y)
    for _ in range(warmup):
        run_dense()
        run_gated()
    td, tg = [], []
    for i in range(steps):  # alternate, and alternate which goes first
        if i % 2 == 0:
            td.append(run_dense())
            tg.append(run_gated())
        else:
            tg.append(run_gated())
            td.append(run_dense())
    return {"dense_s": statistics.median(td), "gated_s": statistics.median(tg),
            "ratio": statistics.median(tg) / statistics.median(td), "steps": steps}


def bench_gating_time(repeats: int = 3) -> list[dict[str, float | str]]:
    import timm
    import torchvision

    rows: list[dict[str, float | str]] = []
    for label, build in (("torchvision:resnet50", lambda: torchvision.models.resnet50()),
                         ("timm:deit_small_patch16_224", lambda: timm.create_model("deit_small_patch16_224"))):
        model = build()
        hf.insert_gates(hf.trace(model))  # warm-up: one-time imports and code generation
        t_trace, t_insert = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            gm = hf.trace(model)
            t1 = time.perf_counter()
            hf.insert_gates(gm)
            t2 = time.perf_counter()
            t_trace.append(t1 - t0)
            t_insert.append(t2 - t1)
        rows.append({"model": label, "trace_s": statistics.median(t_trace),
                     "insert_gates_s": statistics.median(t_insert),
                     "total_s": statistics.median(t_trace) + statistics.median(t_insert)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--write", default=None, help="also write the markdown tables into this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    step = bench_training_step(args.steps)
    gating = bench_gating_time()
    if args.markdown or args.write:
        lines = ["| training step (resnet18, 3x32x32, batch 64, CPU, 1 thread) | dense s | gated s | gated/dense |",
                 "|---|---|---|---|",
                 (f"| median of {step['steps']}, alternating | {step['dense_s']:.3f} | {step['gated_s']:.3f} | "
                 f"{step['ratio']:.3f} |"), "",
                 "| model | trace s | insert_gates s | total s |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['trace_s']:.3f} | {r['insert_gates_s']:.3f} | {r['total_s']:.3f} |"
                  for r in gating]
        text = "\n".join(lines)
        print(text)
        if args.write:
            import sys
            from pathlib import Path

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import _bench_common as common

            common.write_section(Path(args.write), "bench_overhead",
                                 "## Gating overhead (tools/bench_overhead.py)\n\nMachine: " + common.machine()
                                 + ".\n\n" + text + f"\n\nReproduce: `python tools/bench_overhead.py --steps "
                                 f"{args.steps} --write {args.write}`")
        return
    print(f"training step, resnet18 3x32x32 batch 64, CPU 1 thread, median of {step['steps']} alternating:")
    print(f"  dense {step['dense_s']:.3f} s   gated {step['gated_s']:.3f} s   ratio gated/dense {step['ratio']:.3f}"
          "   (target <= 1.25)")
    print("trace + insert_gates (warm, median of 3):")
    for r in gating:
        print(f"  {r['model']:<30} trace {r['trace_s']:.3f} s  insert_gates {r['insert_gates_s']:.3f} s  "
              f"total {r['total_s']:.3f} s   (target <= 1 s)")


if __name__ == "__main__":
    main()
