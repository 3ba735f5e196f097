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
from hyperflux_fx.ir import ChannelGate, ChannelMask


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


def test_a_channel_mask_keeps_the_layout_of_a_strided_input():
    """A mask on a slice (``h[:, :6]`` of a wider tensor) returns the product laid out as the slice was:
    a linear reading a contiguous copy instead takes another CPU kernel on some machines, and its
    gradients then differ in the last bit (seen on glu_halves), which open gates must not change."""
    mask = ChannelMask(1, ((0, 6, 1),))
    wide = torch.randn(2, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
    h = wide[:, :6]
    out = mask(h, torch.ones(6))
    assert out.stride() == h.stride() and torch.equal(out, h)
    out.sum().backward()
    assert torch.equal(wide.grad, torch.cat([torch.ones(2, 6), torch.zeros(2, 6)], 1))  # still differentiable
    dense = torch.randn(2, 6)
    assert mask(dense, torch.ones(6)).stride() == dense.stride()
    row = torch.randn(1, 6)
    assert torch.equal(mask(row.expand(3, 6), torch.ones(6)), row.expand(3, 6))  # a broadcast input: a plain product
