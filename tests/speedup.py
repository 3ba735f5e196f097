"""The measured ORT speed-up of a CLI run, with one retry for noise (the retry times the dense model,
exported again from its source, side by side with the run's compact.onnx, for twice as long)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hyperflux_fx.export.latency import compare_latency
from hyperflux_fx.export.onnx import export_onnx
from hyperflux_fx.frontend.sources import load_source


def measured_speedup(summary: dict[str, Any], out: Path, source: str, ok: Callable[[float], bool],
                     input_shape: tuple[int, ...] | None = None) -> float:
    """``summary``'s speed-up if ``ok`` accepts it, else a second measurement of the same files."""
    if ok(summary["speedup"]):
        return summary["speedup"]
    loaded = load_source(source, input_shape=input_shape)
    dense_path = out.parent / f"{out.name}-dense-again.onnx"
    export_onnx(loaded.model.eval(), loaded.example_inputs, dense_path)
    dense, compact = compare_latency([dense_path, out / "compact.onnx"], batch=summary["latency_batch"],
                                     seconds=6.0)
    return dense["median_ms"] / compact["median_ms"]
