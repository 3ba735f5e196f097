"""An offline text set for language models: the docstrings of Python's standard library, as bytes.

Nothing is downloaded: the text ships with the interpreter. The corpus is the docstrings of the
modules in :data:`MODULES` and of their public functions and classes, in sorted order, joined by blank
lines (about 160 kB on CPython 3.11); the same interpreter gives the same bytes. Tokens are bytes
(0-255, so a model needs ``vocab_size >= 256``; no tokenizer file). The corpus is cut into windows of
``length + 1`` bytes: the first 90% of the windows train, the last 10% validate. A sample is
``(window[:-1], window[1:])``: next-byte prediction.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch
from torch.utils.data import TensorDataset

__all__ = ["MODULES", "TEXT_VOCAB", "text_corpus", "text_datasets"]

TEXT_VOCAB = 256  # byte-level tokens
MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email", "functools", "inspect", "itertools",
           "json", "logging", "pathlib", "pickle", "random", "re", "shutil", "statistics", "string", "subprocess",
           "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile")


@functools.lru_cache(maxsize=1)
def text_corpus() -> bytes:
    """The corpus (see the module docstring)."""
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
    return "\n\n".join(d for d in docs if d).encode("utf-8")


def text_datasets(length: int = 64) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) next-byte datasets of ``length``-token windows (see the module docstring)."""
    data = torch.frombuffer(bytearray(text_corpus()), dtype=torch.uint8).long()
    windows = data[: (data.numel() // (length + 1)) * (length + 1)].view(-1, length + 1)
    cut = int(0.9 * len(windows))
    return (TensorDataset(windows[:cut, :-1].clone(), windows[:cut, 1:].clone()),
            TensorDataset(windows[cut:, :-1].clone(), windows[cut:, 1:].clone()))
