"""Reading and replacing the tensors a graph reaches through ``get_attr`` targets (``"layer1.0.conv1.weight"``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["fetch_attr", "owner_of", "replace_tensor"]


def owner_of(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    """(module holding the attribute, attribute name) of a dotted target."""
    path, _, attr = target.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The object at a dotted target (parameter, buffer or module); AttributeError if missing."""
    owner, attr = owner_of(root, target)
    return getattr(owner, attr)


def replace_tensor(root: nn.Module, target: str, value: torch.Tensor) -> None:
    """Put ``value`` at ``target``: a new Parameter (same requires_grad) for a parameter, else a buffer."""
    owner, attr = owner_of(root, target)
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner._buffers[attr] = value
