"""Structured pruning, head to head: hyperflux-compile (its defaults) against Torch-Pruning at equal MACs.

For each architecture and seed a dense model is trained once (``hf.train_dense``, the CLI's dense
schedule: ``--dense-epochs`` epochs, SGD LR 0.1, cosine, label smoothing 0.1). From that same start,
for each MAC reduction (2x, 4x, 16x by default):

* **hyperflux channel**: ``hyperflux-compile MODEL --weights DENSE --target-sparsity s`` run as a
  user runs it, with every other flag at its default (channel gates, the MAC target, 5 pruning + 10
  regrowth epochs, ``round_to="auto"``). Its compact model's own MACs set the baselines' target.
* **Torch-Pruning 1.6.1** (``pip install .[bench]``), its documented recipes, each pruned with a
  uniform per-layer ratio (its default, ``global_pruning=False``; the classifier left alone) that
  is bisected so the pruned model has the MACs the Hyperflux model reached (the same counter for
  both), then fine-tuned so that every method trains for the same number of epochs as Hyperflux:
  - (a) ``MagnitudePruner`` with ``GroupMagnitudeImportance`` (L2), one shot, then fine-tune;
  - (b) the same in 5 steps, an equal share of the fine-tuning after each step;
  - (c) ``GroupNormPruner``: sparse training with its regulariser (``pruner.regularize`` after each
    backward, its default ``reg``) for a third of the budget, then prune, then fine-tune the rest;
  - (d) (a) fine-tuned with the same distillation from the same dense model as hyperflux-compile's
    default (``DISTILL_ALPHA``, ``DISTILL_TEMPERATURE``): what the method is worth apart from the
    recovery trick.
  Fine-tuning is SGD (momentum 0.9, weight decay 5e-4, cosine, label smoothing 0.1), at each LR of
  ``--baseline-lrs``; the best test accuracy counts, per seed (this favours the baselines). Every LR's
  accuracy goes to ``--json`` (``acc_by_lr``), and the table's last line says how much that per-seed
  choice adds over one LR per cell.

hyperflux-compile's conv rounding (``round_to="auto"``: ONNX Runtime's NCHWc block, 16 with AVX-512 and 8
with AVX2) depends on the CPU, and so did its conv floor until it became a setting of its own
(``min_conv_channels``: 16 on every CPU, docs/folding.md); the table's header names both, as each arch
resolved them.

Every model is exported to ONNX and timed in ONNX Runtime (CPU, 1 thread, batch ``--latency-batch``)
side by side with the dense export. Accuracies are on the fixed test split (MNIST-1D: 1000 signals;
digits: 360 images), mean ± std over seeds. The per-layer widths each method chose go to
``--json`` for diagnosis.

Architectures: mnist1d_cnn (MNIST-1D), mnist1d_hard_cnn (the same CNN on mnist1d-hard, dense ~90%),
mnist1d_resnet (a residual Conv1d network: skip connections couple whole stages), digits_cnn.

The rows behind the published table are kept in the repository, one ``--json`` file per arch and seed
(docs/data/bench_structured/ARCH_SEED.json): ``--from-json docs/data/bench_structured`` renders the table
again, and when a default of ours changes, ``--baselines-from`` the same folder reruns only the Hyperflux
rows wherever the Torch-Pruning ones would come out the same (a full seed of all four archs is about 40–45
minutes of one core, most of it Torch-Pruning's eight fine-tunes per cell).

Usage: python tools/bench_structured.py [--archs mnist1d_cnn,mnist1d_hard_cnn,...] [--seeds 0,1,2]
           [--write docs/BENCHMARKS.md] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common

import hyperflux_fx as hf
from hyperflux_fx.config import CHANNEL_EPOCHS, DISTILL_ALPHA, DISTILL_TEMPERATURE
from hyperflux_fx.export.latency import compare_latency
from hyperflux_fx.train.distill import Distiller

ROOT = common.ROOT
REDUCTIONS = (2, 4, 16)
KD_LABEL = "TP magnitude, one-shot + FT with distillation"


ARCHS = ("mnist1d_cnn", "mnist1d_hard_cnn", "mnist1d_resnet", "digits_cnn", "mnist1d_mlp")


def _arch(name: str):
    """(model.py path, build(), example inputs, train loader, test loader) of an architecture."""
    if name not in ARCHS:
        raise SystemExit(f"unknown arch {name!r}: {', '.join(ARCHS)}")
    ex = common.example_module(name)
    return (ROOT / "examples" / f"{name}.py", ex.build_model, ex.example_inputs(), *common.loaders(name))


def _finetune(model: nn.Module, loader: DataLoader, epochs: int, lr: float, hook=None,
              teacher: nn.Module | None = None) -> None:
    """SGD (momentum 0.9, weight decay 5e-4 on conv/linear weights), cosine LR, label smoothing 0.1; with a
    ``teacher``, the loss hyperflux-compile's distillation uses (its default alpha and temperature)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]  # conv/linear weights, also in a folded fx graph
    ids = {id(p) for p in decay}
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4},
                           {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": 0.0}],
                          lr=lr, momentum=0.9)
    total, i = max(epochs * len(loader), 1), 0
    distiller = None if teacher is None else Distiller(teacher, DISTILL_ALPHA, DISTILL_TEMPERATURE, required=True)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / total))
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=0.1)
            if distiller is not None:
                loss = distiller.loss(loss, out, distiller.teacher_outputs((x,)))[0]
            loss.backward()
            if hook is not None:
                hook(model)
            opt.step()
            i += 1
    model.eval()


def _macs(model: nn.Module, inputs) -> int:
    return hf.count_params_and_macs(model.eval(), inputs)[1]


def _widths(model: nn.Module) -> list[int]:
    """Output widths of the conv/linear layers, in module order."""
    return [int(m.weight.shape[0]) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def _tp_pruner(tp, kind: str, model: nn.Module, inputs, ratio: float, steps: int = 1):
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    cls = tp.pruner.GroupNormPruner if kind == "groupnorm" else tp.pruner.MagnitudePruner
    return cls(model, inputs[0], importance=imp, pruning_ratio=ratio, iterative_steps=steps,
               ignored_layers=[classifier])


def _ratio_for_macs(tp, model: nn.Module, inputs, macs: int) -> float:
    """The uniform per-layer ratio whose pruned model has the MACs closest to ``macs`` (bisection)."""
    def macs_at(r: float) -> int:
        m = copy.deepcopy(model)
        _tp_pruner(tp, "magnitude", m, inputs, r).step()
        return _macs(m, inputs)

    lo, hi = 0.0, 0.99
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs_at(mid) > macs else (lo, mid)
    return min((lo, hi), key=lambda r: abs(macs_at(r) - macs))


def torch_pruning(tp, recipe: str, dense: nn.Module, inputs, loader: DataLoader, ratio: float, epochs: int,
                  lr: float) -> nn.Module:
    model = copy.deepcopy(dense)
    if recipe in ("one-shot", "one-shot-kd"):
        _tp_pruner(tp, "magnitude", model, inputs, ratio).step()
        _finetune(model, loader, epochs, lr, teacher=dense.eval() if recipe == "one-shot-kd" else None)
    elif recipe == "iterative":
        pruner = _tp_pruner(tp, "magnitude", model, inputs, ratio, steps=5)
        share = [epochs // 5 + (1 if k < epochs % 5 else 0) for k in range(5)]
        for k in range(5):
            pruner.step()
            _finetune(model, loader, share[k], lr)
    else:  # group-norm sparse training, prune, fine-tune
        pruner = _tp_pruner(tp, "groupnorm", model, inputs, ratio)
        sparse = max(epochs // 3, 1)
        pruner.update_regularizer()
        _finetune(model, loader, sparse, lr, hook=lambda m: pruner.regularize(m))
        pruner.step()
        _finetune(model, loader, epochs - sparse, lr)
    return model.eval()


def hyperflux(path: Path, weights: Path, sparsity: float, seed: int, out: Path, epochs: tuple[int, int]) -> dict:
    """hyperflux-compile with its defaults (the target asked, and the epochs, which are the CLI's
    defaults unless --quick); its summary.json, with the widths of the compact model's conv/linear
    layers read from compact.pt."""
    cmd = [sys.executable, "-m", "hyperflux_fx.cli", str(path), "--weights", str(weights), "--target-sparsity",
           str(sparsity), "--seed", str(seed), "--epochs", str(epochs[0]), "--regrowth-epochs", str(epochs[1]),
           "--out", str(out), "--quiet", "--force"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.loads((out / "summary.json").read_text())
    state = torch.load(out / "compact.pt", weights_only=False)["state_dict"]
    summary["widths"] = [int(t.shape[0]) for k, t in state.items() if k.endswith("weight") and t.dim() >= 2]
    return summary


def _speedups(dense: nn.Module, models: list[nn.Module | Path], inputs, batch: int, tmp: Path) -> list[float]:
    """Dense / compact ORT latency of each model (a module, or an ONNX file with a dynamic batch),
    each timed side by side with the dense export."""
    x = tuple(torch.randn(batch, *t.shape[1:]) for t in inputs)
    paths = [tmp / "dense.onnx"]
    hf.export_onnx(dense.eval(), x, paths[0])
    for i, m in enumerate(models):
        if isinstance(m, Path):
            paths.append(m)
            continue
        paths.append(tmp / f"m{i}.onnx")
        hf.export_onnx(m.eval(), x, paths[-1])
    out = []
    for p in paths[1:]:
        d, c = compare_latency([paths[0], p], batch=batch)
        out.append(d["median_ms"] / c["median_ms"])
    return out


RECIPES = (("one-shot", "TP magnitude, one-shot + FT"), ("iterative", "TP magnitude, iterative (5 steps)"),
           ("groupnorm", "TP group-norm sparse training + FT"), ("one-shot-kd", KD_LABEL))


def _baselines(tp, dense: nn.Module, inputs, train_loader: DataLoader, test_loader: DataLoader, macs: int, seed: int,
               budget: int, lrs: list[float], macs_dense: int) -> list[dict]:
    """Each Torch-Pruning recipe pruned to ``macs`` and fine-tuned for ``budget`` epochs, best of ``lrs``."""
    ratio = _ratio_for_macs(tp, dense, inputs, macs)
    found = []
    for recipe, label in RECIPES:
        best, by_lr = None, {}
        for lr in lrs:
            torch.manual_seed(seed)
            m = torch_pruning(tp, recipe, dense, inputs, train_loader, ratio, budget, lr)
            acc = by_lr[str(lr)] = hf.evaluate(m, test_loader)
            if best is None or acc > best["acc"]:
                best = {"method": label, "model": m, "acc": acc, "macs": _macs(m, inputs) / macs_dense,
                        "params": sum(p.numel() for p in m.parameters()), "widths": _widths(m), "lr": lr}
        found.append({**best, "acc_by_lr": by_lr})
    return found


def _cached_baselines(cache: list[dict], arch: str, seed: int, x: int, dense_acc: float, macs: float
                      ) -> list[dict] | None:
    """The Torch-Pruning rows of an earlier run of this cell (``--baselines-from``), when they are what a
    rerun would give or can only favour the baselines: the same dense start (its test accuracy equal to the
    bit: the dense training is deterministic), and either the earlier Hyperflux model had exactly the MACs
    ``macs`` (the baselines are bisected to those MACs and fine-tuned deterministically: a rerun gives the
    same rows) or every baseline had at least ``macs``. None otherwise: the baselines are run again."""
    same = [r for r in cache if r["arch"] == arch and r["seed"] == seed]
    if not any(r["x"] == 1 and r["acc"] == dense_acc for r in same):
        return None
    by_label = {}
    for r in same:
        if r["x"] == x:
            by_label.setdefault(r["method"], r)  # the first file that has the cell
    rows = [by_label.get(label) for _, label in RECIPES]
    if any(r is None for r in rows):
        return None
    ours = by_label.get("hyperflux channel (defaults)")
    if not (ours is not None and ours["macs"] == macs) and any(r["macs"] < macs for r in rows):
        return None
    return [{**r, "reused": True} for r in rows]


def _save(rows: list[dict], args) -> None:
    """Rows so far to ``--json`` (after every seed: a long run stopped early keeps what it finished)."""
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def run_arch(arch: str, seeds: list[int], args, tp, rows: list[dict]) -> None:
    path, build, inputs, train_loader, test_loader = _arch(arch)
    budget = args.prune_epochs + args.regrowth_epochs
    lrs = [float(x) for x in args.baseline_lrs.split(",")]
    for seed in seeds:
        torch.manual_seed(seed)
        dense = build()
        hf.train_dense(dense, train_loader, epochs=args.dense_epochs, seed=seed)
        dense.eval()
        macs_dense = _macs(dense, inputs)
        dense_acc = hf.evaluate(dense, test_loader)
        rows.append({"arch": arch, "seed": seed, "x": 1, "method": "dense", "macs": 1.0, "speedup": 1.0,
                     "params": sum(p.numel() for p in dense.parameters()), "acc": dense_acc,
                     "widths": _widths(dense)})
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            weights = tmp / "dense.pt"
            torch.save(dense.state_dict(), weights)
            for x in args.reductions:
                t0 = time.time()
                try:
                    s = hyperflux(path, weights, 1 - 1 / x, seed, tmp / f"hf{x}", (args.prune_epochs,
                                                                                    args.regrowth_epochs))
                except subprocess.CalledProcessError:  # the CLI said why (e.g. a target out of reach)
                    print(f"  {arch} seed {seed} {x}x: hyperflux-compile refused the target, skipped",
                          file=sys.stderr, flush=True)
                    continue
                found = [{"method": "hyperflux channel (defaults)", "model": tmp / f"hf{x}" / "compact.onnx",
                          "acc": s["compact_accuracy"], "macs": s["macs_compact"] / s["macs_dense"],
                          "params": s["params_compact_stored"], "widths": s["widths"], "round_to": s["round_to"],
                          "min_conv_channels": s["min_conv_channels"]}]
                cached = _cached_baselines(args.cached, arch, seed, x, dense_acc, found[0]["macs"]) or []
                if not cached:
                    found += _baselines(tp, dense, inputs, train_loader, test_loader, s["macs_compact"], seed, budget,
                                        lrs, macs_dense)
                speed = _speedups(dense, [f["model"] for f in found], inputs, args.latency_batch, tmp)
                for f, sp in zip(found, speed, strict=True):
                    rows.append({"arch": arch, "seed": seed, "x": x, "speedup": sp,
                                 **{k: v for k, v in f.items() if k != "model"}})
                rows.extend(cached)
                found += cached
                print(f"  {arch} seed {seed} {x}x (MACs {s['macs_compact'] / s['macs_dense']:.4f}): "
                      + ", ".join(f"{f['method']} {100 * f['acc']:.1f}" for f in found)
                      + f" ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        _save(rows, args)


def _seeds_by_arch(rows: list[dict]) -> dict[str, str]:
    """Each arch (in the rows' order) and the seeds it ran, as a ``--seeds`` value."""
    return {a: ",".join(str(s) for s in sorted({r["seed"] for r in rows if r["arch"] == a}))
            for a in dict.fromkeys(r["arch"] for r in rows)}


def _seeds_per_arch(rows: list[dict]) -> str:
    return ", ".join(f"{a} {s}" for a, s in _seeds_by_arch(rows).items())


def _reuse_note(rows: list[dict]) -> str:
    """Which cells' Torch-Pruning rows came from an earlier run (``--baselines-from``), if any."""
    reused = {(r["arch"], r["seed"], r["x"]) for r in rows if r.get("reused")}
    if not reused:
        return ""
    cells = {(r["arch"], r["seed"], r["x"]) for r in rows if r["x"] != 1}
    return (f" Torch-Pruning rows of {len(reused)} of {len(cells)}"
            " cells reused from an earlier run of the same dense start, where hyperflux-compile reached the same MACs"
            " or they had at least ours (`--baselines-from`; their speed-ups were timed in that run).")


def _rounding_note(rows: list[dict]) -> str:
    """The conv rounding and floor hyperflux-compile resolved, per arch over the reductions, as "round_to
    (min_conv_channels)": the rounding is ONNX Runtime's NCHWc block on the CPU that ran it (16 with AVX-512,
    8 with AVX2), the floor 16; both halved where a target needs it. Rows from before the floor was a setting
    of its own had the block as the floor. Empty for rows that predate both fields."""
    ours = [r for r in rows if r["method"].startswith("hyperflux") and "round_to" in r]
    if not ours:
        return ""
    per_arch = {}
    for arch in dict.fromkeys(r["arch"] for r in ours):
        per_x = {x: sorted({(r["round_to"], r.get("min_conv_channels", r["round_to"])) for r in ours
                            if r["arch"] == arch and r["x"] == x})
                 for x in sorted({r["x"] for r in ours if r["arch"] == arch})}
        per_arch[arch] = " / ".join(",".join(f"{b} ({m})" for b, m in vs) for vs in per_x.values())
    return " hyperflux-compile's resolved `round_to` (conv floor) per reduction: " + "; ".join(
        f"{a} {v}" for a, v in per_arch.items()) + "."


def lr_selection_note(rows: list[dict]) -> str:
    """How much choosing Torch-Pruning's LR per seed on the test set adds over one LR per cell (the LR whose
    mean over the seeds is best), averaged over the cells and recipes whose rows carry every LR's accuracy
    (``acc_by_lr``); empty when none do or only one LR ran."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if len(r.get("acc_by_lr", {})) > 1:
            groups.setdefault((r["arch"], r["x"], r["method"]), []).append(r)
    gains = []
    for rs in groups.values():
        per_seed = statistics.mean(max(r["acc_by_lr"].values()) for r in rs)
        fixed = max(statistics.mean(r["acc_by_lr"][lr] for r in rs) for lr in rs[0]["acc_by_lr"])
        gains.append(100 * (per_seed - fixed))
    if not gains:
        return ""
    return (f"Torch-Pruning's LR is the best of {len(next(iter(groups.values()))[0]['acc_by_lr'])} per seed, on "
            f"the test set: over {len(gains)} cells and recipes that adds {statistics.mean(gains):+.2f} pt on "
            f"average (at most {max(gains):+.2f}) to its mean, against one LR per cell chosen on the seeds' mean.")


def table(rows: list[dict], args) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["x"], r["method"]), []).append(r)
    lines = [f"Machine: {common.machine()}. Dense start: {args.dense_epochs} epochs; then "
             f"{args.prune_epochs + args.regrowth_epochs} epochs per method; seeds {_seeds_per_arch(rows)}; "
             "Torch-Pruning best "
             f"of fine-tune LR {args.baseline_lrs}; ORT CPU 1 thread, batch {args.latency_batch}."
             + _rounding_note(rows) + _reuse_note(rows), "",
             "| arch | MAC reduction asked | method | MAC fraction | ORT speed-up | params | test acc % (mean ± std) |",
             "|---|---|---|---|---|---|---|"]
    for (arch, x, method), rs in groups.items():
        acc = [100 * r["acc"] for r in rs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        asked = "-" if x == 1 else f"{x}x"
        lines.append(f"| {arch} | {asked} | {method} | {statistics.mean(r['macs'] for r in rs):.4f} "
                     f"| {statistics.mean(r['speedup'] for r in rs):.2f}x | "
                     f"{statistics.mean(r['params'] for r in rs):,.0f} | {statistics.mean(acc):.2f} ± {std:.2f} |")
    note = lr_selection_note(rows)
    return "\n".join(lines + (["", note] if note else []))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="mnist1d_cnn,mnist1d_hard_cnn,mnist1d_resnet,digits_cnn")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--reductions", default="2,4,16")
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--prune-epochs", type=int, default=CHANNEL_EPOCHS[0],
                        help="the CLI's default with channel gates (its --epochs)")
    parser.add_argument("--regrowth-epochs", type=int, default=CHANNEL_EPOCHS[1], help="the CLI's default")
    parser.add_argument("--baseline-lrs", default="0.01,0.05")
    parser.add_argument("--latency-batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    parser.add_argument("--write", default=None)
    parser.add_argument("--figure", default=None, help="also plot test accuracy against ORT speed-up (PNG)")
    parser.add_argument("--from-json", default=None,
                        help="comma-separated --json files of earlier runs (a folder: its *.json): print/write "
                             "their table and figure")
    parser.add_argument("--quick", action="store_true", help="one arch, one seed, 4x, short: a smoke run")
    parser.add_argument("--baselines-from", default=None,
                        help="comma-separated --json files of earlier runs (a folder: its *.json): reuse a cell's "
                             "Torch-Pruning rows when "
                             "its dense start is the same and Hyperflux reached the same MACs there, or they had "
                             "at least the MACs Hyperflux reaches now")
    args = parser.parse_args(argv)
    args.cached = common.load_rows(args.baselines_from)
    if args.from_json:
        rows = common.load_rows(args.from_json)
        _report(rows, args)
        return
    try:
        import torch_pruning as tp
    except ImportError:
        raise SystemExit("Torch-Pruning is not installed: pip install -e .[bench]") from None
    torch.set_num_threads(1)
    if args.quick:
        args.archs, args.seeds, args.reductions = "mnist1d_cnn", "0", "4"
        args.dense_epochs, args.prune_epochs, args.regrowth_epochs, args.baseline_lrs = 1, 1, 0, "0.05"
    args.reductions = [int(x) for x in str(args.reductions).split(",")]
    rows: list[dict] = []
    t0 = time.time()
    for arch in args.archs.split(","):
        run_arch(arch, [int(s) for s in args.seeds.split(",")], args, tp, rows)
    print(f"(total {time.time() - t0:.0f} s)")
    _save(rows, args)
    _report(rows, args)


def figure(rows: list[dict], path: Path) -> None:
    """Test accuracy (mean ± std over seeds) against measured ORT speed-up, one panel per arch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        methods = list(dict.fromkeys(r["method"] for r in rows if r["arch"] == arch and r["x"] != 1))
        for method in methods:
            pts = []
            for x in sorted({r["x"] for r in rows if r["arch"] == arch and r["x"] != 1}):
                rs = [r for r in rows if r["arch"] == arch and r["method"] == method and r["x"] == x]
                acc = [100 * r["acc"] for r in rs]
                pts.append((statistics.mean(r["speedup"] for r in rs), statistics.mean(acc),
                            statistics.stdev(acc) if len(acc) > 1 else 0.0))
            style = dict(marker="o", lw=2.5) if method.startswith("hyperflux") else dict(marker="s", lw=1, ls="--")
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], label=method,
                        capsize=3, **style)
        dense = [100 * r["acc"] for r in rows if r["arch"] == arch and r["x"] == 1]
        ax.axhline(statistics.mean(dense), color="gray", lw=0.8, ls=":", label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("measured ONNX Runtime speed-up (CPU, 1 thread)")
        ax.set_ylabel("test accuracy %")
        asked = sorted({r["x"] for r in rows if r["arch"] == arch and r["x"] != 1})
        ax.set_title(f"{arch}: " + " / ".join(f"{x}x" for x in asked) + " fewer MACs")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(rows: list[dict], args) -> None:
    text = table(rows, args)
    print(text)
    if args.figure:
        figure(rows, Path(args.figure))
    if args.write:
        common.write_section(Path(args.write), "bench_structured",
                             "## Structured pruning against Torch-Pruning at equal MACs (tools/bench_structured.py)"
                             f"\n\n{text}\n\nReproduce: `pip install -e .[bench]`, then {_commands(rows, args)}")


def _commands(rows: list[dict], args) -> str:
    """The command lines that rerun ``rows``: one per arch when the archs ran different seeds."""
    seeds = _seeds_by_arch(rows)
    if len(set(seeds.values())) == 1:
        return f"`python tools/bench_structured.py --archs {','.join(seeds)} --seeds {seeds.popitem()[1]} " \
               f"--write {args.write}`"
    runs = [f"`python tools/bench_structured.py --archs {a} --seeds {s} --json {a}.json`" for a, s in seeds.items()]
    files = ",".join(f"{a}.json" for a in seeds)
    return " and ".join(runs) + f", then `python tools/bench_structured.py --from-json {files} --write {args.write}`"


if __name__ == "__main__":
    main()
