"""Training-mode code is not baked into the graph (docs/gating.md, "Training-mode code").

Models are gated from train mode, the state every freshly built module is in. The graph is the eval
function: eval outputs equal the model's exactly (``torch.equal``) and are deterministic. Dropout and
drop path still act in training; any other training-only code is reported by module name.
"""

from __future__ import annotations

import pytest
import torch
from models import DropoutDropPath, DropPath, StochasticDepthBlock, TrainingBranch
from torch import nn

import hyperflux_fx as hf
from hyperflux_fx.ir import TRAINING_ONLY_META, EvalIdentity


def _gate(model, x, granularity="channel"):
    assert model.training
    return hf.insert_gates(model, hf.GateConfig(granularity=granularity, seed=0), example_inputs=x).graph_module


def _eval_exact_and_deterministic(model, gated, x):
    model.eval()
    gated.eval()
    with torch.no_grad():
        want, got, again = model(x), gated(x), gated(x)
    assert torch.equal(got, want)
    assert torch.equal(got, again)


def _train_random(gated, x):
    gated.train()
    torch.manual_seed(0)
    with torch.no_grad():
        a = gated(x)
        b = gated(x)
    return not torch.equal(a, b)


@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_dropout_and_drop_path_act_in_training_and_vanish_at_eval(granularity):
    torch.manual_seed(0)
    model, x = DropoutDropPath(), torch.randn(2, 3, 6, 6)
    gated = _gate(model, x, granularity)
    kinds = {type(m) for m in gated.modules()}
    assert EvalIdentity in kinds and nn.Dropout in kinds  # the drop path a leaf, F.dropout a module
    assert gated.meta[TRAINING_ONLY_META] == []  # nothing left over
    _eval_exact_and_deterministic(model, gated, x)
    assert _train_random(gated, x)


def test_each_of_the_two_is_kept_in_training():
    """Without the drop path or without the dropout, training is still random: each one acts."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    for keep in ("drop_path", "dropout"):
        model = DropoutDropPath()
        if keep == "dropout":
            model.drop_path.p = 0.0  # the identity in both modes: traced through
        gated = _gate(model, x)
        if keep == "drop_path":
            gated.get_submodule("dropout").p = 0.0
        assert _train_random(gated, x), keep


def test_the_drop_path_does_not_block_its_channel_group():
    torch.manual_seed(0)
    model, x = DropoutDropPath(), torch.randn(2, 3, 6, 6)
    res = hf.insert_gates(model, hf.GateConfig(granularity="channel"), example_inputs=x)
    residual = [g for g in res.report.channel_groups if g.size == 8]  # stem + conv, summed through the drop path
    assert len(residual) == 1 and residual[0].gated, residual
    assert len(residual[0].producers) == 2


def test_torchvision_stochastic_depth_is_a_drop_path_and_keeps_its_group():
    """``torchvision.ops.stochastic_depth`` is traced through its module (a wrapped function): the op
    table makes it ``StochasticDepth(p, mode)``, random in training, the identity at eval."""
    import torchvision

    torch.manual_seed(0)
    model, x = StochasticDepthBlock(), torch.randn(2, 3, 6, 6)
    res = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=x)
    gated = res.graph_module
    assert any(isinstance(m, torchvision.ops.StochasticDepth) for m in gated.modules())
    assert gated.meta[TRAINING_ONLY_META] == []
    _eval_exact_and_deterministic(model, gated, x)
    assert _train_random(gated, x)
    residual = [g for g in res.report.channel_groups if g.size == 8]
    assert len(residual) == 1 and residual[0].gated, residual


def test_a_training_only_branch_is_reported_by_module_and_eval_stays_exact():
    torch.manual_seed(0)
    model, x = TrainingBranch(), torch.randn(2, 3, 6, 6)
    gated = _gate(model, x)
    found = gated.meta[TRAINING_ONLY_META]
    assert len(found) == 1 and found[0].path == "" and found[0].type == "TrainingBranch"
    assert any("randn_like" in op for op in found[0].train_only)
    assert "training-only code in the root forward" in found[0].message
    _eval_exact_and_deterministic(model, gated, x)


def test_a_literal_training_flag_is_left_as_written():
    """``F.dropout(x, p)`` (training defaults to True) is random in eval in the model too: it stays a
    function call, and the CLI's check refuses the model (tests/test_cli.py)."""

    class AlwaysDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(nn.functional.dropout(x, 0.5))

    gm = hf.trace(AlwaysDropout(), torch.randn(2, 4))
    assert any(n.op == "call_function" and n.target is nn.functional.dropout for n in gm.graph.nodes)


def test_an_identity_module_in_both_modes_is_traced_through():
    model = nn.Sequential(nn.Linear(4, 4), DropPath(0.0), nn.ReLU())
    gm = hf.trace(model, torch.randn(2, 4))
    assert not any(isinstance(m, EvalIdentity) for m in gm.modules())


def test_the_trace_restores_every_module_mode():
    model = DropoutDropPath()
    model.drop_path.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    gm = hf.trace(model, torch.randn(2, 3, 6, 6))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert gm.training


@pytest.mark.parametrize("granularity", ["channel", "weight"])
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_timm_models_with_drop_rates_keep_invariant_1_from_train_mode(name, granularity):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_rate=0.2, drop_path_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    gated = _gate(model, x, granularity)
    assert gated.meta[TRAINING_ONLY_META] == []
    _eval_exact_and_deterministic(model, gated, x)
    assert _train_random(gated, x)
    if name == "convnext_atto":  # its drop paths are kept as leaves
        assert sum(isinstance(m, EvalIdentity) for m in gated.modules()) > 0


class _UntraceableInTraining(nn.Module):
    """Traceable in eval; in training a branch on the data, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.training and y.sum() > 0:
            y = y * 2
        return y


def test_a_failed_train_mode_trace_is_a_warning_naming_what_is_not_checked(caplog):
    with caplog.at_level("WARNING", logger="hyperflux_fx"):
        hf.trace(_UntraceableInTraining(), torch.randn(2, 4))
    (record,) = [r for r in caplog.records if "train-mode trace failed" in r.getMessage()]
    assert record.levelname == "WARNING" and "not checked" in record.getMessage()
