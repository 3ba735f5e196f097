"""The unit timeline (timeline.npz): every channel unit's mask per interval, and the events read off it."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hyperflux_fx as hf
from hyperflux_fx.train.timeline import FLUX_EDGES, TIMELINE_FILE, flux_histogram


def _loaders():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 3, 6, 6, generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    x = centers[y] + torch.randn(256, 3, 6, 6, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), DataLoader(TensorDataset(x, y), 256)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4))


def _run(tmp_path, granularity, **cfg):
    train_loader, val_loader = _loaders()
    gated = hf.insert_gates(_cnn(), hf.GateConfig(granularity=granularity, seed=0),
                            example_inputs=torch.randn(2, 3, 6, 6)).graph_module
    config = hf.TrainConfig(epochs=4, regrowth_epochs=2, lr=0.05, out_dir=str(tmp_path), **cfg)
    return gated, hf.train(gated, train_loader, val_loader, config)


def test_the_last_row_is_what_the_fold_keeps(tmp_path):
    fold = hf.FoldConfig(round_to=4)
    gated, res = _run(tmp_path, "channel", target_sparsity=0.5, target_measure="macs", fold=fold)
    lines = hf.timeline(tmp_path)
    assert set(lines) == {g.target for g in hf.gates(gated)}
    assert all(rows.shape == (res.intervals, g.numel) for g in hf.gates(gated) for rows in [lines[g.target]])
    report = hf.fold_masks(gated, fold).report
    for group in report.groups:
        if group.name in lines:
            last = lines[group.name][-1]
            assert int(last.sum()) == group.after, group  # exactly the units the compact model keeps
    gate = next(g for g in hf.gates(gated))
    assert np.array_equal(lines[gate.target][-1], (gate.flow.detach() >= 0).numpy())
    assert lines[gate.target].dtype == bool and (tmp_path / TIMELINE_FILE).stat().st_size < 20_000


def test_weight_gates_store_one_density_per_interval(tmp_path):
    gated, res = _run(tmp_path, "weight", target_sparsity=0.8)
    lines = hf.timeline(tmp_path / TIMELINE_FILE)
    for g in hf.gates(gated):
        assert lines[g.target].shape == (res.intervals,)
        assert abs(lines[g.target][-1] - float((g.flow.detach() >= 0).float().mean())) < 1e-6


def test_unit_events():
    kept, pruned = True, False
    masks = np.array([[kept, kept, pruned],
                      [pruned, kept, pruned],
                      [pruned, pruned, kept],
                      [kept, pruned, kept]])
    ev = hf.unit_events(masks)
    # unit 0: pruned at 2, back at 4 (2 intervals pruned); unit 2: pruned at 1, back at 3 (2); unit 1 leaves at 3
    assert ev.regrowths == 2 and ev.regrown_units == 2 and sorted(ev.pruned_spells) == [2, 2]
    assert ev.survivors == 2 and ev.survivors_once_pruned == 1.0
    assert ev.departures == [(3, 1)]


def test_every_interval_records_the_flux_of_survivors_and_pruned_units(tmp_path):
    """The flux read-out (HYPERFLUX.md §8) is in the records: its step count is read before it is reset."""
    _, res = _run(tmp_path, "channel", target_sparsity=0.5)
    with_flux = [r for r in res.history if r.flux_survivors_mean is not None]
    assert len(with_flux) == len(res.history)
    assert any(r.flux_pruned_mean is not None for r in res.history)
    layer = next(iter(res.history[-1].layers.values()))
    assert layer.flux_survivors_mean is not None


def test_flux_histogram_bins_by_signed_decade_and_splits_survivors_from_pruned():
    flux = torch.tensor([3e-4, -2e-7, 0.0, 5e-13, 400.0, -1e-2])
    kept = torch.tensor([True, True, False, False, True, False])
    h = flux_histogram(flux, kept)
    assert h.shape == (2, len(FLUX_EDGES) + 1) and h[0].sum() == 3 and h[1].sum() == 3
    zero = int(np.searchsorted(FLUX_EDGES, 0.0))  # the bin between -1e-12 and 1e-12
    assert h[1, zero] == 2  # 0.0 and 5e-13: below every decade
    assert h[0, len(FLUX_EDGES)] == 1  # 400 > 1e2: the last bin
    assert h[0, int(np.searchsorted(FLUX_EDGES, 3e-4))] == 1 and h[1, int(np.searchsorted(FLUX_EDGES, -1e-2))] == 1


def test_flux_histograms_count_every_unit_of_every_gate_per_interval(tmp_path):
    """timeline.npz holds, per gate and interval, the flux distribution of its survivors and pruned units;
    the survivors' count is the timeline's kept count, and weight gates have it too (no per-unit array)."""
    for granularity, cfg in (("channel", {"target_measure": "macs"}), ("weight", {})):
        out = tmp_path / granularity
        gated, res = _run(out, granularity, target_sparsity=0.5, **cfg)
        edges, hists = hf.flux_histograms(out)
        lines = hf.timeline(out)
        assert np.array_equal(edges, FLUX_EDGES) and set(hists) == {g.target for g in hf.gates(gated)}
        for g in hf.gates(gated):
            h = hists[g.target]
            assert h.shape == (res.intervals, 2, len(FLUX_EDGES) + 1)
            assert (h.sum(axis=(1, 2)) == g.numel).all()  # every unit, every interval
            kept = lines[g.target].sum(axis=1) if granularity == "channel" else np.rint(lines[g.target] * g.numel)
            assert np.array_equal(h[:, 0].sum(axis=1), kept)
            assert h[:, 1].sum() > 0  # something was pruned, and its flux recorded


class _FourHeads(nn.Module):
    """A token embedding, 4-head SDPA attention with a residual, an MLP, a mean over the tokens."""

    def __init__(self) -> None:
        super().__init__()
        from models import SDPAAttention

        self.embed, self.attn = nn.Linear(8, 16), SDPAAttention(16, heads=4)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.embed(x))
        return self.head((x + self.mlp(x)).mean(1))


def test_a_four_head_transformer_timeline_ends_on_what_the_fold_keeps(tmp_path):
    """Heads and MLP units: every group's last timeline row is what the fold keeps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, 8, generator=g)
    y = torch.randint(0, 5, (256,), generator=g)
    train_loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    torch.manual_seed(0)
    gated = hf.insert_gates(_FourHeads(), hf.GateConfig(granularity="channel", seed=0),
                            example_inputs=torch.randn(2, 5, 8)).graph_module
    config = hf.TrainConfig(epochs=4, regrowth_epochs=2, lr=0.05, out_dir=str(tmp_path), target_sparsity=0.4,
                            target_measure="params")
    hf.train(gated, train_loader, DataLoader(TensorDataset(x, y), 256), config)
    lines = hf.timeline(tmp_path)
    report = hf.fold_masks(gated, config.fold).report
    checked = [group for group in report.groups if group.name in lines]
    assert [group.before for group in checked if group.unit == "head"] == [4] and len(checked) == len(lines)
    for group in checked:
        assert int(lines[group.name][-1].sum()) == group.after, group
    assert sum(group.deleted for group in checked) > 0  # the fold deleted units, so the check is about a real cut
