"""Data order and distributed training: each rank's batches of an epoch (seeded, resumable), the
process group, and the check that every rank holds the same masks."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from hyperflux_fx.ir import gates
from hyperflux_fx.train.optim import resolve_device

__all__ = ["TrainingError", "check_masks_equal", "epoch_loader", "setup_distributed", "steps_per_epoch"]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, masks diverged across ranks)."""


def setup_distributed(device_spec: str) -> tuple[int, int, bool, torch.device]:
    """(rank, world size, whether this call initialised the process group, device). Under torchrun
    (WORLD_SIZE > 1) the process group is initialised here when nobody did it before."""
    we_initialised = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and device_spec != "cpu" else "gloo")
        we_initialised = True
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = resolve_device(device_spec)
    if distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, we_initialised, device


def epoch_loader(loader: DataLoader, *, epoch: int, start_batch: int, seed: int, rank: int,
                  world: int) -> DataLoader:
    """This rank's batches of ``epoch``, from batch ``start_batch`` on; the order depends only on
    (seed, epoch), so a resumed run sees the same batches."""
    n = len(loader.dataset)  # type: ignore[arg-type]
    bs = loader.batch_size or 1
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=seed, drop_last=loader.drop_last)
        sampler.set_epoch(epoch)
        order = list(sampler)
    else:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
    order = order[start_batch * bs:]
    # A dedicated generator: creating the iterator must not draw from the global RNG (it would
    # differ between a resumed and an uninterrupted run).
    gen = torch.Generator().manual_seed(seed * 7_919 + epoch)
    return DataLoader(loader.dataset, batch_size=bs, sampler=order, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      generator=gen)


def steps_per_epoch(loader: DataLoader, world: int) -> int:
    n = len(loader.dataset)  # type: ignore[arg-type]
    per_rank = n // world if loader.drop_last else math.ceil(n / world)
    bs = loader.batch_size or 1
    return per_rank // bs if loader.drop_last else math.ceil(per_rank / bs)


def _masks_fingerprint(gated: nn.Module) -> torch.Tensor:
    """(open count, position-weighted sum) of all masks: equal across ranks iff (practically) the masks are."""
    count = torch.zeros((), dtype=torch.float64)
    weighted = torch.zeros((), dtype=torch.float64)
    for i, g in enumerate(gates(gated)):
        m = (g.flow.detach() >= 0).flatten().to(torch.float64).cpu()
        count += m.sum()
        weighted += (m * torch.arange(1, m.numel() + 1, dtype=torch.float64)).sum() * (i + 1)
    return torch.stack([count, weighted])


def check_masks_equal(gated: nn.Module, world: int, device: torch.device) -> None:
    fp = _masks_fingerprint(gated).to(device)
    gathered = [torch.zeros_like(fp) for _ in range(world)]
    dist.all_gather(gathered, fp)
    if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
        raise TrainingError(f"gate masks differ across ranks: {[t.tolist() for t in gathered]}")
