"""Frozen configuration dataclasses shared by the passes and the runtime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["GateConfig", "Granularity"]

Granularity = Literal["weight", "channel", "hybrid"]

#: Granularities whose gates the current ``insert_gates`` can place. ``"channel"`` and ``"hybrid"``
#: need the channel-coupling analysis of the fold pass; asking for them raises a clear error.
IMPLEMENTED_GRANULARITIES: tuple[str, ...] = ("weight",)


@dataclass(frozen=True)
class GateConfig:
    """What ``insert_gates`` gates and how its gates start.

    The defaults follow the Hyperflux paper: every conv and linear weight is gated individually,
    flow parameters start in ``U(a, 2.5a)`` with ``a = 0.2`` and the straight-through gradient is
    scaled by ``kappa = 0.25``. For CNNs the first conv and the classifier are gated too; for
    ViT-like models (the graph contains attention) the patch embedding and the head stay dense.
    """

    granularity: Granularity = "weight"  # "weight" now; "channel"/"hybrid" arrive with fold_masks
    include: tuple[str, ...] = ("*",)  # fnmatch globs over qualified parameter names to consider
    exclude: tuple[str, ...] = ()  # globs removed after include (e.g. "head.*")
    min_numel: int = 0  # tensors with fewer elements stay dense
    gate_first: bool | None = None  # gate the first weight op(s); None = auto (paper's choice)
    gate_last: bool | None = None  # gate the op(s) producing the output; None = auto
    init_a: float = 0.2  # flow init U(a, 2.5a): all gates start open
    kappa: float = 0.25  # straight-through scale: dL/dt = kappa * dL/dm
    seed: int | None = None  # seed for flow init; None draws from torch's global RNG

    def __post_init__(self) -> None:
        if self.granularity not in ("weight", "channel", "hybrid"):
            raise ValueError(f"granularity must be 'weight', 'channel' or 'hybrid', got {self.granularity!r}")
        if self.init_a <= 0:
            raise ValueError(f"init_a must be > 0 so that every gate starts open, got {self.init_a}")
        if self.kappa <= 0:
            raise ValueError(f"kappa must be > 0, got {self.kappa}")
        if self.min_numel < 0:
            raise ValueError(f"min_numel must be >= 0, got {self.min_numel}")
        for field_name in ("include", "exclude"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                raise TypeError(f"{field_name} takes a tuple of globs, e.g. ({value!r},), not a bare string")
