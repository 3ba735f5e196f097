"""The result record every pass returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx

__all__ = ["PassResult"]


@dataclass
class PassResult:
    """What a pass returns: the new GraphModule, whether it changed anything, and its report."""

    graph_module: fx.GraphModule  # the rewritten module (a deep copy unless inplace=True)
    modified: bool  # False when the pass found nothing to do
    report: Any  # the pass's report record (e.g. GateReport), printable
