"""The latency target's cost model: the per-op ORT timing table, its calibration against measured
compact models (saved with the run, reused on --resume), and the measured dense-to-compact ratio."""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from hyperflux_fx.analysis.cost_model import CostModel
from hyperflux_fx.analysis.latency_model import LatencyModel, cache_key
from hyperflux_fx.cli.job import Job, say
from hyperflux_fx.config import (
    FoldConfig,
    TrainConfig,
)
from hyperflux_fx.export.latency import compare_latency
from hyperflux_fx.export.onnx import export_onnx
from hyperflux_fx.ir import gates
from hyperflux_fx.passes import fold_masks
from hyperflux_fx.report.outdir import atomic_write_text


def latency_model(job: Job, gated: Any, cfg: TrainConfig) -> LatencyModel:
    """The latency table (cached per machine) of the gated model, calibrated on whole models measured
    in ONNX Runtime: the dense one and nine compact ones (:func:`_calibration_closed`). The
    measurements are kept in OUT.partial, so a resumed run uses the same calibration."""
    model = LatencyModel(CostModel(gated, cfg.fold), progress=not job.args.quiet)
    info = f"{model.measured} op timings measured in {model.build_seconds:.1f} s" if model.measured else "cached"
    say(job.args, f"      latency table of {len(model.ops)} ops: {info} ({model.path})")
    points = _saved_calibration(job)
    if points is None:
        points = _calibration_points(job, gated, model, cfg.fold)
        atomic_write_text(job.partial / CALIBRATION_FILE, json.dumps({"key": cache_key(), "points": points}))
    model.calibrate(points)
    model.measure = lambda: _measured_fraction(job, gated, cfg.fold)
    worst = max(abs(p["predicted_ms"] / p["measured_ms"] - 1) for p in model.calibration)
    say(job.args, f"      calibrated on {len(points)} whole models (dense {points[0][1]:.3f} ms); "
                   f"largest fit error {100 * worst:.1f}%")
    return model


CALIBRATION_FILE = "latency_calibration.json"


def _saved_calibration(job: Job) -> list[tuple[dict[int, int], float]] | None:
    """The calibration a resumed run measured, if it was measured on a machine of this cache key."""
    path = job.partial / CALIBRATION_FILE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or saved.get("key") != cache_key():
        say(job.args, f"      {CALIBRATION_FILE} was measured on another machine (or an older table): measured "
                       "again here")
        return None
    return [({int(g): n for g, n in k.items()}, ms) for k, ms in saved["points"]]


def _dense_onnx(job: Job) -> Path:
    """The dense model's export the latency target measures against (in OUT.partial while training)."""
    path = job.partial / "latency_dense.onnx"
    if not path.exists():
        export_onnx(job.loaded.model.eval(), job.inputs, path)
    return path


def _measured_fraction(job: Job, gated: Any, fold: FoldConfig) -> float:
    """Compact / dense ONNX Runtime latency of the current masks, measured side by side."""
    compact = fold_masks(copy.deepcopy(gated).cpu(), fold, inplace=True).graph_module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(compact, job.inputs, Path(tmp) / "landing.onnx")
        dense, mine = compare_latency([_dense_onnx(job), Path(tmp) / "landing.onnx"], batch=int(job.inputs[0].shape[0]))
    say(job.args, f"      landing check: compact {mine['median_ms']:.3f} ms, dense {dense['median_ms']:.3f} ms")
    return mine["median_ms"] / dense["median_ms"]


CALIBRATION_UNIFORM = (0.25, 0.5, 0.75)  # every group closed at this fraction


CALIBRATION_MIXED = 6  # compact models with each group closed at its own random fraction in [0.1, 0.9]


def _calibration_closed(gated: Any) -> list[list[float]]:
    """Per calibration model, the fraction of each gate's units to close: the dense model, three
    uniform ones and six mixed ones. Learned masks are uneven across layers, and a fit on uniform
    models alone misses mixed ones (docs/BENCHMARKS.md, "Measurements behind the design")."""
    n = len(gates(gated))
    gen = torch.Generator().manual_seed(1234)
    mixed = [(0.1 + 0.8 * torch.rand(n, generator=gen)).tolist() for _ in range(CALIBRATION_MIXED)]
    return [[0.0] * n] + [[c] * n for c in CALIBRATION_UNIFORM] + mixed


def _calibration_points(job: Job, gated: Any, model: LatencyModel, fold: FoldConfig
                        ) -> list[tuple[dict[int, int], float]]:
    """(kept units per group, measured ms) of the dense model and of the compact models of
    :func:`_calibration_closed` (the flows are restored afterwards)."""
    batch = int(job.inputs[0].shape[0])
    flows = [g.flow.detach().clone() for g in gates(gated)]
    counts, paths = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, closed in enumerate(_calibration_closed(gated)):
                gen = torch.Generator().manual_seed(i)
                with torch.no_grad():
                    for g, f, c in zip(gates(gated), flows, closed, strict=True):
                        g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - c if i else f.abs() + 1e-3)
                counts.append(model.cost_model.counts())
                if not i:
                    paths.append(_dense_onnx(job))
                    continue
                paths.append(Path(tmp) / f"calibration{i}.onnx")
                export_onnx(fold_masks(gated, fold).graph_module.eval(), job.inputs, paths[-1])
            return _paired_ms(counts, paths, batch)
    finally:  # the run's own flows, also when an export or a measurement fails
        with torch.no_grad():
            for g, f in zip(gates(gated), flows, strict=True):
                g.flow.copy_(f)


def _paired_ms(counts: list[dict[int, int]], paths: list[Path], batch: int) -> list[tuple[dict[int, int], float]]:
    """(counts, ms) with paths[0] the dense model: each compact model is timed beside the dense one, as
    the landing checks and the final figures are (the same statistic), and its ms is its measured
    fraction of the dense model times the dense model's median over the pairs: a machine's speed
    drifts between measurements minutes apart, the fraction within a pair, timed in its quietest block
    (``compare_latency``), much less (docs/BENCHMARKS.md, "Measurements behind the design")."""
    pairs = [compare_latency([paths[0], p], batch=batch) for p in paths[1:]]
    dense = statistics.median(d["median_ms"] for d, _ in pairs)
    return [(counts[0], dense)] + [(k, dense * c["median_ms"] / d["median_ms"])
                                   for k, (d, c) in zip(counts[1:], pairs, strict=True)]
