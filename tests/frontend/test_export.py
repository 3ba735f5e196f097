"""The torch.export front end (docs/frontends.md): which front end runs and why, the captured graph's
plain call signature, dynamic batch and sequence sizes, keyword inputs, dropout, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from models import UntraceableRoot, WithOpaqueBlock
from torch import fx, nn

import hyperflux_fx as hf
from hyperflux_fx.ir import FRONTEND_META, OPAQUE_META
from hyperflux_fx.ops import call_spec


class ShapeLoop(nn.Module):
    """A Python loop over a tensor's size in the root forward: torch.fx cannot trace it (``range`` of
    a Proxy), torch.export can. Keyword inputs: a float scale and an optional tensor mask."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, scale: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc(x)
        if mask is not None:
            h = h * mask[..., None]
        total = h[:, 0]
        for i in range(1, h.shape[1]):
            total = total + h[:, i]
        return self.out(self.drop(F.relu(total))) * scale


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def test_auto_falls_back_to_export_when_the_root_fails_and_says_why():
    model = ShapeLoop().eval()
    gm = hf.trace(model, (_x(2, 5, 4),))
    choice = gm.meta[FRONTEND_META]
    assert choice.name == "export" and "torch.fx failed at the root" in choice.reason
    assert isinstance(gm, fx.GraphModule) and not hasattr(gm, "_guards_fn")
    assert all(call_spec(n) is None or call_spec(n).kind != "check" for n in gm.graph.nodes)
    for shape in ((2, 5, 4), (5, 5, 4), (1, 5, 4)):  # another batch size runs
        assert torch.equal(gm(_x(*shape)), model(_x(*shape)))


class PaddedBlock(nn.Module):
    """Pads its input to a multiple of 4 when it is not one, computed from the sizes (as MobileViT's block
    does before unfolding patches): torch.fx cannot branch on a size, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = math.ceil(x.shape[-1] / 4) * 4 - x.shape[-1]
        if pad:
            x = F.pad(x, (0, pad, 0, pad))
        return F.relu(self.conv(x))


def test_auto_exports_through_the_leaves_fx_had_to_make_opaque():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), PaddedBlock(), nn.Conv2d(6, 2, 1), nn.Flatten(2)).eval()
    x = _x(2, 3, 7, 7)
    fx_only = hf.trace(model, (x,), frontend="fx")
    assert [o.path for o in fx_only.meta[OPAQUE_META]] == ["1"]
    gm = hf.trace(model, (x,))
    assert gm.meta[FRONTEND_META].name == "export" and "opaque leaves (1)" in gm.meta[FRONTEND_META].reason
    assert torch.equal(gm(x), model(x))
    res = hf.insert_gates(model, hf.GateConfig(granularity="channel"), example_inputs=(x,))
    assert res.report.gateable_share == 1.0  # the block's conv and the stem: nothing opaque left
    with_fx = hf.insert_gates(fx_only, hf.GateConfig(granularity="channel"), example_inputs=(x,))
    assert with_fx.report.gateable_share < 1.0


def test_auto_keeps_the_opaque_leaf_when_export_fails_too():
    gm = hf.trace(WithOpaqueBlock().eval(), (torch.randn(2, 3, 8, 8),))
    assert gm.meta[FRONTEND_META].name == "fx" and "torch.export failed too" in gm.meta[FRONTEND_META].reason
    assert [o.path for o in gm.meta[OPAQUE_META]] == ["block"]


def test_fx_is_used_when_it_traces():
    gm = hf.trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (_x(2, 4),))
    assert gm.meta[FRONTEND_META].name == "fx"


def test_keyword_inputs_become_constants_or_trailing_inputs():
    model = ShapeLoop().eval()
    x, mask = _x(2, 5, 4), (_x(2, 5) > 0).float()
    gm = hf.trace(model, (x,), example_kwargs={"scale": 2.0, "mask": mask})
    assert gm.meta[FRONTEND_META].name == "export" and "keyword" in gm.meta[FRONTEND_META].reason
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    assert torch.equal(gm(x, mask), model(x, scale=2.0, mask=mask))


def test_exported_dropout_follows_the_train_flag():
    model = ShapeLoop().eval()
    x = _x(4, 5, 4)
    gm = hf.trace(model, (x,), frontend="export")
    assert any(isinstance(m, nn.Dropout) for m in gm.modules())
    assert torch.equal(gm.eval()(x), model(x))
    torch.manual_seed(0)
    assert not torch.equal(gm.train()(x), model(x))


def test_errors_name_the_front_end_and_the_fix():
    with pytest.raises(hf.TraceError, match="example_inputs"):
        hf.trace(ShapeLoop())  # fx fails at the root; export would need inputs
    with pytest.raises(hf.TraceError):
        hf.trace(ShapeLoop(), (_x(2, 5, 4),), frontend="fx")
    with pytest.raises(hf.TraceError, match="torch.fx.*torch.export"):
        hf.trace(UntraceableRoot(), (_x(2, 4),))  # data-dependent control flow: neither captures it
    with pytest.raises(ValueError, match="frontend"):
        hf.trace(ShapeLoop(), (_x(2, 5, 4),), frontend="dynamo")
    with pytest.raises(ValueError, match="example_inputs"):
        hf.trace(ShapeLoop(), frontend="export")


def test_insert_gates_passes_the_front_end_through():
    model = ShapeLoop().eval()
    res = hf.insert_gates(model, hf.GateConfig(granularity="channel"), example_inputs=(_x(2, 5, 4),))
    gated = res.graph_module.eval()
    assert gated.meta[FRONTEND_META].name == "export"
    assert any(g.gated for g in res.report.channel_groups)
    assert torch.equal(gated(_x(3, 5, 4)), model(_x(3, 5, 4)))
