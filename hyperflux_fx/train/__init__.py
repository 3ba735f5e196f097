"""What trains: the Hyperflux loop, its pressure scheduler and recorder, checkpoints, dense training."""

from __future__ import annotations

from hyperflux_fx.train.dense import train_dense
from hyperflux_fx.train.distributed import TrainingError
from hyperflux_fx.train.evaluate import accuracy, evaluate
from hyperflux_fx.train.landing import land_on_density
from hyperflux_fx.train.loop import TrainResult, train
from hyperflux_fx.train.recorder import IntervalRecord, Landing, LayerRecord, Recorder
from hyperflux_fx.train.scheduler import (
    PressureController,
    ScalingLaw,
    find_d0,
    fit_scaling_law,
    planned_remaining,
)
from hyperflux_fx.train.timeline import flux_histograms, timeline, unit_events

__all__ = ["IntervalRecord", "Landing", "LayerRecord", "PressureController", "Recorder", "ScalingLaw", "TrainResult",
           "TrainingError", "accuracy", "evaluate", "find_d0", "fit_scaling_law", "land_on_density",
           "flux_histograms", "planned_remaining", "timeline", "train", "train_dense", "unit_events"]
