"""What every stage of a run shares: the Job (arguments, output paths, model, data, configs), the
usage error (exit 2), and the two ways a stage speaks (a one-line error, a progress line)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from hyperflux_fx.config import (
    FoldConfig,
    GateConfig,
    TrainConfig,
)
from hyperflux_fx.frontend.sources import LoadedModel

log = logging.getLogger("hyperflux_fx.cli")


class UsageError(Exception):
    """Bad input: exit code 2."""


def fail(message: str, code: int = 2) -> int:
    first = " ".join(str(message).split("\n")[0].split())
    print(f"hyperflux-compile: error: {first}", file=sys.stderr)
    return code


def say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text)
    log.info(text)


@dataclass
class Job:
    """What every stage of a compile run reads: the arguments, where to write, the model and data."""

    args: argparse.Namespace
    out: Path  # the finished run's directory
    partial: Path  # where the run writes until it is finished
    loaded: LoadedModel
    train_loader: DataLoader
    val_loader: DataLoader
    data_name: str
    gate_cfg: GateConfig
    device: str  # "cuda" or "cpu"
    t_start: float
    train_cfg: TrainConfig = field(default_factory=TrainConfig)  # checked before anything was written

    @property
    def fold(self) -> FoldConfig:  # the run's fold (round_to resolved for the target)
        return self.train_cfg.fold

    @property
    def inputs(self) -> tuple[Any, ...]:
        return self.loaded.example_inputs
