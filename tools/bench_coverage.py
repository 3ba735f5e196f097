"""Structural coverage: the gateable channel share, its blockers and the fold's exactness, per model.

For each model (random init, made sensitive as in the fold tests: norm affines drawn, BatchNorm
statistics re-estimated) at channel granularity:

- the gateable channel share (channels in gated groups over the output channels of the groups the
  graph output does not consume) and the blockers, with the channels each holds back;
- random masks closing about 30%, 50% and 90% of every gated group (one unit of each left open, so
  that no group cuts the input off the output), folded with ``round_to=1``: the
  largest deviation of the compact model from the masked one in float64, relative to
  ``y - mean(y)`` (exact: <= 1e-9; see ``_diff64`` for models left with almost no input dependence,
  checked on the input gradients), and whether parameters were really deleted;
- trace + insert_gates and fold times;
- with the ``[bench]`` extra: Torch-Pruning 1.6.1 (MetaPruner, L2 magnitude, 50% of the channels, the
  classifier ignored, its default recipe) on the same model: does it run, its parameters, and how far
  its output is from the *masked* model (the dense model with exactly the channels Torch-Pruning
  removed zeroed at each pruned module's output), relative to ``y - mean(y)`` in float32. Torch-Pruning
  never checks this.

Usage: python tools/bench_coverage.py [--set public|extended|all] [--models lib:name,...] [--json FILE]
                                      [--from-json FILE] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import queue
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _bench_common as common
from models import REAL_ZOO, build_real  # the fold tests' sensitive real models

import hyperflux_fx as hf

#: models beyond the public zoo, each chosen for a construct of the coverage issue
EXTENDED = [
    ("torchvision", "densenet121", 32),  # BatchNorm over concatenated features
    ("torchvision", "googlenet", 32),  # concatenated branches
    ("torchvision", "squeezenet1_1", 64),  # concatenated expand branches, conv classifier
    ("torchvision", "shufflenet_v2_x0_5", 32),  # chunk, channel shuffle
    ("torchvision", "resnext50_32x4d", 32),  # grouped convolutions
    ("torchvision", "regnet_x_400mf", 32),  # grouped convolutions
    ("torchvision", "regnet_y_400mf", 32),  # grouped convolutions + squeeze-excite
    ("torchvision", "mnasnet0_5", 32),  # depthwise separable
    ("torchvision", "mobilenet_v3_small", 32),  # hard-swish squeeze-excite
    ("torchvision", "efficientnet_b1", 32),  # stochastic depth
    ("torchvision", "convnext_tiny", 32),  # permuted LayerNorm, layer scale
    ("torchvision", "swin_t", 224),  # window partition / reverse, relative position bias
    ("timm", "swin_tiny_patch4_window7_224", 224),  # leaf window functions, cyclic shift, bias table per head
    ("timm", "dla34", 32),  # concatenated aggregation nodes
    ("timm", "ghostnet_050", 32),  # channel slicing after a concatenation
    ("timm", "mixnet_s", 32),  # split into kernel-size groups
    ("timm", "rexnet_100", 32),  # a residual added to a channel slice
    ("timm", "cspresnet50", 32),  # split cross-stage partial blocks
    ("timm", "poolformer_s12", 32),  # GroupNorm(1) over the channels, layer scale
    ("timm", "resnest14d", 32),  # split attention (grouped convs, radix softmax)
    ("timm", "ese_vovnet19b_dw", 32),  # one-shot aggregation (cat), effective SE
    ("timm", "lcnet_050", 32),  # depthwise, SE, hard-swish
    ("timm", "convnextv2_atto", 32),  # global response normalisation
    ("timm", "mobilevit_xxs", 64),  # unfold/fold patches around a transformer
    ("timm", "edgenext_xx_small", 64),  # split depthwise + transposed attention
    ("timm", "regnetx_002", 32),  # grouped convolutions
    ("timm", "selecsls42b", 32),  # cat of stage features
    ("timm", "mobileone_s0", 32),  # reparameterisable multi-branch blocks (identity BN + conv branches), eval
    ("timm", "levit_128s", 224),  # one fused q/k/v projection with a BatchNorm, q and k narrower than v per head
    ("timm", "fastvit_t8", 64),  # depthwise channel multiplier added to a 1x1 conv; reparameterisable mixers
]

SETS = {"public": REAL_ZOO, "extended": EXTENDED, "all": REAL_ZOO + EXTENDED}
CLOSED = (0.3, 0.5, 0.9)


def _diff64(masked: nn.Module, compact: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """In float64: the largest deviation of the compact output from the masked one, relative to the
    masked model's ``y - mean(y)`` (``rel64``), and of the input gradients of a fixed random projection
    of the output, relative to the masked model's (``grad_rel64``). ``exact``: ``rel64`` <= 1e-9; or,
    where the masked model keeps so little input dependence that float64's rounding of the output
    itself (1e-15 x max|y|) is above 1e-9 of ``y - mean(y)`` (a deep model with 90% closed: 1e-8 of
    an output of 0.06), a deviation within that rounding *and* ``grad_rel64`` <= 1e-9. The gradients
    carry the input dependence without the constant part of y, so they check it at full precision."""
    with torch.no_grad():
        shape = masked(x).shape
    r = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ys, grads = [], []
    for model in (compact, masked):
        xi = x.double().requires_grad_()
        y = copy.deepcopy(model).double()(xi)
        grads.append(torch.autograd.grad((y * r).sum(), xi)[0])
        ys.append(y.detach())
    a, b = ys
    diff = float(((a - a.mean(0)) - (b - b.mean(0))).abs().max())
    dep, size = float((b - b.mean(0)).abs().max()), float(b.abs().max())
    gscale = float(grads[1].abs().max())
    gdiff = float((grads[0] - grads[1]).abs().max())
    rel = diff / dep if dep else (0.0 if diff == 0 else float("inf"))
    grel = gdiff / gscale if gscale else (0.0 if gdiff == 0 else float("inf"))
    return {"rel64": rel, "grad_rel64": grel, "dep_scale": dep,
            "exact": rel <= 1e-9 or (diff <= 1e-15 * size and grel <= 1e-9)}


def gate_and_fold(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=x)
    row: dict[str, Any] = {"gate_s": time.perf_counter() - t0, "share": res.report.gateable_share,
                           "channels": list(res.report.gateable_channels),
                           "blockers": [{"reason": why, "channels": ch, "groups": n, "nodes": nodes[:3]}
                                        for why, ch, n, nodes in res.report.blockers()]}
    params_dense = sum(p.numel() for p in model.parameters())
    row["params"] = params_dense
    gated = res.graph_module.eval()
    if not hf.gates(gated):
        return row
    row["fold"] = {}
    for closed in CLOSED:
        gen = torch.Generator().manual_seed(int(closed * 10))
        with torch.no_grad():
            for g in hf.gates(gated):  # about `closed` of each group, one unit at least open (a group
                g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - closed)  # all closed cuts the signal)
                g.flow[g.flow.argmax()] = g.flow.abs().max() + 0.1
        t0 = time.perf_counter()
        folded = hf.fold_masks(gated, hf.FoldConfig(round_to=1))
        fold_s = time.perf_counter() - t0
        compact = folded.graph_module
        row["fold"][str(closed)] = {**_diff64(gated, compact, x), "fold_s": fold_s,
                                    "params": sum(p.numel() for p in compact.parameters()),
                                    "deleted_units": folded.report.deleted_units,
                                    "closed_units": folded.report.closed_units}
    return row


def _classifiers(model: nn.Module, y: torch.Tensor) -> list[nn.Module]:
    """The modules writing the logits (their output width is the class count): Torch-Pruning must keep them."""
    classes = y.shape[-1]
    return [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == classes)
            or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == classes)]


def _zero_channels(module: nn.Module, idxs: list[int]) -> Any:
    """Zero channels ``idxs`` of ``module``'s output: the last dim for linear layers and channels-last
    norms, dim 1 for convs, BatchNorm and channels-first norms (timm's LayerNorm2d)."""
    width = getattr(module, "out_features", None) or getattr(module, "out_channels", None) or (
        module.weight.shape[0] if getattr(module, "weight", None) is not None else None)
    last = isinstance(module, nn.Linear) or (
        not isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm))
        and isinstance(module, nn.LayerNorm) and module.normalized_shape[-1] == width)

    def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        dim = -1 if last and out.shape[-1] == width else 1
        out = out.clone()
        out.index_fill_(dim, torch.tensor(idxs, dtype=torch.long), 0.0)
        return out

    return module.register_forward_hook(hook)


def torch_pruning(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Torch-Pruning's default structural recipe at 50% channels; its distance from the masked model."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    reference = copy.deepcopy(model)
    names = {m: n for n, m in model.named_modules()}
    with torch.no_grad():
        y = model(x)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                  ignored_layers=_classifiers(model, y))
    removed: dict[str, set[int]] = {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            mod = dep.target.module
            if mod in names and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                removed.setdefault(names[mod], set()).update(int(i) for i in idxs)
        group.prune()
    for name, idxs in removed.items():
        _zero_channels(reference.get_submodule(name), sorted(idxs))
    with torch.no_grad():
        a, b = model(x), reference(x)
    a, b = a - a.mean(0), b - b.mean(0)
    return {"runs": True, "params": sum(p.numel() for p in model.parameters()),
            "rel_to_masked": float((a - b).abs().max() / b.abs().max())}


TP_LIMIT_S = 300  # seconds per model
TP_MEMORY = 12 << 30  # bytes of address space: on swin_t Torch-Pruning took all 24 GiB and was OOM-killed


def _tp_child(model: nn.Module, x: torch.Tensor, out: Any) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (TP_MEMORY, TP_MEMORY))
    try:
        out.put(torch_pruning(model, x))
    except Exception as exc:  # noqa: BLE001 - a failure is a result
        out.put({"runs": False, "error": f"{type(exc).__name__}: {exc}"[:200]})


def _torch_pruning_contained(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """:func:`torch_pruning` in a forked process with a memory cap and a time limit."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_tp_child, args=(model, x, out))
    proc.start()
    try:
        return out.get(timeout=TP_LIMIT_S)
    except queue.Empty:
        why = (f"did not finish within {TP_LIMIT_S} s" if proc.is_alive()
               else f"died (exit code {proc.exitcode}; memory capped at {TP_MEMORY >> 30} GiB)")
        return {"runs": False, "error": why}
    finally:
        proc.kill()
        proc.join()


def measure(lib: str, name: str, size: int, with_tp: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"model": f"{lib}:{name}", "size": size}
    model = build_real(lib, name, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    try:
        row.update(gate_and_fold(model, x))
    except Exception as exc:  # a failure is a result here: the row says where
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        traceback.print_exc()
    if with_tp:
        row["tp"] = _torch_pruning_contained(model, x)
    return row


def _fmt_rel(v: float) -> str:
    return f"{v:.0e}" if v > 0 else "0"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | share | top blocker (channels) | fold exact 30/50/90% (max rel. fp64) | params 50% | "
             "gate s | fold s | TP 50%: runs, params, rel. to masked |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "error" if "error" in r else (f"{r['share']:.3f}" if r.get("share") is not None else "-")
        top = "; ".join(f"{b['reason']} ({b['channels']:,})" for b in r.get("blockers", [])[:1]) or "-"
        fold = r.get("fold", {})
        exact = all(f["exact"] for f in fold.values()) and len(fold) == len(CLOSED)
        deletes = all(f["params"] < r["params"] for f in fold.values()) and bool(fold)
        rel = max((f["rel64"] for f in fold.values()), default=float("nan"))
        star = "*" if rel > 1e-9 else ""  # exact by the rounding clause: little input dependence left
        fold_txt = (f"{'yes' if exact and deletes else 'NO'} ({_fmt_rel(rel)}{star})" if fold
                    else r.get("error", "-")[:60])
        half = fold.get("0.5")
        params = f"{r['params'] / 1e6:.2f}M → {half['params'] / 1e6:.2f}M" if half else "-"
        fold_s = max((f["fold_s"] for f in fold.values()), default=float("nan"))
        tp = r.get("tp")
        tp_txt = "-" if tp is None else (f"yes, {tp['params'] / 1e6:.2f}M, {tp['rel_to_masked']:.2g}" if tp["runs"]
                                        else f"no: {tp['error'][:60]}")
        lines.append(f"| {r['model']} | {share} | {top} | {fold_txt} | {params} | {r.get('gate_s', float('nan')):.2f} "
                     f"| {fold_s:.2f} | {tp_txt} |")
    return "\n".join(lines)


def _worst_grad(rows: list[dict[str, Any]]) -> str:
    """The largest input-gradient deviation over the starred cells."""
    rels = [f.get("grad_rel64", float("nan")) for r in rows for f in r.get("fold", {}).values() if f["rel64"] > 1e-9]
    return f"{max(rels):.0e}" if rels else "-"


def overall(rows: list[dict[str, Any]]) -> str:
    """The share over all models' channels together (each model's gateable and total channels)."""
    gated = sum(r["channels"][0] for r in rows if "channels" in r)
    total = sum(r["channels"][1] for r in rows if "channels" in r)
    return f"{gated / total:.3f} ({gated:,} of {total:,} channels)" if total else "-"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=sorted(SETS), default="all")
    parser.add_argument("--models", default=None, help="lib:name[:size],... instead of a set")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning (also skipped without it)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--from-json", default=None, help="render the rows of an earlier --json run")
    parser.add_argument("--write", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        import torch_pruning  # noqa: F401

        with_tp = not args.no_tp
    except ImportError:
        with_tp = False
    models = SETS[args.set]
    if args.models:
        models = [(m.split(":")[0], m.split(":")[1], int(m.split(":")[2]) if m.count(":") > 1 else 32)
                  for m in args.models.split(",")]
    rows = json.loads(Path(args.from_json).read_text()) if args.from_json else []
    for lib, name, size in ([] if args.from_json else models):
        t0 = time.perf_counter()
        rows.append(measure(lib, name, size, with_tp))
        r = rows[-1]
        rels = [format(v["rel64"], ".1e") for v in r.get("fold", {}).values()]
        print(f"{r['model']}: share {r.get('share')} blockers {[b['reason'][:50] for b in r.get('blockers', [])[:2]]} "
              f"fold {rels} tp {r.get('tp')} "
              f"({time.perf_counter() - t0:.0f} s) {r.get('error', '')}", flush=True)
    text = f"{table(rows)}\n\nOverall gateable share: {overall(rows)}; mean over models: " + (
        f"{sum(r['share'] for r in rows if r.get('share') is not None) / max(1, len(rows)):.3f}.\n\n"
        "*: above 1e-9 of y - mean(y), at 90% closed, where the masked model keeps little input dependence "
        "(below 1e-6 of its output): the deviation is within float64's rounding of the output itself "
        "(<= 1e-15 max|y|), and the input gradients of the compact and masked models agree to "
        f"{_worst_grad(rows)} (<= 1e-9 required), which is how the check counts it exact.")
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.write:
        common.write_section(Path(args.write), f"coverage-{args.set}", f"{common.machine()}\n\n{text}")
    return rows


if __name__ == "__main__":
    main()
