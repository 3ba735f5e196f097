"""Plain dense training: the trained start the paper prunes from."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hyperflux_fx.train.evaluate import LossFn, move_to, split_batch
from hyperflux_fx.train.optim import (
    amp_dtype,
    autocast,
    clip_gradients,
    grad_scaler,
    progress_bar,
    resolve_device,
    warmup_cosine,
    weight_optimizer,
)

__all__ = ["train_dense"]


def train_dense(model: nn.Module, train_loader: Iterable[Any], *, epochs: int, lr: float = 0.1,
                momentum: float = 0.9, weight_decay: float = 5e-4, label_smoothing: float = 0.1, seed: int = 0,
                device: str = "cpu", amp: str = "off", loss_fn: LossFn | None = None,
                progress: bool = False, optimizer: str = "sgd", betas: tuple[float, float] = (0.9, 0.999),
                warmup_fraction: float = 0.0, clip_grad_norm: float | None = None) -> nn.Module:
    """Plain dense training (SGD, cosine LR to 0, label smoothing): the start the paper prunes from.

    ``amp`` takes TrainConfig's values ("auto", "bf16", "fp16" with a GradScaler, "off"). ``optimizer``,
    ``betas``, ``warmup_fraction`` and ``clip_grad_norm`` as in TrainConfig (the language-model recipe:
    ``**{k: v for k, v in LANGUAGE_MODEL_RECIPE.items() if k in those}``).
    """
    torch.manual_seed(seed)
    dev = resolve_device(device)
    dtype = amp_dtype(amp, dev)
    scaler = grad_scaler(dtype)
    model.to(dev).train()
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing))
    opt = weight_optimizer(model, [p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                           weight_decay=weight_decay, optimizer=optimizer, betas=betas)
    steps = epochs * len(train_loader)  # type: ignore[arg-type]
    warmup = int(warmup_fraction * steps)
    bar = progress_bar(progress, total=steps, desc="dense")
    i = 0
    for _ in range(epochs):
        for batch in train_loader:
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(lr, 0.0, i, steps, warmup)
            inputs, targets = split_batch(move_to(batch, dev))
            opt.zero_grad(set_to_none=True)
            with autocast(dev, dtype):
                loss = loss_fn(model(*inputs), targets)
            if scaler is not None:
                scaler.scale(loss).backward()
                clip_gradients(opt, clip_grad_norm, scaler)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                clip_gradients(opt, clip_grad_norm)
                opt.step()
            i += 1
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    return model
