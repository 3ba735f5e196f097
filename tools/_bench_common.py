"""Shared pieces of the benchmark scripts: digits data, the two architectures, markdown output."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]


def load_rows(files: str | None) -> list[dict]:
    """The rows of comma-separated ``--json`` files of earlier runs, a folder standing for every ``*.json``
    in it, in name order (none for None)."""
    paths = [Path(f) for f in (files or "").split(",") if f]
    paths = [q for p in paths for q in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    return [r for p in paths for r in json.loads(p.read_text())]


def digits_loaders(batch_size: int = 64, size: int = 16) -> tuple[DataLoader, DataLoader]:
    from hyperflux_fx.frontend.data import digits_datasets

    train, test = digits_datasets(size=size)
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(test, batch_size=512)


def example_module(name: str) -> ModuleType:
    """The module of ``examples/<name>.py`` (a model.py as users write them)."""
    sys.path.insert(0, str(ROOT / "examples"))
    return importlib.import_module(name)


def digits_cnn() -> nn.Module:
    return example_module("digits_cnn").build_model()


def digits_mlp(size: int = 16) -> nn.Module:
    """The second architecture: a 3-layer MLP on the flattened image."""
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def resnet18_digits() -> nn.Module:
    """torchvision's ResNet-18 with a CIFAR-style stem (3x3 stride 1, no max-pool) on 1-channel digits."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def mnist1d_loaders(name: str, batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """MNIST-1D (4000 train / 1000 test), shaped for the example ``name`` (Conv1d: 1x40, MLP: 40); the
    mnist1d-hard variant for ``mnist1d_hard_*``."""
    from hyperflux_fx.frontend.data import mnist1d_datasets

    train, test = mnist1d_datasets(channels_first=name != "mnist1d_mlp", hard=name.startswith("mnist1d_hard"))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(test, batch_size=512)


ARCHS = {"digits_cnn": digits_cnn, "digits_mlp": digits_mlp, "resnet18": resnet18_digits,
         "mnist1d_cnn": lambda: example_module("mnist1d_cnn").build_model(),
         "mnist1d_hard_cnn": lambda: example_module("mnist1d_hard_cnn").build_model(),
         "mnist1d_resnet": lambda: example_module("mnist1d_resnet").build_model(),
         "mnist1d_mlp": lambda: example_module("mnist1d_mlp").build_model()}


def dataset(arch: str) -> str:
    """The data set an architecture trains on (a key of :data:`DATA`): mnist1d-hard for mnist1d_hard_*,
    MNIST-1D for the other mnist1d_*, digits otherwise."""
    if arch.startswith("mnist1d_hard"):
        return "mnist1d-hard"
    return "mnist1d" if arch.startswith("mnist1d") else "digits"


def loaders(arch: str) -> tuple[DataLoader, DataLoader]:
    """(train, test) loaders of an architecture's data set (:func:`dataset`)."""
    return mnist1d_loaders(arch) if dataset(arch).startswith("mnist1d") else digits_loaders()


DATA = {"digits": "Digits (1437 train / 360 test, 16x16)", "mnist1d": "MNIST-1D (4000 train / 1000 test, 40 samples)",
        "mnist1d-hard": "mnist1d-hard (MNIST-1D's generator with stronger noise, shear and translation; 4000 / 1000)"}


def machine(device: str = "cpu") -> str:
    import os
    import platform

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread"


def write_section(path: Path, name: str, text: str) -> None:
    """Replace (or append) the block between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)
