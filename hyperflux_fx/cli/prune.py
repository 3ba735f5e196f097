"""Stage 3, Hyperflux: gate, then prune, regrow and land on the target (train/loop.py)."""

from __future__ import annotations

from hyperflux_fx.analysis.runtime import resolve_fold_config
from hyperflux_fx.cli.args import fold_config
from hyperflux_fx.cli.job import Job, fail, log, say
from hyperflux_fx.cli.latency import latency_model
from hyperflux_fx.passes import PassResult, insert_gates
from hyperflux_fx.report.rerender import save_reports
from hyperflux_fx.train.distributed import TrainingError
from hyperflux_fx.train.loop import TrainResult, train


def hyperflux_stage(job: Job) -> tuple[PassResult, TrainResult | None, int]:
    """[2/5] gates + Hyperflux training; (gate result, train result or None to stop, exit code)."""
    args = job.args
    res = insert_gates(job.loaded.model, job.gate_cfg, example_inputs=job.inputs, leaf_modules=tuple(args.leaf),
                       frontend=job.loaded.frontend)
    save_reports(job.partial, gates=res.report.to_dict())  # for `hyperflux-compile report` on any run
    say(args, f"[2/5] Hyperflux: target sparsity {args.target_sparsity} ({args.target}), granularity "
               f"{args.granularity}, {args.epochs} pruning + {args.regrowth_epochs} regrowth epochs")
    cfg = job.train_cfg
    preferred = resolve_fold_config(fold_config(args))
    if (job.fold.round_to, job.fold.min_conv_channels) != (preferred.round_to, preferred.min_conv_channels):
        say(args, f"      round_to {job.fold.round_to}, min_conv_channels {job.fold.min_conv_channels}: with whole "
                   f"blocks of {preferred.round_to} channels (ONNX Runtime's on this CPU) and convs at least "
                   f"{preferred.min_conv_channels} wide, {args.target_sparsity} of the {args.target} is out of reach")
    try:
        latency = latency_model(job, res.graph_module, cfg) if args.target == "latency" else None
        result = train(res.graph_module, job.train_loader, job.val_loader, cfg, loss_fn=job.loaded.loss_fn,
                       latency_model=latency, teacher=job.loaded.model)  # the dense model is the teacher
        if result.completed:
            (job.partial / "latency_dense.onnx").unlink(missing_ok=True)
    except TrainingError as exc:
        log.error("%s", exc)
        return res, None, fail(f"training failed: {exc} (resume with --resume after fixing the cause)", code=1)
    except ValueError as exc:  # the checks before any write passed: an error here keeps the partial run
        log.error("%s", exc)
        return res, None, fail(f"training failed: {exc} (partial run kept in {job.partial})", code=1)
    if not result.completed:
        say(args, f"stopped after {result.intervals} intervals (--max-intervals); continue with --resume. "
                   f"Partial run in {job.partial}")
        return res, None, 0
    return res, result, 0
