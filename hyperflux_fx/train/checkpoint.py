"""Checkpoints: atomic saves of everything a run needs to continue bit-identically, and the
fingerprint that refuses to resume a different run."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hyperflux_fx.config import TrainConfig
from hyperflux_fx.ir import gates

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "RUN_ONLY_FIELDS", "atomic_save", "checkpoint_problems",
           "fingerprint", "load_checkpoint", "rng_state", "set_rng_state"]

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 2  # 2: the fingerprint holds every TrainConfig field


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# TrainConfig fields that say how a run is carried out, not what it computes: a resume may change them
RUN_ONLY_FIELDS = frozenset({"out_dir", "resume", "progress", "max_intervals", "latency_cache", "device", "compile"})


def fingerprint(gated: nn.Module, cfg: TrainConfig, *, interval_steps: int, flow_lr: float, batch_size: int,
                 dataset_len: int, world: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: every TrainConfig field (its fold
    included, resolved) but :data:`RUN_ONLY_FIELDS`, derived from the dataclass so a new field is
    covered, and what the loader and the gates make of it."""
    config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in RUN_ONLY_FIELDS}
    config["fold"] = dataclasses.asdict(cfg.fold)
    return {
        **config, "gates": {g.target: list(g.flow.shape) for g in gates(gated)},
        "interval_steps": interval_steps, "flow_lr": flow_lr, "batch_size": batch_size, "dataset_len": dataset_len,
        "world_size": world,
    }


def _mismatch(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key == "gates" and a != b:
            a, b = a or {}, b or {}
            only_saved = sorted(set(a) - set(b))[:3]
            only_now = sorted(set(b) - set(a))[:3]
            shapes = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:3]
            out.append(f"gates differ (only in checkpoint: {only_saved}, only now: {only_now}, shape: {shapes})")
        elif a != b:
            out.append(f"{key}: checkpoint={a!r}, now={b!r}")
    return out


def _problems(ckpt: dict[str, Any], now: dict[str, Any]) -> list[str]:
    problems = _mismatch(ckpt.get("fingerprint", {}), now)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        problems.insert(0, f"format: checkpoint={ckpt.get('format')!r}, now={CHECKPOINT_FORMAT}")
    return problems


def checkpoint_problems(path: Path, now: dict[str, Any]) -> list[str]:
    """How the checkpoint at ``path`` differs from the run fingerprinted ``now`` ([] when it matches)."""
    return _problems(torch.load(path, map_location="cpu", weights_only=True), now)


def load_checkpoint(path: Path, now: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The checkpoint at ``path``, after checking that it belongs to the run fingerprinted ``now``.

    Raises:
        ValueError: the checkpoint's format or fingerprint does not match this run.
    """
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if problems := _problems(ckpt, now):
        raise ValueError(f"checkpoint {path} does not match this run: " + "; ".join(problems))
    return ckpt
