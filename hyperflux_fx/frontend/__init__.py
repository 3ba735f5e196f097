"""Capture: tracing a model into a GraphModule (torch.fx with leaf fallback, or torch.export:
exported.py), loading model sources (``model.py``, ``timm:``, ``torchvision:``) and data specs
(digits, CIFAR, image folders, synthetic)."""

from __future__ import annotations

from hyperflux_fx.frontend.data import DataError, digits_datasets, resolve_datasets
from hyperflux_fx.frontend.sources import LoadedModel, SourceError, load_source
from hyperflux_fx.frontend.trace import (
    ExampleInputError,
    Frontend,
    OpaqueModule,
    TraceError,
    normalize_inputs,
    propagate_shapes,
    trace,
)

__all__ = ["DataError", "ExampleInputError", "Frontend", "LoadedModel", "OpaqueModule", "SourceError", "TraceError",
           "digits_datasets", "load_source", "normalize_inputs", "propagate_shapes", "resolve_datasets", "trace"]
