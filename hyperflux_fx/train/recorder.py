"""The recorder: per-interval micro and macro diagnostics (HYPERFLUX.md §8), appended to metrics.jsonl.

Each record holds: interval, epoch, step, phase, global and per-layer density, gamma, the controller's
g, the planned remaining fraction R(e), flips pruned->active (regrowth) and active->pruned per layer
since the previous record, flux statistics of survivors vs pruned units (mean, min among survivors)
over the interval, train loss/accuracy and validation accuracy. Beside it, ``timeline.npz`` holds every
channel unit's mask per interval (train/timeline.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hyperflux_fx.ir import ChannelGate, Gate, gates
from hyperflux_fx.train.timeline import FLUX_EDGES, TIMELINE_FILE, flux_histogram, write_timeline

__all__ = ["METRICS_FILE", "IntervalRecord", "Landing", "LayerRecord", "Recorder", "Tracking", "tracking"]

METRICS_FILE = "metrics.jsonl"  # one record per interval, beside the run's timeline.npz


class _Fields:
    """Read access by name as well as by attribute: ``rec["density"]``, ``rec.get("planned")`` and
    ``"gamma" in rec`` work as they did when records were dicts."""

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return any(f.name == key for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self else default

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))  # type: ignore[call-overload]


@dataclass
class Landing(_Fields):
    """The landing: every flow shifted by one constant so the density is exactly the target."""

    shift: float
    density_before: float  # what the dynamics alone had reached
    density_after: float


@dataclass
class LayerRecord(_Fields):
    """One gate's state at the end of an interval."""

    density: float
    kept: int
    units: int
    regrown: int  # pruned -> active since the previous record
    pruned: int  # active -> pruned since the previous record
    flux_survivors_mean: float | None = None  # mean flux over the interval (None without flux tracking)
    flux_pruned_mean: float | None = None
    pressure_scale: float | None = None  # the gate's multiplier of gamma (channel gates: its marginal cost)


@dataclass
class IntervalRecord(_Fields):
    """One scheduler interval: what the trainer passed in and what the recorder measured."""

    interval: int
    epoch: int
    step: int
    phase: str  # "prune" or "regrow"
    gamma: float  # pressure used during the interval
    gamma_next: float  # pressure set for the next one
    g: float  # the controller's state (gamma = g ** 1.5)
    planned: float | None  # the plan R(e) (pruning phase)
    target_density: float
    measured_density: float  # what the controller steers: the target measure (count or cost) of the open
    #   units, before the fold's rounding to blocks; after any landing
    train_loss: float
    train_metric: float
    val_metric: float | None
    lr: float
    flow_lr: float
    flows_frozen: bool
    landing: Landing | None
    seconds: float
    train_task_loss: float | None = None  # with distillation: the task loss alone (train_loss is the blend)
    train_distill_loss: float | None = None  # with distillation: T^2 KL(teacher || student), interval mean
    distill_share: float | None = None  # alpha * distillation term / blended loss
    measured_density_rounded: float | None = None  # the same, with the fold's rounding (what fold_masks keeps)
    val_loss: float | None = None  # the loss per target element on the validation loader (per token for an LM)
    density: float = 0.0  # kept fraction of gated units
    sparsity: float = 0.0
    regrown: int = 0
    pruned: int = 0
    flux_survivors_mean: float | None = None
    flux_pruned_mean: float | None = None
    flux_survivors_min: float | None = None
    layers: dict[str, LayerRecord] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntervalRecord:
        data = dict(data)
        data["landing"] = Landing(**data["landing"]) if data.get("landing") else None
        data["layers"] = {k: LayerRecord(**v) for k, v in data.get("layers", {}).items()}
        return cls(**data)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class Recorder:
    """Collects one record per scheduler interval; writes ``metrics.jsonl`` when given a path."""

    def __init__(self, model: nn.Module, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[IntervalRecord] = []
        self._prev: dict[str, torch.Tensor] = {g.target: g.flow.detach() >= 0 for g in gates(model)}
        # per gate, one row per interval: a channel gate's unit masks, a weight gate's density
        self.timeline: dict[str, list[torch.Tensor]] = {g.target: [] for g in gates(model)}
        self._kinds = {g.target: "units" if isinstance(g, ChannelGate) else "density" for g in gates(model)}
        # per gate, one 2 x bins count array per interval: the flux of survivors and of pruned units
        self.flux_hist: dict[str, list[torch.Tensor]] = {g.target: [] for g in gates(model)}

    def record(self, model: nn.Module, **fields: Any) -> IntervalRecord:
        """Measure the model now, complete ``fields`` (interval, epoch, gamma, ...: the trainer's part
        of an :class:`IntervalRecord`), store and write."""
        all_gates = gates(model)
        rec = IntervalRecord(**fields)
        table, hists = self._statistics(all_gates)
        self._measure(rec, all_gates, table)
        data = rec.to_dict()
        rec = IntervalRecord.from_dict(data)  # JSON-clean, as a resumed run reads it back
        self.records.append(rec)
        self._append_timeline(all_gates, table)
        for g, hist in zip(all_gates, hists, strict=True):
            self.flux_hist.setdefault(g.target, []).append(hist)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(data) + "\n")
            self._write_timeline()
        return rec

    def _append_timeline(self, all_gates: list[Gate], table: list[list[float]]) -> None:
        """One timeline row per gate: the channel gates' masks (kept by :meth:`_statistics`), copied to the
        host together, and the weight gates' densities from the kept counts already there."""
        channel = [g for g in all_gates if isinstance(g, ChannelGate)]
        if channel:
            masks = torch.cat([self._prev[g.target].flatten() for g in channel]).cpu()
            for g, mask in zip(channel, masks.split([g.numel for g in channel]), strict=True):
                self.timeline.setdefault(g.target, []).append(mask)
        for g, row in zip(all_gates, table, strict=True):
            if not isinstance(g, ChannelGate):
                self.timeline.setdefault(g.target, []).append(torch.tensor([row[0] / g.numel]))

    def _write_timeline(self) -> None:
        names = [n for n, rows in self.timeline.items() if rows]
        arrays = [torch.stack(self.timeline[n]).numpy() if self._kinds.get(n) == "units"
                  else torch.cat(self.timeline[n]).numpy() for n in names]
        hists = [torch.stack(self.flux_hist[n]).to(torch.int32).numpy() for n in names] if all(
            len(self.flux_hist.get(n, [])) == len(self.timeline[n]) for n in names) else None
        write_timeline(self.path.with_name(TIMELINE_FILE), names, [self._kinds.get(n, "units") for n in names],
                       arrays, hists)

    def _statistics(self, all_gates: list[Gate]) -> tuple[list[list[float]], list[torch.Tensor]]:
        """Per gate: kept, regrown, pruned, flux sums of survivors / pruned, min survivor flux, steps; and
        the flux histogram of survivors and pruned units (zeros without flux tracking). Computed on the
        model's device and copied to the host together (not per gate); resets the gates' flux and
        remembers the masks."""
        rows, hists = [], []
        for g in all_gates:
            mask = g.flow.detach() >= 0
            prev = self._prev.get(g.target)
            prev = torch.ones_like(mask) if prev is None else prev.to(mask.device)
            row = [mask.sum(), (mask & ~prev).sum(), (prev & ~mask).sum()]
            flux = g.mean_flux()
            if flux is not None:
                row += [torch.where(mask, flux, 0.0).sum(), torch.where(mask, 0.0, flux).sum(),
                        torch.where(mask, flux, math.inf).min(), g.flux_steps.clone()]  # a copy: reset zeroes it
                hists.append(flux_histogram(flux, mask))
                g.reset_flux()
            else:
                zero = mask.new_zeros((), dtype=torch.float64)
                row += [zero, zero, zero + math.inf, zero]
                hists.append(torch.zeros(2, len(FLUX_EDGES) + 1, dtype=torch.long, device=mask.device))
            rows.append(torch.stack([v.to(torch.float64) for v in row]))
            self._prev[g.target] = mask
        if not rows:
            return [], []
        return torch.stack(rows).cpu().tolist(), list(torch.stack(hists).cpu())

    @staticmethod
    def _measure(rec: IntervalRecord, all_gates: list[Gate], table: list[list[float]]) -> None:
        layers: dict[str, LayerRecord] = {}
        kept_total = units_total = regrown_total = pruned_total = 0
        surv_sum = pruned_sum = 0.0
        surv_n = pruned_n = 0
        surv_min = math.inf
        for g, (kept_f, regrown_f, pruned_f, fs_sum, fp_sum, fs_min, steps) in zip(all_gates, table, strict=True):
            kept, regrown, pruned = int(kept_f), int(regrown_f), int(pruned_f)
            layer = LayerRecord(density=kept / g.numel, kept=kept, units=g.numel, regrown=regrown, pruned=pruned,
                                pressure_scale=float(g.pressure_scale))
            if g.flux_sum is not None and steps > 0:
                n_pruned = g.numel - kept
                layer.flux_survivors_mean = fs_sum / kept if kept else None
                layer.flux_pruned_mean = fp_sum / n_pruned if n_pruned else None
                if kept:
                    surv_sum += fs_sum
                    surv_n += kept
                    surv_min = min(surv_min, fs_min)
                if n_pruned:
                    pruned_sum += fp_sum
                    pruned_n += n_pruned
            layers[g.target] = layer
            kept_total += kept
            units_total += g.numel
            regrown_total += regrown
            pruned_total += pruned
        rec.density = kept_total / max(units_total, 1)
        rec.sparsity = 1.0 - rec.density
        rec.regrown, rec.pruned = regrown_total, pruned_total
        rec.flux_survivors_mean = surv_sum / surv_n if surv_n else None
        rec.flux_pruned_mean = pruned_sum / pruned_n if pruned_n else None
        rec.flux_survivors_min = surv_min if surv_n and math.isfinite(surv_min) else None
        rec.layers = layers

    def rewrite(self) -> None:
        """Rewrite ``metrics.jsonl`` from the records held (atomically): used after a resume, so the
        file matches the checkpoint even if the interrupted run wrote records past it."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(rec.to_dict()) + "\n" for rec in self.records)
        os.replace(tmp, self.path)
        self._write_timeline()

    def state_dict(self) -> dict[str, Any]:
        return {"records": json.dumps([rec.to_dict() for rec in self.records]), "prev": dict(self._prev),
                "timeline": {n: torch.stack(rows) if rows else torch.empty(0) for n, rows in self.timeline.items()},
                "flux_hist": {n: torch.stack(rows) if rows else torch.empty(0) for n, rows in self.flux_hist.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [IntervalRecord.from_dict(d) for d in json.loads(state["records"])]
        self._prev = dict(state["prev"])
        self.timeline = {n: list(rows.cpu()) if rows.numel() else [] for n, rows in state.get("timeline", {}).items()}
        self.flux_hist = {n: list(rows.cpu()) if rows.numel() else []
                          for n, rows in state.get("flux_hist", {}).items()}


@dataclass
class Tracking(_Fields):
    """How closely the pruning phase followed the plan (the controller's record, docs/training.md)."""

    intervals: int  # pruning intervals judged (after the first ``skip``, landing interval excluded)
    median_gap: float  # median over them of |measured - planned| / planned
    worst_gap: float  # the signed gap of largest size
    max_flip_fraction: float  # most units flipped (either way) in one interval, over all gated units
    landing_move: float | None  # kept fraction after the landing minus before (None: no landing)


def tracking(records: list[IntervalRecord], *, skip: int = 2) -> Tracking | None:
    """Tracking statistics of a run's records: the pruning intervals after the first ``skip`` (the
    warm-up and the first pressure), the landing's own interval left out (the landing judges itself).
    None when no such interval exists."""
    prune = [r for r in records if r.phase == "prune" and r.planned]
    judged = [r for r in prune[skip:] if r.landing is None]
    if not judged:
        return None
    units = sum(layer.units for layer in records[0].layers.values()) or 1
    gaps = [(r.measured_density - r.planned) / r.planned for r in judged]
    flips = [(r.regrown + r.pruned) / units for r in records if r.landing is None]
    landing = next((r.landing for r in records if r.landing is not None), None)
    return Tracking(intervals=len(judged), median_gap=statistics.median(abs(g) for g in gaps),
                    worst_gap=max(gaps, key=abs), max_flip_fraction=max(flips, default=0.0),
                    landing_move=None if landing is None else landing.density_after - landing.density_before)
