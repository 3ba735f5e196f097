"""Dataset adapters: scikit-learn's digits (embedded default); CIFAR and image folders arrive with the CLI."""

from __future__ import annotations

from hyperflux_fx.data.digits import DIGITS_CLASSES, digits_datasets

__all__ = ["DIGITS_CLASSES", "digits_datasets"]
