"""fold_masks: invariant 2 (the compact model computes what the masked model computed) and its report.

Errors are measured on the input-dependent part of the output (``y - y.mean(0)``, batch of 2) against
its scale, with atol = 1e-5 x scale (DESIGN.md invariant 2): deleting channels reorders no sum, it
only drops exact zeros, so what remains is float rounding of the smaller matmuls.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from equivalence import assert_fold_exact
from models import FOLD_ZOO, NoBiasChain, RollBranch
from torch import nn

import hyperflux_fx as hf


def _set_flows(gated, closed_fraction, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in hf.gates(gated):
            g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - closed_fraction)


def _masked_and_compact(name, granularity, closed_fraction, config=None):
    build, inputs = FOLD_ZOO[name]
    model = build().eval()
    x = inputs()
    res = hf.insert_gates(model, hf.GateConfig(granularity=granularity, seed=0), example_inputs=x)
    gated = res.graph_module.eval()
    if not res.modified:
        return None
    _set_flows(gated, closed_fraction)
    with torch.no_grad():
        y_masked = gated(*x)
    folded = hf.fold_masks(gated, config or hf.FoldConfig(round_to=1))  # fixtures are narrower than a block
    with torch.no_grad():
        y_compact = folded.graph_module(*x)
    return res, gated, folded, x, y_masked, y_compact


# Fixtures with no deletable channel group: channel granularity gates nothing there, and each
# group's report names the blocker (the coupling tests cover the rules themselves).
NOTHING_TO_GATE = {
    "mha": "MultiheadAttention",  # an nn.MultiheadAttention leaf is not in the channel table
    "opaque_block": "DataDependentBlock",  # an opaque leaf
    "shared_weight": "is shared by",  # one weight used by two ops
}


@pytest.mark.parametrize("granularity", ["channel", "hybrid", "weight"])
@pytest.mark.parametrize("name", sorted(FOLD_ZOO))
def test_fold_is_exact_on_the_fixture_zoo(name, granularity):
    out = _masked_and_compact(name, granularity, 0.5)
    if granularity == "channel" and name in NOTHING_TO_GATE:
        assert out is None, f"{name}: expected no gate at channel granularity"
        res = hf.insert_gates(FOLD_ZOO[name][0]().eval(), hf.GateConfig(granularity="channel"),
                              example_inputs=FOLD_ZOO[name][1]())
        groups = res.report.channel_groups
        assert groups and not any(g.gated for g in groups) and all(g.blocked for g in groups)
        assert any(NOTHING_TO_GATE[name] in why for g in groups for why in g.blocked)
        with pytest.raises(ValueError, match="no gates"):
            hf.fold_masks(res.graph_module)
        return
    assert out is not None, f"{name} at granularity={granularity}: nothing was gated"
    res, gated, folded, x, _y_masked, _y_compact = out
    assert_fold_exact(gated, folded.graph_module, x)
    compact = folded.graph_module
    assert not hf.gates(compact) and not any(n.startswith("hyperflux") for n, _ in compact.named_modules())
    compact.graph.lint()
    rep = folded.report
    if any(g.gated for g in res.report.channel_groups):  # closed channels were deleted
        assert rep.params_after < rep.params_before and 0 < rep.deleted_units <= rep.closed_units
    else:  # nothing deletable: same size, masks folded into weights
        assert rep.params_after <= rep.params_before


def test_a_channel_shuffle_that_loses_channels_becomes_a_gather_of_the_kept_ones():
    res, gated, folded, x, _, _ = _masked_and_compact("channel_shuffle", "channel", 0.5)
    assert_fold_exact(gated, folded.graph_module, x)
    gathers = [n for n in folded.graph_module.graph.nodes if n.target is torch.index_select]
    assert folded.report.rule_counts["shuffles_gathered"] == len(gathers) == 3
    assert not any(n.target == "transpose" or n.target is torch.transpose for n in folded.graph_module.graph.nodes)
    assert folded.report.deleted_units > 0


def test_dead_channels_from_weight_masks_alone_are_deleted():
    model = NoBiasChain().eval()
    x = torch.randn(2, 3, 6, 6)
    gated = hf.insert_gates(model, hf.GateConfig(seed=0), example_inputs=x).graph_module.eval()
    gate = next(g for g in hf.gates(gated) if g.target == "c1.weight")
    with torch.no_grad():
        gate.flow[[1, 4]] = -1.0  # every weight of output channels 1 and 4 closed: those channels are 0
    folded = hf.fold_masks(gated, hf.FoldConfig(round_to=1))
    compact = folded.graph_module
    assert_fold_exact(gated, compact, (x,))
    assert compact.c1.weight.shape == (4, 3, 3, 3) and compact.c2.weight.shape == (6, 4, 3, 3)
    assert folded.report.rule_counts["dead_channels"] == 2
    kept = hf.fold_masks(gated, hf.FoldConfig(delete_dead=False)).graph_module
    assert kept.c1.weight.shape == (6, 3, 3, 3)


@pytest.mark.parametrize(("round_to", "expected"), [(1, 3), (4, 4), (8, 8)])
def test_round_to_keeps_strongest_closed_channels_and_stays_exact(round_to, expected):
    model = NoBiasChain().eval()
    x = torch.randn(2, 3, 6, 6)
    gated = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=x).graph_module.eval()
    g = hf.gates(gated)[0]
    assert g.numel == 6
    with torch.no_grad():
        g.flow.copy_(torch.tensor([0.3, -0.1, -0.5, 0.2, -0.2, 0.1]))
    compact = hf.fold_masks(gated, hf.FoldConfig(round_to=round_to)).graph_module
    assert compact.c1.weight.shape[0] == min(expected, 6)
    assert_fold_exact(gated, compact, (x,))


def test_all_but_one_and_all_closed_groups():
    model = NoBiasChain().eval()
    x = torch.randn(2, 3, 6, 6)
    gated = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=x).graph_module.eval()
    g0, g1 = hf.gates(gated)
    with torch.no_grad():
        g0.flow.fill_(-1.0)
        g0.flow[2] = 1.0  # all but one closed
        g1.flow.fill_(-1.0)  # a whole group closed: one channel (zero where consumed) stays
    compact = hf.fold_masks(gated, hf.FoldConfig(round_to=1)).graph_module
    assert compact.c1.weight.shape[0] == 1 and compact.c2.weight.shape == (1, 1, 3, 3)
    assert_fold_exact(gated, compact, (x,))


def test_unsupported_op_blocks_only_its_group_and_is_reported():
    model = RollBranch().eval()
    x = torch.randn(2, 3, 6, 6)
    res = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=x)
    groups = {g.producers[0]: g for g in res.report.channel_groups}
    assert not groups["conv2d"].gated and "roll" in groups["conv2d"].blocked[0]
    assert groups["conv2d_1"].gated
    gated = res.graph_module.eval()
    _set_flows(gated, 0.5)
    folded = hf.fold_masks(gated, hf.FoldConfig(round_to=1))
    assert_fold_exact(gated, folded.graph_module, (x,))
    assert folded.graph_module.b.weight.shape[0] < 4 and folded.graph_module.a.weight.shape[0] == 4


def test_fold_refuses_ungated_models():
    gm = hf.trace(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="gated"):
        hf.fold_masks(gm)
    with pytest.raises(ValueError, match="gated"):
        hf.fold_masks(nn.Linear(2, 2))


def test_count_params_and_macs():
    lin = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    assert hf.count_params_and_macs(lin, torch.randn(3, 10)) == (10 * 20 + 20 + 20 * 5 + 5, 3 * (200 + 100))
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert hf.count_params_and_macs(conv, torch.randn(1, 3, 5, 5)) == (8 * 27, 8 * 25 * 27)
    gated = hf.insert_gates(lin).graph_module  # functional ops counted, flows not counted as params
    assert hf.count_params_and_macs(gated, torch.randn(3, 10)) == (325, 900)


class _ResponseNormOfAConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = F.gelu(self.conv(x))
        g = t.norm(p=2, dim=(2, 3), keepdim=True)
        return self.head((t + t * (g / (g.mean(1, keepdim=True) + 1e-6))).mean((2, 3)))


def test_a_dead_channel_of_a_normalised_group_is_kept():
    # a channel zeroed by weight masks alone is "dead", and the fold deletes dead channels, except where a
    # norm or a mean over the channels counts its zeros (the property test found a GRN whose mean moved 15%)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    gated = hf.insert_gates(_ResponseNormOfAConv(), hf.GateConfig(granularity="hybrid"),
                            example_inputs=(x,)).graph_module.eval()
    weight_gate = next(g for g in hf.gates(gated) if g.target == "conv.weight")
    with torch.no_grad():
        for g in hf.gates(gated):
            g.flow.fill_(1.0)
        weight_gate.flow[0].fill_(-1.0)  # every weight of output channel 0 masked: it computes zeros
    folded = hf.fold_masks(gated, hf.FoldConfig(round_to=1))
    assert_fold_exact(gated, folded.graph_module, (x,))
    assert folded.graph_module.conv.weight.shape[0] == 4 and folded.report.deleted_units == 0
