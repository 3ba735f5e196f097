"""``hf:DIR`` sources: a Hugging Face transformers model from a local folder, never the hub.

DIR holds a ``config.json`` and, optionally, ``*.safetensors`` weights (random init without them).
The class is the config's first ``architectures`` entry (``LlamaForCausalLM``), else ``AutoModel``.
The model is wrapped so that it takes the inputs positionally and returns its logits (a plain call
signature, what hyperflux-compile trains and exports); the wrapper is captured with torch.export
(docs/frontends.md). A causal language model comes with the offline text set (frontend/text.py,
next-byte prediction: ``vocab_size >= 256``, checked by the CLI) and a language-modelling loss
(cross-entropy over every position); ``--data text:PATH`` trains on the user's corpus instead, tokenised
with the folder's ``tokenizer.json``. Needs ``pip install .[hf]``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hyperflux_fx.frontend.text import text_datasets

__all__ = ["hidden_size", "HFLogits", "language_model_loss", "load_hf", "quietly"]

SEQUENCE = 64  # tokens per example and per training window


class HFLogits(nn.Module):
    """A transformers model called positionally, returning ``.logits`` (``use_cache=False`` where the
    model has a cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.kwargs = {"use_cache": False} if hasattr(model.config, "use_cache") else {}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, **self.kwargs).logits


def hidden_size(model: nn.Module) -> int | None:
    """The width of a transformers model (wrapped in :class:`HFLogits` or not); None for other models."""
    inner = model.model if isinstance(model, HFLogits) else model
    config = getattr(inner, "config", None)
    return getattr(config, "hidden_size", None) if config is not None else None


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token logits ``(batch, seq, vocab)`` against ``(batch, seq)`` targets."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def quietly(load: Any) -> Any:
    """``load()`` without transformers' weight-loading progress bar (one line of errors stays one line)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load()
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_hf(folder: Path, input_shape: tuple[int, ...] | None) -> tuple[nn.Module, tuple[Any, ...], Any, Any]:
    """(model, example inputs, datasets or None, loss or None) of an ``hf:DIR`` source, as a model.py
    gives them (see the module docstring).

    Raises:
        ValueError: DIR has no config.json, an unknown architecture, or transformers is missing.
    """
    if not (folder / "config.json").is_file():
        raise ValueError(f"hf:{folder}: no config.json in that folder (hf:DIR reads a local folder, never the hub)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("hf: sources need Hugging Face transformers: pip install '.[hf]'") from exc
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ValueError(f"hf:{folder}: architecture {arch!r} is not in transformers {transformers.__version__}")
    if any(folder.glob("*.safetensors")):
        model = quietly(lambda: cls.from_pretrained(folder, local_files_only=True))
    else:
        model = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    causal = arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")
    shape = tuple(input_shape) if input_shape is not None else (2, SEQUENCE)
    inputs = (torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(0)),)
    if not causal:
        return HFLogits(model.eval()), inputs, None, None
    return HFLogits(model.eval()), inputs, functools.partial(text_datasets, shape[-1]), language_model_loss
