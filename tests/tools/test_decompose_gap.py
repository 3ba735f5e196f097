"""tools/decompose_gap.py: the magnitude pick counts every weight a unit's removal deletes, and folds exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import decompose_gap  # noqa: E402

import hyperflux_fx as hf  # noqa: E402


def _dense(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = decompose_gap.common.example_module("digits_cnn").build_model()
    path = tmp_path / "dense.pt"
    torch.save(model.state_dict(), path)
    return path


def test_a_residual_streams_magnitude_sums_its_producers_rows_and_consumers_columns(tmp_path):
    torch.set_num_threads(1)
    weights = _dense(tmp_path)
    sd = torch.load(weights)
    gm = decompose_gap.gated_dense("digits_cnn", weights, seed=0)
    imp = decompose_gap.magnitudes(gm)
    stream = next(path for path, g in hf.ir.named_gates(gm) if "conv2d_2" in g.producers)  # stem + layer1's conv2

    def rows(name):
        return sd[name].double().flatten(1).pow(2).sum(1)

    def cols(name):
        return sd[name].double().transpose(0, 1).flatten(1).pow(2).sum(1)

    expected = (rows("stem.0.weight") + rows("layer1.conv2.weight") + cols("layer1.conv1.weight")
                + cols("layer2.conv1.weight") + cols("layer2.shortcut.0.weight"))
    assert torch.allclose(imp[stream], expected)
    assert len(imp) == len(hf.gates(gm)) and all(v.min() > 0 for v in imp.values())


def test_the_pick_keeps_the_strongest_units_and_folds_to_exactly_their_counts(tmp_path):
    torch.set_num_threads(1)
    weights = _dense(tmp_path)
    gm = decompose_gap.gated_dense("digits_cnn", weights, seed=0)
    imp = decompose_gap.magnitudes(gm)
    counts = {path: max(1, v.numel() // 3) for path, v in imp.items()}
    keep = decompose_gap.top_k(imp, counts)
    for path, k in counts.items():
        assert int(keep[path].sum()) == k
        assert imp[path][keep[path]].min() >= imp[path][~keep[path]].max()
    x = decompose_gap.common.example_module("digits_cnn").example_inputs()[0]
    masked = decompose_gap.gated_dense("digits_cnn", weights, seed=0)
    compact = decompose_gap.compact(masked, keep)
    assert torch.allclose(compact.eval()(x), masked.eval()(x), atol=1e-5)  # the fold is exact
    widths = [int(p.shape[0]) for p in compact.parameters() if p.dim() >= 2]
    assert sorted(set(widths[:-1])) == sorted(set(counts.values()))  # every conv at its group's count
