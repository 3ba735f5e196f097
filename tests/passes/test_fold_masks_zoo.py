"""Invariant 2 on the real zoo: random structured masks at 30%, 50%, 90% closed, plus edge cases.

The compact model's input-dependent output (``y - y.mean(0)``) equals the masked model's within
atol = 1e-5 x its scale (fp32; DESIGN.md invariant 2). Models are made sensitive first (BN statistics
re-estimated, norm affines drawn), see ``models.build_real``.
"""

from __future__ import annotations

import pytest
import torch
from equivalence import assert_fold_exact, close_at_random
from models import REAL_ZOO, build_real

import hyperflux_fx as hf


@pytest.mark.parametrize(("lib", "name", "size"), REAL_ZOO, ids=[f"{lib}:{name}" for lib, name, _ in REAL_ZOO])
def test_zoo_fold_is_exact_and_deletes(lib, name, size):
    model = build_real(lib, name, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    res = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=x)
    gated = res.graph_module.eval()
    groups = res.report.channel_groups
    transformer = res.report.model_kind == "transformer"
    assert res.report.gateable_share >= 0.95, res.report.blockers()
    if transformer:  # heads, MLP hidden units and the LayerNorm'd residual stream are gated
        assert any(g.gated and g.unit == "head" for g in groups)
        assert any(g.gated and g.unit == "channel" for g in groups)
        stream = next(g for g in groups if "conv2d" in g.producers)  # the patch embedding writes the stream
    params_dense, macs_dense = hf.count_params_and_macs(model, x)
    for closed_fraction in (0.3, 0.5, 0.9):
        close_at_random(gated, closed_fraction)
        folded = hf.fold_masks(gated, hf.FoldConfig(round_to=1))
        compact = folded.graph_module
        assert_fold_exact(gated, compact, (x,))
        rep = folded.report
        params, macs = hf.count_params_and_macs(compact, x)
        assert params < params_dense and macs < macs_dense
        assert rep.params_after == params
        if transformer:
            heads = [g for g in rep.groups if g.unit == "head" and g.closed]
            assert heads and all(g.deleted > 0 or g.after == 1 for g in heads)
            assert sum(g.deleted for g in rep.groups if g.unit == "channel") > 0
            assert next(g for g in rep.groups if g.name == stream.name).deleted > 0
        else:
            assert rep.deleted_units >= 0.9 * rep.closed_units, str(rep)


def test_edge_cases_on_resnet18():
    model = build_real("torchvision", "resnet18", 32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gated = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=x).graph_module.eval()
    all_gates = hf.gates(gated)
    with torch.no_grad():
        for g in all_gates:  # all but one channel closed, everywhere
            g.flow.fill_(-1.0)
            g.flow[0] = 1.0
    compact = hf.fold_masks(gated, hf.FoldConfig(round_to=1)).graph_module
    assert_fold_exact(gated, compact, (x,))
    assert compact.get_submodule("layer4.1.conv1").weight.shape[:2] == (1, 1)
    # a whole residual branch closed: the inner group of layer1.0 (conv1 -> bn1 -> relu -> conv2)
    inner = next(g for g in all_gates if any(p == "conv2d_1" for p in g.producers))
    with torch.no_grad():
        for g in all_gates:
            g.flow.fill_(1.0)
        inner.flow.fill_(-1.0)
    folded = hf.fold_masks(gated, hf.FoldConfig(round_to=1))
    assert_fold_exact(gated, folded.graph_module, (x,))
    # min_channels keeps one zero channel
    assert folded.graph_module.get_submodule("layer1.0.conv1").weight.shape[0] == 1


@pytest.mark.parametrize(("lib", "name"), [("torchvision", "resnet18"), ("torchvision", "mobilenet_v2"),
                                           ("timm", "resnet18")])
def test_fold_with_batchnorm_folding(lib, name):
    model = build_real(lib, name, 32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gated = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=x).graph_module.eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for g in hf.gates(gated):
            g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - 0.5)
    folded = hf.fold_masks(gated, hf.FoldConfig(round_to=1, fold_batchnorm=True))
    compact = folded.graph_module.eval()
    assert folded.report.rule_counts["batchnorm_folded"] > 0
    with torch.no_grad():  # fp32: the folded weights carry one more rounding; tolerance as in equivalence.py
        y_m = gated(x)
        torch.testing.assert_close(compact(x), y_m, rtol=0, atol=1e-5 * float(y_m.abs().max()))
    # the folding itself is exact: done in float64 on the compact model, it changes nothing
    plain = hf.fold_masks(gated, hf.FoldConfig(round_to=1)).graph_module.double().eval()
    merged = hf.fold_batchnorm(plain).graph_module
    assert_fold_exact(plain, merged, (x.double(),))
    used = {str(n.target) for n in compact.graph.nodes if n.op == "call_module"}
    assert not [n for n, m in compact.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and n in used]
