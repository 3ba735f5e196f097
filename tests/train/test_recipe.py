"""The language-model recipe: AdamW with decay on conv/linear weights only, linear warm-up then cosine,
gradient-norm clipping; the paper's SGD stays the default for everything else."""

from __future__ import annotations

import argparse
import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hyperflux_fx as hf
from hyperflux_fx.cli.args import recipe_fields, resolve_recipe
from hyperflux_fx.config import DISTILL_TEMPERATURE, LANGUAGE_MODEL_RECIPE, language_model_lr
from hyperflux_fx.ir import ChannelGate
from hyperflux_fx.train.optim import (
    FlowAdam,
    clip_gradients,
    cosine,
    decayed,
    flow_optimizer,
    warmup_cosine,
    weight_optimizer,
)


@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_a_torch_export_capture_decays_the_same_linear_weights(granularity):
    """A graph captured with torch.export calls aten.linear on parameters, with no nn.Linear left to
    recognise: the decayed set is read from the graph's conv/linear weight operands (it was empty)."""
    from models import EXPORT_ZOO

    build, inputs = EXPORT_ZOO["tiny_decoder"]
    model = build()
    gm = hf.insert_gates(model, hf.GateConfig(granularity=granularity), example_inputs=inputs(),
                         frontend="export").graph_module
    names = {id(p): n for n, p in gm.named_parameters()}
    got = sorted(names[i] for i in decayed(gm) if i in names)
    linears = sorted(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear))
    assert got == linears and not any("norm" in n or "embed" in n for n in got)  # the LM head, tied: a linear too


def test_warmup_rises_linearly_then_follows_the_cosine():
    lrs = [warmup_cosine(1.0, 0.1, i, 100, 10) for i in range(100)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # reaches the peak at the last warm-up step
    assert lrs[10:] == pytest.approx([cosine(1.0, 0.1, i, 90) for i in range(90)])
    assert warmup_cosine(1.0, 0.1, 5, 100, 0) == cosine(1.0, 0.1, 5, 100)  # no warm-up: the cosine as before


def test_adamw_decays_only_conv_and_linear_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = weight_optimizer(model, list(model.parameters()), lr=1e-3, momentum=0.9, weight_decay=0.1,
                           optimizer="adamw", betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.95)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)} and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[1]["weight_decay"] == 0.0  # biases and the norm's affine
    assert isinstance(weight_optimizer(model, list(model.parameters()), lr=0.1, momentum=0.9, weight_decay=0.0),
                      torch.optim.SGD)  # the paper's, still the default
    with pytest.raises(ValueError, match="optimizer must be"):
        weight_optimizer(model, list(model.parameters()), lr=0.1, momentum=0.9, weight_decay=0.0, optimizer="lion")


def test_clipping_bounds_the_gradient_norm_and_none_leaves_it():
    p = nn.Parameter(torch.zeros(10))
    p.grad = torch.full((10,), 3.0)
    opt = torch.optim.SGD([p], lr=0.1)
    clip_gradients(opt, None)
    assert float(p.grad.norm()) == pytest.approx(3.0 * 10 ** 0.5)
    clip_gradients(opt, 1.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_the_peak_lr_follows_the_width():
    assert language_model_lr(256) == pytest.approx(1e-3)  # the anchor, measured (docs/BENCHMARKS.md)
    assert language_model_lr(1024) == pytest.approx(2.5e-4) and language_model_lr(4096) == pytest.approx(6.25e-5)
    assert language_model_lr(64) == 1e-3 and language_model_lr(16384) == 5e-5  # within the range
    assert language_model_lr(None) == 1e-4  # width unknown: the pruning papers' continued-training LR
    assert hf.TrainConfig.for_language_models(hidden_size=1024).lr == pytest.approx(2.5e-4)


def test_the_recipe_is_a_config_and_bad_values_are_refused():
    cfg = hf.TrainConfig.for_language_models(target_sparsity=0.5)
    assert (cfg.optimizer, cfg.lr, cfg.clip_grad_norm, cfg.warmup_fraction, cfg.label_smoothing) == (
        "adamw", 1e-4, 1.0, 0.03, 0.0)
    assert cfg.target_sparsity == 0.5
    assert dataclasses.replace(cfg, optimizer="sgd").optimizer == "sgd"
    for bad, match in (({"optimizer": "lion"}, "optimizer must be"), ({"warmup_fraction": 1.0}, "warmup_fraction"),
                       ({"clip_grad_norm": 0.0}, "clip_grad_norm")):
        with pytest.raises(ValueError, match=match):
            hf.TrainConfig(**bad)


@pytest.mark.parametrize(("recipe", "lm", "pretrained", "expect"), [
    ("auto", True, True, ("lm", 1e-4, 0)),  # a pretrained causal LM: its weights are the dense model
    ("auto", True, False, ("lm", 1e-4, 10)),
    ("auto", False, False, ("cnn", 0.1, 10)),
    ("cnn", True, True, ("cnn", 0.1, 0)),
])
@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_the_cli_resolves_the_recipe_from_the_source(recipe, lm, pretrained, expect, granularity):
    args = argparse.Namespace(recipe=recipe, lr=None, dense_epochs=None, epochs=None, regrowth_epochs=None,
                              distill_temperature=None, granularity=granularity)
    resolve_recipe(args, lm, pretrained)
    assert (args.recipe, args.lr, args.dense_epochs) == expect
    # the budget's split: a twelfth pruning, the rest recovery for a language model; with the CNN recipe 5 + 10
    # for a structure (the fine-tune gets most), the paper's proportions (10 + 5) for weight gates only
    cnn_split = (5, 10) if granularity == "channel" else (10, 5)
    assert (args.epochs, args.regrowth_epochs) == ((0.25, 2.75) if expect[0] == "lm" else cnn_split)
    # per token a language model distils at T 1, a classifier at the CNNs' 4
    assert args.distill_temperature == (1.0 if expect[0] == "lm" else DISTILL_TEMPERATURE)
    fields = recipe_fields(args)
    assert fields == ({} if expect[0] == "cnn" else {k: LANGUAGE_MODEL_RECIPE[k] for k in fields})
    args = argparse.Namespace(recipe=recipe, lr=3e-4, dense_epochs=2, epochs=0.5, regrowth_epochs=3,
                              distill_temperature=2.0, granularity=granularity)  # flags win
    resolve_recipe(args, lm, pretrained)
    assert (args.lr, args.dense_epochs, args.epochs, args.regrowth_epochs) == (3e-4, 2, 0.5, 3)
    assert args.distill_temperature == 2.0


def test_a_fraction_of_an_epoch_is_that_share_of_its_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    gated = hf.insert_gates(model, hf.GateConfig(granularity="channel"), example_inputs=(torch.randn(2, 6),))
    loader = DataLoader(TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,))), batch_size=8)  # 8 steps
    cfg = hf.TrainConfig(target_sparsity=0.5, epochs=0.5, regrowth_epochs=1.25, interval_steps=2, track_flux=False,
                         distill="off")
    res = hf.train(gated.graph_module, loader, None, config=cfg)
    assert res.steps == 4 + 10  # half of 8 steps pruning, 1.25 x 8 recovering
    assert [r.step for r in res.history if r.phase == "prune"] == [2, 4]
    assert res.history[-1].step == 14 and res.history[-1].epoch == 1  # the second epoch, cut short
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="TrainConfig.epochs must be"):
            hf.TrainConfig(epochs=bad)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="TrainConfig.regrowth_epochs must be"):
            hf.TrainConfig(regrowth_epochs=bad)
    assert hf.TrainConfig(regrowth_epochs=0).regrowth_epochs == 0  # no recovery phase is allowed


def test_train_with_the_recipe_warms_up_clips_and_steps_adamw(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    gated = hf.insert_gates(model, hf.GateConfig(granularity="channel"), example_inputs=(torch.randn(2, 6),))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    norms = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, m: norms.append(m) or real(ps, m))
    cfg = hf.TrainConfig.for_language_models(target_sparsity=0.5, epochs=2, regrowth_epochs=1, interval_steps=4,
                                             warmup_fraction=0.5, track_flux=False, distill="off")
    result = hf.train(gated.graph_module, loader, loader, config=cfg)
    assert norms and set(norms) == {1.0}  # every step clipped at the recipe's norm
    evaluated = [rec for rec in result.history if rec["val_metric"] is not None]
    assert evaluated and all(rec["val_loss"] is not None and rec["val_loss"] > 0 for rec in evaluated)
    with torch.no_grad():  # the last one is the trained gated model's loss per example (no label smoothing here)
        expect = float(torch.nn.functional.cross_entropy(gated.graph_module.eval()(x), y))
    assert evaluated[-1]["val_loss"] == pytest.approx(expect, rel=1e-4)
    lrs = [rec["lr"] for rec in result.history]
    assert lrs[0] < 1e-4 and max(lrs) <= 1e-4 + 1e-12  # the first interval is still warming up


def test_the_lm_recipe_fine_tunes_at_the_peak_lr_and_presses_every_unit_alike():
    lm = hf.TrainConfig.for_language_models(target_sparsity=0.5, hidden_size=256).resolved(structured=True)
    assert (lm.regrowth_lr_ratio, lm.cost_exponent) == (1.0, 0.0) and lm.regrowth_lr == pytest.approx(lm.lr)
    cnn = hf.TrainConfig(target_sparsity=0.5).resolved(structured=True)
    assert (cnn.cost_exponent, cnn.regrowth_lr) == (1.0, pytest.approx(cnn.lr))  # channel gates: LR rewinding
    weights = hf.TrainConfig(target_sparsity=0.5).resolved(structured=False)
    assert (weights.regrowth_lr_ratio, weights.regrowth_lr) == (0.3, pytest.approx(0.3 * weights.lr))
    assert hf.TrainConfig(regrowth_lr_ratio=0.3).resolved(True).regrowth_lr == pytest.approx(0.03)  # given wins
    assert (cnn.epochs, cnn.regrowth_epochs, weights.epochs, weights.regrowth_epochs) == (5, 10, 10, 5)
    assert (lm.epochs, lm.regrowth_epochs) == (0.25, 2.75)
    given = hf.TrainConfig(epochs=7, regrowth_epochs=0).resolved(True)  # given wins, 0 regrowth epochs too
    assert (given.epochs, given.regrowth_epochs) == (7, 0)
    assert hf.TrainConfig(regrowth_lr=0.01, regrowth_lr_ratio=1.0).resolved(True).regrowth_lr == 0.01  # given wins
    for bad, match in (({"cost_exponent": 1.5}, "cost_exponent"), ({"cost_exponent": -0.1}, "cost_exponent"),
                       ({"regrowth_lr_ratio": 0.0}, "regrowth_lr_ratio")):
        with pytest.raises(ValueError, match=match):
            hf.TrainConfig(**bad)


def test_the_flows_adam_is_per_element_unless_shared_is_asked():
    """flux_normalization: "element" (the paper's Adam) by default, with either kind of gate and in the LM
    recipe; "shared" only when asked."""
    for structured in (True, False):
        assert hf.TrainConfig(target_sparsity=0.5).resolved(structured).flux_normalization == "element"
    lm = hf.TrainConfig.for_language_models(target_sparsity=0.5, hidden_size=256).resolved(structured=True)
    assert lm.flux_normalization == "element"
    assert hf.TrainConfig(flux_normalization="shared").resolved(structured=True).flux_normalization == "shared"
    with pytest.raises(ValueError, match="flux_normalization"):
        hf.TrainConfig(flux_normalization="global")


def test_a_shared_second_moment_moves_flows_by_their_fluxs_magnitude():
    """Per element, Adam moves a flow with a consistent flux by one LR per step whatever its size; with one
    second moment for the group, a flux ten times larger moves its flow ten times further (so the magnitude
    counts against the decoupled pressure), at lr * m_hat / sqrt(v_hat) with v the gradients' mean square."""
    grads = torch.tensor([0.01, 0.1, -0.05, 0.0])

    def moved(optimizer_for: type, shared: bool) -> list[float]:
        flow = nn.Parameter(torch.zeros(4))
        opt = (FlowAdam([{"params": [flow], "shared": shared}], lr=0.1) if optimizer_for is FlowAdam
               else torch.optim.Adam([flow], lr=0.1))
        for _ in range(5):
            flow.grad = grads.clone()
            opt.step()
        return (-flow.detach()).tolist()

    element, shared = moved(torch.optim.Adam, False), moved(FlowAdam, True)
    assert element[0] == pytest.approx(0.5, rel=1e-4) and element[1] == pytest.approx(0.5, rel=1e-4)  # one LR a step
    assert shared[1] == pytest.approx(10 * shared[0], rel=1e-5)  # in proportion to the flux
    rms = float(grads.pow(2).mean().sqrt())
    assert shared[1] == pytest.approx(5 * 0.1 * 0.1 / rms, rel=1e-4)
    assert shared[3] == 0.0
    # a FlowAdam group without ``shared`` is Adam itself
    assert moved(FlowAdam, False) == pytest.approx(element, rel=1e-6, abs=1e-7)


def test_the_flow_optimizer_shares_only_the_channel_gates_moment_and_resumes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    gated = hf.insert_gates(model, hf.GateConfig(granularity="hybrid"),
                            example_inputs=(torch.randn(2, 6),)).graph_module
    flows = {id(g.flow): isinstance(g, ChannelGate) for g in hf.gates(gated)}
    assert set(flows.values()) == {True, False}
    assert isinstance(flow_optimizer(gated, lr=0.1, normalization="element"), torch.optim.Adam)
    opt = flow_optimizer(gated, lr=0.1, normalization="shared")
    for group in opt.param_groups:
        assert {flows[id(p)] for p in group["params"]} <= {group["shared"]}
    assert sum(len(group["params"]) for group in opt.param_groups) == len(flows)
    for g in hf.gates(gated):
        g.flow.grad = torch.randn_like(g.flow)
    opt.step()
    again = flow_optimizer(gated, lr=0.1, normalization="shared")
    again.load_state_dict(opt.state_dict())  # a checkpoint's state resumes as it was saved
    for p in (p for group in opt.param_groups for p in group["params"]):
        torch.testing.assert_close(again.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    with pytest.raises(ValueError, match="element"):
        flow_optimizer(gated, lr=0.1, normalization="global")


def test_a_channel_run_with_a_shared_flux_normalization_lands_on_its_target(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    gated = hf.insert_gates(model, hf.GateConfig(granularity="channel"),
                            example_inputs=(torch.randn(2, 6),)).graph_module
    data = TensorDataset(torch.randn(256, 6), torch.randint(0, 3, (256,)))
    loader = DataLoader(data, batch_size=32, shuffle=True)
    cfg = hf.TrainConfig(target_sparsity=0.5, epochs=4, regrowth_epochs=1, device="cpu",
                         flux_normalization="shared", out_dir=str(tmp_path))
    result = hf.train(gated, loader, loader, cfg)
    assert result.flux_normalization == "shared"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert all(st["exp_avg_sq"].dim() == 0 for st in ckpt["opt_t"]["state"].values())  # one moment per group
    assert abs(result.sparsity - 0.5) <= 0.05


def test_the_flow_lr_warms_up_over_the_first_pruning_steps_and_zero_leaves_it():
    """flow_warmup_steps=3: the flows' LR is 1/3, 2/3, then all of the schedule's flow LR at pruning steps
    1, 2, 3 (one interval a step); 0 (the paper's, the CNN recipe's) is the flow LR from the first step,
    and the LM recipe warms up over 3."""

    def flow_lrs(warmup: int) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        gated = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0),
                                example_inputs=(torch.randn(2, 6),))
        loader = DataLoader(TensorDataset(torch.randn(48, 6), torch.randint(0, 3, (48,))), batch_size=8)  # 6 steps
        cfg = hf.TrainConfig(target_sparsity=0.5, epochs=1, regrowth_epochs=0, interval_steps=1, track_flux=False,
                             distill="off", flow_warmup_steps=warmup)
        return [rec.flow_lr for rec in hf.train(gated.graph_module, loader, None, config=cfg).history]

    plain, warm = flow_lrs(0), flow_lrs(3)
    assert len(set(plain)) == 1 and plain[0] > 0
    assert warm[:4] == pytest.approx([plain[0] / 3, 2 * plain[0] / 3, plain[0], plain[0]])
    assert hf.TrainConfig.for_language_models(target_sparsity=0.5).flow_warmup_steps == 3
    assert hf.TrainConfig.for_language_models(target_sparsity=0.5).distill_temperature == 1.0
    assert hf.TrainConfig(target_sparsity=0.5).flow_warmup_steps == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="flow_warmup_steps"):
            hf.TrainConfig(flow_warmup_steps=bad)


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0])
def test_channel_pressure_follows_what_a_unit_saves_to_the_cost_exponent(exponent):
    from hyperflux_fx.ir import ChannelGate, gates
    from hyperflux_fx.train.measure import Measure

    torch.manual_seed(0)  # a wide middle layer: its units save more parameters than the first layer's
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 3))
    gm = hf.insert_gates(model, hf.GateConfig(granularity="channel"), example_inputs=(torch.randn(2, 4),)).graph_module
    measure = Measure(gm, hf.TrainConfig(target_sparsity=0.5, target_measure="params", cost_exponent=exponent))
    measure.refresh_pressure()
    channel = [g for g in gates(gm) if isinstance(g, ChannelGate)]
    assert len({g.unit_cost for g in channel}) > 1  # the groups differ in what a unit saves
    units = sum(g.numel for g in channel)
    assert sum(g.numel * g.pressure_scale for g in channel) / units == pytest.approx(1.0)  # the mean stays 1
    for a in channel:
        for b in channel:
            assert a.pressure_scale / b.pressure_scale == pytest.approx((a.unit_cost / b.unit_cost) ** exponent)


def test_uniform_cost_basis_prices_a_unit_by_the_open_fraction_not_by_which_layers_stayed_wide():
    from hyperflux_fx.ir import ChannelGate, gates
    from hyperflux_fx.train.measure import Measure

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 3))
    costs = {}
    for basis in ("current", "uniform"):
        for narrow in (1, 2):  # the same 32 units closed in the first or the second wide layer
            gm = hf.insert_gates(copy.deepcopy(model), hf.GateConfig(granularity="channel"),
                                 example_inputs=(torch.randn(2, 4),)).graph_module
            channel = [g for g in gates(gm) if isinstance(g, ChannelGate)]
            with torch.no_grad():
                channel[narrow].flow[:32] = -1.0
            Measure(gm, hf.TrainConfig(target_sparsity=0.5, target_measure="params", cost_basis=basis)
                    ).refresh_pressure()
            costs[basis, narrow] = [g.unit_cost for g in channel]
    assert costs["current", 1] != costs["current", 2]  # a layer's units cost what its neighbours kept
    assert costs["uniform", 1] == costs["uniform", 2]
    assert len(set(costs["uniform", 1])) > 1  # still priced by layer
    with pytest.raises(ValueError, match="cost_basis"):
        hf.TrainConfig(cost_basis="dense")
