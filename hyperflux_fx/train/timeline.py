"""The unit timeline: which unit was kept or pruned at the end of every scheduler interval (the
microscopic half of HYPERFLUX.md §8's diagnostics), and the events read off it.

A run with an ``out_dir`` writes ``timeline.npz`` beside ``metrics.jsonl``, rewritten (atomically) every
interval. For a channel gate (channels, heads, MLP units, width) it holds the 0/1 mask of every unit,
an ``intervals x units`` bool array; for a weight gate only its per-interval density (a 25M-weight
model must not write gigabytes). Keys: ``names`` (the gates' targets, in order), ``kinds``
("units" or "density" per gate), and ``g0``, ``g1``, ... the arrays in that order.

Beside the masks, every gate (weight gates too: the size does not grow with the gate) has the
distribution of its units' flux over each interval, split into survivors and pruned units:
``h0``, ``h1``, ... ``intervals x 2 x bins`` counts (row 0 the units kept at the end of the interval,
row 1 the pruned ones) over the fixed signed-log bins ``flux_edges`` (:data:`FLUX_EDGES`: ±1e-12 … ±1e2,
a decade per bin, one bin for |flux| < 1e-12). :func:`flux_histograms` reads them back.

:func:`timeline` reads one back; :func:`unit_events` turns a unit array into what happened to the
units: regrowth events (pruned → kept), how long units stayed pruned before they came back, the
share of the final survivors that were pruned at some point, and the order in which units left.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FLUX_EDGES", "TIMELINE_FILE", "UnitEvents", "flux_histogram", "flux_histograms", "timeline",
           "timeline_and_flux", "unit_events", "write_timeline"]

TIMELINE_FILE = "timeline.npz"
_DECADES = 10.0 ** np.arange(-12, 3)  # 1e-12 ... 1e2
FLUX_EDGES = np.concatenate([-_DECADES[::-1], _DECADES])  # signed-log bin edges of the flux histograms


def flux_histogram(flux: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``2 x (len(FLUX_EDGES) + 1)`` counts of ``flux`` over :data:`FLUX_EDGES`: row 0 the ``kept`` units,
    row 1 the others. Computed where the tensors are (no host synchronisation)."""
    edges = torch.as_tensor(FLUX_EDGES, dtype=flux.dtype, device=flux.device)
    bins = torch.bucketize(flux.detach().flatten(), edges)
    n = len(FLUX_EDGES) + 1
    counts = torch.zeros(2 * n, dtype=torch.long, device=flux.device)  # index_add: no data-sized output, no sync
    counts.index_add_(0, (~kept.flatten()).long() * n + bins, torch.ones_like(bins))
    return counts.view(2, n)


def write_timeline(path: str | Path, names: list[str], kinds: list[str], arrays: list[np.ndarray],
                   histograms: list[np.ndarray] | None = None) -> None:
    """Write the timeline atomically (see the module docstring); ``histograms`` per gate, in ``names``' order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    extra = {f"h{i}": h for i, h in enumerate(histograms or [])}
    np.savez_compressed(tmp, names=np.array(json.dumps(names)), kinds=np.array(json.dumps(kinds)),
                        flux_edges=FLUX_EDGES, **{f"g{i}": a for i, a in enumerate(arrays)}, **extra)
    os.replace(tmp, path)


def _npz(run_dir: str | Path) -> Path:
    """A run's timeline.npz (``run_dir`` may be the file itself)."""
    path = Path(run_dir)
    return path / TIMELINE_FILE if path.is_dir() else path


def timeline(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The timeline of a run (its ``--out`` or ``out_dir``, or the timeline.npz itself): gate target ->
    ``intervals x units`` bool array (channel gates) or ``intervals`` densities (weight gates)."""
    with np.load(_npz(run_dir)) as data:
        names = json.loads(str(data["names"]))
        return {name: data[f"g{i}"] for i, name in enumerate(names)}


def flux_histograms(run_dir: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The flux distributions of a run: (bin edges, gate target -> ``intervals x 2 x bins`` counts, row 0
    the units kept at the end of the interval, row 1 the pruned ones). Empty for a run written before
    they were recorded."""
    with np.load(_npz(run_dir)) as data:
        names = json.loads(str(data["names"]))
        if "flux_edges" not in data.files:
            return FLUX_EDGES, {}
        return data["flux_edges"], {name: data[f"h{i}"] for i, name in enumerate(names) if f"h{i}" in data.files}


def timeline_and_flux(run_dir: str | Path) -> tuple[dict[str, np.ndarray] | None,
                                                    tuple[np.ndarray, dict[str, np.ndarray]] | None]:
    """(:func:`timeline`, :func:`flux_histograms`) of a run directory; (None, None) where it has no
    timeline.npz (a run interrupted before its first interval)."""
    if not (Path(run_dir) / TIMELINE_FILE).exists():
        return None, None
    return timeline(run_dir), flux_histograms(run_dir)


@dataclass(frozen=True)
class UnitEvents:
    """What happened to the units of one gate over a run (from its ``intervals x units`` timeline)."""

    regrowths: int  # pruned -> kept transitions, all units together
    regrown_units: int  # units that came back at least once
    pruned_spells: list[int]  # for every regrowth: how many intervals the unit had stayed pruned
    survivors: int  # units kept at the end
    survivors_once_pruned: float  # share of the final survivors that were pruned at some interval
    departures: list[tuple[int, int]]  # (interval, unit) of the last closing of each unit pruned at the end,
    #   in the order they left

    def to_dict(self) -> dict[str, Any]:
        return {"regrowths": self.regrowths, "regrown_units": self.regrown_units,
                "pruned_spells": self.pruned_spells, "survivors": self.survivors,
                "survivors_once_pruned": self.survivors_once_pruned, "departures": self.departures}


def unit_events(masks: np.ndarray) -> UnitEvents:
    """The events of an ``intervals x units`` bool timeline (a unit is kept before the first row)."""
    masks = np.asarray(masks, dtype=bool)
    history = np.vstack([np.ones((1, masks.shape[1]), dtype=bool), masks])
    regrow = ~history[:-1] & history[1:]  # row t: came back at interval t
    close = history[:-1] & ~history[1:]
    spells = []
    for t, unit in zip(*np.nonzero(regrow), strict=True):
        last_kept = np.nonzero(history[: t + 1, unit])[0].max()
        spells.append(int(t - last_kept))
    final = masks[-1] if len(masks) else np.ones(masks.shape[1], dtype=bool)
    ever_pruned = (~masks).any(axis=0) if len(masks) else np.zeros(masks.shape[1], dtype=bool)
    survivors = int(final.sum())
    departures = sorted((int(np.nonzero(close[:, u])[0].max()) + 1, int(u)) for u in np.nonzero(~final)[0])
    return UnitEvents(regrowths=int(regrow.sum()), regrown_units=int(regrow.any(axis=0).sum()),
                      pruned_spells=spells, survivors=survivors,
                      survivors_once_pruned=float((ever_pruned & final).sum() / survivors) if survivors else 0.0,
                      departures=departures)
