"""A residual 1-D CNN for MNIST-1D: a stem and three stages of two basic blocks (Conv1d-BN-ReLU-Conv1d-BN
plus a skip connection, a 1x1 Conv1d-BN where the width or the length changes), global average pool,
linear classifier.

Widths 32-64-128, kernel 5, the length halved at the second and third stages (40 → 20 → 10 samples).
The skip connections couple every block's output with its stage's residual stream, so the channel
groups the pruning must keep consistent span whole stages. MNIST-1D is generated offline by the
``mnist1d`` package (see ``hyperflux_fx.frontend.mnist1d``): 4000 training and 1000 test signals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LENGTH = 40
NUM_CLASSES = 10
WIDTHS = (32, 64, 128)


class Block(nn.Module):
    """Conv1d-BN-ReLU-Conv1d-BN with an identity or 1x1 Conv1d-BN shortcut, summed, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 5, stride=stride, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 5, padding=2, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv1d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class MNIST1DResNet(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, widths[0], 5, padding=2, bias=False), nn.BatchNorm1d(widths[0]),
                                  nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [Block(cin, w, stride=1 if i == 0 else 2), Block(w, w)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=-1))


def build_model() -> nn.Module:
    return MNIST1DResNet()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 1, LENGTH),)


def datasets() -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """MNIST-1D, generated offline (4000 train / 1000 test, the package's fixed seed)."""
    from hyperflux_fx.frontend.data import mnist1d_datasets

    return mnist1d_datasets(channels_first=True)
