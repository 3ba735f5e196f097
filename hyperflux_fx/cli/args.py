"""The command line: flags, their parsing (shapes, multiples, an earlier summary.json) and the checks
that need nothing but the flags (exit 2 before anything is loaded)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from hyperflux_fx.cli.job import UsageError
from hyperflux_fx.config import (
    DISTILL_ALPHA,
    DISTILL_TEMPERATURE,
    FLUX_NORMALIZATIONS,
    LANGUAGE_MODEL_RECIPE,
    PRESSURE_MODES,
    FoldConfig,
    TrainConfig,
    epoch_split,
    language_model_lr,
)
from hyperflux_fx.frontend.trace import FRONTENDS


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (expected e.g. 2,3,32,32)") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (expected positive integers, e.g. 2,3,32,32)")
    return dims


def _epochs(text: str) -> int | float:
    """An epoch count: whole (2) or a fraction of a pass over the training data (0.5)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of epochs: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a number of epochs: {text!r}")
    return int(value) if value.is_integer() else value


def _multiple(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a channel multiple: {text!r} (expected auto or an integer >= 1)")
    return value


def _round_to(text: str) -> int | str | dict[str, int]:
    """auto, an integer, or an earlier run's summary.json: the multiples that run resolved (both), and its conv
    floor (1 in a summary from before the field, which is what those runs used with their rounding)."""
    if not text.endswith(".json"):
        return _multiple(text)
    try:
        summary = json.loads(Path(text).read_text())
        return {"round_to": int(summary["round_to"]), "round_to_width": int(summary["round_to_width"]),
                "min_conv_channels": int(summary.get("min_conv_channels", 1))}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"{text}: not a summary.json with round_to and round_to_width ({exc})"
                                         ) from exc


RECIPES = ("auto", "cnn", "lm")
#: the TrainConfig fields the language-model recipe sets besides the LR (which --lr may replace)
_LM_FIELDS = ("optimizer", "betas", "weight_decay", "warmup_fraction", "clip_grad_norm", "lr_final_ratio",
              "regrowth_lr_final", "label_smoothing", "regrowth_lr_ratio", "cost_exponent", "flow_warmup_steps")
_BY_RECIPE = ("epochs", "regrowth_epochs", "distill_temperature")  # the recipe's, when not given
_DENSE_FIELDS = ("optimizer", "betas", "weight_decay", "warmup_fraction", "clip_grad_norm", "label_smoothing")


def resolve_recipe(args: argparse.Namespace, language_model: bool, pretrained: bool,
                   hidden_size: int | None = None) -> None:
    """--recipe auto: lm for a causal language model, cnn otherwise; then --lr (the LM recipe's follows the
    model's width), --epochs / --regrowth-epochs (the LM recipe prunes for 0.25 epoch and recovers
    for 2.75; the CNN recipe 5 + 10 with channel gates, 10 + 5 with weight gates), --distill-temperature
    (1 with the LM recipe, 4 else) and --dense-epochs default by it
    (an hf: folder with weights is the dense model: no dense training unless asked)."""
    if args.recipe == "auto":
        args.recipe = "lm" if language_model else "cnn"
    if args.lr is None:
        args.lr = language_model_lr(hidden_size) if args.recipe == "lm" else 0.1
    if args.dense_epochs is None:
        args.dense_epochs = 0 if pretrained else 10
    if args.recipe == "lm":
        defaults = LANGUAGE_MODEL_RECIPE
    else:
        split = epoch_split(structured=args.granularity != "weight")
        defaults = {"epochs": split[0], "regrowth_epochs": split[1],
                    "distill_temperature": TrainConfig.distill_temperature}
    for name in _BY_RECIPE:
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])


def recipe_fields(args: argparse.Namespace, dense: bool = False) -> dict[str, Any]:
    """The TrainConfig (or, ``dense``, train_dense) settings of the resolved recipe besides the LR."""
    if args.recipe != "lm":
        return {}
    return {k: LANGUAGE_MODEL_RECIPE[k] for k in (_DENSE_FIELDS if dense else _LM_FIELDS)}


def fold_config(args: argparse.Namespace) -> FoldConfig:
    """The fold the flags ask for; --round-to SUMMARY.json reuses both multiples and the conv floor that run
    resolved (an explicit --round-to-width or --min-conv-channels still wins)."""
    floor = args.min_conv_channels
    if isinstance(args.round_to, dict):
        width = args.round_to_width if args.round_to_width != "auto" else args.round_to["round_to_width"]
        floor = floor if floor != "auto" else args.round_to["min_conv_channels"]
        return FoldConfig(round_to=args.round_to["round_to"], round_to_width=width, min_conv_channels=floor)
    return FoldConfig(round_to=args.round_to, round_to_width=args.round_to_width, min_conv_channels=floor)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_learning_flags(p: argparse.ArgumentParser) -> None:
    """How the pruning learns: the pressure's form and the distillation from the dense model."""
    p.add_argument("--pressure", choices=PRESSURE_MODES, default="auto",
                   help="coupled: the paper's pressure through the flows' Adam; decoupled: applied after it, in "
                        "proportion to gamma; auto: decoupled with channel gates (docs/training.md)")
    p.add_argument("--flux-normalization", choices=FLUX_NORMALIZATIONS, default="element",
                   help="how the flows' Adam normalises the channel gates' flux: element (per unit, the paper's Adam) "
                        "or shared (one second moment for all channel units, so the flux's magnitude counts against "
                        "the decoupled pressure; docs/training.md)")
    p.add_argument("--recipe", choices=RECIPES, default="auto",
                   help="how the weights learn: cnn = SGD with momentum, cosine (the paper's); lm = AdamW, warm-up, "
                        "cosine, gradient clipping (docs/frontends.md); auto: lm for a causal language model")
    p.add_argument("--distill", choices=("auto", "off"), default="auto",
                   help="auto: with channel gates, distil from the dense model during pruning and fine-tuning when "
                        "the outputs are class logits (per token for language models); off: the task loss alone")
    p.add_argument("--distill-alpha", type=float, default=DISTILL_ALPHA,
                   help="weight of the distillation term in the loss")
    p.add_argument("--distill-temperature", type=float, default=None,
                   help=f"softmax temperature of teacher and student (default: {DISTILL_TEMPERATURE:g}; "
                        f"{LANGUAGE_MODEL_RECIPE['distill_temperature']:g} with the language-model recipe)")


def _add_fold_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uniform-layers", action="store_true",
                   help="every numbered layer keeps the same counts (query heads, KV heads, MLP units), so that a "
                        "Hugging Face config describes the result (compact_hf/); needs --target params, macs or "
                        "latency")
    p.add_argument("--round-to", type=_round_to, default="auto",
                   help="keep a conv's kept channel counts multiples of this when folding; auto = the block "
                        "ONNX Runtime's fast conv kernels need on this CPU (measured), halved while a params/MACs "
                        "target is out of reach with whole blocks; or an earlier run's summary.json: reuse the "
                        "multiples it resolved (also for --round-to-width)")
    p.add_argument("--min-conv-channels", type=_multiple, default="auto",
                   help="the fewest channels a conv layer keeps (all of a narrower one), before the rounding; auto = "
                        "16 with --round-to auto, on every CPU (halved with the block while a params/MACs target is "
                        "out of reach), else 1 (the multiple is the floor)")
    p.add_argument("--round-to-width", type=_multiple, default="auto",
                   help="the same for linear/matmul widths (MLP units, the residual width); auto = 1 (measured: "
                        "ONNX Runtime is never faster for a multiple there). "
                        "Attention heads are never rounded")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="hyperflux-compile", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Learn what to prune with Hyperflux, fold it into a smaller model, export it to ONNX "
                            "and measure it. Multi-GPU: torchrun --nproc-per-node N -m hyperflux_fx.cli SOURCE ...")
    p.add_argument("source", help="model.py (with build_model()), timm:NAME, torchvision:NAME or hf:DIR")
    p.add_argument("--data", default=None, help="digits | mnist1d | mnist1d-hard | cifar10:ROOT | cifar100:ROOT | "
                                                "imagefolder:ROOT | synthetic | text:PATH (a .txt, .jsonl or folder, "
                                                "tokenised with the hf: folder's tokenizer.json) (default: "
                                                "model.py's datasets(), else digits)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="language models: tokens per window (the example input is 2 x this); default "
                        "min(512, the model's positions) with --data text:, else 64")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="fraction of the --target measure to remove, in (0, 1) (default: 0.5 of the MACs for "
                        "channel/hybrid gates, 0.9 of the weights for weight gates)")
    p.add_argument("--granularity", choices=("weight", "channel", "hybrid"), default="channel",
                   help="gate channel groups (channels/heads/hidden units: a smaller, faster model), weights "
                        "(unstructured: a smaller file, no speed-up), or both")
    p.add_argument("--target", choices=("count", "params", "macs", "latency"), default=None,
                   help="what the sparsity counts: gated units, the compact model's exact parameters / MACs, or its "
                        "ONNX Runtime latency (predicted from a per-op timing table), against the dense model's "
                        "(default: macs for channel/hybrid gates, count for weight gates)")
    p.add_argument("--target-speedup", type=float, default=None,
                   help="aim at this ONNX Runtime speed-up: --target latency with --target-sparsity 1 - 1/X")
    p.add_argument("--epochs", type=_epochs, default=None,
                   help="pruning-phase epochs, fractions allowed (default 5; 10 with weight gates; 0.25 LM recipe)")
    p.add_argument("--regrowth-epochs", type=_epochs, default=None,
                   help="regrowth-phase epochs, fractions allowed (default 10; 5 with weight gates; 2.75 LM recipe)")
    p.add_argument("--dense-epochs", type=int, default=None,
                   help="dense training first, when --weights is not given (default: 10; 0 for an hf: folder "
                        "with weights, which is the dense model)")
    _add_learning_flags(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None,
                   help="weight learning rate (pruning phase and dense training); default: the recipe's "
                        "(0.1 with SGD, 1e-4 with the language-model recipe)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: runs/<model name>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--plan", action="store_true", help="print the gating/coupling plan and exit without training")
    p.add_argument("--no-export", action="store_true", help="skip ONNX export and latency")
    _add_fold_flags(p)
    p.add_argument("--input-shape", type=_shape, default=None, help="example input shape incl. batch, e.g. 2,3,32,32")
    p.add_argument("--weights", default=None, help="state-dict file of trained dense weights (weights_only load)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier width for timm/torchvision models")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--max-intervals", type=int, default=None,
                   help="stop after this many scheduler intervals (resumable with --resume)")
    p.add_argument("--leaf", action="append", default=[], metavar="QUALNAME", help="keep a submodule opaque")
    p.add_argument("--frontend", choices=FRONTENDS, default=None,
                   help="capture with torch.fx, torch.export, or auto: fx, then export if fx fails at the model's "
                        "own forward (default: auto; export for hf: sources)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="do not gate matching parameters")
    p.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    p.add_argument("--verbose", action="store_true", help="with --plan: list every skipped parameter")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables; errors only")
    return p


def _validate_speedup(args: argparse.Namespace) -> None:
    """--target-speedup X is --target latency --target-sparsity 1 - 1/X."""
    if args.target_speedup is None:
        return
    if args.target_sparsity is not None:
        raise UsageError("--target-speedup and --target-sparsity both set the target: give one of them")
    if not args.target_speedup > 1.0:
        raise UsageError(f"--target-speedup must be > 1 (how many times faster), got {args.target_speedup}")
    if args.target not in (None, "latency"):
        raise UsageError(f"--target-speedup is a latency target; it cannot go with --target {args.target}")
    args.target, args.target_sparsity = "latency", 1.0 - 1.0 / args.target_speedup


def validate(args: argparse.Namespace) -> Path | None:
    _validate_speedup(args)
    if args.target is None:
        args.target = "count" if args.granularity == "weight" else "macs"
    if args.target_sparsity is None:
        args.target_sparsity = 0.9 if args.granularity == "weight" else 0.5
    if not 0.0 < args.target_sparsity < 1.0:
        raise UsageError(f"--target-sparsity must be in (0, 1), got {args.target_sparsity}")
    if not 0.0 <= args.distill_alpha <= 1.0:
        raise UsageError(f"--distill-alpha must be in [0, 1], got {args.distill_alpha}")
    if args.distill_temperature is not None and not args.distill_temperature > 0:
        raise UsageError(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine (use --device cpu or auto)")
    for name in ("batch_size", "dense_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < (0 if name == "dense_epochs" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.epochs is not None and not args.epochs > 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    if args.regrowth_epochs is not None and args.regrowth_epochs < 0:
        raise UsageError(f"--regrowth-epochs must be >= 0, got {args.regrowth_epochs}")
    if args.target != "count" and args.granularity == "weight":
        raise UsageError(f"--target {args.target} needs --granularity channel or hybrid (weight gates delete no "
                         f"channel, so the {args.target} do not change)")
    if args.target == "latency" and args.no_export:
        raise UsageError("--target latency needs ONNX Runtime to time the model: drop --no-export")
    if args.plan:
        return None
    out = Path(args.out) if args.out else Path("runs") / Path(args.source.split(":")[-1]).stem
    if out.exists() and not (args.resume or args.force):
        raise UsageError(f"--out {out} exists: pass --resume to continue it or --force to replace it")
    if args.resume and not (out.with_name(out.name + ".partial").exists() or out.exists()):
        raise UsageError(f"--resume: nothing to resume in {out} (no {out.name}.partial or {out.name})")
    return out
