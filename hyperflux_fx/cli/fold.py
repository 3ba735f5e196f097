"""Stage 4, the fold: delete what the gates closed, check the compact model against the gated one, and
measure accuracy (and, for language models, loss and perplexity) dense -> pruned -> compact."""

from __future__ import annotations

import math
import time
from typing import Any

import torch.nn.functional as F

from hyperflux_fx.analysis.cost import count_costs
from hyperflux_fx.cli.job import Job, log, say
from hyperflux_fx.frontend.hf import language_model_loss
from hyperflux_fx.passes import PassResult, fold_masks
from hyperflux_fx.report.rerender import save_reports
from hyperflux_fx.train.evaluate import evaluate, evaluate_loss
from hyperflux_fx.train.loop import TrainResult
from hyperflux_fx.train.recorder import tracking
from hyperflux_fx.train.sensitivity import group_sensitivity


def _language_model_figures(job: Job, dense: Any, gated: Any, compact: Any) -> dict[str, float]:
    """Validation loss per token and perplexity, dense → pruned → compact, for a language model (an hf:
    causal LM's loss); {} for other models."""
    if not job.loaded.language_model:
        return {}
    out = {}
    for name, model in (("dense", dense), ("pruned", gated), ("compact", compact)):
        loss = evaluate_loss(model.to(job.device), job.val_loader, language_model_loss)
        model.cpu()
        out[f"val_loss_{name}"], out[f"perplexity_{name}"] = loss, math.exp(min(loss, 80.0))
    return out


SENSITIVITY_BUDGET_S = (5.0, 0.1, 60.0)  # per-group sensitivity: at least 5 s, a tenth of the run so far, at
#   most 60 s; it stops measuring new groups after that, and says so


def _sensitivity(job: Job, gated: Any) -> dict[str, Any] | None:
    """How much the loss grows as each channel group's lowest-flow units close, beside what the run kept
    (train/sensitivity.py); None without channel gates."""
    least, share, most = SENSITIVITY_BUDGET_S
    budget = min(most, max(least, share * (time.perf_counter() - job.t_start)))
    sens = group_sensitivity(gated, job.val_loader, job.loaded.loss_fn or F.cross_entropy, budget_s=budget)
    if not sens.groups and not sens.capped:
        return None
    rho = sens.spearman()
    capped = f", capped at {budget:.0f} s" if sens.capped else ""
    say(job.args, f"      sensitivity: {len(sens.groups)} of {sens.total_groups} groups in {sens.seconds:.1f} s"
                  f"{capped}; rank correlation of the loss growth at 50% closed with the kept fraction: "
                  + ("-" if rho is None else f"{rho:+.2f}"))
    return sens.to_dict()


def fold_stage(job: Job, gated: Any, result: TrainResult, dense_acc: float) -> tuple[PassResult, dict[str, Any]]:
    """[3/5] fold_masks; (its result, the summary with the accuracy, size and MAC figures)."""
    args, model, inputs = job.args, job.loaded.model, job.inputs
    pruned_acc = evaluate(gated, job.val_loader)
    sensitivity = _sensitivity(job, gated)
    say(args, "[3/5] fold_masks")
    folded = fold_masks(gated, job.fold)  # the fold the exact targets counted
    save_reports(job.partial, fold=folded.report.to_dict())
    compact = folded.graph_module.eval()
    lm = _language_model_figures(job, model, gated, compact)
    dense_costs = count_costs(model, inputs, frontend=job.loaded.frontend)
    compact_costs = count_costs(compact, inputs)
    params_dense, macs_dense = dense_costs.params, dense_costs.macs
    params_stored, macs_compact = compact_costs.params, compact_costs.macs
    macs_note = "; ".join(f"{what}: {c.note}" for what, c in (("dense", dense_costs), ("compact", compact_costs))
                          if c.note)
    if macs_note:
        log.warning("MAC count may be incomplete: %s", macs_note)
    return folded, {
        "source": args.source, "data": job.data_name, "target_sparsity": args.target_sparsity,
        "achieved_sparsity": result.sparsity, "target_measure": args.target, "granularity": args.granularity,
        "recipe": args.recipe, "lr": args.lr, "dense_epochs": args.dense_epochs, "epochs": args.epochs,
        "regrowth_epochs": args.regrowth_epochs, "uniform_layers": args.uniform_layers,
        "sensitivity": sensitivity,
        "dense_accuracy": dense_acc, "pruned_accuracy": pruned_acc,
        "compact_accuracy": evaluate(compact, job.val_loader),
        "params_dense": params_dense, "params_compact": sum(int((p != 0).sum()) for p in compact.parameters()),
        "params_compact_stored": params_stored, "macs_dense": macs_dense, "macs_compact": macs_compact,
        "macs_note": macs_note or None,  # what the MAC counts may miss (a model not captured whole)
        **lm,
        "onnx_parity_max_abs_diff": None, "ort_latency_ms_dense": None, "ort_latency_ms_compact": None,
        "deleted_units": folded.report.deleted_units, "closed_units": folded.report.closed_units,
        # what the dynamics reached before the landing put the density on the target (docs/training.md)
        "sparsity_before_landing": (None if result.density_before_landing is None
                                    else 1.0 - result.density_before_landing),
        "controller_lookahead": result.controller_lookahead, "round_to": folded.report.round_to,
        "round_to_width": folded.report.round_to_width, "min_conv_channels": folded.report.min_conv_channels,
        "tracking": None if (t := tracking(result.history)) is None else t.to_dict(),
        "land_at": result.land_at, "regrowth_lr": result.regrowth_lr, "pressure": result.pressure,
        "cost_exponent": result.cost_exponent, "flux_normalization": result.flux_normalization,
        "distilled": result.distilled, "distill_alpha": args.distill_alpha if result.distilled else None,
        "distill_temperature": args.distill_temperature if result.distilled else None,
        "target_speedup": args.target_speedup, "latency_predicted_ms_compact": None,  # set beside the measurement
        "latency_predicted_speedup": (result.latency_table["predicted_dense_ms"] / result.predicted_latency_ms
                                      if result.predicted_latency_ms else None),
        "latency_table": (None if result.latency_table is None  # the prediction in the calibration's ms
                          else {**result.latency_table, "predicted_compact_ms": result.predicted_latency_ms}),
    }
