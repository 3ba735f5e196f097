"""Graph rewrites, one pass per file."""

from __future__ import annotations

from hyperflux_fx.passes._result import PassResult
from hyperflux_fx.passes.insert_gates import GatedTensor, GateReport, SkippedItem, insert_gates

__all__ = ["GateReport", "GatedTensor", "PassResult", "SkippedItem", "insert_gates"]
