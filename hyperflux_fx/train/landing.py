"""The landing: one constant shift of every flow parameter so that the density is exactly the
target (the order of the flows, what the dynamics learned, is kept; only the threshold moves)."""

from __future__ import annotations

import torch
from torch import nn

from hyperflux_fx.ir import Gate, density, gates
from hyperflux_fx.train.recorder import Landing

__all__ = ["land_on_density", "open_flow_distance"]


@torch.no_grad()
def open_flow_distance(all_gates: list[Gate], default: float = 0.35) -> float:
    """Mean value of the open flows (their distance above the threshold); ``default`` (the mean of
    the default init U(0.2, 0.5)) when none is open."""
    total = torch.zeros((), dtype=torch.float64, device=all_gates[0].flow.device)
    count = torch.zeros((), dtype=torch.float64, device=total.device)
    for g in all_gates:
        f = g.flow.detach()
        total += torch.where(f >= 0, f, 0.0).sum(dtype=torch.float64)
        count += (f >= 0).sum()
    n = float(count)
    return float(total) / n if n > 0 else default


@torch.no_grad()
def land_on_density(gated: nn.Module, target_density: float) -> Landing:
    """Shift every flow parameter by one constant so that the density is ``target_density``: the
    largest flows stay open (``round(target_density * N)`` of them; exact measures land with
    :func:`hyperflux_fx.train.measure.land_on_measure`). The order of the flows — what the dynamics learned —
    is kept; only the threshold moves, as a pressure impulse would move it.

    Returns:
        The :class:`~hyperflux_fx.train.recorder.Landing` (shift, density before and after).
    """
    all_gates = gates(gated)
    flows = torch.cat([g.flow.detach().flatten().float().cpu() for g in all_gates])
    before = density(gated)
    n = flows.numel()
    keep = min(n, max(1, round(target_density * n)))
    kth_largest = torch.kthvalue(flows, n - keep + 1).values.item()
    shift = -kth_largest
    for g in all_gates:
        g.flow.add_(shift)
    return Landing(shift=shift, density_before=before, density_after=density(gated))
