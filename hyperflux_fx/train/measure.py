"""What the target counts: the kept fraction the controller steers, the landing hits and the recorder logs.

* ``"count"``: the fraction of gated units kept (the paper's density).
* ``"params"`` / ``"macs"``: the compact model's parameters / MACs over the dense model's, exactly as
  ``fold_masks`` with the run's ``FoldConfig`` followed by ``count_params_and_macs`` would give them
  (:class:`~hyperflux_fx.analysis.cost_model.CostModel`, rounding included). The pressure on each
  channel group follows what closing one more of its units would save at the current masks
  (refreshed every interval), and the landing bisects the flow threshold on the exact measure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from hyperflux_fx.analysis.cost_model import MEASURES, CostModel
from hyperflux_fx.analysis.coupling import kept_count
from hyperflux_fx.config import TrainConfig
from hyperflux_fx.ir import ChannelGate, density, gates
from hyperflux_fx.train.landing import land_on_density
from hyperflux_fx.train.recorder import Landing

__all__ = ["Measure", "land_on_measure"]


class Measure:
    """The run's target measure (see the module docstring)."""

    def __init__(self, gated: nn.Module, cfg: TrainConfig) -> None:
        self.name = cfg.target_measure
        self.gated = gated
        self.cost_model: CostModel | None = None
        if self.name in MEASURES:
            if not isinstance(gated, fx.GraphModule) or not any(isinstance(g, ChannelGate) for g in gates(gated)):
                raise ValueError(f"target_measure={self.name!r} needs channel gates (granularity 'channel' or "
                                 f"'hybrid'): weight gates delete nothing, so the {self.name} do not change")
            self.cost_model = CostModel(gated, cfg.fold)
            self._check_reachable(1.0 - cfg.target_sparsity)

    def _check_reachable(self, target_kept: float) -> None:
        cm = self.cost_model
        floor = {g.id: kept_count(g.size, g.size, cm.fold) if cm.gate_of[g.id] is not None and g.deletable
                 else g.size for g in cm.groups}
        least = cm.cost_at(floor).of(self.name) / max(cm.dense.of(self.name), 1)
        if target_kept < least:
            raise ValueError(f"target_sparsity {1 - target_kept:.3f} of the {self.name} is out of reach: closing "
                             f"every gated unit removes {1 - least:.3f} of them (the rest is in ungated or "
                             f"blocked layers; see the gating report)")

    def kept(self, *, rounded: bool = True) -> float:
        """The kept fraction in this measure (``rounded=False``: before the fold's rounding, smoother
        for the controller)."""
        if self.cost_model is None:
            return density(self.gated)
        return self.cost_model.kept_fraction(self.name, rounded=rounded)

    @torch.no_grad()
    def refresh_pressure(self) -> None:
        """Scale each channel gate's pressure by what one of its units saves now, over the mean."""
        cm = self.cost_model
        if cm is None:
            return
        marginal = cm.marginal(cm.counts(rounded=False))
        scaled = [(gate, float(marginal[gid].of(self.name))) for gid, gate in cm.gate_of.items() if gate is not None]
        units = sum(g.numel for g, _ in scaled)
        mean = sum(g.numel * m for g, m in scaled) / max(units, 1)
        for gate, m in scaled:
            gate.unit_cost = m
            gate.pressure_scale = m / mean if mean > 0 else 1.0

    def land(self, target_kept: float) -> Landing:
        """Shift every flow by one constant so this measure lands as close to ``target_kept`` as it can."""
        if self.cost_model is None:
            return land_on_density(self.gated, target_kept)
        landing = land_on_measure(self.gated, lambda: self.kept(), target_kept)
        if self.cost_model.fold.round_to > 1:
            round_groups(self.cost_model, self.name, target_kept)
            landing.density_after = self.kept()
        return landing


def _block_choices(size: int, kept: int, step: int, reach: int = 2) -> list[int]:
    """Kept counts a group may round to: the ``reach`` multiples of ``step`` below and above ``kept``
    (at least one block, at most ``size``)."""
    down = kept // step * step
    values = {down - i * step for i in range(reach)} | {down + (i + 1) * step for i in range(reach)}
    return sorted({min(size, v) for v in values if v >= step} | ({size} if kept >= size else set()))


@torch.no_grad()
def round_groups(cm: CostModel, measure: str, target_kept: float) -> dict[int, int]:
    """Decide the fold's rounding per group, up or down, so the measure lands closest to the target.

    After the landing each group keeps some open units; the fold would round every count *up* to
    the block. Here each gated group instead takes the multiple of the block below or above its
    open count, chosen greedily (one group at a time, the change that brings the measure closest
    to ``target_kept``), and its masks are made to say so: the weakest open units close, or the
    strongest closed units open (their flows set to just below / at zero; the flows are frozen after
    the landing). The masked model then computes what the compact model will.
    """
    step = int(cm.fold.round_to)
    dense = max(cm.dense.of(measure), 1)
    gated = {g.id: g for g in cm.groups if g.deletable and cm.gate_of[g.id] is not None}
    k = cm.counts(rounded=False)
    opened = {gid: min(k[gid], gated[gid].size) for gid in gated}
    choices = {gid: _block_choices(gated[gid].size, opened[gid], step) for gid in gated}
    chosen = cm.counts()  # the fold's own rounding (up) is where the search starts

    def error(counts: dict[int, int]) -> float:
        return abs(cm.cost_at(counts).of(measure) / dense - target_kept)

    while True:
        best, best_err = None, error(chosen)
        for gid, options in choices.items():
            for value in options:
                if value != chosen[gid] and (err := error({**chosen, gid: value})) < best_err - 1e-12:
                    best, best_err = (gid, value), err
        if best is None:
            break
        chosen[best[0]] = best[1]
    for gid in gated:
        _set_open_count(cm.gate_of[gid], chosen[gid])
    return chosen


def _set_open_count(gate: ChannelGate, count: int) -> None:
    """Open exactly the ``count`` strongest units of ``gate`` (flows of the others just below 0)."""
    flow = gate.flow.detach()
    order = torch.argsort(flow.flatten(), descending=True)
    flat = flow.view(-1)
    keep, drop = order[:count], order[count:]
    flat[keep] = torch.clamp(flat[keep], min=0.0)
    flat[drop] = torch.clamp(flat[drop], max=-1e-6)


@torch.no_grad()
def land_on_measure(gated: nn.Module, kept: Callable[[], float], target_kept: float) -> Landing:
    """The landing for an exact measure: bisect the flow threshold (one shift of every flow, so the
    flows' order is kept) on ``kept()``, which is non-decreasing in the number of open units, and
    take the threshold whose measure is closest to ``target_kept``."""
    all_gates = gates(gated)
    before = kept()
    saved = [g.flow.detach().clone() for g in all_gates]
    flows = torch.cat([f.flatten().float().cpu() for f in saved])
    order = torch.sort(torch.unique(flows), descending=True).values  # candidate thresholds

    def shift_all(shift: float) -> None:
        for g, f in zip(all_gates, saved, strict=True):
            g.flow.copy_(f + shift)

    def at(j: int) -> float:  # measure with the j+1 largest distinct flows open
        shift_all(-float(order[j]))
        value = kept()
        shift_all(0.0)
        return value

    lo, hi = 0, order.numel() - 1
    while lo < hi:  # smallest j with at(j) >= target
        mid = (lo + hi) // 2
        if at(mid) >= target_kept:
            hi = mid
        else:
            lo = mid + 1
    best = lo
    if lo > 0 and abs(at(lo - 1) - target_kept) < abs(at(lo) - target_kept):
        best = lo - 1
    shift = -float(order[best])
    shift_all(shift)
    return Landing(shift=shift, density_before=before, density_after=kept())
