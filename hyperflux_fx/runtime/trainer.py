"""Hyperflux training: pruning phase then regrowth phase (HYPERFLUX.md §4-§5), checkpoints, DDP.

``train(gated, train_loader, val_loader, TrainConfig(...))`` runs the method on a model gated by
``insert_gates``:

* two optimisers: SGD (momentum, weight decay on conv/linear weights only) for the weights, Adam
  (no decay) for the flow parameters; cosine LR; label-smoothed cross-entropy by default;
* pruning phase: gamma from the :class:`~hyperflux_fx.runtime.scheduler.PressureController`, updated
  at the end of every scheduler interval; regrowth phase: gamma 0, LRs reset, the flow LR decayed by
  ``decay**k`` per regrowth epoch; halfway through regrowth (``land_at``) all flows are shifted by one
  constant so the density is exactly the target, then frozen while the weights fine-tune (``land``);
* at every interval: a recorder entry (metrics.jsonl) and an atomic checkpoint (``resume=True``
  continues from it; on CPU with ``num_workers=0`` a resumed run ends bit-identical to an
  uninterrupted one);
* CUDA with AMP (bf16, or fp16 with a GradScaler) when available, CPU otherwise; under ``torchrun``
  the model is wrapped in DDP and each rank reads its shard of every epoch; masks are checked to be
  identical across ranks at every interval; only rank 0 writes files.

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
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from hyperflux_fx.config import TrainConfig
from hyperflux_fx.runtime.gates import density, gates, track_flux
from hyperflux_fx.runtime.pressure import pressure_state, set_pressure
from hyperflux_fx.runtime.recorder import Recorder
from hyperflux_fx.runtime.scheduler import (
    PressureController,
    ScalingLaw,
    fit_scaling_law,
    resolve_interval_steps,
    response_lag_intervals,
)

__all__ = ["TrainResult", "TrainingError", "accuracy", "evaluate", "land_on_density", "train", "train_dense"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1

LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], float]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, masks diverged across ranks)."""


@dataclass
class TrainResult:
    """What ``train`` returns."""

    density: float  # kept fraction of gated units at the end
    sparsity: float  # 1 - density
    target_sparsity: float
    val_accuracy: float | None  # metric on the validation loader at the end (None without one)
    history: list[dict[str, Any]] = field(default_factory=list)  # the recorder's entries
    steps: int = 0  # optimizer steps taken in total (including before a resume)
    intervals: int = 0  # scheduler intervals completed
    seconds: float = 0.0  # wall time of this call
    completed: bool = True  # False when stopped early by max_intervals (resumable)
    law: ScalingLaw | None = None  # pressure/density law fitted to this run's pruning phase
    checkpoint: str | None = None  # path of the last checkpoint
    controller_lookahead: int = 0  # the look-ahead the pressure controller used (resolved when auto)

    @property
    def density_before_landing(self) -> float | None:
        """Density the dynamics alone had reached when the landing moved it to the target (None
        when no landing happened: ``land=False`` or a run stopped before it)."""
        return next((r["landing"]["density_before"] for r in self.history if r.get("landing")), None)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of classification logits."""
    return float((outputs.argmax(dim=-1) == targets).float().mean())


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _split(batch: Any) -> tuple[tuple[Any, ...], Any]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError("batches must be (inputs, targets) pairs; got " + type(batch).__name__)
    inputs, targets = batch[0], batch[1]
    return (tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)), targets


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine")
    return device


def _amp_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    if spec not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'off', got {spec!r}")
    if spec == "off":
        return None
    if device.type != "cuda":
        if spec == "fp16":
            raise ValueError("amp='fp16' needs CUDA; use amp='bf16' or 'off' on CPU")
        return torch.bfloat16 if spec == "bf16" else None
    if spec == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if spec == "bf16" else torch.float16


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], *, metric_fn: MetricFn | None = None,
             device: torch.device | str | None = None, amp_dtype: torch.dtype | None = None) -> float:
    """Mean of ``metric_fn`` (accuracy by default) over ``loader``, weighted by batch size, eval mode."""
    metric_fn = metric_fn or accuracy
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in loader:
            inputs, targets = _split(_to(batch, device))
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
            with ctx:
                out = model(*inputs)
            n = int(targets.shape[0]) if isinstance(targets, torch.Tensor) else 1
            total += metric_fn(out.float(), targets) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _epoch_loader(loader: DataLoader, *, epoch: int, start_batch: int, seed: int, rank: int,
                  world: int) -> DataLoader:
    """This rank's batches of ``epoch``, from batch ``start_batch`` on; the order depends only on
    (seed, epoch), so a resumed run sees the same batches."""
    n = len(loader.dataset)  # type: ignore[arg-type]
    bs = loader.batch_size or 1
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=seed, drop_last=loader.drop_last)
        sampler.set_epoch(epoch)
        order = list(sampler)
    else:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
    order = order[start_batch * bs:]
    # A dedicated generator: creating the iterator must not draw from the global RNG (it would
    # differ between a resumed and an uninterrupted run).
    gen = torch.Generator().manual_seed(seed * 7_919 + epoch)
    return DataLoader(loader.dataset, batch_size=bs, sampler=order, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      generator=gen)


def _steps_per_epoch(loader: DataLoader, world: int) -> int:
    n = len(loader.dataset)  # type: ignore[arg-type]
    per_rank = n // world if loader.drop_last else math.ceil(n / world)
    bs = loader.batch_size or 1
    return per_rank // bs if loader.drop_last else math.ceil(per_rank / bs)


def _decayed(gated: nn.Module) -> set[int]:
    """ids of the parameters that get weight decay: conv and linear weights (gated or not)."""
    out: set[int] = set()
    gated_names = {g.target for g in gates(gated)}
    for name, p in gated.named_parameters():
        owner_path, _, attr = name.rpartition(".")
        owner = gated.get_submodule(owner_path) if owner_path else gated
        if name in gated_names or (attr == "weight" and isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd))):
            out.add(id(p))
    return out


def _rng_state(device: torch.device) -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _masks_fingerprint(gated: nn.Module) -> torch.Tensor:
    """(open count, position-weighted sum) of all masks: equal across ranks iff (practically) the masks are."""
    count = torch.zeros((), dtype=torch.float64)
    weighted = torch.zeros((), dtype=torch.float64)
    for i, g in enumerate(gates(gated)):
        m = (g.flow.detach() >= 0).flatten().to(torch.float64).cpu()
        count += m.sum()
        weighted += (m * torch.arange(1, m.numel() + 1, dtype=torch.float64)).sum() * (i + 1)
    return torch.stack([count, weighted])


def _check_masks_equal(gated: nn.Module, world: int, device: torch.device) -> None:
    fp = _masks_fingerprint(gated).to(device)
    gathered = [torch.zeros_like(fp) for _ in range(world)]
    dist.all_gather(gathered, fp)
    if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
        raise TrainingError(f"gate masks differ across ranks: {[t.tolist() for t in gathered]}")


def _fingerprint(gated: nn.Module, cfg: TrainConfig, *, interval_steps: int, flow_lr: float, batch_size: int,
                 dataset_len: int, world: int) -> dict[str, Any]:
    return {
        "gates": {g.target: list(g.flow.shape) for g in gates(gated)},
        "target_sparsity": cfg.target_sparsity, "epochs": cfg.epochs, "regrowth_epochs": cfg.regrowth_epochs,
        "interval_steps": interval_steps, "lr": cfg.lr, "flow_lr": flow_lr, "seed": cfg.seed,
        "batch_size": batch_size, "dataset_len": dataset_len, "world_size": world,
    }


def _mismatch(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key == "gates" and a != b:
            a, b = a or {}, b or {}
            only_saved = sorted(set(a) - set(b))[:3]
            only_now = sorted(set(b) - set(a))[:3]
            shapes = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:3]
            out.append(f"gates differ (only in checkpoint: {only_saved}, only now: {only_now}, shape: {shapes})")
        elif a != b:
            out.append(f"{key}: checkpoint={a!r}, now={b!r}")
    return out


def _flow_lr(cfg: TrainConfig, pruning_steps: int) -> float:
    if cfg.flow_lr is not None:
        return cfg.flow_lr
    # The paper's flows travel lr * steps ~ 39 over its pruning phase (1e-3 x 39k steps); a short
    # run at 1e-3 could not move a flow from its init (0.2..0.5) past 0. Keep the travel budget.
    return max(1e-3, cfg.flow_travel / max(pruning_steps, 1))


@torch.no_grad()
def _open_flow_distance(all_gates: list[Any], default: float = 0.35) -> float:
    """Mean value of the open flows (their distance above the threshold); ``default`` (the mean of
    the default init U(0.2, 0.5)) when none is open."""
    total = torch.zeros((), dtype=torch.float64, device=all_gates[0].flow.device)
    count = torch.zeros((), dtype=torch.float64, device=total.device)
    for g in all_gates:
        f = g.flow.detach()
        total += torch.where(f >= 0, f, 0.0).sum(dtype=torch.float64)
        count += (f >= 0).sum()
    n = float(count)
    return float(total) / n if n > 0 else default


def _cosine(start: float, end: float, i: int, n: int) -> float:
    if n <= 1:
        return start
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(i, n) / n))


@torch.no_grad()
def land_on_density(gated: nn.Module, target_density: float, *, weighted: bool = False) -> dict[str, float]:
    """Shift every flow parameter by one constant so that the density is ``target_density``: the
    largest flows stay open (``round(target_density * N)`` of them, or, ``weighted``, as many as fit
    in that fraction of the total unit cost). The order of the flows — what the dynamics learned —
    is kept; only the threshold moves, as a pressure impulse would move it.

    Returns:
        ``{"shift", "density_before", "density_after"}``.
    """
    all_gates = gates(gated)
    flows = torch.cat([g.flow.detach().flatten().float().cpu() for g in all_gates])
    before = density(gated, weighted=weighted)
    if weighted:
        cost = torch.cat([torch.full((g.numel,), g.unit_cost) for g in all_gates])
        order = torch.argsort(flows, descending=True)
        cum = torch.cumsum(cost[order], 0) / cost.sum()
        keep = int(torch.searchsorted(cum, torch.tensor(target_density)).item()) + 1
        keep = min(flows.numel(), max(1, keep))
        kth_largest = flows[order[keep - 1]].item()
    else:
        n = flows.numel()
        keep = min(n, max(1, round(target_density * n)))
        kth_largest = torch.kthvalue(flows, n - keep + 1).values.item()
    shift = -kth_largest
    for g in all_gates:
        g.flow.add_(shift)
    return {"shift": shift, "density_before": before, "density_after": density(gated, weighted=weighted)}


def train(gated: nn.Module, train_loader: DataLoader, val_loader: Iterable[Any] | None = None,
          config: TrainConfig | None = None, *, loss_fn: LossFn | None = None,
          metric_fn: MetricFn | None = None) -> TrainResult:
    """Run the Hyperflux pruning and regrowth phases on a gated model.

    Args:
        gated: a model produced by ``insert_gates`` (trained dense weights are the paper's start).
        train_loader: a ``DataLoader`` of ``(inputs, targets)``; its dataset, batch size, workers and
            collate function are used, the order is the trainer's (seeded, resumable).
        val_loader: any iterable of ``(inputs, targets)``; evaluated every ``eval_every`` intervals.
        config: the schedule; ``TrainConfig()`` by default.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; label-smoothed cross-entropy by default.
        metric_fn: ``metric_fn(outputs, targets) -> float`` (batch mean); top-1 accuracy by default.

    Returns:
        TrainResult; the model is trained in place.

    Raises:
        ValueError: bad configuration, no gates, or a checkpoint that does not match this run.
        TrainingError: non-finite loss (the last good checkpoint is kept) or masks diverged across ranks.
    """
    cfg = config or TrainConfig()
    if not isinstance(train_loader, DataLoader):
        raise TypeError(f"train_loader must be a torch.utils.data.DataLoader, got {type(train_loader).__name__}")
    all_gates = gates(gated)
    if not all_gates:
        raise ValueError("the model has no gates: run hyperflux_fx.insert_gates first")
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing))
    on_device_accuracy = metric_fn is None  # the default metric is summed on the device: no sync per step
    metric_fn = metric_fn or accuracy
    t_start = time.perf_counter()

    # -- distributed / device ----------------------------------------------------------------------
    we_initialised = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        we_initialised = True
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = _resolve_device(cfg.device)
    if distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp_dtype = _amp_dtype(cfg.amp, device)
    gated.to(device)
    state = pressure_state(gated)

    # -- schedule ----------------------------------------------------------------------------------
    spe = _steps_per_epoch(train_loader, world)
    if spe < 1:
        raise ValueError("the training loader yields no batch per rank (dataset smaller than a batch?)")
    prune_steps = cfg.epochs * spe
    regrow_steps = cfg.regrowth_epochs * spe
    total_steps = prune_steps + regrow_steps
    ivl = resolve_interval_steps(cfg.interval_steps, spe, cfg.epochs, cfg.min_intervals)
    prune_intervals = math.ceil(prune_steps / ivl)
    flow_lr = _flow_lr(cfg, prune_steps)
    lookahead = cfg.controller_lookahead
    if lookahead is None:  # the flows' response lag: their mean distance above the threshold now
        lookahead = response_lag_intervals(flow_lr, ivl, prune_intervals, distance=_open_flow_distance(all_gates))
    controller = PressureController(1.0 - cfg.target_sparsity, prune_intervals, step=cfg.pressure_step,
                                    regrowth_compensation=cfg.regrowth_compensation,
                                    warmup_intervals=cfg.warmup_intervals, lookahead=lookahead,
                                    scale_down=cfg.controller_scale_down)
    target_density = 1.0 - cfg.target_sparsity
    weighted = cfg.target_measure == "cost"  # density as the kept fraction of unit cost (params/MACs)
    # the landing happens at the first interval end at or after this step
    land_step = prune_steps + (math.ceil(cfg.land_at * regrow_steps) if regrow_steps else 0)

    # -- optimisers --------------------------------------------------------------------------------
    flow_ids = {id(g.flow) for g in all_gates}
    decay_ids = _decayed(gated)
    params = [p for p in gated.parameters() if id(p) not in flow_ids and p.requires_grad]
    opt_w = torch.optim.SGD([{"params": [p for p in params if id(p) in decay_ids], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0}],
                            lr=cfg.lr, momentum=cfg.momentum)
    opt_t = torch.optim.Adam([g.flow for g in all_gates], lr=flow_lr, weight_decay=0.0, fused=True)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    ckpt_path = out_dir / "checkpoints" / CHECKPOINT_NAME if out_dir is not None else None
    writer = rank == 0
    recorder = Recorder(gated, out_dir / "metrics.jsonl" if (out_dir is not None and writer) else None)
    fingerprint = _fingerprint(gated, cfg, interval_steps=ivl, flow_lr=flow_lr,
                               batch_size=train_loader.batch_size or 1,
                               dataset_len=len(train_loader.dataset), world=world)  # type: ignore[arg-type]

    step = 0
    intervals_done = 0
    frozen = False
    last_good: int | None = None
    if cfg.resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        problems = _mismatch(ckpt.get("fingerprint", {}), fingerprint)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            problems.insert(0, f"format: checkpoint={ckpt.get('format')!r}, now={CHECKPOINT_FORMAT}")
        if problems:
            raise ValueError(f"checkpoint {ckpt_path} does not match this run: " + "; ".join(problems))
        gated.load_state_dict(ckpt["model"])
        opt_w.load_state_dict(ckpt["opt_w"])
        opt_t.load_state_dict(ckpt["opt_t"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if cfg.controller_lookahead is None:  # measured at the fresh start; the flows have moved since
            controller.lookahead = int(ckpt["controller"].get("lookahead", 0))
        controller.load_state_dict(ckpt["controller"])
        recorder.load_state_dict(ckpt["recorder"])
        if writer:
            recorder.rewrite()
        _set_rng_state(ckpt["rng"], device)
        step, intervals_done, frozen = int(ckpt["step"]), int(ckpt["intervals"]), bool(ckpt["frozen"])
        last_good = intervals_done
        log.info("resumed from %s at step %d (interval %d)", ckpt_path, step, intervals_done)
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        import numpy as np

        np.random.seed(cfg.seed % 2**32)
        set_pressure(gated, 0.0)
        if out_dir is not None and writer and recorder.path is not None and recorder.path.exists():
            recorder.path.unlink()  # a fresh run starts a fresh metrics file
    if cfg.track_flux:
        track_flux(gated, True)

    model: nn.Module = gated
    if distributed:
        model = nn.parallel.DistributedDataParallel(gated, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    gated.train()

    bar = None
    if cfg.progress and writer:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="hyperflux", dynamic_ncols=True)

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    metric_sum, seen = 0.0, 0
    iterator = None
    current_epoch = -1
    val_acc: float | None = None
    calls_intervals = 0
    stopped_early = False
    try:
        while step < total_steps:
            epoch, batch_idx = divmod(step, spe)
            if iterator is None or epoch != current_epoch:
                iterator = iter(_epoch_loader(train_loader, epoch=epoch, start_batch=batch_idx, seed=cfg.seed,
                                              rank=rank, world=world))
                current_epoch = epoch
            batch = next(iterator)
            pruning = step < prune_steps
            # learning rates for this step
            if pruning:
                lr_w = _cosine(cfg.lr, cfg.lr * cfg.lr_final_ratio, step, prune_steps)
                lr_t = flow_lr
            else:
                j = step - prune_steps
                lr_w = _cosine(cfg.regrowth_lr, cfg.regrowth_lr_final, j, regrow_steps)
                k = j // spe
                lr_t = 0.0 if (frozen or k >= cfg.regrowth_flow_epochs) else (
                    flow_lr * cfg.regrowth_flow_scaler * cfg.regrowth_decay ** k)
            for group in opt_w.param_groups:
                group["lr"] = lr_w
            for group in opt_t.param_groups:
                group["lr"] = lr_t

            inputs, targets = _split(_to(batch, device))
            opt_w.zero_grad(set_to_none=True)
            opt_t.zero_grad(set_to_none=True)
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
            with ctx:
                out = model(*inputs)
                loss = loss_fn(out, targets)
            if scaler is not None:
                state.grad_scale.fill_(scaler.get_scale())  # pressure must be scaled like the loss
                scaler.scale(loss).backward()
                scaler.step(opt_w)
                if lr_t > 0:
                    scaler.step(opt_t)
                scaler.update()
            else:
                loss.backward()
                opt_w.step()
                if lr_t > 0:
                    opt_t.step()
            n = int(targets.shape[0]) if isinstance(targets, torch.Tensor) else 1
            loss_sum += loss.detach().double() * n
            if on_device_accuracy:
                correct += (out.detach().argmax(dim=-1) == targets).sum()
            else:
                metric_sum += metric_fn(out.detach().float(), targets) * n
            seen += n
            step += 1
            if bar is not None:
                bar.update(1)

            # -- interval end ----------------------------------------------------------------------
            phase_start = 0 if pruning else prune_steps
            phase_end = prune_steps if pruning else total_steps
            if (step - phase_start) % ivl != 0 and step != phase_end:
                continue
            train_loss = float(loss_sum) / max(seen, 1)
            metric_sum += float(correct)
            if not math.isfinite(train_loss):
                where = f"{ckpt_path} (interval {last_good})" if last_good is not None else "none written"
                raise TrainingError(f"loss became {train_loss} in interval {intervals_done + 1} (step {step}); "
                                    f"training stopped. Last good checkpoint: {where}")
            intervals_done += 1
            calls_intervals += 1
            gamma_used = float(state.gamma)
            r = density(gated, weighted=weighted)
            if pruning:
                gamma_next = controller.update(r)
                planned = controller.planned(controller.completed)
                if step == phase_end:
                    gamma_next = 0.0  # regrowth follows, at gamma 0
            else:
                gamma_next, planned = 0.0, None
            landing = None
            if cfg.land and not frozen and step >= land_step:
                landing = land_on_density(gated, target_density, weighted=weighted)
                frozen = True
                r = landing["density_after"]
            set_pressure(gated, gamma_next)
            due = val_loader is not None and (intervals_done % cfg.eval_every == 0 or step in (prune_steps, total_steps))
            if due:
                val_acc = evaluate(gated, val_loader, metric_fn=metric_fn, device=device, amp_dtype=amp_dtype)
            rec = recorder.record(
                gated, interval=intervals_done, epoch=epoch, step=step, phase="prune" if pruning else "regrow",
                gamma=gamma_used, gamma_next=gamma_next, g=controller.g, planned=planned,
                target_density=target_density, measured_density=r, train_loss=train_loss, train_metric=metric_sum / max(seen, 1),
                val_metric=val_acc if due else None, lr=lr_w, flow_lr=lr_t, flows_frozen=frozen, landing=landing,
                seconds=time.perf_counter() - t_start)
            loss_sum.zero_()
            correct.zero_()
            metric_sum, seen = 0.0, 0
            if distributed:
                _check_masks_equal(gated, world, device if device.type == "cuda" else torch.device("cpu"))
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", density=f"{rec['density']:.4f}", gamma=f"{gamma_used:.3g}")
            log.info("interval %d (%s) step %d: density %.4f planned %s gamma %.4g loss %.4f val %s",
                     intervals_done, rec["phase"], step, rec["density"], planned, gamma_used, train_loss, val_acc)
            if ckpt_path is not None and writer:
                _atomic_save({
                    "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "model": gated.state_dict(),
                    "opt_w": opt_w.state_dict(), "opt_t": opt_t.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "controller": controller.state_dict(), "recorder": recorder.state_dict(),
                    "rng": _rng_state(device), "step": step, "intervals": intervals_done, "frozen": frozen,
                    "config": asdict(cfg),
                }, ckpt_path)
                last_good = intervals_done
            if distributed:
                dist.barrier()
            if cfg.max_intervals is not None and calls_intervals >= cfg.max_intervals and step < total_steps:
                stopped_early = True
                break
    finally:
        if bar is not None:
            bar.close()
        if cfg.track_flux:
            track_flux(gated, False)
        if we_initialised:
            dist.destroy_process_group()

    final_density = density(gated, weighted=weighted)
    law = None
    pts = [(rec["gamma"], rec["measured_density"]) for rec in recorder.records
           if rec["phase"] == "prune" and rec["gamma"]]
    if len(pts) >= 3:
        try:
            law = fit_scaling_law([p[0] for p in pts], [p[1] for p in pts])
        except (ValueError, FloatingPointError):
            law = None
    return TrainResult(density=final_density, sparsity=1.0 - final_density, target_sparsity=cfg.target_sparsity,
                       val_accuracy=val_acc, history=list(recorder.records), steps=step, intervals=intervals_done,
                       seconds=time.perf_counter() - t_start, completed=not stopped_early, law=law,
                       checkpoint=str(ckpt_path) if ckpt_path is not None and ckpt_path.exists() else None,
                       controller_lookahead=controller.lookahead)


def train_dense(model: nn.Module, train_loader: Iterable[Any], *, epochs: int, lr: float = 0.1,
                momentum: float = 0.9, weight_decay: float = 5e-4, label_smoothing: float = 0.1, seed: int = 0,
                device: str = "cpu", amp: str = "off", loss_fn: LossFn | None = None,
                progress: bool = False) -> nn.Module:
    """Plain dense training (SGD, cosine LR to 0, label smoothing): the start the paper prunes from.

    ``amp`` takes TrainConfig's values ("auto", "bf16", "fp16" with a GradScaler, "off").
    """
    torch.manual_seed(seed)
    dev = _resolve_device(device)
    amp_dtype = _amp_dtype(amp, dev)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    model.to(dev).train()
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing))
    decay = _decayed(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                           {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}],
                          lr=lr, momentum=momentum)
    steps = epochs * len(train_loader)  # type: ignore[arg-type]
    i = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="dense", dynamic_ncols=True)
    for _ in range(epochs):
        for batch in train_loader:
            for group in opt.param_groups:
                group["lr"] = _cosine(lr, 0.0, i, steps)
            inputs, targets = _split(_to(batch, dev))
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
                loss = loss_fn(model(*inputs), targets)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            i += 1
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    return model
