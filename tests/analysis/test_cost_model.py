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


@pytest.mark.parametrize("name", ["residual_add", "concat", "layernorm_mlp", "attention_heads"])
def test_counts_under_overrides_equal_the_fold_of_those_masks(name):
    """CostModel.counts(overrides) predicts, per group, the kept count fold_masks gives once the gate's
    masks say the same, rounding included (multiples of 4 for every kind of width)."""
    _, x, res = _gated(name, "channel", closed_fraction=0.2)
    gm = res.graph_module.eval()
    fold = hf.FoldConfig(round_to=4, round_to_width=4)
    model = CostModel(gm, fold)
    gate = max((g for g in hf.gates(gm) if isinstance(g, ChannelGate)), key=lambda g: g.numel)
    assert gate.numel >= 6
    closed = torch.zeros(gate.numel, dtype=torch.bool)
    closed[: gate.numel - 3] = True  # 3 open: rounded up to 4
    predicted = model.counts({gate: closed})
    with torch.no_grad():
        gate.flow.copy_(torch.where(closed, -1.0, 1.0))
    report = hf.fold_masks(gm, fold).report
    folded = {g.name: g.after for g in report.groups}
    assert folded[gate.target] == predicted[next(gid for gid, g in model.gate_of.items() if g is gate)]
    assert folded[gate.target] % 4 == 0 and folded[gate.target] < gate.numel  # rounded up, and deleted


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


class _ConvThenMLP(torch.nn.Module):
    """2-D conv channels (ORT's blocked layout) feeding linear widths (plain GEMMs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 48, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(48, 48, 3, padding=1)
        self.fc1 = torch.nn.Linear(48, 40)
        self.fc2 = torch.nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def _close_all_but(gm: torch.nn.Module, kept_open: int) -> None:
    with torch.no_grad():
        for g in hf.gates(gm):
            g.flow.copy_(torch.where(torch.arange(g.numel) < kept_open, 1.0, -1.0))


@pytest.mark.parametrize("round_to", ["auto", 8])
def test_round_to_applies_to_conv_channels_and_not_to_linear_widths(round_to):
    """Each gate keeps 5 open units: the 2-D conv groups are raised to the conv floor (16 under "auto", 1 with
    an explicit multiple) and rounded up to the block (deleted down to a multiple of it), the linear widths
    keep exactly 5 (round_to_width resolves to 1)."""
    x = torch.randn(2, 3, 8, 8)
    gm = hf.insert_gates(_ConvThenMLP().eval(), hf.GateConfig(granularity="channel"), example_inputs=x).graph_module
    _close_all_but(gm, 5)
    fold = hf.FoldConfig(round_to=round_to)
    report = hf.fold_masks(gm, fold).report
    resolved = resolve_fold_config(fold)
    step, floor = resolved.round_to, resolved.min_conv_channels
    assert report.round_to == step and report.round_to_width == 1 and report.min_conv_channels == floor
    assert floor == (16 if round_to == "auto" else 1)
    after = {g.name: g.after for g in report.groups if g.before > 10}
    conv = [n for n in after if "conv" in n]
    linear = [n for n in after if "linear" in n]
    assert len(conv) == 2 and len(linear) == 1, after
    for name in conv:
        assert after[name] == -(-max(floor, 5) // step) * step, (name, after)
        assert after[name] < 48  # something was deleted, so the assertion above is about a fold that acted
    assert after[linear[0]] == 5


def test_the_conv_floor_is_its_own_setting_and_the_same_on_every_cpu(monkeypatch):
    """min_conv_channels: "auto" resolves to CONV_FLOOR whatever the block (8 or 16), an explicit round_to
    makes it 1 (the multiple is the floor, as before), an explicit floor stays; it raises conv groups only
    (never linear widths), a group narrower than the floor keeps every unit, and bad values are refused."""
    from hyperflux_fx.analysis import runtime
    from hyperflux_fx.analysis.coupling import kept_count
    from hyperflux_fx.config import CONV_FLOOR

    assert CONV_FLOOR == 16 and hf.FoldConfig().min_conv_channels == "auto"
    assert hf.FoldConfig(round_to=8).min_conv_channels == 1
    assert hf.FoldConfig(round_to=8, min_conv_channels=24).min_conv_channels == 24
    for block in (8, 16):
        monkeypatch.setattr(runtime, "nchwc_block", lambda block=block: block)
        resolved = resolve_fold_config(hf.FoldConfig())
        assert (resolved.round_to, resolved.min_conv_channels) == (block, 16)
    for bad in (0, -1, True, 2.5, "16"):
        with pytest.raises(ValueError, match="min_conv_channels"):
            hf.FoldConfig(min_conv_channels=bad)
    x = torch.randn(2, 3, 8, 8)
    gm = hf.insert_gates(_ConvThenMLP().eval(), hf.GateConfig(granularity="channel"), example_inputs=x).graph_module
    groups = {("conv" if g.conv else "linear"): g for g in CostModel(gm, hf.FoldConfig(round_to=1)).groups
              if g.size in (40, 48)}
    def fold(**kw):
        return resolve_fold_config(hf.FoldConfig(round_to=8, **kw))

    assert kept_count(groups["conv"], 46, fold(min_conv_channels=16)) == 16  # 2 open: raised to the floor
    assert kept_count(groups["conv"], 30, fold(min_conv_channels=16)) == 24  # 18 open: rounded up to a block
    assert kept_count(groups["conv"], 46, fold()) == 8  # the block alone, as before
    assert kept_count(groups["conv"], 46, fold(min_conv_channels=64)) == 48  # all of it
    assert kept_count(groups["linear"], 38, fold(min_conv_channels=16)) == 2  # linear: no conv floor, no block


def test_default_fold_deletes_a_closed_head():
    """round_to never applies to heads: under the defaults a model with 2 heads loses the closed one."""
    build, inputs = ZOO["sdpa_attention"]
    x = inputs()
    gm = hf.insert_gates(build().eval(), hf.GateConfig(granularity="channel"), example_inputs=x).graph_module
    heads = [g for g in hf.gates(gm) if isinstance(g, ChannelGate)]
    assert [h.numel for h in heads] == [2]
    _close_all_but(gm, 1)
    folded = hf.fold_masks(gm)  # FoldConfig() defaults: round_to="auto"
    (group,) = [g for g in folded.report.groups if g.unit == "head"]
    assert (group.before, group.after, group.deleted) == (2, 1, 1)
    assert folded.graph_module.qkv.weight.shape[0] == 3 * 8  # 16 -> 8 channels each of q, k, v
    torch.testing.assert_close(folded.graph_module(*x), gm(*x), atol=1e-5, rtol=1e-5)


def test_round_to_width_rounds_linear_widths_when_asked():
    x = torch.randn(2, 3, 8, 8)
    gm = hf.insert_gates(_ConvThenMLP().eval(), hf.GateConfig(granularity="channel"), example_inputs=x).graph_module
    _close_all_but(gm, 5)
    report = hf.fold_masks(gm, hf.FoldConfig(round_to=1, round_to_width=8)).report
    after = {g.name: g.after for g in report.groups if g.before > 10}
    assert all(v == (8 if "linear" in n else 5) for n, v in after.items()), after


def test_cost_model_needs_example_inputs_and_refuses_batchnorm_folding():
    _, _, res = _gated("residual_add", "channel")
    with pytest.raises(ValueError, match="fold_batchnorm"):
        CostModel(res.graph_module, hf.FoldConfig(fold_batchnorm=True))


def test_round_to_applies_to_1d_conv_channels_too():
    """round_to is each conv layer's minimum width as well as the kernels' block: a Conv1d keeps whole
    blocks (docs/folding.md), its linear head does not."""
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 48, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv1d(48, 48, 3),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(48 * 6, 40), torch.nn.ReLU(),
                              torch.nn.Linear(40, 3))
    x = torch.randn(2, 2, 8)
    gm = hf.insert_gates(net.eval(), hf.GateConfig(granularity="channel"), example_inputs=x).graph_module
    _close_all_but(gm, 5)
    report = hf.fold_masks(gm, hf.FoldConfig(round_to=8)).report
    after = {g.name: g.after for g in report.groups if g.before > 10}
    assert sorted(after.values()) == [5, 8, 8], after
