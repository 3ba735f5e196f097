"""The entry point and the pipeline: source -> dense -> prune -> fold -> export -> report, each a module
of this package, over one Job; the output directory's lock held for the whole run."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from hyperflux_fx.cli.args import build_parser, validate
from hyperflux_fx.cli.dense import dense_stage
from hyperflux_fx.cli.export import export_stage, hf_folder, save_compact
from hyperflux_fx.cli.fold import fold_stage
from hyperflux_fx.cli.job import Job, UsageError, fail, say
from hyperflux_fx.cli.prune import hyperflux_stage
from hyperflux_fx.cli.report import report_command, report_stage
from hyperflux_fx.cli.source import check_open_gates_change_nothing, datasets, load, preflight, print_plan
from hyperflux_fx.config import (
    GateConfig,
    TrainConfig,
)
from hyperflux_fx.frontend.sources import LoadedModel
from hyperflux_fx.frontend.trace import ExampleInputError, TraceError, trace
from hyperflux_fx.ir import gates
from hyperflux_fx.passes import insert_gates
from hyperflux_fx.report.outdir import OutputLocked, RunLock


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_command(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(format="%(levelname)s %(message)s")
    for h in logging.getLogger().handlers:  # the console shows warnings (errors with --quiet); run.log has all
        if not isinstance(h, logging.FileHandler):
            h.setLevel(logging.ERROR if args.quiet else logging.WARNING)
    try:
        return _run(args)
    except UsageError as exc:
        return fail(str(exc))


def _run(args: argparse.Namespace) -> int:
    out = validate(args)
    lock = None
    if out is not None and int(os.environ.get("RANK", "0")) == 0:  # under DDP only rank 0 writes, and locks
        try:
            lock = RunLock(out).acquire()  # before anything is written; held until OUT.partial is OUT
        except OutputLocked as exc:
            raise UsageError(str(exc)) from exc
    try:
        return _run_locked(args, out)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(args: argparse.Namespace, out: Path | None) -> int:
    torch.manual_seed(args.seed)
    loaded = load(args)
    gate_cfg = GateConfig(granularity=args.granularity, exclude=tuple(args.exclude), seed=args.seed,
                          cost=args.target if args.target in ("params", "macs") else "count")  # a first guess
    try:
        gm = trace(loaded.model, loaded.example_inputs, leaf_modules=tuple(args.leaf), frontend=loaded.frontend)
        if args.plan:
            t0 = time.perf_counter()
            res = insert_gates(gm, gate_cfg, example_inputs=loaded.example_inputs, inplace=True)
            return print_plan(args, loaded, res, time.perf_counter() - t0)
        res = insert_gates(gm, gate_cfg, example_inputs=loaded.example_inputs)  # validate gating before any work
        if not gates(res.graph_module):
            raise ValueError(f"nothing to prune at --granularity {args.granularity}: {res.report.why_nothing_gated()}")
        check_open_gates_change_nothing(loaded, res.graph_module)
    except (TraceError, ExampleInputError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    train_set, val_set, data_name = datasets(args, loaded)
    assert out is not None
    train_cfg = preflight(args, out, res, train_set)
    return _compile(args, out, loaded, train_set, val_set, data_name, gate_cfg, train_cfg)


def _compile(args: argparse.Namespace, out: Path, loaded: LoadedModel, train_set: Dataset, val_set: Dataset,
             data_name: str, gate_cfg: GateConfig, train_cfg: TrainConfig) -> int:
    """Prepare OUT.partial and its run.log, then run the stages."""
    t_start = time.perf_counter()
    if args.force and out.exists() and not args.resume:
        shutil.rmtree(out)
    partial = out.with_name(out.name + ".partial")
    if args.resume and out.exists() and not partial.exists():
        out.rename(partial)  # a finished run resumed: re-run its tail from the checkpoint
    if not args.resume and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(partial / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("hyperflux_fx")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    device = "cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) else "cpu"
    job = Job(args=args, out=out, partial=partial, loaded=loaded,
               train_loader=DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers),
               val_loader=DataLoader(val_set, batch_size=max(args.batch_size, 256), num_workers=args.workers),
               data_name=data_name, gate_cfg=gate_cfg, device=device, t_start=t_start, train_cfg=train_cfg)
    try:
        return _pipeline(job)
    finally:
        root.removeHandler(handler)
        handler.close()


def _pipeline(job: Job) -> int:
    """dense -> Hyperflux -> fold -> export -> report; returns the exit code."""
    args = job.args
    say(args, f"hyperflux-compile {args.source} -> {job.out}  (data: {job.data_name}, device: {job.device})")
    dense_acc = dense_stage(job)
    gated_res, result, code = hyperflux_stage(job)
    if result is None:
        return code
    gated = gated_res.graph_module.cpu()
    folded, summary = fold_stage(job, gated, result, dense_acc)
    if not args.no_export:
        failure = export_stage(job, folded.graph_module, summary)
        if failure is not None:
            return failure
    save_compact(job, folded.graph_module)
    summary.update(hf_folder(job, folded.graph_module))
    summary["wall_seconds"] = time.perf_counter() - job.t_start
    report_stage(job, summary, result, gated_res, folded)
    return 0
