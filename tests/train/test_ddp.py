"""Two CPU processes with the gloo backend (spawned here): DDP keeps the masks identical across ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hyperflux_fx as hf


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 10, generator=g)
        y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
        loader = DataLoader(TensorDataset(x, y), batch_size=32)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
        gated = hf.insert_gates(model, hf.GateConfig(seed=0)).graph_module
        res = hf.train(gated, loader, None, hf.TrainConfig(target_sparsity=0.7, epochs=3, regrowth_epochs=1, lr=0.05,
                                                              out_dir=os.path.join(tmp, f"out_{rank}")))
        torch.save({"masks": [gt.mask() for gt in hf.gates(gated)], "steps": res.steps, "sparsity": res.sparsity,
                    "weights": {k: v for k, v in gated.state_dict().items()}}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_process_gloo_run_keeps_masks_identical(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == 4 * 4  # 128 samples per rank, batch 32, 4 epochs in all
    assert all(torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"], strict=True))
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    assert abs(r0["sparsity"] - 0.7) < 0.01
    assert (tmp_path / "out_0" / "metrics.jsonl").exists() and not (tmp_path / "out_1").exists()
