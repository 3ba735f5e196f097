"""What leaves the compiler: ONNX export checked against ONNX Runtime, and latency measurement."""

from __future__ import annotations

from hyperflux_fx.export.latency import compare_latency, measure_latency
from hyperflux_fx.export.onnx import ExportCheckError, ExportError, ExportReport, export_onnx

__all__ = ["ExportCheckError", "ExportError", "ExportReport", "compare_latency", "export_onnx", "measure_latency"]
