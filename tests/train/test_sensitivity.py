"""Per-group sensitivity: the loss growth as one group's lowest-flow units close, the flows left as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hyperflux_fx as hf
from hyperflux_fx.ir import ChannelGate
from hyperflux_fx.train.sensitivity import group_sensitivity, spearman


def test_spearman_ranks_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)  # average ranks for the tie
    assert spearman([1, 1, 1], [1, 2, 3]) is None


class TwoPaths(nn.Module):
    """Two hidden layers summed into the output; ``quiet``'s units reach it with tiny weights."""

    def __init__(self) -> None:
        super().__init__()
        self.loud, self.quiet = nn.Linear(4, 8), nn.Linear(4, 8)
        self.out_loud, self.out_quiet = nn.Linear(8, 3), nn.Linear(8, 3)
        with torch.no_grad():
            self.out_quiet.weight.mul_(1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_loud(F.relu(self.loud(x))) + self.out_quiet(F.relu(self.quiet(x)))


def test_a_group_that_matters_costs_more_to_close_and_the_flows_are_restored():
    torch.manual_seed(0)
    model = TwoPaths()
    x = torch.randn(64, 4)
    y = model(x).argmax(-1)  # the model's own predictions: closing loud units must hurt
    gated = hf.insert_gates(model, hf.GateConfig(granularity="channel"), example_inputs=(x[:2],)).graph_module
    groups = [g for g in hf.gates(gated) if isinstance(g, ChannelGate)]
    with torch.no_grad():
        for g in groups:
            g.flow.copy_(torch.linspace(-0.5, 1.0, g.flow.numel()))  # a third of each group closed
    before = [g.flow.detach().clone() for g in groups]
    sens = group_sensitivity(gated, DataLoader(TensorDataset(x, y), batch_size=16), F.cross_entropy)
    assert all(torch.equal(g.flow.detach(), b) for g, b in zip(groups, before, strict=True))  # bit for bit
    names = {g.target: "loud" if "loud" in str(g.producers) or g.producers == ("linear",) else "quiet"
             for g in groups}
    loud = next(s for s in sens.groups if names[s.name] == "loud")
    quiet = next(s for s in sens.groups if names[s.name] == "quiet")
    assert loud.kept == pytest.approx(5 / 8) and set(loud.loss_delta) == {"0.25", "0.5", "0.75"}
    assert loud.loss_delta["0.75"] > 100 * abs(quiet.loss_delta["0.75"])
    assert not sens.capped and sens.batches == 4 and sens.total_groups == len(groups)


def test_the_time_budget_caps_and_says_so():
    model = TwoPaths()
    x = torch.randn(8, 4)
    gated = hf.insert_gates(model, hf.GateConfig(granularity="channel"), example_inputs=(x[:2],)).graph_module
    sens = group_sensitivity(gated, [(x, torch.zeros(8, dtype=torch.long))], F.cross_entropy, budget_s=-1.0)
    assert sens.capped and sens.groups == [] and sens.total_groups > 0 and sens.spearman() is None
