"""insert_gates on the tiny fixture zoo: invariant 1, golden graphs, the report, the config, purity."""

from __future__ import annotations

import copy

import pytest
import torch
from models import ZOO, FunctionalOps, RollBranch, SharedWeight, StandardizedConv
from torch import nn

import hyperflux_fx as hf
from hyperflux_fx.ir import GATE_REPORT_META


def _gated(name, config=None):
    build, inputs = ZOO[name]
    model = build().eval()
    x = inputs()
    res = hf.insert_gates(model, config or hf.GateConfig(seed=0), example_inputs=x)
    return model, res, x


def _float_inputs(x):
    return tuple(t.clone().requires_grad_(True) if t.is_floating_point() else t for t in x)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_open_gates_change_nothing(name):
    """Invariant 1: exact equality of outputs and of gradients w.r.t. the original weights."""
    model, res, x = _gated(name)
    gated = res.graph_module.eval()
    assert res.modified and len(res.report.gated) > 0
    xa, xb = _float_inputs(x), _float_inputs(x)
    ya, yb = model(*xa), gated(*xb)
    assert torch.equal(ya, yb)
    upstream = torch.randn(ya.shape, generator=torch.Generator().manual_seed(5))
    (ya * upstream).sum().backward()
    (yb * upstream).sum().backward()
    gated_params = dict(gated.named_parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None or gated_params[pname].grad is None, pname
        if p.grad is not None:
            torch.testing.assert_close(gated_params[pname].grad, p.grad, rtol=0, atol=0, msg=pname)
    for g in hf.gates(gated):
        assert g.flow.grad is not None, f"flow of {g.target} received no gradient"
        assert torch.isfinite(g.flow.grad).all()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_random_masks_equal_masked_original(name):
    model, res, x = _gated(name)
    gated = res.graph_module.eval()
    gen = torch.Generator().manual_seed(7)
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters())
    with torch.no_grad():
        for g in hf.gates(gated):
            g.flow.copy_(torch.randn(g.flow.shape, generator=gen))
            params[g.target].mul_(g.mask())
        assert 0.3 < hf.density(gated) < 0.7
    y_gated, y_masked, y_dense = gated(*x), masked(*x), model(*x)
    assert torch.equal(y_gated, y_masked)
    assert not torch.allclose(y_gated, y_dense), "the masks must matter for this check to mean anything"


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_parameter_is_gated_or_reported(name):
    model, res, _ = _gated(name)
    rep = res.report
    gated = {g.name for g in rep.gated}
    skipped = [s.name for s in rep.skipped if s.kind == "parameter"]
    assert len(skipped) == len(set(skipped)) and not gated & set(skipped)
    assert gated | set(skipped) == {n for n, _ in model.named_parameters()}
    assert all(s.reason for s in rep.skipped)
    assert res.graph_module.meta[GATE_REPORT_META] is rep
    res.graph_module.graph.lint()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_original_state_dict_loads_and_input_is_untouched(name):
    model, res, x = _gated(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gated = res.graph_module.eval()
    # train the gated copy one step: the original must not move
    gated.train()
    out = gated(*_float_inputs(x))
    out.float().pow(2).mean().backward()
    with torch.no_grad():
        for p in gated.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} of the input model changed"
    # the original names still load; only hyperflux state (flow parameters, gamma) is missing
    fresh = ZOO[name][0]()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(0.01)
    result = gated.load_state_dict(fresh.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("hyperflux_") for k in result.missing_keys)
    fresh.eval()
    gated.eval()
    for g in hf.gates(gated):
        with torch.no_grad():
            g.flow.abs_()  # reopen everything
    assert torch.equal(gated(*x), fresh(*x))


def test_graph_module_input_is_deep_copied():
    build, inputs = ZOO["concat"]
    gm = hf.trace(build(), inputs())
    code = gm.code
    res = hf.insert_gates(gm)
    assert gm.code == code and not hf.gates(gm)
    assert res.graph_module is not gm and len(hf.gates(res.graph_module)) == 3
    res2 = hf.insert_gates(gm, inplace=True)
    assert res2.graph_module is gm and len(hf.gates(gm)) == 3


GOLDEN_RESIDUAL_ADD = '''
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    stem_weight = self.stem.weight
    hyperflux_gates_stem_weight = self.hyperflux_gates.stem_weight(stem_weight);  stem_weight = None
    conv1_weight = self.conv1.weight
    hyperflux_gates_conv1_weight = self.hyperflux_gates.conv1_weight(conv1_weight);  conv1_weight = None
    conv2_weight = self.conv2.weight
    hyperflux_gates_conv2_weight = self.hyperflux_gates.conv2_weight(conv2_weight);  conv2_weight = None
    fc_weight = self.fc.weight
    hyperflux_gates_fc_weight = self.hyperflux_gates.fc_weight(fc_weight);  fc_weight = None
    conv2d = torch.conv2d(x, hyperflux_gates_stem_weight, None, (1, 1), (1, 1), (1, 1), 1);  x = hyperflux_gates_stem_weight = None
    bn0 = self.bn0(conv2d);  conv2d = None
    relu = torch.nn.functional.relu(bn0, inplace = False);  bn0 = None
    conv2d_1 = torch.conv2d(relu, hyperflux_gates_conv1_weight, None, (1, 1), (1, 1), (1, 1), 1);  hyperflux_gates_conv1_weight = None
    bn1 = self.bn1(conv2d_1);  conv2d_1 = None
    relu_1 = torch.nn.functional.relu(bn1, inplace = False);  bn1 = None
    conv2d_2 = torch.conv2d(relu_1, hyperflux_gates_conv2_weight, None, (1, 1), (1, 1), (1, 1), 1);  relu_1 = hyperflux_gates_conv2_weight = None
    bn2 = self.bn2(conv2d_2);  conv2d_2 = None
    add = relu + bn2;  relu = bn2 = None
    relu_2 = torch.nn.functional.relu(add, inplace = False);  add = None
    mean = relu_2.mean((2, 3));  relu_2 = None
    fc_bias = self.fc.bias
    linear = torch._C._nn.linear(mean, hyperflux_gates_fc_weight, fc_bias);  mean = hyperflux_gates_fc_weight = fc_bias = None
    return linear
'''  # noqa: E501 (torch.fx's generated code, compared verbatim)

GOLDEN_FUNCTIONAL_OPS = '''
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    cw_1 = self.cw
    hyperflux_gates_cw = self.hyperflux_gates.cw(cw_1);  cw_1 = None
    lw_1 = self.lw
    hyperflux_gates_lw = self.hyperflux_gates.lw(lw_1);  lw_1 = None
    m_1 = self.m
    hyperflux_gates_m = self.hyperflux_gates.m(m_1);  m_1 = None
    m2_1 = self.m2
    hyperflux_gates_m2 = self.hyperflux_gates.m2(m2_1);  m2_1 = None
    cb = self.cb
    conv2d = torch.conv2d(x, hyperflux_gates_cw, cb, padding = 1);  x = hyperflux_gates_cw = cb = None
    relu = torch.nn.functional.relu(conv2d, inplace = False);  conv2d = None
    mean = relu.mean((2, 3));  relu = None
    linear = torch._C._nn.linear(mean, hyperflux_gates_lw);  mean = hyperflux_gates_lw = None
    matmul = linear @ hyperflux_gates_m;  linear = hyperflux_gates_m = None
    t = hyperflux_gates_m2.t();  hyperflux_gates_m2 = None
    matmul_1 = torch.matmul(matmul, t);  matmul = t = None
    return matmul_1
'''

# nn.MultiheadAttention is gated at module level; the input projection (it feeds attention) is gated,
# the classifier head of an attention model stays dense and keeps its call_module.
GOLDEN_MHA = '''
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    inp_weight = self.inp.weight
    hyperflux_gates_inp_weight = self.hyperflux_gates.inp_weight(inp_weight);  inp_weight = None
    mha_in_proj_weight = self.mha.in_proj_weight
    hyperflux_gates_mha_in_proj_weight = self.hyperflux_gates.mha_in_proj_weight(mha_in_proj_weight);  mha_in_proj_weight = None
    mha_out_proj_weight = self.mha.out_proj.weight
    hyperflux_gates_mha_out_proj_weight = self.hyperflux_gates.mha_out_proj_weight(mha_out_proj_weight);  mha_out_proj_weight = None
    inp_bias = self.inp.bias
    linear = torch._C._nn.linear(x, hyperflux_gates_inp_weight, inp_bias);  x = hyperflux_gates_inp_weight = inp_bias = None
    mha_1 = self.mha
    hyperflux_calls_mha = self.hyperflux_calls.mha(mha_1, (hyperflux_gates_mha_in_proj_weight, hyperflux_gates_mha_out_proj_weight), linear, linear, linear);  mha_1 = hyperflux_gates_mha_in_proj_weight = hyperflux_gates_mha_out_proj_weight = None
    getitem = hyperflux_calls_mha[0];  hyperflux_calls_mha = None
    add = linear + getitem;  linear = getitem = None
    mean = add.mean(1);  add = None
    out = self.out(mean);  mean = None
    return out
'''  # noqa: E501 (torch.fx's generated code, compared verbatim)


@pytest.mark.parametrize(("name", "golden"), [("residual_add", GOLDEN_RESIDUAL_ADD),
                                              ("functional_ops", GOLDEN_FUNCTIONAL_OPS),
                                              ("mha", GOLDEN_MHA)])
def test_golden_graph(name, golden):
    _, res, _ = _gated(name)
    assert res.graph_module.code.strip() == golden.strip()


def test_functional_parameters_are_gated_in_their_slots():
    res = hf.insert_gates(FunctionalOps())
    assert [g.name for g in res.report.gated] == ["cw", "lw", "m", "m2"]
    assert res.report.rule_counts == {"gate": 4, "slot:conv2d": 1, "slot:linear": 1, "slot:matmul": 2}
    reasons = {s.name: s.reason for s in res.report.skipped}
    assert "not a weight" in reasons["cb"]


def test_shared_parameter_gets_one_gate_and_tied_embedding_stays_dense():
    res = hf.insert_gates(SharedWeight())
    assert [g.name for g in res.report.gated] == ["shared.weight"]
    assert len(hf.gates(res.graph_module)) == 1
    assert res.report.rule_counts["functionalize:Linear"] == 2
    reasons = {s.name: s.reason for s in res.report.skipped}
    assert "embedding" in reasons["emb.weight"]


def test_computed_weight_is_reported_not_gated():
    res = hf.insert_gates(StandardizedConv())
    ops = [s for s in res.report.skipped if s.kind == "op"]
    assert len(ops) == 1 and "computed from parameters" in ops[0].reason and "conv2d" in ops[0].reason
    assert "not a weight" in {s.name: s.reason for s in res.report.skipped}["weight"]


def test_attention_models_keep_embedding_and_head_dense_by_default():
    _, res, _ = _gated("attention_heads")
    rep = res.report
    assert rep.model_kind == "transformer" and not rep.gate_first and not rep.gate_last
    assert [g.name for g in rep.gated] == ["qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"]
    reasons = {s.name: s.reason for s in rep.skipped}
    assert "patch embedding" in reasons["embed.weight"] and "head" in reasons["head.weight"]
    _, res_all, _ = _gated("attention_heads", hf.GateConfig(gate_first=True, gate_last=True))
    assert len(res_all.report.gated) == 6


def test_cnn_first_and_last_gated_by_default_and_switchable():
    _, res, _ = _gated("residual_add")
    assert res.report.model_kind == "cnn" and next(g.name for g in res.report.gated) == "stem.weight"
    _, res2, _ = _gated("residual_add", hf.GateConfig(gate_first=False, gate_last=False))
    assert [g.name for g in res2.report.gated] == ["conv1.weight", "conv2.weight"]


def test_include_exclude_and_min_numel():
    _, res, _ = _gated("residual_add", hf.GateConfig(include=("conv*",), exclude=("conv2.*",)))
    assert [g.name for g in res.report.gated] == ["conv1.weight"]
    reasons = {s.name: s.reason for s in res.report.skipped}
    assert "include" in reasons["stem.weight"] and "exclude" in reasons["conv2.weight"]
    _, res2, _ = _gated("residual_add", hf.GateConfig(min_numel=300))
    assert [g.name for g in res2.report.gated] == ["conv1.weight", "conv2.weight"]  # stem 216, fc 32
    assert "min_numel" in {s.name: s.reason for s in res2.report.skipped}["fc.weight"]


def test_seed_makes_flow_init_reproducible():
    _, a, _ = _gated("concat", hf.GateConfig(seed=3))
    _, b, _ = _gated("concat", hf.GateConfig(seed=3))
    _, c, _ = _gated("concat", hf.GateConfig(seed=4))
    fa, fb, fc = ([g.flow for g in hf.gates(r.graph_module)] for r in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(fa, fb, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(fa, fc, strict=True))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hf.insert_gates({"weight": torch.zeros(2)})
    with pytest.raises(TypeError, match="GateConfig"):
        hf.insert_gates(nn.Linear(2, 2), {"granularity": "weight"})
    with pytest.raises(ValueError, match="needs example_inputs"):
        hf.insert_gates(nn.Linear(2, 2), hf.GateConfig(granularity="channel"))
    with pytest.raises(ValueError, match="granularity"):
        hf.GateConfig(granularity="block")
    with pytest.raises(TypeError, match="tuple of globs"):
        hf.GateConfig(include="conv*")
    gated = hf.insert_gates(nn.Linear(2, 2)).graph_module
    with pytest.raises(ValueError, match="already gated"):
        hf.insert_gates(gated)


def test_nothing_to_gate_is_reported_unmodified():
    res = hf.insert_gates(nn.Sequential(nn.LayerNorm(4), nn.ReLU()))
    assert not res.modified and res.report.gated == [] and len(res.report.skipped) == 2


def test_report_prints_tables():
    _, res, _ = _gated("opaque_block")
    text = str(res.report)
    assert "stem.weight" in text and "block.conv.weight" in text and "module" in text
    assert "opaque modules" in text and "DataDependentBlock" in text
    d = res.report.to_dict()
    assert d["gated_elements"] == sum(g["numel"] for g in d["gated"]) == 3 * 4 * 9 + 4 * 4 * 9 + 12


def test_gated_model_survives_deepcopy_and_pickle_with_pressure(tmp_path):
    _, res, x = _gated("residual_add")
    gated = res.graph_module
    hf.set_pressure(gated, 2.0)
    path = tmp_path / "gated.pt"
    torch.save(gated, path)
    for clone in (copy.deepcopy(gated), torch.load(path, weights_only=False)):
        assert hf.get_pressure(clone) == 2.0
        n = sum(g.numel for g in hf.gates(clone))
        clone.eval()
        (clone(*x) * 0).sum().backward()  # no data gradient: the flow gradient is pure pressure
        for g in hf.gates(clone):
            torch.testing.assert_close(g.flow.grad, torch.full_like(g.flow, 2.0 / n))


def test_the_report_leads_with_the_blockers_and_the_gateable_share():
    res = hf.insert_gates(RollBranch().eval(), hf.GateConfig(granularity="channel"),
                          example_inputs=torch.randn(2, 3, 6, 6))
    report = res.report
    assert report.blockers() == [("roll over the channels", 4, 1, ["roll"])]
    assert report.gateable_share == pytest.approx(0.5)  # branch b's 4 channels of a + b's 8 (the head's 2 aside)
    text = str(report)
    assert text.index("gateable channel share 0.50") < text.index("channel groups: size")
    assert "blocked: roll over the channels: 4 channels in 1 group (at roll)" in text
    assert report.to_dict()["gateable_share"] == pytest.approx(0.5)
