"""Dataset specs for the CLI: ``digits``, ``mnist1d``, ``mnist1d-hard``, ``cifar10:ROOT``, ``cifar100:ROOT``,
``imagefolder:ROOT``, ``synthetic``, ``text:PATH`` (a language model's corpus: frontend/text.py).
Nothing is downloaded: roots must hold the data as torchvision lays it out; digits and MNIST-1D are
generated from installed packages."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from hyperflux_fx.frontend.digits import digits_datasets
from hyperflux_fx.frontend.mnist1d import MNIST1D_LENGTH, mnist1d_datasets
from hyperflux_fx.frontend.text import TextError, corpus_datasets, load_tokens

__all__ = ["DataError", "digits_datasets", "mnist1d_datasets", "resolve_datasets"]

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset spec that cannot be served (unknown name, missing files)."""


def _cifar(kind: str, root: str, size: int) -> tuple[Dataset, Dataset]:
    import torchvision
    import torchvision.transforms as T

    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    files = ("data_batch_1 ... data_batch_5, test_batch, batches.meta" if kind == "cifar10"
             else "train, test, meta")
    base = Path(root)
    if not (base / folder).is_dir():
        raise DataError(f"{kind}: no {base / folder} (expected the python version as torchvision lays it out: "
                        f"{folder}/ with {files}; nothing is downloaded)")
    mean, std = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)) if kind == "cifar10" else (
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    resize = [T.Resize(size)] if size != 32 else []
    train_tf = T.Compose([*resize, T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(mean, std)])
    test_tf = T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
    try:
        return (cls(str(base), train=True, transform=train_tf, download=False),
                cls(str(base), train=False, transform=test_tf, download=False))
    except RuntimeError as exc:
        raise DataError(f"{kind}: {base / folder} is incomplete or corrupted ({exc}); expected {files}") from exc


def _imagefolder(root: str, size: int) -> tuple[Dataset, Dataset]:
    import torchvision
    import torchvision.transforms as T

    base = Path(root)
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise DataError(f"imagefolder: no {base / split}/ (expected {base}/train/<class>/*.jpg and "
                            f"{base}/val/<class>/*.jpg)")
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(_MEAN, _STD)])
    val_tf = T.Compose([T.Resize(int(size * 1.14)), T.CenterCrop(size), T.ToTensor(), T.Normalize(_MEAN, _STD)])
    try:
        return (torchvision.datasets.ImageFolder(str(base / "train"), transform=train_tf),
                torchvision.datasets.ImageFolder(str(base / "val"), transform=val_tf))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"imagefolder: {exc}") from exc


def _synthetic(sample_shape: tuple[int, ...], num_classes: int, n_train: int = 256, n_val: int = 64,
               seed: int = 0) -> tuple[Dataset, Dataset]:
    """Learnable fake data with the model's input shape: class k adds a fixed random pattern."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, *sample_shape, generator=gen)

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, num_classes, (n,), generator=gen)
        x = patterns[y] + torch.randn(n, *sample_shape, generator=gen)
        return TensorDataset(x, y)

    return make(n_train), make(n_val)


def _text(path: str, sample_shape: tuple[int, ...], vocab: int, tokenizer_dir: str | Path | None
          ) -> tuple[Dataset, Dataset]:
    if not path:
        raise DataError("text needs a path: --data text:FILE.txt, text:FILE.jsonl or text:FOLDER")
    if len(sample_shape) != 1:
        raise DataError(f"text gives token windows (batch, seq_len); the model's example input is {sample_shape} "
                        "without the batch dim")
    try:
        tokens = load_tokens(tokenizer_dir)
        if tokens.vocab_size > vocab:
            raise DataError(f"the tokenizer has {tokens.vocab_size} tokens but the model's output has {vocab}: its "
                            "ids would index past the embedding (use the tokenizer the model was trained with)")
        return corpus_datasets(path, sample_shape[0], tokens)
    except TextError as exc:
        raise DataError(str(exc)) from exc


def resolve_datasets(spec: str, *, sample_shape: tuple[int, ...], num_classes: int,
                     seed: int = 0, tokenizer_dir: str | Path | None = None) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for a spec; ``sample_shape`` is one example input without the batch dim.
    ``text:PATH`` tokenises with ``tokenizer_dir``'s tokenizer.json (bytes where there is none), and
    ``num_classes`` is then the vocabulary the model predicts.

    Raises:
        DataError: unknown spec, missing root or files, or images the model cannot take.
    """
    kind, _, root = spec.partition(":")
    if kind == "text":
        return _text(root, tuple(sample_shape), num_classes, tokenizer_dir)
    size = sample_shape[-1] if len(sample_shape) == 3 else 32
    if kind == "digits":
        if len(sample_shape) != 3 or sample_shape[0] != 1 or sample_shape[1] != sample_shape[2]:
            raise DataError(f"digits are 1-channel square images; the model's example input is {sample_shape} "
                            "(use --data synthetic, or a model for 1xNxN inputs)")
        return digits_datasets(size=sample_shape[-1], seed=seed)
    if kind in ("mnist1d", "mnist1d-hard"):
        if tuple(sample_shape) not in ((1, MNIST1D_LENGTH), (MNIST1D_LENGTH,)):
            raise DataError(f"mnist1d signals are 1x{MNIST1D_LENGTH} (Conv1d) or {MNIST1D_LENGTH} (MLP); the "
                            f"model's example input is {tuple(sample_shape)} (without the batch dim)")
        return mnist1d_datasets(channels_first=len(sample_shape) == 2, hard=kind == "mnist1d-hard")
    if kind in ("cifar10", "cifar100", "imagefolder"):
        if not root:
            raise DataError(f"{kind} needs a root: --data {kind}:/path/to/data")
        if len(sample_shape) != 3 or sample_shape[0] != 3:
            raise DataError(f"{kind} gives 3-channel images; the model's example input is {sample_shape}")
        return _cifar(kind, root, size) if kind.startswith("cifar") else _imagefolder(root, size)
    if kind == "synthetic":
        return _synthetic(tuple(sample_shape), num_classes, seed=seed)
    raise DataError(f"unknown dataset {spec!r}: use digits, mnist1d, mnist1d-hard, cifar10:ROOT, cifar100:ROOT, "
                    "imagefolder:ROOT, synthetic or text:PATH")

