"""Graph rewrites, one pass per file."""

from __future__ import annotations

from hyperflux_fx.passes._result import PassResult
from hyperflux_fx.passes.fold_batchnorm import fold_batchnorm
from hyperflux_fx.passes.fold_masks import FoldConfig, FoldReport, fold_masks
from hyperflux_fx.passes.insert_gates import GatedTensor, GateReport, SkippedItem, insert_gates

__all__ = ["FoldConfig", "FoldReport", "GateReport", "GatedTensor", "PassResult", "SkippedItem", "fold_batchnorm", "fold_masks",
           "insert_gates"]
