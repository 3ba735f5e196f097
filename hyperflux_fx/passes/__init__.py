"""Graph rewrites, one pass per module: insert_gates, fold_masks, fold_batchnorm."""

from __future__ import annotations

from hyperflux_fx.config import FoldConfig
from hyperflux_fx.passes._gate_report import ChannelGroupReport, GatedTensor, GateReport, SkippedItem
from hyperflux_fx.passes._result import PassResult
from hyperflux_fx.passes.fold_batchnorm import fold_batchnorm
from hyperflux_fx.passes.fold_masks import FoldGroup, FoldReport, fold_masks
from hyperflux_fx.passes.insert_gates import insert_gates

__all__ = ["ChannelGroupReport", "FoldConfig", "FoldGroup", "FoldReport", "GateReport", "GatedTensor", "PassResult",
           "SkippedItem", "fold_batchnorm", "fold_masks", "insert_gates"]
