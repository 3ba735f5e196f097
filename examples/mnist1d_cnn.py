"""A 1-D CNN for MNIST-1D (Conv1d + BN + ReLU blocks, global average pool, linear classifier).

Five conv layers, widths 32-64-64-128-128, kernel 5, the length halved after the second and fourth
(40 → 20 → 10 samples). MNIST-1D is generated offline by the ``mnist1d`` package (see
``hyperflux_fx.frontend.mnist1d``): 4000 training and 1000 test signals of 40 samples. The paper's
CNN reaches 94%; this one, trained densely by hyperflux-compile's default dense schedule, is
reported in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import torch
from torch import nn

LENGTH = 40
NUM_CLASSES = 10
WIDTHS = (32, 64, 64, 128, 128)
STRIDES = (1, 2, 1, 2, 1)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, 5, stride=stride, padding=2, bias=False), nn.BatchNorm1d(cout), nn.ReLU())


class MNIST1DCNN(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = WIDTHS,
                 strides: tuple[int, ...] = STRIDES) -> None:
        super().__init__()
        cins = (1, *widths[:-1])
        self.features = nn.Sequential(*[_block(i, o, s) for i, o, s in zip(cins, widths, strides, strict=True)])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=-1))


def build_model() -> nn.Module:
    return MNIST1DCNN()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 1, LENGTH),)


def datasets() -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """MNIST-1D, generated offline (4000 train / 1000 test, the package's fixed seed)."""
    from hyperflux_fx.frontend.data import mnist1d_datasets

    return mnist1d_datasets(channels_first=True)
