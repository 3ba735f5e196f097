"""Loading models from ``model.py`` / ``timm:NAME`` / ``torchvision:NAME`` / ``hf:DIR`` (random init
or local weights; nothing is downloaded)."""

from __future__ import annotations

import difflib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hyperflux_fx.frontend.hf import language_model_loss, load_hf
from hyperflux_fx.frontend.trace import normalize_inputs, short_error

__all__ = ["LoadedModel", "SourceError", "load_source"]


class SourceError(ValueError):
    """A model source (``model.py``, ``timm:NAME``, ``torchvision:NAME``) could not be loaded."""


@dataclass
class LoadedModel:
    """A model and what its source says about it."""

    model: nn.Module
    example_inputs: tuple[Any, ...]  # positional example inputs (batch of 2 by default)
    source: str  # what the user passed
    datasets: Callable[..., Any] | None = None  # model.py's datasets(), if any
    loss_fn: Callable[..., Any] | None = None  # model.py's loss_fn, if any
    frontend: str = "auto"  # the front end that captures it (hf: sources: "export")
    pretrained: bool = False  # the source brought trained weights (an hf: folder with safetensors)

    @property
    def language_model(self) -> bool:
        """A causal language model: an hf: causal LM, trained with the next-token loss."""
        return self.loss_fn is language_model_loss


def _inputs_from_shape(shape: Sequence[int]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(*shape, generator=gen),)


def _load_model_py(path: Path) -> tuple[nn.Module, tuple[Any, ...] | None, Any, Any]:
    if not path.is_file():
        raise SourceError(f"model file not found: {path}")
    mod_name = f"hyperflux_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise SourceError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise SourceError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from exc
    except Exception as exc:
        raise SourceError(f"importing {path} failed: {short_error(exc)}") from exc
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise SourceError(f"{path} defines no build_model(): add `def build_model() -> torch.nn.Module`")
    model = build()
    if not isinstance(model, nn.Module):
        raise SourceError(f"{path}: build_model() returned {type(model).__name__}, not a torch.nn.Module")
    inputs = None
    if callable(getattr(module, "example_inputs", None)):
        inputs = normalize_inputs(module.example_inputs())
    return model, inputs, getattr(module, "datasets", None), getattr(module, "loss_fn", None)


def load_source(source: str, *, input_shape: Sequence[int] | None = None, weights: str | Path | None = None,
                num_classes: int | None = None) -> LoadedModel:
    """Load ``model.py`` (``build_model()``, optional ``example_inputs()``, ``datasets()``, ``loss_fn``),
    ``timm:NAME``, ``torchvision:NAME`` (random init; nothing is downloaded) or ``hf:DIR`` (a local
    transformers folder, :mod:`hyperflux_fx.frontend.hf`).

    Args:
        source: the source string.
        input_shape: overrides the example input shape (including batch).
        weights: a state-dict file loaded with ``torch.load(weights_only=True)``.
        num_classes: classifier width for timm/torchvision models (their default when None).

    Raises:
        SourceError: with what to fix.
    """
    datasets = loss_fn = None
    frontend, pretrained = "auto", False
    if source.startswith("hf:"):
        try:
            model, inputs, datasets, loss_fn = load_hf(Path(source.split(":", 1)[1]), input_shape)
        except ValueError as exc:
            raise SourceError(str(exc)) from exc
        frontend, input_shape = "export", None
        pretrained = any(Path(source.split(":", 1)[1]).glob("*.safetensors"))
    elif source.startswith(("timm:", "torchvision:")):
        model, inputs = _library_model(source, num_classes)
    else:
        model, inputs, datasets, loss_fn = _load_model_py(Path(source))
        if inputs is None and input_shape is None:
            raise SourceError(f"{source} has no example_inputs(): add one, or pass --input-shape (e.g. 2,3,32,32)")
    if input_shape is not None:
        if not all(isinstance(d, int) and d > 0 for d in input_shape):
            raise SourceError(f"input shape must be positive integers, got {tuple(input_shape)}")
        inputs = _inputs_from_shape(tuple(input_shape))
    if weights is not None:
        _load_weights(model, Path(weights))
    assert inputs is not None
    return LoadedModel(model=model, example_inputs=inputs, source=source, datasets=datasets, loss_fn=loss_fn,
                       frontend=frontend, pretrained=pretrained)


def _library_model(source: str, num_classes: int | None) -> tuple[nn.Module, tuple[Any, ...]]:
    """``timm:NAME`` / ``torchvision:NAME``: the model (random init) and example inputs of its input size."""
    library, name = source.split(":", 1)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if library == "timm":
        import timm

        available = timm.list_models()
    else:
        import torchvision

        available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SourceError(f"unknown {library} model {name!r}{hint}")
    if library == "timm":
        model = timm.create_model(name, pretrained=False, **kwargs)
        return model, _inputs_from_shape((2, *tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))))
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model, _inputs_from_shape((2, 3, 299, 299) if name.startswith("inception") else (2, 3, 224, 224))


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise SourceError(f"weights file not found: {path}")
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise SourceError(f"cannot load weights from {path}: {short_error(exc)}") from exc
