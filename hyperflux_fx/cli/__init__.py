"""hyperflux-compile: learn what to prune with Hyperflux and hand back a verified compact model.

``hyperflux-compile SOURCE [flags]`` where SOURCE is ``model.py`` (``build_model()``, optional
``example_inputs()``, ``datasets()``, ``loss_fn``), ``timm:NAME``, ``torchvision:NAME`` or ``hf:DIR`` (a
local Hugging Face transformers folder: config.json, optional safetensors; ``pip install .[hf]``). The run:
dense training (unless ``--weights``), gate insertion, Hyperflux pruning + regrowth, fold, ONNX export
with parity check, latency, then ``--out`` receives compact.onnx, compact.pt, summary.json,
metrics.jsonl, checkpoints/, report.html and run.log (and, for an hf: causal LM whose layers kept the
same sizes, compact_hf/: a folder ``from_pretrained`` loads). Everything is written to ``OUT.partial``
and renamed to ``OUT`` at the end; an interrupted run continues with ``--resume``.

Exit codes: 0 success; 2 bad input (one line on stderr, nothing written: every check that can be made
before training is); 1 an error after that (training or export; the partial run and the last good
checkpoint are kept). Multi-GPU:
``torchrun --nproc-per-node N -m hyperflux_fx.cli SOURCE ...``.
"""

from __future__ import annotations

from hyperflux_fx.cli.args import build_parser
from hyperflux_fx.cli.main import main

__all__ = ["build_parser", "main"]
