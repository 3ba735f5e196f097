"""Gate runtime: mask forward, scaled straight-through backward, flux read-out, hook survival."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import hyperflux_fx as hf
from hyperflux_fx.ir import PressureState, WeightGate


def _gate(shape=(4, 3), kappa=0.25) -> WeightGate:
    torch.manual_seed(0)
    return WeightGate(shape, target="w", kappa=kappa)


def test_init_is_uniform_a_to_2_5a_and_open():
    g = WeightGate((1000,), target="w", init_a=0.2, generator=torch.Generator().manual_seed(0))
    assert g.flow.min() >= 0.2 and g.flow.max() <= 0.5
    assert g.flow.std() > 0.05  # really spread, not a constant
    assert torch.equal(g.mask(), torch.ones(1000))


def test_forward_is_weight_times_hard_mask():
    g = _gate()
    with torch.no_grad():
        g.flow.copy_(torch.tensor([[0.1, -0.1, 0.0], [-2.0, 3.0, -1e-9], [1, 1, 1], [-1, -1, -1]]))
    w = torch.randn(4, 3)
    expected_mask = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0]])  # t >= 0 (0 counts as open)
    assert torch.equal(g(w), w * expected_mask)
    assert torch.equal(g.mask(), expected_mask)


def test_backward_is_scaled_straight_through():
    g = _gate(kappa=0.25)
    with torch.no_grad():
        g.flow[0].fill_(-0.5)  # row 0 pruned
    w = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    (g(w) * upstream).sum().backward()
    m = g.mask()
    torch.testing.assert_close(w.grad, upstream * m, rtol=0, atol=0)
    # dL/dt = kappa * dL/dm = kappa * W * dL/d(W*m), pruned entries included (regrowth signal)
    torch.testing.assert_close(g.flow.grad, 0.25 * upstream * w.detach(), rtol=1e-6, atol=1e-7)
    assert (g.flow.grad[0] != 0).all(), "a pruned weight must still receive a mask gradient"


def test_flux_accumulates_minus_dL_dm_between_resets():
    g = _gate()
    g.track_flux(True)
    w = torch.randn(4, 3)
    ups = [torch.randn(4, 3) for _ in range(3)]
    for u in ups:
        (g(w) * u).sum().backward()
    expected = -sum(u * w for u in ups) / 3
    torch.testing.assert_close(g.mean_flux(), expected, rtol=1e-5, atol=1e-6)
    g.reset_flux()
    assert g.mean_flux().abs().sum() == 0
    g.track_flux(False)
    assert g.mean_flux() is None


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(RuntimeError, match="expects shape"):
        _gate()(torch.randn(3, 4))


def test_low_precision_weight_keeps_its_dtype():
    g = _gate()
    w = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    out = g(w)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert g.flow.grad.dtype == torch.float32 and w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_pressure_hook_survives_copy_and_pickle(how):
    g = _gate()
    state = PressureState(g.numel)
    g.attach_pressure(state)
    state.gamma.fill_(6.0)
    if how == "deepcopy":
        g2 = copy.deepcopy(g)
    else:
        buf = io.BytesIO()
        torch.save(g, buf)
        buf.seek(0)
        g2 = torch.load(buf, weights_only=False)
    assert g2._pressure is not None and g2._pressure is not state
    g2(torch.zeros(4, 3)).sum().backward()  # zero weights: the data part of dL/dt is 0
    torch.testing.assert_close(g2.flow.grad, torch.full((4, 3), 6.0 / 12))


def test_density_and_layer_density():
    gated = hf.insert_gates(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
                            ).graph_module
    g0, _g1 = hf.gates(gated)
    with torch.no_grad():
        g0.flow[:2].fill_(-1)  # 8 of 20 closed
    assert hf.density(gated) == pytest.approx((20 - 8 + 10) / 30)
    assert hf.layer_density(gated) == {"0.weight": pytest.approx(12 / 20), "2.weight": 1.0}
    with pytest.raises(ValueError, match="no gates"):
        hf.density(torch.nn.Linear(2, 2))


def test_flux_helpers_on_a_gated_model():
    gated = hf.insert_gates(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
                            ).graph_module
    with pytest.raises(RuntimeError, match="track_flux"):
        hf.flux(gated)
    hf.track_flux(gated)
    gated(torch.randn(3, 4)).pow(2).sum().backward()
    fx = hf.flux(gated)
    assert set(fx) == {"0.weight", "2.weight"} and all(v.abs().sum() > 0 for v in fx.values())
    hf.reset_flux(gated)
    assert all(v.abs().sum() == 0 for v in hf.flux(gated).values())


def test_masked_mean_is_the_plain_mean_when_open_and_the_open_channels_mean_otherwise():
    from hyperflux_fx.ir import MaskedMean

    x = torch.randn(2, 3, 3, 6, generator=torch.Generator().manual_seed(0))
    mean = MaskedMean(3, keepdim=True)
    assert torch.equal(mean(x, torch.ones(6)), x.mean(3, keepdim=True))  # bit for bit
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    assert torch.equal(mean(x, mask), x[..., [0, 2, 3]].mean(3, keepdim=True))
    assert torch.equal(MaskedMean(1, keepdim=False)(x.transpose(1, 3), mask), x.transpose(1, 3)[:, [0, 2, 3]].mean(1))
    closed = mean(x, torch.zeros(6))
    assert closed.shape == (2, 3, 3, 1) and not closed.any()
