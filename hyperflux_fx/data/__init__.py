"""Dataset adapters: scikit-learn's digits (embedded default), CIFAR-10/100 and image folders from a local
root, synthetic data shaped like the model's input."""

from __future__ import annotations

from hyperflux_fx.data.digits import DIGITS_CLASSES, digits_datasets
from hyperflux_fx.data.sources import DataError, resolve_datasets

__all__ = ["DIGITS_CLASSES", "DataError", "digits_datasets", "resolve_datasets"]
