"""Equivalence checks shared by the fold tests (tolerances stated here, once).

fp32: compact vs masked outputs within atol = 1e-5 x max|y| — fp32 rounding grows with the
magnitudes computed, and a compact conv sums fewer (exactly zero) terms in another order.
fp64: the same two models in double precision, on the input-dependent part ``y - y.mean(0)``
(STYLE.md: a random classifier's logits are mostly its bias), within 1e-9 x its scale: rounding
is then ~1e-16, so any wrong deletion shows at full size.
"""

from __future__ import annotations

import copy

import torch


def assert_fold_exact(masked: torch.nn.Module, compact: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    with torch.no_grad():
        y_m, y_c = masked(*inputs), compact(*inputs)
        torch.testing.assert_close(y_c, y_m, rtol=0, atol=1e-5 * float(y_m.abs().max()) + 1e-7)
        m64, c64 = copy.deepcopy(masked).double(), copy.deepcopy(compact).double()
        x64 = tuple(x.double() if x.is_floating_point() else x for x in inputs)
        a, b = c64(*x64), m64(*x64)
        a, b = a - a.mean(0), b - b.mean(0)
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * scale + 1e-12)


def close_at_random(gated: torch.nn.Module, closed_fraction: float) -> None:
    """Set every gate's flows so that about ``closed_fraction`` of its units are closed (seeded by the
    fraction: the same masks every run)."""
    import hyperflux_fx as hf

    gen = torch.Generator().manual_seed(int(closed_fraction * 10))
    with torch.no_grad():
        for g in hf.gates(gated):
            g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - closed_fraction)
