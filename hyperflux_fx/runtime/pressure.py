"""Pressure: the global regulariser that pushes every flow parameter toward pruning (HYPERFLUX.md §3).

``L = L_data + gamma * mean(t)``: its gradient is the constant ``gamma / N`` on every flow parameter.
``insert_gates`` registers one :class:`PressureState` on the gated model (attribute
``hyperflux_pressure``) and a gradient hook on every flow parameter that adds ``gamma * scale / N``
during backward. The scheduler sets gamma with :func:`set_pressure`; any training loop then gets the
dynamics without changing its loss. :func:`pressure_loss` is the explicit form of the same term, for
loops that prefer it — use one or the other (keep the state's gamma at 0 with the explicit loss).
"""

from __future__ import annotations

import torch
from torch import nn

from hyperflux_fx.runtime.gates import CALLS_ATTR, GATES_ATTR, MASKS_ATTR, gates

__all__ = ["PRESSURE_ATTR", "STATE_ATTRS", "PressureState", "get_pressure", "pressure_loss", "pressure_state", "set_pressure"]

#: Attribute name of the shared pressure state on a gated model.
PRESSURE_ATTR = "hyperflux_pressure"
#: Every attribute hyperflux adds to a gated model (fold_masks removes them; parameter counts skip them).
STATE_ATTRS = (GATES_ATTR, MASKS_ATTR, CALLS_ATTR, PRESSURE_ATTR)


class PressureState(nn.Module):
    """Shared pressure state of one gated model: ``gamma`` (a buffer, so it follows ``.to()`` and is
    saved in checkpoints) and ``total_elements`` N, the number of gated units the mean runs over."""

    def __init__(self, total_elements: int) -> None:
        super().__init__()
        if total_elements <= 0:
            raise ValueError(f"total_elements must be > 0, got {total_elements}")
        self.register_buffer("gamma", torch.zeros((), dtype=torch.float32))
        # Loss scale of fp16 AMP: the hooks see scaled gradients, so the pressure is scaled alike.
        self.register_buffer("grad_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.total_elements = int(total_elements)

    def extra_repr(self) -> str:
        return f"gamma={float(self.gamma):.6g}, total_elements={self.total_elements}"


def pressure_state(module: nn.Module) -> PressureState:
    """The pressure state of a gated model.

    Raises:
        ValueError: when ``module`` was not produced by ``insert_gates``.
    """
    state = getattr(module, PRESSURE_ATTR, None)
    if not isinstance(state, PressureState):
        # ValueError, not TypeError: any module is the right type, an ungated one the wrong value
        raise ValueError("the model has no pressure state: run hyperflux_fx.insert_gates first")  # noqa: TRY004
    return state


def set_pressure(module: nn.Module, gamma: float) -> None:
    """Set gamma for the gradient hooks of every gate of ``module``."""
    if not gamma >= 0:  # also rejects NaN
        raise ValueError(f"pressure gamma must be >= 0, got {gamma}")
    pressure_state(module).gamma.fill_(float(gamma))


def get_pressure(module: nn.Module) -> float:
    """Current gamma of the gradient hooks."""
    return float(pressure_state(module).gamma.item())


def pressure_loss(module: nn.Module, gamma: float | torch.Tensor) -> torch.Tensor:
    """Explicit pressure term ``gamma * mean(t)`` over all gated units (scaled per gate by its
    ``pressure_scale``); its gradient equals what the hooks add when the state's gamma is ``gamma``."""
    all_gates = gates(module)
    if not all_gates:
        raise ValueError("the model has no gates: run hyperflux_fx.insert_gates first")
    total = sum(g.numel for g in all_gates)
    weighted = torch.stack([g.flow.sum() * g.pressure_scale for g in all_gates]).sum()
    return gamma * weighted / total
