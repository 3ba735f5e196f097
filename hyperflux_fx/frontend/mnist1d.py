"""MNIST-1D (Greydanus, "Scaling down deep learning", 2020), generated offline by its package.

The data set is a function of its arguments: ``mnist1d.data.make_dataset`` with the package's default
arguments (5000 signals of 40 samples, 10 classes, generation seed 42) gives the paper's split, the
first 4000 for training and the last 1000 for testing. Nothing is downloaded (the package's
``get_dataset`` would fetch a pickle; it is never called). Generation takes about two seconds and
is done once per process.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["MNIST1D_CLASSES", "MNIST1D_HARD", "MNIST1D_LENGTH", "mnist1d_datasets"]

MNIST1D_CLASSES = 10
MNIST1D_LENGTH = 40  # samples per signal (the package's final_seq_length)
# mnist1d-hard: the same generator and seed with stronger correlated and i.i.d. noise, shear and
# translation (the package's defaults: 0.25, 0.02, 0.75, 48), so that capacity and recovery matter: the
# dense mnist1d_cnn reaches 91.6% on it (10 dense epochs, seed 0) instead of about 98% (docs/BENCHMARKS.md).
MNIST1D_HARD = {"corr_noise_scale": 0.33, "iid_noise_scale": 0.04, "shear_scale": 0.9, "max_translation": 52}


@functools.lru_cache(maxsize=2)
def _generate(hard: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # a core dependency; only a broken install gets here
        raise ImportError("MNIST-1D needs the mnist1d package (pip install mnist1d==0.0.2.post1)") from exc
    args = get_dataset_args()
    if hard:
        for key, value in MNIST1D_HARD.items():
            setattr(args, key, value)
    # make_dataset seeds numpy's and Python's global generators: leave the caller's streams untouched
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def mnist1d_datasets(*, channels_first: bool = True, hard: bool = False) -> tuple[Dataset, TensorDataset]:
    """(train, test) MNIST-1D datasets: 4000 / 1000 float32 signals of 40 samples, labels 0-9.

    With ``channels_first`` each signal is ``(1, 40)`` (for Conv1d models), otherwise ``(40,)`` (MLPs).
    ``hard``: the generator with :data:`MNIST1D_HARD`'s arguments (mnist1d-hard). The package already
    centres the signals and scales them to unit standard deviation.
    """
    x, y, x_test, y_test = _generate(hard)
    shape = (1, MNIST1D_LENGTH) if channels_first else (MNIST1D_LENGTH,)

    def tensors(xs: np.ndarray, ys: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(xs, dtype=torch.float32).reshape(-1, *shape),
                             torch.tensor(ys, dtype=torch.long))

    return tensors(x, y), tensors(x_test, y_test)
