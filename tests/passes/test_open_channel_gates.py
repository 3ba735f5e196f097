"""Invariant 1 at channel and hybrid granularity: with every gate open the gated model computes what the
original computes, bit for bit — outputs, weight gradients and input gradients — in eval *and* train
mode. Channel gates multiply activations by masks of ones (``x * 1`` is ``x``), and a mask-aware norm
with every channel open runs the plain norm, so the equalities are exact (``torch.equal``).

Train mode re-seeds the RNG before each pass, so dropout draws the same masks in both models.
"""

from __future__ import annotations

import pytest
import torch
from models import FOLD_ZOO, REAL_ZOO, build_real

import hyperflux_fx as hf
from hyperflux_fx.ir import ChannelGate


def _pass(model: torch.nn.Module, x: torch.Tensor, up: torch.Tensor | None, train: bool):
    model.train(train)
    xi = x.clone().requires_grad_(x.is_floating_point())
    torch.manual_seed(7)
    y = model(xi)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)) if up is None else up
    (y * up).sum().backward()
    return y.detach(), xi.grad, up


def _assert_open_gates_change_nothing(model: torch.nn.Module, x: torch.Tensor, granularity: str) -> None:
    res = hf.insert_gates(model, hf.GateConfig(granularity=granularity, seed=0), example_inputs=x)
    gated = res.graph_module
    assert any(isinstance(g, ChannelGate) for g in hf.gates(gated)), "nothing gated"
    for train in (False, True):
        model.zero_grad()
        gated.zero_grad()
        ya, gxa, up = _pass(model, x, None, train)
        yb, gxb, _ = _pass(gated, x, up, train)
        mode = "train" if train else "eval"
        assert torch.equal(ya, yb), f"{mode}: outputs differ"
        assert (gxa is None) == (gxb is None) and (gxa is None or torch.equal(gxa, gxb)), f"{mode}: input gradients"
        gp = dict(gated.named_parameters())
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert torch.equal(gp[name].grad, p.grad), f"{mode}: gradient of {name}"


@pytest.mark.parametrize("granularity", ["channel", "hybrid"])
@pytest.mark.parametrize("name", sorted(FOLD_ZOO))
def test_open_channel_gates_change_nothing_on_the_fixture_zoo(name, granularity):
    build, inputs = FOLD_ZOO[name]
    res = hf.insert_gates(build().eval(), hf.GateConfig(granularity="channel"), example_inputs=inputs())
    if not any(g.gated for g in res.report.channel_groups):
        pytest.skip("no channel group can be gated (test_fold_masks names the blocker)")
    _assert_open_gates_change_nothing(build(), inputs()[0], granularity)


@pytest.mark.parametrize("granularity", ["channel", "hybrid"])
@pytest.mark.parametrize(("lib", "name", "size"), REAL_ZOO, ids=[f"{lib}:{name}" for lib, name, _ in REAL_ZOO])
def test_open_channel_gates_change_nothing_on_the_real_zoo(lib, name, size, granularity):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    _assert_open_gates_change_nothing(build_real(lib, name, size), x, granularity)
