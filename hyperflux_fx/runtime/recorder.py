"""The recorder: per-interval micro and macro diagnostics (HYPERFLUX.md §8), appended to metrics.jsonl.

Each record holds: interval, epoch, step, phase, global and per-layer density, gamma, the controller's
g, the planned remaining fraction R(e), flips pruned->active (regrowth) and active->pruned per layer
since the previous record, flux statistics of survivors vs pruned units (mean, min among survivors)
over the interval, train loss/accuracy and validation accuracy.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hyperflux_fx.runtime.gates import gates

__all__ = ["Recorder"]


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
        self.records: list[dict[str, Any]] = []
        self._prev: dict[str, torch.Tensor] = {g.target: g.flow.detach() >= 0 for g in gates(model)}

    def record(self, model: nn.Module, **fields: Any) -> dict[str, Any]:
        """Measure the model now, merge ``fields`` (interval, epoch, gamma, ...), store and write."""
        # Every statistic is computed on the model's device and copied to the host once (one
        # synchronisation per interval, not several per gate).
        all_gates = gates(model)
        rows = []
        for g in all_gates:
            mask = g.flow.detach() >= 0
            prev = self._prev.get(g.target)
            prev = torch.ones_like(mask) if prev is None else prev.to(mask.device)
            row = [mask.sum(), (mask & ~prev).sum(), (prev & ~mask).sum()]
            flux = g.mean_flux()
            if flux is not None:
                row += [torch.where(mask, flux, 0.0).sum(), torch.where(mask, 0.0, flux).sum(),
                        torch.where(mask, flux, math.inf).min(), g.flux_steps]
                g.reset_flux()
            else:
                zero = mask.new_zeros((), dtype=torch.float64)
                row += [zero, zero, zero + math.inf, zero]
            rows.append(torch.stack([v.to(torch.float64) for v in row]))
            self._prev[g.target] = mask
        table = torch.stack(rows).cpu().tolist() if rows else []

        layers: dict[str, dict[str, Any]] = {}
        kept_total = units_total = regrown_total = pruned_total = 0
        surv_sum = pruned_sum = 0.0
        surv_n = pruned_n = 0
        surv_min = math.inf
        for g, (kept_f, regrown_f, pruned_f, fs_sum, fp_sum, fs_min, steps) in zip(all_gates, table, strict=True):
            kept, regrown, pruned = int(kept_f), int(regrown_f), int(pruned_f)
            layer: dict[str, Any] = {"density": kept / g.numel, "kept": kept, "units": g.numel,
                                     "regrown": regrown, "pruned": pruned}
            if g.flux_sum is not None and steps > 0:
                n_pruned = g.numel - kept
                layer["flux_survivors_mean"] = fs_sum / kept if kept else math.nan
                layer["flux_pruned_mean"] = fp_sum / n_pruned if n_pruned else math.nan
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
        rec: dict[str, Any] = dict(fields)
        rec["density"] = kept_total / max(units_total, 1)
        rec["sparsity"] = 1.0 - rec["density"]
        rec["regrown"] = regrown_total
        rec["pruned"] = pruned_total
        rec["flux_survivors_mean"] = surv_sum / surv_n if surv_n else None
        rec["flux_pruned_mean"] = pruned_sum / pruned_n if pruned_n else None
        rec["flux_survivors_min"] = surv_min if surv_n else None
        rec["layers"] = layers
        rec = _clean(rec)
        self.records.append(rec)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
        return rec

    def rewrite(self) -> None:
        """Rewrite ``metrics.jsonl`` from the records held (atomically): used after a resume, so the
        file matches the checkpoint even if the interrupted run wrote records past it."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(rec) + "\n" for rec in self.records)
        os.replace(tmp, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"records": json.dumps(self.records), "prev": dict(self._prev)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = json.loads(state["records"])
        self._prev = dict(state["prev"])
