"""The example model files load as hyperflux-compile loads them, and their data has the model's input shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hyperflux_fx.frontend.sources import load_source

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["mnist1d_resnet", "mnist1d_hard_cnn"])
def test_example_builds_and_its_data_fits(name):
    loaded = load_source(str(EXAMPLES / f"{name}.py"))
    out = loaded.model(*loaded.example_inputs)
    assert out.shape == (loaded.example_inputs[0].shape[0], 10)
    train, test = loaded.datasets()
    assert tuple(train[0][0].shape) == tuple(loaded.example_inputs[0].shape[1:])
    assert len(train) == 4000 and len(test) == 1000


def test_the_residual_example_couples_its_stages():
    import hyperflux_fx as hf

    loaded = load_source(str(EXAMPLES / "mnist1d_resnet.py"))
    res = hf.insert_gates(loaded.model, hf.GateConfig(granularity="channel"), example_inputs=loaded.example_inputs)
    # stem + 3 stages: one residual-stream group per stage plus one per block's inner conv (6 blocks)
    assert len(hf.gates(res.graph_module)) == 3 + 6
    with torch.no_grad():
        assert torch.equal(res.graph_module.eval()(*loaded.example_inputs), loaded.model.eval()(*loaded.example_inputs))
