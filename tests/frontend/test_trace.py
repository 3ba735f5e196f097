"""trace(): leaf fallback, opaque modules, TraceError, example-input checks; load_source()."""

from __future__ import annotations

import pytest
import torch
from models import ZOO, DataDependentBlock, UntraceableRoot, WithOpaqueBlock
from torch import fx, nn

import hyperflux_fx as hf
from hyperflux_fx.ir import OPAQUE_META


@pytest.mark.parametrize("name", sorted(ZOO))
def test_trace_is_exact_on_the_zoo(name):
    build, inputs = ZOO[name]
    model = build().eval()
    gm = hf.trace(model, inputs())
    assert isinstance(gm, fx.GraphModule)
    assert torch.equal(gm(*inputs()), model(*inputs()))
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op in ("placeholder", "call_module"))


def test_untraceable_submodule_becomes_an_opaque_leaf():
    model = WithOpaqueBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = hf.trace(model, x)
    opaque = gm.meta[OPAQUE_META]
    assert [o.path for o in opaque] == ["block"]
    assert "control flow" in opaque[0].error and opaque[0].type.endswith("DataDependentBlock")
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["stem", "block", "fc"]
    assert torch.equal(gm(x), model(x))
    assert torch.equal(gm(-x.abs()), model(-x.abs()))  # the other branch still runs inside the leaf


def test_untraceable_root_raises_trace_error_with_hint():
    with pytest.raises(hf.TraceError) as info:
        hf.trace(UntraceableRoot())
    err = info.value
    assert err.module_path == ""
    assert "UntraceableRoot" in str(err) and "leaf_modules" in str(err) and "concrete_args" in str(err)
    assert isinstance(err.fx_error, Exception)


def test_fallback_limit_raises_trace_error_naming_the_module():
    with pytest.raises(hf.TraceError) as info:
        hf.trace(WithOpaqueBlock(), max_fallbacks=0)
    assert info.value.module_path == "block" and "'block'" in str(info.value)


def test_leaf_modules_by_type_and_name():
    model = WithOpaqueBlock()
    gm = hf.trace(model, leaf_modules=(DataDependentBlock,))
    assert gm.meta[OPAQUE_META] == []  # a user leaf is not a fallback
    gm2 = hf.trace(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU())), leaf_modules=("1",))
    assert [n.target for n in gm2.graph.nodes if n.op == "call_module"] == ["0", "1"]
    with pytest.raises(TypeError, match="leaf_modules"):
        hf.trace(model, leaf_modules=(42,))


def test_concrete_args_fix_control_flow():
    class Flag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, double: bool = False):
            y = self.fc(x)
            return y * 2 if double else y

    model = Flag()
    with pytest.raises(hf.TraceError, match="control flow"):  # the flag is a proxy without concrete_args
        hf.trace(model, max_fallbacks=0)
    gm = hf.trace(model, concrete_args={"double": True})
    x = torch.randn(2, 3)
    assert torch.equal(gm(x, True), model(x, True))
    assert any("mul" in str(n.target) for n in gm.graph.nodes)


def test_non_module_raises_type_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hf.trace(lambda x: x)


def test_wrong_example_input_raises_example_input_error():
    build, _ = ZOO["flatten_linear"]
    with pytest.raises(hf.ExampleInputError, match=r"\[\(2, 1, 9, 9\)\].*--input-shape"):
        hf.trace(build(), torch.randn(2, 1, 9, 9))


def test_shape_propagation_leaves_training_state_and_bn_stats_alone():
    build, inputs = ZOO["residual_add"]
    model = build().train()
    before = model.bn0.running_mean.clone()
    gm = hf.trace(model, inputs())
    assert gm.training and gm.bn0.training
    assert torch.equal(gm.bn0.running_mean, before)


# -- load_source ---------------------------------------------------------------------------------

def test_load_model_py(tmp_path):
    f = tmp_path / "model.py"
    f.write_text("import torch\n"
                 "def build_model():\n    return torch.nn.Sequential(torch.nn.Linear(4, 2))\n"
                 "def example_inputs():\n    return torch.zeros(3, 4)\n")
    loaded = hf.load_source(str(f))
    assert isinstance(loaded.model, nn.Sequential) and loaded.example_inputs[0].shape == (3, 4)
    assert hf.load_source(str(f), input_shape=(5, 4)).example_inputs[0].shape == (5, 4)


@pytest.mark.parametrize(("text", "match"), [
    ("def build_model(:\n", "syntax error"),
    ("x = 1\n", "build_model"),
    ("def build_model():\n    return 3\n", "not a torch.nn.Module"),
    ("def build_model():\n    import torch\n    return torch.nn.Linear(2, 2)\n", "example_inputs"),
])
def test_load_model_py_errors(tmp_path, text, match):
    f = tmp_path / "model.py"
    f.write_text(text)
    with pytest.raises(hf.SourceError, match=match):
        hf.load_source(str(f))


def test_load_source_errors_for_missing_file_and_unknown_names(tmp_path):
    with pytest.raises(hf.SourceError, match="not found"):
        hf.load_source(str(tmp_path / "nope.py"))
    with pytest.raises(hf.SourceError, match="did you mean"):
        hf.load_source("timm:resnet_18")
    with pytest.raises(hf.SourceError, match="unknown torchvision model"):
        hf.load_source("torchvision:not_a_model_at_all")


def test_load_torchvision_and_timm_without_download_and_weights(tmp_path):
    tv = hf.load_source("torchvision:resnet18", num_classes=10)
    assert tv.example_inputs[0].shape == (2, 3, 224, 224)
    w = tmp_path / "w.pt"
    torch.save(tv.model.state_dict(), w)
    again = hf.load_source("torchvision:resnet18", num_classes=10, weights=w)
    assert torch.equal(again.model.fc.weight, tv.model.fc.weight)
    tm = hf.load_source("timm:resnet18", input_shape=(1, 3, 32, 32))
    assert tm.example_inputs[0].shape == (1, 3, 32, 32)
    with pytest.raises(hf.SourceError, match="cannot load weights"):
        hf.load_source("torchvision:resnet18", weights=w)  # 1000 classes vs 10
