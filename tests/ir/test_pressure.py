"""Pressure: the gradient hooks give the same updates as the explicit gamma * mean(t) loss."""

from __future__ import annotations

import copy

import pytest
import torch
from models import ZOO

import hyperflux_fx as hf


def _train(gated, steps, *, gamma_hook, gamma_loss, seed=0):
    torch.manual_seed(seed)
    weights = [p for n, p in gated.named_parameters() if not n.endswith(".flow")]
    flows = [g.flow for g in hf.gates(gated)]
    opt_w = torch.optim.SGD(weights, lr=0.05, momentum=0.9)
    opt_t = torch.optim.Adam(flows, lr=1e-3)
    hf.set_pressure(gated, gamma_hook)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        loss = gated(x).pow(2).mean()
        if gamma_loss:
            loss = loss + hf.pressure_loss(gated, gamma_loss)
        opt_w.zero_grad()
        opt_t.zero_grad()
        loss.backward()
        opt_w.step()
        opt_t.step()
    return gated


def test_hooks_and_pressure_loss_give_identical_updates():
    build, inputs = ZOO["residual_add"]
    gated = hf.insert_gates(build(), hf.GateConfig(seed=0), example_inputs=inputs()).graph_module.train()
    a = _train(copy.deepcopy(gated), 6, gamma_hook=3.0, gamma_loss=0.0)
    b = _train(copy.deepcopy(gated), 6, gamma_hook=0.0, gamma_loss=3.0)
    c = _train(copy.deepcopy(gated), 6, gamma_hook=0.0, gamma_loss=0.0)
    for ga, gb, gc in zip(hf.gates(a), hf.gates(b), hf.gates(c), strict=True):
        # The two only differ in the order of one float addition per element; Adam keeps that at
        # the last bits, hence the tight but nonzero tolerance.
        torch.testing.assert_close(ga.flow, gb.flow, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(ga.flow, gc.flow), "pressure must change the update"
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_hook_adds_gamma_over_n_to_every_flow_parameter_pruned_or_not():
    gated = hf.insert_gates(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))).graph_module
    n = sum(g.numel for g in hf.gates(gated))
    assert n == 12 + 8
    g0 = hf.gates(gated)[0]
    with torch.no_grad():
        g0.flow[0].fill_(-1.0)  # pruned weights feel the pressure too (no floor)
    hf.set_pressure(gated, 5.0)
    assert hf.get_pressure(gated) == 5.0
    gated(torch.zeros(1, 3)).sum().backward()  # zero input: no data gradient on layer 0's mask
    torch.testing.assert_close(g0.flow.grad, torch.full((4, 3), 5.0 / n))


def test_pressure_alone_drives_density_down():
    gated = hf.insert_gates(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                            hf.GateConfig(seed=1)).graph_module
    hf.set_pressure(gated, 50.0)
    opt = torch.optim.Adam([g.flow for g in hf.gates(gated)], lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        (gated(torch.randn(16, 8)).sum() * 0).backward()
        opt.step()
    assert hf.density(gated) < 0.05


def test_set_pressure_rejects_bad_values_and_ungated_models():
    gated = hf.insert_gates(torch.nn.Linear(2, 2)).graph_module
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            hf.set_pressure(gated, bad)
    with pytest.raises(ValueError, match="insert_gates"):
        hf.set_pressure(torch.nn.Linear(2, 2), 1.0)
