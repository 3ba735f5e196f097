"""Hyperflux vs magnitude pruning at the same epoch budget and sparsity, on digits.

For each architecture (examples/digits_cnn.py and a 3-layer MLP on digits; examples/mnist1d_cnn.py and
examples/mnist1d_mlp.py on MNIST-1D with ``--archs mnist1d_cnn,mnist1d_mlp``) a dense model is trained first
(``--dense-epochs``). From it, for each target sparsity:

* **Hyperflux**: ``insert_gates`` + ``train`` (``--prune-epochs`` pruning + ``--regrowth-epochs``
  regrowth, landing on the target).
* **One-shot global magnitude + fine-tune**: ``torch.nn.utils.prune.global_unstructured`` (L1) over
  the same weights Hyperflux gates, then fine-tuning for the whole budget.
* **Gradual magnitude pruning** (Zhu & Gupta 2017): global magnitude masks recomputed every
  ``--gmp-every`` steps, sparsity following ``s_t = s_f (1 - (1 - t / T_p)^3)`` over the first 75% of
  the budget, then fine-tuning with the masks fixed.

Baselines use SGD (momentum 0.9, weight decay 5e-4) with cosine LR; each is run at every LR in
``--baseline-lrs`` and the best test accuracy is reported (this favours the baselines). Sparsity is
measured over the gated weights (every conv/linear weight). Accuracies are on the fixed 360-image
test split, mean over ``--seeds``. The last column is each method's training wall time per step
(for Hyperflux including its interval bookkeeping and val evaluation); on CUDA (``--device cuda``)
every method runs with the same ``--amp`` (bf16 by default there).

Usage: python tools/bench_sparsity.py [--write docs/BENCHMARKS.md] [--quick] [--device cuda --archs resnet18]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common

import hyperflux_fx as hf


def _weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def _sparsity(model: nn.Module) -> float:
    ws = [getattr(m, n) for m, n in _weights(model)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = {id(getattr(m, n)) for m, n in _weights(model)}
    params = list(model.parameters())
    return torch.optim.SGD([{"params": [p for p in params if id(p) in decay], "weight_decay": 5e-4},
                            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}],
                           lr=lr, momentum=0.9)


DEVICE = torch.device("cpu")
AMP: torch.dtype | None = None


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _run_epochs(model, loader, epochs, lr, step_hook=None):
    opt = _sgd(model, lr)
    total = epochs * len(loader)
    i = 0
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / total))
            opt.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE.type, dtype=AMP, enabled=AMP is not None):
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            loss.backward()  # bf16 autocast: no loss scaling needed
            opt.step()
            if step_hook is not None:
                step_hook(i, total)
            i += 1


def one_shot(dense, loader, target, epochs, lr):
    model = copy.deepcopy(dense)
    prune.global_unstructured(_weights(model), pruning_method=prune.L1Unstructured, amount=target)
    _run_epochs(model, loader, epochs, lr)  # the pruning re-parametrisation keeps pruned weights at 0
    for m, n in _weights(model):
        prune.remove(m, n)
    return model


def gradual(dense, loader, target, epochs, lr, every):
    model = copy.deepcopy(dense)
    params = [getattr(m, n) for m, n in _weights(model)]
    masks = [torch.ones_like(p) for p in params]

    def recompute(s):
        flat = torch.cat([(p.detach() * mk).abs().flatten() for p, mk in zip(params, masks, strict=True)])
        k = round(s * flat.numel())
        if k < 1:
            return
        thr = torch.kthvalue(flat, k).values
        for p, mk in zip(params, masks, strict=True):
            mk.copy_(((p.detach().abs() > thr) & (mk > 0)).float())

    def hook(i, total):
        prune_steps = int(0.75 * total)
        if i < prune_steps and i % every == 0:
            s = target * (1 - (1 - i / prune_steps) ** 3)
            recompute(s)
        elif i == prune_steps:
            recompute(target)
        with torch.no_grad():
            for p, mk in zip(params, masks, strict=True):
                p.mul_(mk)

    _run_epochs(model, loader, epochs, lr, step_hook=hook)
    return model


def _timed(steps, fn, *args, **kwargs):
    """(result, ms per step) of ``fn(*args, **kwargs)``, synchronised on CUDA."""
    _sync()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync()
    return out, 1000 * (time.perf_counter() - t0) / steps


def hyperflux(dense, train_loader, test_loader, target, prune_epochs, regrowth_epochs, seed, amp="off"):
    gated = hf.insert_gates(dense.cpu(), hf.GateConfig(seed=seed)).graph_module
    res = hf.train(gated, train_loader, test_loader,
                   hf.TrainConfig(target_sparsity=target, epochs=prune_epochs, regrowth_epochs=regrowth_epochs,
                                  seed=seed, device=str(DEVICE), amp=amp))
    return gated, res, res.density_before_landing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.9,0.95,0.98")
    parser.add_argument("--archs", default="digits_cnn,digits_mlp")
    parser.add_argument("--dense-epochs", type=int, default=15)
    parser.add_argument("--prune-epochs", type=int, default=10)
    parser.add_argument("--regrowth-epochs", type=int, default=5)
    parser.add_argument("--baseline-lrs", default="0.01,0.05")
    parser.add_argument("--gmp-every", type=int, default=5, help="steps between gradual-magnitude mask updates")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--write", default=None, help="also write the table into this markdown file")
    parser.add_argument("--quick", action="store_true", help="one target, one arch, short: a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                        help="autocast for every method on CUDA (auto: bf16); ignored on the CPU")
    args = parser.parse_args()
    global DEVICE, AMP
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    amp = args.amp if DEVICE.type == "cuda" else "off"
    AMP = torch.bfloat16 if amp in ("auto", "bf16") else None
    torch.set_num_threads(1)
    if args.quick:
        args.targets, args.archs = "0.9", "digits_mlp"
        args.dense_epochs, args.prune_epochs, args.regrowth_epochs = 3, 2, 1
        args.baseline_lrs = "0.05"
    targets = [float(t) for t in args.targets.split(",")]
    lrs = [float(x) for x in args.baseline_lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    budget = args.prune_epochs + args.regrowth_epochs
    rows = []
    t0 = time.time()
    for arch in args.archs.split(","):
        train_loader, test_loader = common.loaders(arch)
        steps = budget * len(train_loader)
        for seed in seeds:
            torch.manual_seed(seed)
            dense = common.ARCHS[arch]()
            _, ms = _timed(args.dense_epochs * len(train_loader), hf.train_dense, dense, train_loader,
                           epochs=args.dense_epochs, seed=seed, device=str(DEVICE), amp=amp)
            dense_acc = hf.evaluate(dense, test_loader)
            rows.append((arch, seed, "-", "dense", 0.0, dense_acc, None, ms))
            for target in targets:
                (_, res, before), ms = _timed(steps, hyperflux, dense, train_loader, test_loader, target,
                                              args.prune_epochs, args.regrowth_epochs, seed, amp)
                rows.append((arch, seed, target, "hyperflux", res.sparsity, res.val_accuracy,
                             None if before is None else 1 - before, ms))
                dense.to(DEVICE)
                runs = [_timed(steps, one_shot, dense, train_loader, target, budget, lr) for lr in lrs]
                best = max((hf.evaluate(m, test_loader), _sparsity(m)) for m, _ in runs)
                rows.append((arch, seed, target, "one-shot magnitude + FT", best[1], best[0], None,
                             statistics.mean(t for _, t in runs)))
                runs = [_timed(steps, gradual, dense, train_loader, target, budget, lr, args.gmp_every) for lr in lrs]
                best = max((hf.evaluate(m, test_loader), _sparsity(m)) for m, _ in runs)
                rows.append((arch, seed, target, "gradual magnitude (cubic)", best[1], best[0], None,
                             statistics.mean(t for _, t in runs)))
                print(f"  {arch} seed {seed} target {target}: done ({time.time() - t0:.0f}s)", file=sys.stderr)

    # aggregate over seeds
    table = {}
    for arch, _seed, target, method, sp, acc, pre, ms in rows:
        table.setdefault((arch, target, method), []).append((sp, acc, pre, ms))
    data = sorted({common.DATA[common.dataset(a)] for a in args.archs.split(",")})
    lines = [(f"{' and '.join(data)}, dense {args.dense_epochs} epochs, then {budget} epochs "
             f"per method ({args.prune_epochs} pruning + {args.regrowth_epochs} regrowth for Hyperflux); "
             f"seeds {args.seeds}; baselines best of LR {args.baseline_lrs}. Machine: {common.machine(args.device)}"
             f"{', AMP bf16' if AMP is not None else ''}."),
             "",
             "| arch | target | method | achieved sparsity | test acc % | before landing | ms/step |",
             "|---|---|---|---|---|---|---|"]
    for (arch, target, method), vals in table.items():
        sp = statistics.mean(v[0] for v in vals)
        acc = statistics.mean(v[1] for v in vals)
        pre = [v[2] for v in vals if v[2] is not None]
        pre_s = f"{statistics.mean(pre):.4f}" if pre else ""
        ms = statistics.mean(v[3] for v in vals)
        lines.append(f"| {arch} | {target} | {method} | {sp:.4f} | {100 * acc:.2f} | {pre_s} | {ms:.1f} |")
    text = "\n".join(lines)
    print(text)
    print(f"\n(total {time.time() - t0:.0f} s)")
    if args.write:  # MNIST-1D runs get their own section beside the digits one
        mnist1d = all(common.dataset(a) == "mnist1d" for a in args.archs.split(","))
        name, title = (("bench_sparsity_mnist1d", "Sparsity vs accuracy on MNIST-1D") if mnist1d
                       else ("bench_sparsity", "Sparsity vs accuracy"))
        how = (f"python tools/bench_sparsity.py --archs {args.archs} --targets {args.targets} --seeds {args.seeds} "
               f"--write {args.write}")
        common.write_section(Path(args.write), name, f"## {title} (tools/bench_sparsity.py)\n\n{text}\n\n"
                             f"Reproduce: `{how}`")


if __name__ == "__main__":
    main()
