"""The MNIST-1D source: generated offline by the mnist1d package, with the paper's fixed split."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hyperflux_fx.frontend.data import DataError, resolve_datasets
from hyperflux_fx.frontend.mnist1d import MNIST1D_CLASSES, MNIST1D_LENGTH, mnist1d_datasets


def test_mnist1d_is_the_papers_split_and_leaves_global_rngs_alone():
    np.random.seed(7)
    random.seed(7)
    before = (np.random.rand(), random.random())
    np.random.seed(7)
    random.seed(7)
    train, test = mnist1d_datasets()
    assert (np.random.rand(), random.random()) == before  # the package seeds the global generators; we restore
    assert len(train) == 4000 and len(test) == 1000
    x, y = train[0]
    assert x.shape == (1, MNIST1D_LENGTH) and x.dtype == torch.float32 and y.dtype == torch.long
    labels = torch.stack([test[i][1] for i in range(len(test))])
    assert set(labels.tolist()) == set(range(MNIST1D_CLASSES))
    xs = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(float(xs.mean())) < 0.1 and 0.8 < float(xs.std()) < 1.2  # the package centres and scales
    again, _ = mnist1d_datasets(channels_first=False)
    assert again[0][0].shape == (MNIST1D_LENGTH,) and torch.equal(again[0][0], x.flatten())  # deterministic


def test_the_mnist1d_spec_checks_the_models_input_shape():
    train, _ = resolve_datasets("mnist1d", sample_shape=(1, MNIST1D_LENGTH), num_classes=10)
    assert train[0][0].shape == (1, MNIST1D_LENGTH)
    flat, _ = resolve_datasets("mnist1d", sample_shape=(MNIST1D_LENGTH,), num_classes=10)
    assert flat[0][0].shape == (MNIST1D_LENGTH,)
    with pytest.raises(DataError, match="mnist1d signals are 1x40"):
        resolve_datasets("mnist1d", sample_shape=(1, 16, 16), num_classes=10)


def test_mnist1d_hard_is_the_same_generator_with_stronger_distortions():
    easy, easy_test = mnist1d_datasets()
    hard, hard_test = resolve_datasets("mnist1d-hard", sample_shape=(1, MNIST1D_LENGTH), num_classes=10)
    assert len(hard) == 4000 and len(hard_test) == 1000
    assert set(hard.tensors[1].tolist()) == set(range(MNIST1D_CLASSES))
    assert not torch.equal(easy.tensors[0], hard.tensors[0])
    # a nearest-class-mean classifier on the raw signals: the hard set is harder
    def ncm_accuracy(train, test):
        xs, ys = train.tensors[0].flatten(1), train.tensors[1]
        means = torch.stack([xs[ys == c].mean(0) for c in range(MNIST1D_CLASSES)])
        pred = torch.cdist(test.tensors[0].flatten(1), means).argmin(1)
        return float((pred == test.tensors[1]).float().mean())
    assert ncm_accuracy(hard, hard_test) < ncm_accuracy(easy, easy_test)
    again, _ = mnist1d_datasets(hard=True)
    assert torch.equal(again.tensors[0], hard.tensors[0])  # deterministic
