"""Batches and evaluation: moving ``(inputs, targets)`` batches to a device, the default metric."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hyperflux_fx.train.optim import autocast

__all__ = ["LossFn", "MetricFn", "accuracy", "evaluate", "evaluate_loss", "move_to", "split_batch"]

LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], float]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of classification logits."""
    return float((outputs.argmax(dim=-1) == targets).float().mean())


def move_to(batch: Any, device: torch.device) -> Any:
    """A batch (tensors, nested in lists/tuples/dicts) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def split_batch(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """``(positional inputs, targets)`` of an ``(inputs, targets)`` batch."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError("batches must be (inputs, targets) pairs; got " + type(batch).__name__)
    inputs, targets = batch[0], batch[1]
    return (tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)), targets


@torch.no_grad()
def _weighted_means(model: nn.Module, loader: Iterable[Any], device: torch.device | str | None,
                    amp_dtype: torch.dtype | None, *scores: Callable[[torch.Tensor, Any], tuple[float, int]]
                    ) -> list[float]:
    """Per score, the mean of ``score(outputs, targets) = (value, weight)`` over ``loader``, weighted, from
    one pass in eval mode (outputs in float32)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals, counts = [0.0] * len(scores), [0] * len(scores)
    try:
        for batch in loader:
            inputs, targets = split_batch(move_to(batch, device))
            with autocast(device, amp_dtype):
                out = model(*inputs).float()
            for i, score in enumerate(scores):
                value, n = score(out, targets)
                totals[i] += value * n
                counts[i] += n
    finally:
        model.train(was_training)
    return [total / max(count, 1) for total, count in zip(totals, counts, strict=True)]


def _per_example(metric_fn: MetricFn) -> Callable[[torch.Tensor, Any], tuple[float, int]]:
    """A metric weighted by the batch's examples."""
    return lambda out, targets: (metric_fn(out, targets),
                                 int(targets.shape[0]) if isinstance(targets, torch.Tensor) else 1)


def _per_element(loss_fn: LossFn) -> Callable[[torch.Tensor, Any], tuple[float, int]]:
    """A loss weighted by the targets' elements (per token for a language model)."""
    return lambda out, targets: (float(loss_fn(out, targets)),
                                 int(targets.numel()) if isinstance(targets, torch.Tensor) else 1)


def evaluate(model: nn.Module, loader: Iterable[Any], *, metric_fn: MetricFn | None = None,
             device: torch.device | str | None = None, amp_dtype: torch.dtype | None = None) -> float:
    """Mean of ``metric_fn`` (accuracy by default) over ``loader``, weighted by batch size, eval mode."""
    return _weighted_means(model, loader, device, amp_dtype, _per_example(metric_fn or accuracy))[0]


def evaluate_with_loss(model: nn.Module, loader: Iterable[Any], *, metric_fn: MetricFn, loss_fn: LossFn,
                       device: torch.device | str | None = None,
                       amp_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """(metric per example, loss per target element) over ``loader`` in one pass, in eval mode."""
    metric, loss = _weighted_means(model, loader, device, amp_dtype, _per_example(metric_fn), _per_element(loss_fn))
    return metric, loss


def evaluate_loss(model: nn.Module, loader: Iterable[Any], loss_fn: LossFn, *,
                  device: torch.device | str | None = None, amp_dtype: torch.dtype | None = None) -> float:
    """Mean of ``loss_fn`` over ``loader``, weighted by the targets' elements (per token for a language
    model: its exponential is the perplexity), eval mode, float32."""
    return _weighted_means(model, loader, device, amp_dtype, _per_element(loss_fn))[0]
