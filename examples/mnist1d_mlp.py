"""The MNIST-1D paper's MLP: 40 → 100 → 100 → 10 with ReLU (the paper reports 68% test accuracy).

MNIST-1D is generated offline by the ``mnist1d`` package (``hyperflux_fx.frontend.mnist1d``).
"""

from __future__ import annotations

import torch
from torch import nn

LENGTH = 40
NUM_CLASSES = 10


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(LENGTH, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, NUM_CLASSES))


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, LENGTH),)


def datasets() -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """MNIST-1D, generated offline (4000 train / 1000 test, the package's fixed seed)."""
    from hyperflux_fx.frontend.data import mnist1d_datasets

    return mnist1d_datasets(channels_first=False)
