"""Where a structured run's accuracy gap comes from: the widths, the units picked, or the training.

A diagnostic beside tools/bench_structured.py, not a row of its table. For one hyperflux-compile run (its
``--out``, made from ``--weights DENSE``) it fine-tunes, from the dense weights and with Torch-Pruning's
recipe of bench_structured (``_finetune``: SGD, momentum 0.9, weight decay 5e-4, cosine, label smoothing
0.1, ``--epochs`` at each LR of ``--lrs``, the best per model as there):

- ``our_masks``: the run's final masks (checkpoints/last.pt's flows) on the dense weights;
- ``l2_our_widths``: an L2 group-magnitude pick from the dense weights of the same count per gated group;
- ``l2_tp_widths``: the same pick at the widths Torch-Pruning chose (``--tp-widths``: the conv/linear output
  widths in parameter order, as bench_structured's ``--json`` records them).

The magnitude of a unit is the sum of the squares of every weight its removal deletes: its producers' output
rows and its consumers' input columns (Torch-Pruning's ``GroupMagnitudeImportance(p=2)`` counts BatchNorm's
affine parameters too; they are left out here). Each model is folded with ``round_to=1`` so the widths are
exactly the masks'. Comparing the three with the run's own accuracy separates structure (``l2_our_widths`` −
``l2_tp_widths``), training (the run − ``l2_our_widths``) and selection (``our_masks`` − ``l2_our_widths``).

Usage: python tools/decompose_gap.py --arch digits_cnn --run OUT --weights DENSE.pt --seed 0
           [--tp-widths 22,22,...] [--epochs 15] [--lrs 0.01,0.05] [--json rows.jsonl]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import fx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common
from bench_structured import _finetune

import hyperflux_fx as hf
from hyperflux_fx.ir import GATES_ATTR, MASKS_ATTR, named_gates

EXACT_FOLD = hf.FoldConfig(round_to=1, round_to_width=1, min_conv_channels=1)


def gated_dense(arch: str, weights: Path, seed: int) -> fx.GraphModule:
    ex = common.example_module(arch)
    model = ex.build_model()
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    cfg = hf.GateConfig(granularity="channel", seed=seed, cost="macs")
    return hf.insert_gates(model, cfg, example_inputs=ex.example_inputs()).graph_module


def _weight_name(node: fx.Node) -> str | None:
    """The name of the parameter a conv/linear node reads as its weight, or None."""
    arg = node.args[1] if node.op == "call_function" and len(node.args) > 1 else None
    return arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    name = _weight_name(node)
    return None if name is None else gm.get_parameter(name)


def magnitudes(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Per gate: each unit's sum of squared producer rows and consumer columns of the dense weights."""
    nodes = {n.name: n for n in gm.graph.nodes}
    gate_nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(GATES_ATTR)}
    out = {}
    for path, gate in named_gates(gm):
        imp = torch.zeros(gate.flow.numel(), dtype=torch.float64)
        for name in gate.producers:
            imp += _weight(gm, nodes[name]).detach().double().flatten(1).pow(2).sum(1)
        for mask_node in gate_nodes[path].users:
            if not (mask_node.op == "call_module" and mask_node.target.startswith(MASKS_ATTR)):
                continue
            if gm.get_submodule(mask_node.target).dim != 1:
                continue
            for consumer in mask_node.users:
                w = _weight(gm, consumer)
                if w is not None and w.shape[1] == imp.numel():
                    imp += w.detach().double().transpose(0, 1).flatten(1).pow(2).sum(1)
        out[path] = imp
    return out


def top_k(imp: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, torch.Tensor]:
    keep = {}
    for path, scores in imp.items():
        keep[path] = torch.zeros(scores.numel(), dtype=torch.bool)
        keep[path][torch.topk(scores, counts[path]).indices] = True
    return keep


def tp_counts(gm: fx.GraphModule, arch: str, widths: list[int]) -> dict[str, int]:
    """Per gate, the width Torch-Pruning gave its first producer (widths in parameter order, >= 2-dim)."""
    order = [n for n, p in common.example_module(arch).build_model().named_parameters() if p.dim() >= 2]
    nodes = {n.name: n for n in gm.graph.nodes}
    return {path: widths[order.index(_weight_name(nodes[g.producers[0]]))] for path, g in named_gates(gm)}


def compact(gm: fx.GraphModule, keep: dict[str, torch.Tensor]) -> fx.GraphModule:
    with torch.no_grad():
        for path, gate in named_gates(gm):
            gate.flow.copy_(torch.where(keep[path], 0.3, -0.3))
    return hf.fold_masks(gm, EXACT_FOLD).graph_module


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True, choices=["mnist1d_cnn", "mnist1d_hard_cnn", "mnist1d_resnet", "digits_cnn"])
    p.add_argument("--run", type=Path, required=True, help="a hyperflux-compile --out (channel gates)")
    p.add_argument("--weights", type=Path, required=True, help="the dense state_dict the run started from")
    p.add_argument("--seed", type=int, required=True, help="the run's --seed (gate init; the fine-tune's seed)")
    p.add_argument("--tp-widths", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lrs", type=lambda s: [float(v) for v in s.split(",")], default=[0.01, 0.05])
    p.add_argument("--json", type=Path, default=None, help="append one JSON line per model")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train_loader, test_loader = common.loaders(args.arch)
    inputs = common.example_module(args.arch).example_inputs()
    flows = torch.load(args.run / "checkpoints" / "last.pt", weights_only=False, map_location="cpu")["model"]
    ours = {k[: -len(".flow")]: v >= 0 for k, v in flows.items() if k.endswith(".flow")}
    gm = gated_dense(args.arch, args.weights, args.seed)
    imp = magnitudes(gm)
    picks = {"our_masks": ours, "l2_our_widths": top_k(imp, {k: int(v.sum()) for k, v in ours.items()})}
    if args.tp_widths:
        picks["l2_tp_widths"] = top_k(imp, tp_counts(gm, args.arch, args.tp_widths))
    run_state = torch.load(args.run / "compact.pt", weights_only=False)["state_dict"]
    run_widths = [int(t.shape[0]) for t in run_state.values() if t.dim() >= 2]
    folded = {name: compact(gated_dense(args.arch, args.weights, args.seed), keep) for name, keep in picks.items()}
    widths = {name: [int(t.shape[0]) for t in m.parameters() if t.dim() >= 2] for name, m in folded.items()}
    if widths["our_masks"] != run_widths:  # checked before any fine-tune is spent on a mismatch
        raise SystemExit(f"the run's masks fold to {widths['our_masks']}, its compact.pt has {run_widths}")
    for name, start in folded.items():
        by_lr, t0 = {}, time.time()
        for lr in args.lrs:
            torch.manual_seed(args.seed)
            model = copy.deepcopy(start)
            _finetune(model, train_loader, args.epochs, lr)
            by_lr[str(lr)] = hf.evaluate(model, test_loader)
        row = {"arch": args.arch, "seed": args.seed, "run": str(args.run), "model": name, "acc": max(by_lr.values()),
               "acc_by_lr": by_lr, "widths": widths[name], "macs": hf.count_params_and_macs(start, inputs)[1],
               "seconds": round(time.time() - t0)}
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
