"""The MNIST-1D CNN of ``mnist1d_cnn.py`` on mnist1d-hard: the same generator and seed with stronger
noise, shear and translation (``hyperflux_fx.frontend.mnist1d.MNIST1D_HARD``), so that the dense model
sits near 90% and capacity and recovery matter when pruning. Generated offline: 4000 train / 1000 test.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn


def _sibling():
    """examples/mnist1d_cnn.py (a model file is imported by path, so its folder is not on sys.path)."""
    spec = importlib.util.spec_from_file_location("mnist1d_cnn_for_hard", Path(__file__).with_name("mnist1d_cnn.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CNN = _sibling()


def build_model() -> nn.Module:
    return _CNN.build_model()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return _CNN.example_inputs()


def datasets() -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """mnist1d-hard, generated offline (4000 train / 1000 test, the package's fixed seed)."""
    from hyperflux_fx.frontend.data import mnist1d_datasets

    return mnist1d_datasets(channels_first=True, hard=True)
