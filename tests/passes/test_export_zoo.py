"""The export front end's models: invariant 1 (open gates: ``torch.equal`` on outputs, input and weight
gradients, eval and train, at weight and channel granularity, against the captured graph without
gates; outputs are also ``torch.equal`` to the eager model's, gradients within 1e-4 of their scale:
the capture may lay a tensor out differently, e.g. Llama's attention output, and a backward kernel
then sums in another order), invariant 2 (fold exact, float64 within
1e-9 of y - mean(y), see equivalence.py, with real deletion of heads, MLP units and the hidden width at
30/50/90% closed) and ONNX parity of the compact model (export_onnx's own check: max |ort - torch| <=
1e-5 + 1e-4 x the scale of the input-dependent output).

EXPORT_ZOO holds plain-torch models with the patterns of LLM blocks (grouped-query attention, RoPE,
RMSNorm written out, SwiGLU, GPT-2's Conv1D, a shared per-head position bias, tied LM heads); HF_ZOO
the tiny random Hugging Face configs of the acceptance list (skipped without ``pip install .[hf]``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from equivalence import assert_fold_exact, close_at_random
from models import EXPORT_ZOO, HF_ZOO, build_hf

import hyperflux_fx as hf
from hyperflux_fx.analysis.cost_model import CostModel
from hyperflux_fx.analysis.coupling.rules.heads import KV_KEPT
from hyperflux_fx.ir import FRONTEND_META


def _export_case(name: str):
    if name in EXPORT_ZOO:
        build, inputs = EXPORT_ZOO[name]
        return build().eval(), inputs(), {}
    pytest.importorskip("transformers")
    return build_hf(name)


CASES = sorted(EXPORT_ZOO) + [f"hf:{n}" for n in HF_ZOO]


def _case(name: str):
    return _export_case(name.removeprefix("hf:"))


def _pass(model, inputs, kwargs, up, train):
    model.train(train)
    xs = tuple(x.clone().requires_grad_(x.is_floating_point()) for x in inputs)
    torch.manual_seed(7)
    y = model(*xs, **kwargs)
    y = y.logits if hasattr(y, "logits") else y
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)) if up is None else up
    (y * up).sum().backward()
    return y.detach(), [x.grad for x in xs], up


@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize("name", CASES)
def test_open_gates_change_nothing(name, granularity):
    model, inputs, kwargs = _case(name)
    captured = hf.trace(copy.deepcopy(model), inputs, example_kwargs=kwargs or None, frontend="export")
    res = hf.insert_gates(model, hf.GateConfig(granularity=granularity, seed=0), example_inputs=inputs,
                          example_kwargs=kwargs or None, frontend="export")
    gated = res.graph_module
    assert gated.meta[FRONTEND_META].name == "export" and hf.gates(gated)
    for train in (False, True):
        mode = "train" if train else "eval"
        for m in (model, captured, gated):
            m.zero_grad()
        y0, g0, up = _pass(model, inputs, kwargs, None, train)
        ya, ga, _ = _pass(captured, inputs, {}, up, train)
        yb, gb, _ = _pass(gated, inputs, {}, up, train)
        assert torch.equal(y0, ya) and torch.equal(ya, yb), f"{mode}: outputs differ"
        assert all((a is None) == (b is None) and (a is None or torch.equal(a, b)) for a, b in zip(ga, gb, strict=True))
        gp, cp = dict(gated.named_parameters()), dict(captured.named_parameters())
        for pname, p in model.named_parameters():
            if p.grad is None or pname not in gp:
                continue
            assert torch.equal(gp[pname].grad, cp[pname].grad), f"{mode}: gradient of {pname}"
            torch.testing.assert_close(cp[pname].grad, p.grad, rtol=0, atol=1e-4 * float(p.grad.abs().max()) + 1e-12)


@pytest.mark.parametrize("name", CASES)
def test_fold_is_exact_and_deletes_heads_units_and_width(name, tmp_path):
    model, inputs, kwargs = _case(name)
    res = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=inputs,
                          example_kwargs=kwargs or None, frontend="export")
    gated = res.graph_module.eval()
    groups = res.report.channel_groups
    # the KV heads of grouped-query attention are kept by design (the query positions are the unit)
    kept_kv = sum(channels for why, channels, _, _ in res.report.blockers() if why == KV_KEPT)
    gated_channels, total = res.report.gateable_channels
    assert gated_channels / (total - kept_kv) >= 0.9, res.report.blockers()
    heads = [g for g in groups if g.gated and g.unit == "head"]
    width = next(g for g in groups if g.gated and any(p.startswith(("embedding", "conv")) for p in g.producers)
                 and g.unit == "channel")  # the hidden width: written by the embedding / patch embedding
    assert heads and width
    params_dense = sum(p.numel() for p in model.parameters())
    deleted_heads = 0
    for closed_fraction in (0.3, 0.5, 0.9):
        close_at_random(gated, closed_fraction)
        folded = hf.fold_masks(gated, hf.FoldConfig(round_to=1))
        compact = folded.graph_module
        assert_fold_exact(gated, compact, inputs)
        deleted = {g.name: g.deleted for g in folded.report.groups}
        assert deleted[width.name] > 0, str(folded.report)
        deleted_heads += sum(deleted[g.name] for g in heads)
        assert sum(p.numel() for p in compact.parameters()) < params_dense
        if closed_fraction == 0.5:
            report = hf.export_onnx(compact, inputs, tmp_path / "compact.onnx")
            assert report.max_abs_diff is not None
    assert deleted_heads > 0


def test_a_token_models_first_layer_is_not_taken_for_a_patch_embedding():
    """Behind the embedding look-up nothing is "the first op": at weight granularity layer 0's projections
    are gated (a transformer keeps only its patch embedding and head dense)."""
    build, inputs = EXPORT_ZOO["tiny_decoder"]
    res = hf.insert_gates(build().eval(), hf.GateConfig(granularity="weight"), example_inputs=inputs(),
                          frontend="export")
    gated = {g.name for g in res.report.gated}
    assert {f"{p}.weight" for p in ("q", "k", "v", "o", "gate", "up", "down")} <= gated


@pytest.mark.parametrize("name", ["tiny_decoder", "tiny_decoder_sdpa_gqa"])
def test_under_gqa_a_head_unit_is_one_query_position_in_every_kv_group(name):
    """4 query heads over 2 KV heads (repeated in the graph, or by sdpa's enable_gqa): the head gate has
    2 units, query position p being heads p and 2 + p; the KV heads are kept whole. Closing position 1
    deletes query heads 1 and 3 (each KV group keeps one), and the repeat follows."""
    build, inputs = EXPORT_ZOO[name]
    model = build().eval()
    res = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=inputs(),
                          frontend="export")
    gated = res.graph_module.eval()
    heads = [g for g in res.report.channel_groups if g.unit == "head"]
    query = [g for g in heads if g.gated]
    assert len(query) == 1 and query[0].size == 2
    assert sum(KV_KEPT in g.blocked for g in heads) == 2  # the k and the v heads
    gate = next(g for g in hf.gates(gated) if g.unit == "head")
    with torch.no_grad():
        gate.flow.copy_(torch.tensor([1.0, -1.0]))
    fold = hf.FoldConfig(round_to=1)
    predicted = CostModel(gated, fold).cost()
    compact = hf.fold_masks(gated, fold).graph_module
    assert_fold_exact(gated, compact, inputs())
    assert (predicted.params, predicted.macs) == hf.count_params_and_macs(compact, inputs())  # exact integers
    d = model.head_dim
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in (0, 2)])
    assert torch.equal(compact.q.weight, model.q.weight[rows])
    assert torch.equal(compact.o.weight, model.o.weight[:, rows])
    assert torch.equal(compact.k.weight, model.k.weight) and torch.equal(compact.v.weight, model.v.weight)
