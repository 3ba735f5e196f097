"""hyperflux-fx: a torch.fx pruning compiler driven by the Hyperflux method.

Public API (see docs/ and ../shared/DESIGN.md)::

    import hyperflux_fx as hf
    gm = hf.trace(model, example_inputs)
    res = hf.insert_gates(model, hf.GateConfig(), example_inputs=example_inputs)
    hf.density(res.graph_module)
"""

from __future__ import annotations

from hyperflux_fx.analysis.cost import count_params_and_macs
from hyperflux_fx.analysis.cost_model import Cost, CostModel
from hyperflux_fx.config import FoldConfig, GateConfig, TrainConfig
from hyperflux_fx.export import ExportCheckError, ExportError, ExportReport, export_onnx, measure_latency
from hyperflux_fx.frontend import ExampleInputError, SourceError, TraceError, load_source, trace
from hyperflux_fx.ir import (
    Gate,
    WeightGate,
    density,
    flux,
    gates,
    get_pressure,
    layer_density,
    pressure_loss,
    reset_flux,
    set_pressure,
    track_flux,
)
from hyperflux_fx.passes import FoldReport, GateReport, PassResult, fold_batchnorm, fold_masks, insert_gates
from hyperflux_fx.train import (
    PressureController,
    ScalingLaw,
    TrainingError,
    TrainResult,
    evaluate,
    fit_scaling_law,
    flux_histograms,
    timeline,
    train,
    train_dense,
    unit_events,
)

__version__ = "0.1.0"

__all__ = [
    "Cost",
    "CostModel",
    "ExampleInputError",
    "ExportCheckError",
    "ExportError",
    "ExportReport",
    "FoldConfig",
    "FoldReport",
    "Gate",
    "GateConfig",
    "GateReport",
    "PassResult",
    "PressureController",
    "ScalingLaw",
    "SourceError",
    "TraceError",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "WeightGate",
    "count_params_and_macs",
    "density",
    "evaluate",
    "export_onnx",
    "fit_scaling_law",
    "flux",
    "fold_batchnorm",
    "fold_masks",
    "gates",
    "get_pressure",
    "insert_gates",
    "layer_density",
    "load_source",
    "measure_latency",
    "pressure_loss",
    "reset_flux",
    "set_pressure",
    "flux_histograms",
    "timeline",
    "trace",
    "track_flux",
    "train",
    "train_dense",
    "unit_events",
]
