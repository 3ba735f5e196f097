"""Hyperflux training: pruning phase then regrowth phase (HYPERFLUX.md §4-§5), checkpoints, DDP.

``train(gated, train_loader, val_loader, TrainConfig(...))`` runs the method on a model gated by
``insert_gates``:

* two optimisers: SGD (momentum, weight decay on conv/linear weights only) for the weights, Adam
  (no decay) for the flow parameters; cosine LR; label-smoothed cross-entropy by default;
* pruning phase: gamma from the :class:`~hyperflux_fx.train.scheduler.PressureController`, updated
  at the end of every scheduler interval; regrowth phase: gamma 0, LRs reset, the flow LR decayed by
  ``decay**k`` per regrowth epoch; halfway through regrowth (``land_at``) all flows are shifted by one
  constant so the density is exactly the target, then frozen while the weights fine-tune (``land``);
* at every interval: a recorder entry (metrics.jsonl) and an atomic checkpoint (``resume=True``
  continues from it; on CPU with ``num_workers=0`` a resumed run ends bit-identical to an
  uninterrupted one);
* CUDA with AMP (bf16, or fp16 with a GradScaler) when available, CPU otherwise; under ``torchrun``
  the model is wrapped in DDP and each rank reads its shard of every epoch; masks are checked to be
  identical across ranks at every interval; only rank 0 writes files.

The stages are functions over two small records: :class:`_Run` (what is fixed for the run: schedule,
device, optimisers, recorder) and :class:`_Progress` (what advances: step, interval, running sums).
``train`` is setup -> restore -> loop (step, interval end: controller, landing, record, checkpoint)
-> result.

The training loader is used for its dataset, batch size, workers and collate function: the trainer
builds each epoch's order itself (seeded by ``TrainConfig.seed`` and the epoch) so a run can resume
in the middle of an epoch.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from hyperflux_fx.analysis.latency_model import LatencyModel
from hyperflux_fx.config import TrainConfig
from hyperflux_fx.ir import (
    ChannelGate,
    Gate,
    PressureState,
    apply_decoupled_pressure,
    gates,
    lift_regrown,
    pressure_state,
    set_pressure,
    track_flux,
)
from hyperflux_fx.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    atomic_save,
    checkpoint_problems,
    fingerprint,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from hyperflux_fx.train.distill import Distiller, frozen_teacher
from hyperflux_fx.train.distributed import (
    TrainingError,
    check_masks_equal,
    epoch_loader,
    setup_distributed,
    steps_per_epoch,
)
from hyperflux_fx.train.evaluate import LossFn, MetricFn, accuracy, evaluate_with_loss, move_to, split_batch
from hyperflux_fx.train.landing import open_flow_distance
from hyperflux_fx.train.measure import Measure
from hyperflux_fx.train.optim import (
    amp_dtype,
    autocast,
    clip_gradients,
    cosine,
    flow_optimizer,
    grad_scaler,
    progress_bar,
    warmup_cosine,
    weight_optimizer,
)
from hyperflux_fx.train.recorder import METRICS_FILE, IntervalRecord, Landing, Recorder
from hyperflux_fx.train.scheduler import (
    PressureController,
    ScalingLaw,
    fit_run_law,
    resolve_interval_steps,
    response_lag_intervals,
)

__all__ = ["TrainResult", "TrainingError", "resume_problems", "train"]

log = logging.getLogger(__name__)

# Decoupled pressure's controller: gamma *= (measured / planned) ** gain per interval. Chosen on a 256-unit MLP,
# 4 seeds, gains 1 / 2 / 4 with look-ahead 0 / 1 / 2: 4 with no look-ahead tracked closest (docs/training.md).
LOG_CONTROLLER_GAIN = 4.0


@dataclass
class TrainResult:
    """What ``train`` returns."""

    density: float  # kept fraction at the end, in the target measure (units, or exact params / MACs)
    sparsity: float  # 1 - density
    target_sparsity: float
    val_accuracy: float | None  # metric on the validation loader at the end (None without one)
    history: list[IntervalRecord] = field(default_factory=list)  # the recorder's entries
    steps: int = 0  # optimizer steps taken in total (including before a resume)
    intervals: int = 0  # scheduler intervals completed
    seconds: float = 0.0  # wall time of this call
    completed: bool = True  # False when stopped early by max_intervals (resumable)
    law: ScalingLaw | None = None  # pressure/density law, only when fitted on this run's equilibria (fit_run_law)
    law_note: str = ""  # why there is no law, or what it was fitted on
    checkpoint: str | None = None  # path of the last checkpoint
    controller_lookahead: int = 0  # the look-ahead the pressure controller used (resolved when auto)
    measure: str = "count"  # what density / sparsity count (TrainConfig.target_measure)
    predicted_latency_ms: float | None = None  # "latency": the compact model's predicted ORT latency (ms)
    latency_table: dict[str, Any] | None = None  # "latency": op timings measured / cached, seconds, cache file
    land_at: float | None = None  # the landing point used (TrainConfig.land_at, resolved by the gates' kind)
    regrowth_lr: float | None = None  # the regrowth / fine-tune weight LR used (resolved likewise)
    pressure: str = "coupled"  # the pressure used (TrainConfig.pressure, resolved by the gates' kind)
    cost_exponent: float = 1.0  # TrainConfig.cost_exponent: channel pressure ~ what a unit saves to this power
    flux_normalization: str = "element"  # the flows' Adam for channel gates (TrainConfig.flux_normalization)
    distilled: bool = False  # whether the loss blended in distillation from the teacher (TrainConfig.distill)

    @property
    def density_before_landing(self) -> float | None:
        """Density the dynamics alone had reached when the landing moved it to the target (None
        when no landing happened: ``land=False`` or a run stopped before it)."""
        return next((r.landing.density_before for r in self.history if r.landing is not None), None)


@dataclass
class _Schedule:
    """Steps and intervals of a run."""

    spe: int  # steps per epoch (per rank)
    prune_steps: int
    regrow_steps: int
    interval: int  # steps per scheduler interval
    flow_lr: float
    land_step: int  # the landing happens at the first interval end at or after this step

    @property
    def total_steps(self) -> int:
        return self.prune_steps + self.regrow_steps


@dataclass
class _Run:
    """Everything fixed for one call of ``train``."""

    cfg: TrainConfig
    gated: nn.Module
    model: nn.Module  # gated, or its DDP / compiled wrapper
    gates: list[Gate]
    pressure: PressureState
    schedule: _Schedule
    controller: PressureController
    opt_w: torch.optim.Optimizer
    opt_t: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    recorder: Recorder
    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int
    world: int
    loss_fn: LossFn
    metric_fn: MetricFn
    on_device_accuracy: bool  # the default metric is summed on the device: no sync per step
    ckpt_path: Path | None
    fingerprint: dict[str, Any]
    t_start: float
    measure: Measure
    lift: float = 0.0  # decoupled pressure: a regrown unit's flow is lifted to at least this (0: never)
    channel_units: int = 0  # units of the channel gates (controller_max_close is a fraction of them)
    distiller: Distiller | None = None  # the dense teacher and the blend (TrainConfig.distill)

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


@dataclass
class _Progress:
    """What advances during the run."""

    step: int = 0
    intervals: int = 0
    frozen: bool = False  # flows frozen by the landing
    last_good: int | None = None  # interval of the last checkpoint written
    calls_intervals: int = 0  # intervals completed by this call
    val_acc: float | None = None
    val_loss: float | None = None  # the loss function's mean per target element on the validation loader
    stopped_early: bool = False
    loss_sum: torch.Tensor | None = None  # over the current interval, on the device
    correct: torch.Tensor | None = None
    metric_sum: float = 0.0
    seen: int = 0
    closed: int = 0  # channel units closed by the dynamics in the current interval (controller_max_close)
    start_closed: list[torch.Tensor] | None = None  # per gate, the units closed when the interval began
    task_sum: torch.Tensor | None = None  # the task loss alone, summed like loss_sum (with distillation)
    distill_sum: torch.Tensor | None = None  # the distillation term, likewise


def train(gated: nn.Module, train_loader: DataLoader, val_loader: Iterable[Any] | None = None,
          config: TrainConfig | None = None, *, loss_fn: LossFn | None = None,
          metric_fn: MetricFn | None = None, latency_model: LatencyModel | None = None,
          teacher: nn.Module | None = None) -> TrainResult:
    """Run the Hyperflux pruning and regrowth phases on a gated model.

    Args:
        gated: a model produced by ``insert_gates`` (trained dense weights are the paper's start).
        train_loader: a ``DataLoader`` of ``(inputs, targets)``; its dataset, batch size, workers and
            collate function are used, the order is the trainer's (seeded, resumable).
        val_loader: any iterable of ``(inputs, targets)``; evaluated every ``eval_every`` intervals.
        config: the schedule; ``TrainConfig()`` by default.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; label-smoothed cross-entropy by default.
        metric_fn: ``metric_fn(outputs, targets) -> float`` (batch mean); top-1 accuracy by default.
        teacher: the dense model to distil from (``config.distill``); None: a frozen copy of ``gated`` as it
            is when training starts (every gate open: the dense model). It is never trained or changed.
        latency_model: with ``target_measure="latency"``, a calibrated
            :class:`~hyperflux_fx.analysis.latency_model.LatencyModel` of ``gated`` (else one is built,
            calibrated on ``config.latency_dense_ms`` when given).

    Returns:
        TrainResult; the model is trained in place.

    Raises:
        ValueError: bad configuration, no gates, or a checkpoint that does not match this run.
        TrainingError: non-finite loss (the last good checkpoint is kept) or masks diverged across ranks.
    """
    if not isinstance(train_loader, DataLoader):
        raise TypeError(f"train_loader must be a torch.utils.data.DataLoader, got {type(train_loader).__name__}")
    if not gates(gated):
        raise ValueError("the model has no gates: run hyperflux_fx.insert_gates first")
    cfg = (config or TrainConfig()).resolved(structured=any(isinstance(g, ChannelGate) for g in gates(gated)))
    t_start = time.perf_counter()
    rank, world, we_initialised, device = setup_distributed(cfg.device)
    try:
        run = _setup(gated, train_loader, cfg, rank, world, device, loss_fn, metric_fn, t_start,
                     Measure(gated, cfg, latency_model))
        run.distiller = _distiller(cfg, gated, teacher, device)
        progress = _restore_or_start(run)
        _loop(run, progress, train_loader, val_loader)
    finally:
        pressure_state(gated).decoupled = False  # the gradient hooks carry the pressure outside train()
        if cfg.track_flux:
            track_flux(gated, False)
        if we_initialised:
            dist.destroy_process_group()
    return _result(run, progress)


def resume_problems(gated: nn.Module, train_loader: DataLoader, config: TrainConfig) -> list[str]:
    """Why :func:`train` with ``config.resume`` would refuse the checkpoint in ``config.out_dir`` ([] when
    it matches, or when there is none to resume), checked without training or writing anything."""
    cfg = config.resolved(structured=any(isinstance(g, ChannelGate) for g in gates(gated)))
    path = Path(cfg.out_dir) / "checkpoints" / CHECKPOINT_NAME if cfg.out_dir is not None else None
    if not cfg.resume or path is None or not path.exists():
        return []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return checkpoint_problems(path, _fingerprint(gated, cfg, train_loader, _schedule(cfg, train_loader, world), world))


def _fingerprint(gated: nn.Module, cfg: TrainConfig, loader: DataLoader, schedule: _Schedule, world: int
                 ) -> dict[str, Any]:
    return fingerprint(gated, cfg, interval_steps=schedule.interval, flow_lr=schedule.flow_lr,
                       batch_size=loader.batch_size or 1, dataset_len=len(loader.dataset),  # type: ignore[arg-type]
                       world=world)


def _setup(gated: nn.Module, loader: DataLoader, cfg: TrainConfig, rank: int, world: int, device: torch.device,
           loss_fn: LossFn | None, metric_fn: MetricFn | None, t_start: float, measure: Measure) -> _Run:
    """Move the model, plan the schedule and the controller, build optimisers and the recorder."""
    dtype = amp_dtype(cfg.amp, device)
    gated.to(device)
    all_gates = gates(gated)
    schedule = _schedule(cfg, loader, world)
    decoupled = cfg.pressure == "decoupled"
    distance = open_flow_distance(all_gates)  # the open flows' mean height above the threshold now
    lookahead = cfg.controller_lookahead
    if lookahead is None and decoupled:
        lookahead = 0  # proportional pressure answers within the interval; extrapolating it only adds swings
    if lookahead is None:  # the flows' response lag, from their distance to the threshold
        lookahead = response_lag_intervals(schedule.flow_lr, schedule.interval, _prune_intervals(schedule),
                                           distance=distance)
    # Landing at the end of pruning freezes the flows: nothing regrows after it, so the pruning phase aims at
    # the target itself and the landing is only the last correction.
    compensation = 1.0 if (cfg.land and cfg.land_at == 0.0) else cfg.regrowth_compensation
    controller = PressureController(
        1.0 - cfg.target_sparsity, _prune_intervals(schedule), step=cfg.pressure_step,
        regrowth_compensation=compensation, warmup_intervals=cfg.warmup_intervals, lookahead=lookahead,
        scale_down=cfg.controller_scale_down, rule="log" if decoupled else "paper",
        gamma0=distance / (schedule.flow_lr * max(schedule.prune_steps, 1) / 2),
        gain=LOG_CONTROLLER_GAIN)
    flow_ids = {id(g.flow) for g in all_gates}
    params = [p for p in gated.parameters() if id(p) not in flow_ids and p.requires_grad]
    opt_w = weight_optimizer(gated, params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                             optimizer=cfg.optimizer, betas=cfg.betas)
    opt_t = flow_optimizer(gated, lr=schedule.flow_lr, normalization=cfg.flux_normalization)
    pressure_state(gated).decoupled = decoupled
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    return _Run(
        cfg=cfg, gated=gated, model=gated, gates=all_gates, pressure=pressure_state(gated), schedule=schedule,
        controller=controller, opt_w=opt_w, opt_t=opt_t, scaler=grad_scaler(dtype),
        recorder=Recorder(gated, out_dir / METRICS_FILE if (out_dir is not None and rank == 0) else None),
        device=device, amp_dtype=dtype, rank=rank, world=world,
        loss_fn=loss_fn or (lambda out, y: F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)),
        metric_fn=metric_fn or accuracy, on_device_accuracy=metric_fn is None,
        ckpt_path=out_dir / "checkpoints" / CHECKPOINT_NAME if out_dir is not None else None,
        fingerprint=_fingerprint(gated, cfg, loader, schedule, world),
        t_start=t_start, measure=measure,
        channel_units=sum(g.numel for g in all_gates if isinstance(g, ChannelGate)),
        lift=(0.0 if not decoupled else cfg.regrowth_lift if cfg.regrowth_lift is not None else distance))


def _distiller(cfg: TrainConfig, gated: nn.Module, teacher: nn.Module | None, device: torch.device
               ) -> Distiller | None:
    """The teacher (given, or a frozen copy of the gated model before any step) on the run's device."""
    if cfg.distill == "off":
        return None
    teacher = frozen_teacher(gated if teacher is None else teacher).to(device)
    return Distiller(teacher=teacher, alpha=cfg.distill_alpha, temperature=cfg.distill_temperature,
                     required=cfg.distill == "on")


def _schedule(cfg: TrainConfig, loader: DataLoader, world: int) -> _Schedule:
    spe = steps_per_epoch(loader, world)
    if spe < 1:
        raise ValueError("the training loader yields no batch per rank (dataset smaller than a batch?)")
    prune_steps = max(1, round(cfg.epochs * spe))  # a fraction of an epoch: that share of its steps
    regrow_steps = round(cfg.regrowth_epochs * spe)
    return _Schedule(spe=spe, prune_steps=prune_steps, regrow_steps=regrow_steps,
                     interval=resolve_interval_steps(cfg.interval_steps, spe, cfg.epochs, cfg.min_intervals),
                     flow_lr=_flow_lr(cfg, prune_steps),
                     land_step=prune_steps + (math.ceil(cfg.land_at * regrow_steps) if regrow_steps else 0))


def _prune_intervals(schedule: _Schedule) -> int:
    return math.ceil(schedule.prune_steps / schedule.interval)


def _flow_lr(cfg: TrainConfig, pruning_steps: int) -> float:
    if cfg.flow_lr is not None:
        return cfg.flow_lr
    # The paper's flows travel lr * steps ~ 39 over its pruning phase (1e-3 x 39k steps); a short
    # run at 1e-3 could not move a flow from its init (0.2..0.5) past 0. Keep the travel budget.
    return max(1e-3, cfg.flow_travel / max(pruning_steps, 1))


def _restore_or_start(run: _Run) -> _Progress:
    """Continue from the checkpoint (``resume``), or seed a fresh start; then wrap the model."""
    cfg, progress = run.cfg, _Progress()
    if cfg.resume and run.ckpt_path is not None and run.ckpt_path.exists():
        _restore(run, progress, load_checkpoint(run.ckpt_path, run.fingerprint, run.device))
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        set_pressure(run.gated, 0.0)
        if run.writer and run.recorder.path is not None and run.recorder.path.exists():
            run.recorder.path.unlink()  # a fresh run starts a fresh metrics file
    run.measure.refresh_pressure()  # cost-weighted pressure follows the masks (restored or fresh)
    if cfg.track_flux:
        track_flux(run.gated, True)
    if run.distributed:
        run.model = nn.parallel.DistributedDataParallel(
            run.gated, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if cfg.compile:
        run.model = torch.compile(run.model)  # type: ignore[assignment]
    run.gated.train()
    progress.loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    progress.correct = torch.zeros((), dtype=torch.float64, device=run.device)
    progress.task_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    progress.distill_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    return progress


def _restore(run: _Run, progress: _Progress, ckpt: dict[str, Any]) -> None:
    run.gated.load_state_dict(ckpt["model"])
    run.opt_w.load_state_dict(ckpt["opt_w"])
    run.opt_t.load_state_dict(ckpt["opt_t"])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.cfg.controller_lookahead is None:  # measured at the fresh start; the flows have moved since
        run.controller.lookahead = int(ckpt["controller"].get("lookahead", 0))
    run.controller.load_state_dict(ckpt["controller"])
    run.recorder.load_state_dict(ckpt["recorder"])
    if run.writer:
        run.recorder.rewrite()
    set_rng_state(ckpt["rng"], run.device)
    progress.step, progress.intervals = int(ckpt["step"]), int(ckpt["intervals"])
    progress.frozen = bool(ckpt["frozen"])
    progress.last_good = progress.intervals
    log.info("resumed from %s at step %d (interval %d)", run.ckpt_path, progress.step, progress.intervals)


def _batches(run: _Run, progress: _Progress, loader: DataLoader) -> Iterator[Any]:
    """The run's batches from the current step on, epoch by epoch (each epoch's order seeded)."""
    while progress.step < run.schedule.total_steps:
        epoch, batch_idx = divmod(progress.step, run.schedule.spe)
        for batch in epoch_loader(loader, epoch=epoch, start_batch=batch_idx, seed=run.cfg.seed, rank=run.rank,
                                  world=run.world):
            yield batch
            if progress.step >= run.schedule.total_steps or progress.step % run.schedule.spe == 0:
                break  # the epoch is over (or the run): the next epoch gets a fresh order


def _loop(run: _Run, progress: _Progress, loader: DataLoader, val_loader: Iterable[Any] | None) -> None:
    bar = progress_bar(run.cfg.progress and run.writer, total=run.schedule.total_steps, initial=progress.step,
                       desc="hyperflux")
    try:
        for batch in _batches(run, progress, loader):
            _train_step(run, progress, batch)
            if bar is not None:
                bar.update(1)
            if _interval_ends(run, progress) and _end_interval(run, progress, val_loader, bar):
                break
    finally:
        if bar is not None:
            bar.close()


def _learning_rates(run: _Run, progress: _Progress) -> tuple[float, float]:
    """(weight LR, flow LR) for the current step."""
    cfg, s = run.cfg, run.schedule
    if progress.step < s.prune_steps:
        warmup = int(cfg.warmup_fraction * s.prune_steps)
        flow_lr = s.flow_lr * min(1.0, (progress.step + 1) / max(cfg.flow_warmup_steps, 1))
        return warmup_cosine(cfg.lr, cfg.lr * cfg.lr_final_ratio, progress.step, s.prune_steps, warmup), flow_lr
    j = progress.step - s.prune_steps
    k = j // s.spe
    lr_t = 0.0 if (progress.frozen or k >= cfg.regrowth_flow_epochs) else (
        s.flow_lr * cfg.regrowth_flow_scaler * cfg.regrowth_decay ** k)
    return cosine(cfg.regrowth_lr, cfg.regrowth_lr_final, j, s.regrow_steps), lr_t


def _train_step(run: _Run, progress: _Progress, batch: Any) -> None:
    """One optimiser step of weights and flows; the loss and metric are summed for the interval."""
    lr_w, lr_t = _learning_rates(run, progress)
    for group in run.opt_w.param_groups:
        group["lr"] = lr_w
    for group in run.opt_t.param_groups:
        group["lr"] = lr_t
    watch = lr_t > 0 and run.pressure.decoupled and progress.step < run.schedule.prune_steps
    closed_before = [g.flow.detach() < 0 for g in run.gates] if watch else None
    if closed_before is not None and progress.start_closed is None:
        progress.start_closed = closed_before  # the first step of the interval (or of a resumed run)
    inputs, targets = split_batch(move_to(batch, run.device))
    run.opt_w.zero_grad(set_to_none=True)
    run.opt_t.zero_grad(set_to_none=True)
    with autocast(run.device, run.amp_dtype):
        out = run.model(*inputs)
        loss = run.loss_fn(out, targets)
        if run.distiller is not None and run.distiller.applies(out, targets):
            task = loss
            loss, kd = run.distiller.loss(task, out, run.distiller.teacher_outputs(inputs))
            progress.task_sum += task.detach().double() * int(targets.shape[0])
            progress.distill_sum += kd.detach().double() * int(targets.shape[0])
    if run.scaler is not None:
        run.pressure.grad_scale.fill_(run.scaler.get_scale())  # pressure must be scaled like the loss
        run.scaler.scale(loss).backward()
        clip_gradients(run.opt_w, run.cfg.clip_grad_norm, run.scaler)
        run.scaler.step(run.opt_w)
        if lr_t > 0:
            run.scaler.step(run.opt_t)
        run.scaler.update()
    else:
        loss.backward()
        clip_gradients(run.opt_w, run.cfg.clip_grad_norm)
        run.opt_w.step()
        if lr_t > 0:
            run.opt_t.step()
    if lr_t > 0 and run.pressure.decoupled:
        apply_decoupled_pressure(run.gated, lr_t)
        if closed_before is not None:
            if run.lift > 0:
                lift_regrown(run.gated, closed_before, run.lift)
            _pace_closings(run, progress, closed_before)
            _pace_flips(run, progress, closed_before)
    n = int(targets.shape[0]) if isinstance(targets, torch.Tensor) else 1
    progress.loss_sum += loss.detach().double() * n
    if run.on_device_accuracy:
        progress.correct += (out.detach().argmax(dim=-1) == targets).sum()
    else:
        progress.metric_sum += run.metric_fn(out.detach().float(), targets) * n
    progress.seen += n
    progress.step += 1


@torch.no_grad()
def _pace_closings(run: _Run, progress: _Progress, closed_before: list[torch.Tensor]) -> None:
    """Channel units that closed in this step wait (flow held at 0, still open) when closing them would
    close more than ``controller_max_close`` of the units in this interval, or take the measure below the
    plan at the end of this interval less ``controller_floor``; the least pushed wait first."""
    cfg = run.cfg
    fresh = [(g, (g.flow < 0) & ~was) for g, was in zip(run.gates, closed_before, strict=True)
             if isinstance(g, ChannelGate)]
    cands = sorted(((float(g.flow[i]), g, i) for g, f in fresh if bool(f.any())
                    for i in torch.nonzero(f).flatten().tolist()), key=lambda c: c[0])  # deepest pushed first
    if not cands:
        return
    floors = run.measure.gate_floors()
    if floors:  # never below the block the fold keeps anyway: the least pushed of those closings wait
        open_now = {id(g): int((g.flow >= 0).sum()) for g, _ in fresh}
        kept = []
        for c in reversed(cands):
            _, g, i = c
            if open_now[id(g)] < floors.get(g, 0):
                g.flow[i] = 0.0
                open_now[id(g)] += 1
            else:
                kept.append(c)
        cands = kept[::-1]
    if cfg.controller_max_close is not None:
        allowed = max(0, math.floor(cfg.controller_max_close * run.channel_units) - progress.closed)
        for _, g, i in cands[allowed:]:
            g.flow[i] = 0.0
        cands = cands[:allowed]
    if cfg.controller_floor is not None and cands:
        floor = run.controller.planned(progress.step // run.schedule.interval + 1) * (1.0 - cfg.controller_floor)
        while cands and run.measure.kept(rounded=False) < floor:
            _, g, i = cands.pop()  # reopen the least pushed until the floor holds
            g.flow[i] = 0.0
    progress.closed += len(cands)


@torch.no_grad()
def _pace_flips(run: _Run, progress: _Progress, closed_before: list[torch.Tensor]) -> None:
    """Channel units that left their state at the interval's start in this step wait (a closing held open at
    0, a regrowth held closed just below 0) when more than ``controller_max_flip`` of the units would differ
    from that start; the least decided (flow nearest 0) wait first."""
    cap = run.cfg.controller_max_flip
    if cap is None or progress.start_closed is None:
        return
    watched = [(g, (g.flow < 0) ^ start, (g.flow < 0) ^ was)  # (gate, differs from the start, changed now)
               for g, start, was in zip(run.gates, progress.start_closed, closed_before, strict=True)
               if isinstance(g, ChannelGate)]
    if not watched:
        return
    moved = torch.stack([away.sum() for _, away, _ in watched]).sum()
    excess = int(moved) - math.floor(cap * run.channel_units)
    if excess <= 0:
        return
    cands = sorted(((abs(float(g.flow[i])), g, i) for g, away, now in watched
                    for i in torch.nonzero(away & now).flatten().tolist()), key=lambda c: c[0])
    for _, g, i in cands[:excess]:
        if g.flow[i] < 0:
            g.flow[i] = 0.0
            progress.closed -= 1  # _pace_closings counted it
        else:
            g.flow[i] = -torch.finfo(g.flow.dtype).tiny


def _interval_ends(run: _Run, progress: _Progress) -> bool:
    """Does the step just taken end a scheduler interval (or a phase)?"""
    s, step = run.schedule, progress.step
    pruning = step - 1 < s.prune_steps  # the phase of the step just taken
    phase_start, phase_end = (0, s.prune_steps) if pruning else (s.prune_steps, s.total_steps)
    return (step - phase_start) % s.interval == 0 or step == phase_end


def _end_interval(run: _Run, progress: _Progress, val_loader: Iterable[Any] | None, bar: Any) -> bool:
    """Controller, landing, validation, record, checkpoint. Returns True to stop (max_intervals)."""
    cfg, step = run.cfg, progress.step
    pruning = step - 1 < run.schedule.prune_steps
    train_loss = float(progress.loss_sum) / max(progress.seen, 1)
    progress.metric_sum += float(progress.correct)
    if not math.isfinite(train_loss):
        where = f"{run.ckpt_path} (interval {progress.last_good})" if progress.last_good is not None else "none written"
        raise TrainingError(f"loss became {train_loss} in interval {progress.intervals + 1} (step {step}); "
                            f"training stopped. Last good checkpoint: {where}")
    progress.intervals += 1
    progress.calls_intervals += 1
    gamma_used = float(run.pressure.gamma)
    gamma_next, planned = _next_pressure(run, run.measure.kept(rounded=False), pruning, step)
    landing = _maybe_land(run, progress)
    r = run.measure.kept(rounded=False)
    if pruning:
        run.measure.refresh_pressure()
    set_pressure(run.gated, gamma_next)
    s = run.schedule
    due = val_loader is not None and (progress.intervals % cfg.eval_every == 0 or step in (s.prune_steps,
                                                                                         s.total_steps))
    if due:
        progress.val_acc, progress.val_loss = evaluate_with_loss(
            run.gated, val_loader, metric_fn=run.metric_fn, loss_fn=run.loss_fn, device=run.device,
            amp_dtype=run.amp_dtype)
    rec = run.recorder.record(
        run.gated, interval=progress.intervals, epoch=(step - 1) // s.spe, step=step,
        phase="prune" if pruning else "regrow", gamma=gamma_used, gamma_next=gamma_next, g=run.controller.g,
        planned=planned, target_density=1.0 - cfg.target_sparsity, measured_density=r,
        measured_density_rounded=landing.density_after if landing is not None else run.measure.kept(),
        train_loss=train_loss, **_distill_fields(run, progress),
        train_metric=progress.metric_sum / max(progress.seen, 1), val_metric=progress.val_acc if due else None,
        val_loss=progress.val_loss if due else None,
        lr=run.opt_w.param_groups[0]["lr"], flow_lr=run.opt_t.param_groups[0]["lr"], flows_frozen=progress.frozen,
        landing=landing, seconds=time.perf_counter() - run.t_start)
    progress.loss_sum.zero_()
    progress.correct.zero_()
    progress.task_sum.zero_()
    progress.distill_sum.zero_()
    progress.closed, progress.start_closed = 0, None
    progress.metric_sum, progress.seen = 0.0, 0
    _after_record(run, progress, rec, bar)
    if cfg.max_intervals is not None and progress.calls_intervals >= cfg.max_intervals and step < s.total_steps:
        progress.stopped_early = True
        return True
    return False


def _distill_fields(run: _Run, progress: _Progress) -> dict[str, float | None]:
    """The interval's mean task loss and distillation term, and the term's share of the blended loss."""
    if run.distiller is None or not run.distiller.active:
        return {}
    n = max(progress.seen, 1)
    task, kd = float(progress.task_sum) / n, float(progress.distill_sum) / n
    blended = (1.0 - run.distiller.alpha) * task + run.distiller.alpha * kd
    return {"train_task_loss": task, "train_distill_loss": kd,
            "distill_share": run.distiller.alpha * kd / blended if blended > 0 else None}


def _next_pressure(run: _Run, r: float, pruning: bool, step: int) -> tuple[float, float | None]:
    """(gamma for the next interval, the plan R(e) now); gamma is 0 in regrowth."""
    if not pruning:
        return 0.0, None
    gamma_next = run.controller.update(r)
    planned = run.controller.planned(run.controller.completed)
    if step == run.schedule.prune_steps:
        gamma_next = 0.0  # regrowth follows, at gamma 0
    return gamma_next, planned


def _maybe_land(run: _Run, progress: _Progress) -> Landing | None:
    """At the first interval end at or after land_step: land on the target and freeze the flows."""
    if not run.cfg.land or progress.frozen or progress.step < run.schedule.land_step:
        return None
    progress.frozen = True
    return run.measure.land(1.0 - run.cfg.target_sparsity)


def _after_record(run: _Run, progress: _Progress, rec: IntervalRecord, bar: Any) -> None:
    """Rank check, progress display, log line and checkpoint at the end of an interval."""
    if run.distributed:
        check_masks_equal(run.gated, run.world, run.device if run.device.type == "cuda" else torch.device("cpu"))
    if bar is not None:
        bar.set_postfix(loss=f"{rec.train_loss:.3f}", kept=f"{rec.measured_density:.4f}", gamma=f"{rec.gamma:.3g}")
    log.info("interval %d (%s) step %d: density %.4f planned %s gamma %.4g loss %.4f val %s", rec.interval,
             rec.phase, rec.step, rec.density, rec.planned, rec.gamma, rec.train_loss, progress.val_acc)
    if run.ckpt_path is not None and run.writer:
        atomic_save({
            "format": CHECKPOINT_FORMAT, "fingerprint": run.fingerprint, "model": run.gated.state_dict(),
            "opt_w": run.opt_w.state_dict(), "opt_t": run.opt_t.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else {},
            "controller": run.controller.state_dict(), "recorder": run.recorder.state_dict(),
            "rng": rng_state(run.device), "step": progress.step, "intervals": progress.intervals,
            "frozen": progress.frozen, "config": asdict(run.cfg),
        }, run.ckpt_path)
        progress.last_good = progress.intervals
    if run.distributed:
        dist.barrier()


def _result(run: _Run, progress: _Progress) -> TrainResult:
    final_density = run.measure.kept()
    law, law_note = fit_run_law([(rec.gamma, rec.measured_density) for rec in run.recorder.records
                                 if rec.phase == "prune"])
    ckpt = run.ckpt_path
    return TrainResult(density=final_density, sparsity=1.0 - final_density, target_sparsity=run.cfg.target_sparsity,
                       val_accuracy=progress.val_acc, history=list(run.recorder.records), steps=progress.step,
                       intervals=progress.intervals, seconds=time.perf_counter() - run.t_start,
                       completed=not progress.stopped_early, law=law, law_note=law_note,
                       checkpoint=str(ckpt) if ckpt is not None and ckpt.exists() else None,
                       controller_lookahead=run.controller.lookahead, measure=run.measure.name,
                       predicted_latency_ms=run.measure.predicted_ms(), latency_table=run.measure.latency_info(),
                       land_at=run.cfg.land_at, regrowth_lr=run.cfg.regrowth_lr, pressure=run.cfg.pressure,
                       cost_exponent=run.cfg.cost_exponent, flux_normalization=run.cfg.flux_normalization,
                       distilled=bool(run.distiller is not None and run.distiller.active))
