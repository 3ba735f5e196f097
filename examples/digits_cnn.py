"""A small ResNet-style CNN for scikit-learn's bundled 8x8 digits, upsampled to 16x16.

This is the embedded default that `make demo` compiles. A model file for hyperflux-compile defines
``build_model()`` and optionally ``example_inputs()`` and ``datasets()`` (train, validation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 16  # digits are 8x8; the adapter upsamples them to this size
NUM_CLASSES = 10


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN with an identity or 1x1-conv shortcut, summed, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class DigitsCNN(nn.Module):
    """Stem, three residual stages (32, 64, 128 channels), global average pool, linear classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model() -> nn.Module:
    return DigitsCNN()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE),)


def datasets() -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """scikit-learn's bundled digits (no download), upsampled to IMAGE_SIZE, fixed split."""
    from hyperflux_fx.frontend.data import digits_datasets

    return digits_datasets(size=IMAGE_SIZE)
