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

__all__ = [
    "Gate",
    "GatedModuleCall",
    "PressureState",
    "WeightGate",
    "density",
    "flux",
    "gates",
    "get_pressure",
    "layer_density",
    "named_gates",
    "pressure_loss",
    "pressure_state",
    "reset_flux",
    "set_pressure",
    "track_flux",
]
