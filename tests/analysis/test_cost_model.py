"""The exact cost model: what fold_masks + count_params_and_macs would give, without folding."""

from __future__ import annotations

import pytest
import torch
from models import FOLD_ZOO, ZOO

import hyperflux_fx as hf
from hyperflux_fx.analysis.cost_model import CostModel
from hyperflux_fx.analysis.runtime import _chain_stays_blocked, nchwc_block, resolve_fold_config
from hyperflux_fx.ir import ChannelGate


def _gated(name, granularity, closed_fraction=0.5, seed=1):
    build, inputs = FOLD_ZOO[name]
    x = inputs()
    res = hf.insert_gates(build().eval(), hf.GateConfig(granularity=granularity, seed=0), example_inputs=x)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in hf.gates(res.graph_module):
            g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - closed_fraction)
    return build, x, res


@pytest.mark.parametrize("round_to", [1, 4])
@pytest.mark.parametrize("granularity", ["channel", "hybrid", "weight"])
@pytest.mark.parametrize("name", sorted(FOLD_ZOO))
def test_cost_equals_count_of_the_folded_model(name, granularity, round_to):
    build, x, res = _gated(name, granularity)
    if not res.modified:
        pytest.skip("nothing gated")
    gm = res.graph_module.eval()
    fold = hf.FoldConfig(round_to=round_to)
    model = CostModel(gm, fold)
    predicted = model.cost()
    compact = hf.fold_masks(gm, fold).graph_module
    assert (predicted.params, predicted.macs) == hf.count_params_and_macs(compact, x)  # exact integers
    assert (model.dense.params, model.dense.macs) == hf.count_params_and_macs(build().eval(), x)


@pytest.mark.parametrize("name", ["residual_add", "attention_heads", "concat", "flatten_linear", "layernorm_mlp",
                                  "sdpa_attention"])
def test_marginal_cost_is_the_finite_difference_of_one_unit(name):
    _, _, res = _gated(name, "channel", closed_fraction=0.0)  # all open
    gm = res.graph_module.eval()
    model = CostModel(gm, hf.FoldConfig(round_to=1))
    now = model.counts(rounded=False)
    marginal = model.marginal(now)
    checked = 0
    for group in model.groups:
        gate = model.gate_of[group.id]
        if gate is None or not group.deletable:
            continue
        closed = gate.mask() == 0
        if closed.all() or int((~closed).sum()) < 2:
            continue
        one_more = closed.clone()
        one_more[torch.nonzero(~closed).flatten()[0]] = True
        after = model.cost_at(model.counts({gate: one_more}, rounded=False))
        before = model.cost_at(now)
        assert before.params - after.params == marginal[group.id].params
        assert before.macs - after.macs == marginal[group.id].macs
        assert marginal[group.id].params > 0
        checked += 1
    assert checked > 0


def test_cost_is_bilinear_in_the_widths_of_a_conv_chain():
    """Halving both sides of a conv removes three quarters of its MACs, not half."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    gm = hf.insert_gates(net, hf.GateConfig(granularity="channel"), example_inputs=x).graph_module
    model = CostModel(gm, hf.FoldConfig(round_to=1))
    half = {g.id: g.size // 2 if g.deletable else g.size for g in model.groups}
    mid_conv_macs = 16 * 16 * 9 * 64
    assert model.dense.macs - model.cost_at(half).macs >= mid_conv_macs * 3 // 4


def test_overrides_and_the_landing_rule_agree_with_fold_rounding():
    _, x, res = _gated("residual_add", "channel")
    gm = res.graph_module.eval()
    model = CostModel(gm, hf.FoldConfig(round_to=4))
    gate = next(g for g in hf.gates(gm) if isinstance(g, ChannelGate))
    all_open = {gate: torch.zeros(gate.numel, dtype=torch.bool)}
    assert model.cost(all_open).params >= model.cost().params


def test_round_to_auto_resolves_to_the_runtime_block():
    block = nchwc_block()
    resolved = resolve_fold_config(hf.FoldConfig()).round_to
    assert hf.FoldConfig().round_to == "auto"
    assert resolved == (block or 1)
    if block:
        assert block in (4, 8, 16, 32)
        assert _chain_stays_blocked(block)  # ORT keeps a conv chain of that width in its blocked layout
        if block > 4:
            assert not _chain_stays_blocked(block // 2)  # and not one of half of it


def test_fold_with_auto_rounding_keeps_multiples_of_the_block():
    build, inputs = ZOO["concat"]
    x = inputs()
    res = hf.insert_gates(build().eval(), hf.GateConfig(granularity="channel"), example_inputs=x)
    with torch.no_grad():
        for g in hf.gates(res.graph_module):
            g.flow.copy_(torch.rand(g.flow.shape) - 0.6)
    report = hf.fold_masks(res.graph_module).report
    step = resolve_fold_config(hf.FoldConfig()).round_to
    for g in report.groups:
        if g.deleted:
            assert g.after % step == 0 or g.after == g.before, g
    assert report.round_to == step


def test_cost_model_needs_example_inputs_and_refuses_batchnorm_folding():
    _, _, res = _gated("residual_add", "channel")
    with pytest.raises(ValueError, match="fold_batchnorm"):
        CostModel(res.graph_module, hf.FoldConfig(fold_batchnorm=True))
