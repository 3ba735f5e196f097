"""Invariant 1 on the real model zoo (random init, fp32, eval): torchvision and timm models.

CNNs run at 3x32x32 (every one of them reaches the classifier at that size), ViTs at 3x224x224
(their position embeddings fix the size). Batch 2. Equalities are exact: with every gate open the
gated op receives ``W * 1`` which is bitwise ``W``, and the same kernels run on the same values.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import REAL_ZOO
from models import build_real as _build

import hyperflux_fx as hf

ZOO = REAL_ZOO


@pytest.mark.parametrize(("lib", "name", "size"), ZOO, ids=[f"{lib}:{name}" for lib, name, _ in ZOO])
def test_zoo_invariant_1(lib, name, size):
    model = _build(lib, name, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    res = hf.insert_gates(model, hf.GateConfig(seed=0), example_inputs=x)
    gated = res.graph_module.eval()
    rep = res.report
    n_weights = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)))
    if rep.model_kind == "transformer":
        assert {s.name for s in rep.skipped if "stays dense" in s.reason} == {"patch_embed.proj.weight", "head.weight"}
        assert len(rep.gated) == n_weights - 2
    else:
        assert len(rep.gated) == n_weights, "every conv and linear weight of a CNN is gated"
    assert rep.opaque == []

    # open gates: identical outputs and identical gradients of the original weights
    ya = model(x)
    yb = gated(x)
    assert torch.equal(ya, yb)
    up = torch.randn(ya.shape, generator=torch.Generator().manual_seed(2))
    (ya * up).sum().backward()
    (yb * up).sum().backward()
    gp = dict(gated.named_parameters())
    for pname, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(gp[pname].grad, p.grad, rtol=0, atol=0, msg=pname)
    for g in hf.gates(gated):
        assert g.flow.grad is not None and torch.isfinite(g.flow.grad).all(), g.target
        assert g.flow.grad.abs().sum() > 0, f"flow of {g.target} got an all-zero gradient"

    # random masks: equal to the original run with W * m substituted
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for g in hf.gates(gated):
            g.flow.copy_(torch.randn(g.flow.shape, generator=gen))
            params[g.target].mul_(g.mask())
        y_gated = gated(x)
        y_masked = masked(x)
        assert torch.equal(y_gated, y_masked)
        # the masks matter: the masked output moves by more than 0.1% of the output scale
        assert (y_gated - ya).abs().max() > 1e-3 * ya.abs().max()
    assert 0.45 < hf.density(gated) < 0.55
