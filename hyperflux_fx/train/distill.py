"""Distillation from the dense model the run starts from (docs/training.md, "Distillation").

The teacher is the dense model: the one the CLI trained in stage 1 or loaded with ``--weights``, or,
through the API, a frozen copy of the gated model taken before training starts (with every gate
open it computes the dense model exactly: invariant 1). The student is the gated model. The loss is

    (1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with the KL summed over the last (class) dim and averaged over every other position, so a language
model is distilled per token. The teacher runs without grad, in eval mode, in the run's autocast
dtype; the KL is computed in float32.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hyperflux_fx.ir import gates, set_pressure, track_flux

__all__ = ["Distiller", "distillation_loss", "frozen_teacher", "is_class_logits"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``: summed over the last dim, averaged over the
    rest (a batch of class vectors, or every token of a batch of sequences)."""
    t = float(temperature)
    s_log = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
    t_log = F.log_softmax(teacher.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s_log, t_log, reduction="batchmean", log_target=True) * (t * t)


def is_class_logits(outputs: Any, targets: Any) -> bool:
    """Are ``outputs`` class logits for ``targets`` (class indices with the outputs' shape less the last dim)?"""
    return (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor) and outputs.dim() >= 2
            and outputs.is_floating_point() and not targets.is_floating_point()
            and tuple(targets.shape) == tuple(outputs.shape[:-1]))


@torch.no_grad()
def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` in eval mode: no parameter requires grad, a gated copy gets no pressure
    and tracks no flux (its gates stay as they are now)."""
    teacher = copy.deepcopy(model)
    if gates(teacher):
        track_flux(teacher, False)
        set_pressure(teacher, 0.0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@dataclass
class Distiller:
    """The teacher and the blend; :meth:`loss` gives ``(blended loss, distillation term)``."""

    teacher: nn.Module
    alpha: float
    temperature: float
    required: bool  # distill="on": outputs that are not class logits are an error, not a silent skip
    active: bool | None = None  # decided on the first batch

    def applies(self, outputs: Any, targets: Any) -> bool:
        if self.active is None:
            self.active = is_class_logits(outputs, targets)
            if not self.active and self.required:
                raise ValueError("distill='on' needs class logits and class-index targets (outputs (..., classes), "
                                 "targets of the outputs' shape less the last dim); got outputs "
                                 f"{_shape(outputs)} and targets {_shape(targets)}. Use distill='off' or 'auto'")
        return self.active

    def teacher_outputs(self, inputs: tuple[Any, ...]) -> torch.Tensor:
        self.teacher.eval()  # in case a caller switched it back
        with torch.no_grad():
            return self.teacher(*inputs)

    def loss(self, task: torch.Tensor, outputs: torch.Tensor, teacher_out: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        kd = distillation_loss(outputs, teacher_out, self.temperature)
        return (1.0 - self.alpha) * task + self.alpha * kd, kd


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
