"""Per-group sensitivity after a run: how much the loss grows as one group's units close.

For one channel group at a time, the other groups as the run left them: every unit of the group is
opened (the loss then is the group's baseline), then the ``k`` lowest-flow fraction of its units is
closed (k = 25/50/75%: the run's own order of removal) and the loss measured again on a few batches
of the validation loader. ``loss_delta[k]`` is the growth over the baseline. Set beside the fraction
of units the run kept, it answers whether the dynamics kept what matters: a group whose closing costs
much should have kept more (:meth:`Sensitivity.spearman`, the rank correlation across groups). The
flows are restored exactly; a time budget caps the measurement on big models (``capped`` says so).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hyperflux_fx.ir import ChannelGate, gates
from hyperflux_fx.train.evaluate import LossFn, evaluate_loss, move_to

__all__ = ["SENSITIVITY_FRACTIONS", "GroupSensitivity", "Sensitivity", "group_sensitivity", "spearman"]

SENSITIVITY_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass
class GroupSensitivity:
    """One group: what the run kept, and the loss growth as its lowest-flow units close."""

    name: str
    units: int
    kept: float  # fraction of the group's units open at the end of the run
    loss_delta: dict[str, float] = field(default_factory=dict)  # "0.25" -> loss(25% closed) - loss(all open)


@dataclass
class Sensitivity:
    """The measurement over every channel group (in the gates' order), and how it was made."""

    groups: list[GroupSensitivity]
    batches: int  # validation batches each loss is measured on
    seconds: float
    capped: bool  # the time budget ran out: the groups after ``len(groups)`` were not measured
    total_groups: int

    def spearman(self, fraction: float = 0.5) -> float | None:
        """Rank correlation across groups between the loss growth at ``fraction`` closed and the kept
        fraction (positive: groups that cost more to close kept more). None with fewer than 3 groups."""
        pairs = [(g.loss_delta[str(fraction)], g.kept) for g in self.groups if str(fraction) in g.loss_delta]
        if len(pairs) < 3:
            return None
        return spearman([a for a, _ in pairs], [b for _, b in pairs])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spearman": self.spearman()}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else cov / (va * vb) ** 0.5


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


@torch.no_grad()
def group_sensitivity(gated: nn.Module, loader: Iterable[Any], loss_fn: LossFn, *,
                      fractions: tuple[float, ...] = SENSITIVITY_FRACTIONS, batches: int = 8,
                      budget_s: float = 60.0, device: torch.device | str | None = None,
                      amp_dtype: torch.dtype | None = None) -> Sensitivity:
    """Measure every channel group of ``gated`` (see the module docstring); ``gated`` is left as it was."""
    device = torch.device(device) if device is not None else next(gated.parameters()).device
    data = [move_to(b, device) for b in itertools.islice(loader, batches)]  # moved once, measured often
    groups = [g for g in gates(gated) if isinstance(g, ChannelGate)]
    t0, out = time.perf_counter(), []
    for gate in groups:  # each loss in eval mode (evaluate_loss), the model's mode left as it was
        if time.perf_counter() - t0 > budget_s:
            break
        out.append(_one_group(gated, gate, data, loss_fn, fractions, device, amp_dtype))
    return Sensitivity(out, len(data), time.perf_counter() - t0, len(out) < len(groups), len(groups))


def _one_group(gated: nn.Module, gate: ChannelGate, data: list[Any], loss_fn: LossFn,
               fractions: tuple[float, ...], device: torch.device, amp_dtype: torch.dtype | None
               ) -> GroupSensitivity:
    saved = gate.flow.detach().clone()
    order = torch.argsort(saved)  # lowest flow first: the order the run removed them in
    n = saved.numel()
    result = GroupSensitivity(gate.target, n, float((saved >= 0).float().mean()))
    try:
        gate.flow.data.fill_(1.0)  # every unit of this group open
        base = evaluate_loss(gated, data, loss_fn, device=device, amp_dtype=amp_dtype)
        for k in fractions:
            gate.flow.data.fill_(1.0)
            gate.flow.data[order[: int(round(k * n))]] = -1.0
            result.loss_delta[str(k)] = evaluate_loss(gated, data, loss_fn, device=device,
                                                      amp_dtype=amp_dtype) - base
    finally:
        gate.flow.data.copy_(saved)
    return result
