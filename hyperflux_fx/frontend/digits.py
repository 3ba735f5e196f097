"""scikit-learn's bundled 8x8 digits (no download), upsampled, with a fixed train/test split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DIGITS_CLASSES", "RandomShift", "digits_datasets"]

DIGITS_CLASSES = 10


class RandomShift(Dataset):
    """Training augmentation: translate each image by up to ``pixels`` in x and y (zero fill).

    Uses torch's global RNG, so a checkpoint's RNG state makes resumed runs repeat it exactly.
    """

    def __init__(self, base: TensorDataset, pixels: int = 1) -> None:
        self.base = base
        self.pixels = int(pixels)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        if self.pixels > 0:
            p = self.pixels
            dx, dy = (int(v) for v in torch.randint(-p, p + 1, (2,)))
            x = torch.roll(F.pad(x, (p, p, p, p)), shifts=(dy, dx), dims=(-2, -1))[..., p:-p, p:-p]
        return x, y


def digits_datasets(*, size: int = 16, test_fraction: float = 0.2, seed: int = 0,
                    augment: bool = True) -> tuple[Dataset, TensorDataset]:
    """(train, test) datasets of 1x``size``x``size`` images, normalised with the train statistics.

    The split is stratified and fixed by ``seed`` (1437 train / 360 test with the defaults).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    labels = torch.tensor(data.target, dtype=torch.long)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    idx = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels.numpy(), random_state=seed)
    train_x, test_x = images[train_idx], images[test_idx]
    mean, std = train_x.mean(), train_x.std()
    train = TensorDataset((train_x - mean) / std, labels[train_idx])
    test = TensorDataset((test_x - mean) / std, labels[test_idx])
    return (RandomShift(train) if augment else train), test
