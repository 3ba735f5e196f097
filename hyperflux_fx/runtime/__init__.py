"""What runs: gate modules and their straight-through gradient, pressure."""

from __future__ import annotations

from hyperflux_fx.runtime.gates import (
    Gate,
    GatedModuleCall,
    WeightGate,
    density,
    flux,
    gates,
    layer_density,
    named_gates,
    reset_flux,
    track_flux,
)
from hyperflux_fx.runtime.pressure import PressureState, get_pressure, pressure_loss, pressure_state, set_pressure
from hyperflux_fx.runtime.recorder import Recorder
from hyperflux_fx.runtime.scheduler import PressureController, ScalingLaw, find_d0, fit_scaling_law, planned_remaining
from hyperflux_fx.runtime.trainer import TrainingError, TrainResult, accuracy, evaluate, train, train_dense

__all__ = [
    "Gate",
    "GatedModuleCall",
    "PressureController",
    "PressureState",
    "Recorder",
    "ScalingLaw",
    "TrainResult",
    "TrainingError",
    "WeightGate",
    "accuracy",
    "density",
    "evaluate",
    "find_d0",
    "fit_scaling_law",
    "flux",
    "gates",
    "get_pressure",
    "layer_density",
    "named_gates",
    "planned_remaining",
    "pressure_loss",
    "pressure_state",
    "reset_flux",
    "set_pressure",
    "track_flux",
    "train",
    "train_dense",
]
