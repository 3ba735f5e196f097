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

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from hyperflux_fx.analysis.cost import count_costs
from hyperflux_fx.analysis.cost_model import MEASURES, CostModel
from hyperflux_fx.analysis.latency_model import LatencyModel, cache_key, cache_path
from hyperflux_fx.analysis.runtime import resolve_fold_config
from hyperflux_fx.config import (
    DISTILL_ALPHA,
    DISTILL_TEMPERATURE,
    PRESSURE_MODES,
    FoldConfig,
    GateConfig,
    TrainConfig,
)
from hyperflux_fx.export.hf_folder import NotUniform, check_hf_folder, save_hf_folder
from hyperflux_fx.export.latency import compare_latency
from hyperflux_fx.export.onnx import ExportCheckError, ExportError, export_onnx
from hyperflux_fx.frontend.data import DataError, resolve_datasets
from hyperflux_fx.frontend.hf import language_model_loss
from hyperflux_fx.frontend.sources import LoadedModel, SourceError, load_source
from hyperflux_fx.frontend.trace import FRONTENDS, ExampleInputError, TraceError, modes_restored, trace
from hyperflux_fx.ir import TRAINING_ONLY_META, gates
from hyperflux_fx.passes import PassResult, fold_masks, insert_gates
from hyperflux_fx.report.html import render_report
from hyperflux_fx.report.outdir import OutputLocked, RunLock, atomic_write_text
from hyperflux_fx.report.rerender import rerender, save_reports
from hyperflux_fx.report.summary import FASTER, asked_and_got, headline, slower_note, speedup
from hyperflux_fx.train.dense import train_dense
from hyperflux_fx.train.distributed import TrainingError
from hyperflux_fx.train.evaluate import evaluate, evaluate_loss
from hyperflux_fx.train.loop import TrainResult, resume_problems, train
from hyperflux_fx.train.measure import Measure, fold_within_reach
from hyperflux_fx.train.recorder import tracking
from hyperflux_fx.train.timeline import TIMELINE_FILE, timeline

__all__ = ["build_parser", "main"]

log = logging.getLogger("hyperflux_fx.cli")


class UsageError(Exception):
    """Bad input: exit code 2."""


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (expected e.g. 2,3,32,32)") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (expected positive integers, e.g. 2,3,32,32)")
    return dims


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
    """auto, an integer, or an earlier run's summary.json: the multiples that run resolved (both)."""
    if not text.endswith(".json"):
        return _multiple(text)
    try:
        summary = json.loads(Path(text).read_text())
        return {"round_to": int(summary["round_to"]), "round_to_width": int(summary["round_to_width"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"{text}: not a summary.json with round_to and round_to_width ({exc})"
                                         ) from exc


def _fold_config(args: argparse.Namespace) -> FoldConfig:
    """The fold the flags ask for; --round-to SUMMARY.json reuses both multiples that run resolved
    (an explicit --round-to-width still wins)."""
    if isinstance(args.round_to, dict):
        width = args.round_to_width if args.round_to_width != "auto" else args.round_to["round_to_width"]
        return FoldConfig(round_to=args.round_to["round_to"], round_to_width=width)
    return FoldConfig(round_to=args.round_to, round_to_width=args.round_to_width)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_learning_flags(p: argparse.ArgumentParser) -> None:
    """How the pruning learns: the pressure's form and the distillation from the dense model."""
    p.add_argument("--pressure", choices=PRESSURE_MODES, default="auto",
                   help="coupled: the paper's pressure through the flows' Adam; decoupled: applied after it, in "
                        "proportion to gamma; auto: decoupled with channel gates (docs/training.md)")
    p.add_argument("--distill", choices=("auto", "off"), default="auto",
                   help="auto: with channel gates, distil from the dense model during pruning and fine-tuning when "
                        "the outputs are class logits (per token for language models); off: the task loss alone")
    p.add_argument("--distill-alpha", type=float, default=DISTILL_ALPHA,
                   help="weight of the distillation term in the loss")
    p.add_argument("--distill-temperature", type=float, default=DISTILL_TEMPERATURE,
                   help="softmax temperature of teacher and student")


def _add_fold_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round-to", type=_round_to, default="auto",
                   help="keep a conv's kept channel counts multiples of this when folding; auto = the block "
                        "ONNX Runtime's fast conv kernels need on this CPU (measured), halved while a params/MACs "
                        "target is out of reach with whole blocks; or an earlier run's summary.json: reuse the "
                        "multiples it resolved (also for --round-to-width)")
    p.add_argument("--round-to-width", type=_multiple, default="auto",
                   help="the same for linear/matmul widths (MLP units, the residual width); auto = 1 (measured: "
                        "ONNX Runtime is never faster for a multiple there). "
                        "Attention heads are never rounded")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hyperflux-compile", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    p.add_argument("--epochs", type=int, default=10, help="pruning-phase epochs")
    p.add_argument("--regrowth-epochs", type=int, default=5, help="regrowth-phase epochs")
    p.add_argument("--dense-epochs", type=int, default=10, help="dense training first, when --weights is not given")
    _add_learning_flags(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="weight learning rate (pruning phase and dense training)")
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


def _fail(message: str, code: int = 2) -> int:
    first = " ".join(str(message).split("\n")[0].split())
    print(f"hyperflux-compile: error: {first}", file=sys.stderr)
    return code


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text)
    log.info(text)


def _report_command(argv: list[str]) -> int:
    """``hyperflux-compile report RUN_DIR``: report.html again from what the run left (report/rerender.py)."""
    p = _Parser(prog="hyperflux-compile report", description="Render report.html again from a finished run "
                "(--out) or an interrupted one (--out.partial), without training.")
    p.add_argument("run_dir", help="the run's --out (its .partial is used when the run was interrupted)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    out = Path(args.run_dir.removesuffix(".partial"))
    try:
        with RunLock(out):
            page, stopped = rerender(args.run_dir)
    except OutputLocked as exc:
        return _fail(str(exc))
    except (FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    print(f"{page}" + (f"  ({stopped})" if stopped else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return _report_command(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(format="%(levelname)s %(message)s")
    for h in logging.getLogger().handlers:  # the console shows warnings (errors with --quiet); run.log has all
        if not isinstance(h, logging.FileHandler):
            h.setLevel(logging.ERROR if args.quiet else logging.WARNING)
    try:
        return _run(args)
    except UsageError as exc:
        return _fail(str(exc))


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


def _validate(args: argparse.Namespace) -> Path | None:
    _validate_speedup(args)
    if args.target is None:
        args.target = "count" if args.granularity == "weight" else "macs"
    if args.target_sparsity is None:
        args.target_sparsity = 0.9 if args.granularity == "weight" else 0.5
    if not 0.0 < args.target_sparsity < 1.0:
        raise UsageError(f"--target-sparsity must be in (0, 1), got {args.target_sparsity}")
    if not 0.0 <= args.distill_alpha <= 1.0:
        raise UsageError(f"--distill-alpha must be in [0, 1], got {args.distill_alpha}")
    if not args.distill_temperature > 0:
        raise UsageError(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine (use --device cpu or auto)")
    for name in ("epochs", "batch_size", "dense_epochs"):
        if getattr(args, name) < (0 if name == "dense_epochs" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.regrowth_epochs < 0:
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


def _num_classes(model: Any, inputs: tuple[Any, ...]) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise UsageError("the model's output is not (batch, classes) logits: give model.py a loss_fn and datasets()")
    return int(out.shape[-1])


@dataclass
class _Job:
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


def _run(args: argparse.Namespace) -> int:
    out = _validate(args)
    lock = None
    if out is not None and int(os.environ.get("RANK", "0")) == 0:  # under DDP only rank 0 writes, and locks
        try:
            lock = RunLock(out).acquire()  # before anything is written; held until OUT.partial is OUT
        except OutputLocked as exc:
            raise UsageError(str(exc)) from exc
    try:
        return _run_locked(args, out)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(args: argparse.Namespace, out: Path | None) -> int:
    torch.manual_seed(args.seed)
    loaded = _load(args)
    gate_cfg = GateConfig(granularity=args.granularity, exclude=tuple(args.exclude), seed=args.seed,
                          cost=args.target if args.target in ("params", "macs") else "count")  # a first guess
    try:
        gm = trace(loaded.model, loaded.example_inputs, leaf_modules=tuple(args.leaf), frontend=loaded.frontend)
        if args.plan:
            t0 = time.perf_counter()
            res = insert_gates(gm, gate_cfg, example_inputs=loaded.example_inputs, inplace=True)
            return _print_plan(args, loaded, res, time.perf_counter() - t0)
        res = insert_gates(gm, gate_cfg, example_inputs=loaded.example_inputs)  # validate gating before any work
        if not gates(res.graph_module):
            raise ValueError(f"nothing to prune at --granularity {args.granularity}: {res.report.why_nothing_gated()}")
        _check_open_gates_change_nothing(loaded, res.graph_module)
    except (TraceError, ExampleInputError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    train_set, val_set, data_name = _datasets(args, loaded)
    assert out is not None
    train_cfg = _preflight(args, out, res, train_set)
    return _compile(args, out, loaded, train_set, val_set, data_name, gate_cfg, train_cfg)


def _train_config(args: argparse.Namespace, partial: Path) -> TrainConfig:
    return TrainConfig(target_sparsity=args.target_sparsity, epochs=args.epochs, regrowth_epochs=args.regrowth_epochs,
                       lr=args.lr, seed=args.seed, device=args.device, out_dir=str(partial), resume=args.resume,
                       progress=not args.quiet, max_intervals=args.max_intervals,
                       target_measure=args.target, fold=_fold_config(args), pressure=args.pressure,
                       distill=args.distill, distill_alpha=args.distill_alpha,
                       distill_temperature=args.distill_temperature)


def _preflight(args: argparse.Namespace, out: Path, res: PassResult, train_set: Dataset) -> TrainConfig:
    """The run's TrainConfig, after every check that can be made before the first byte is written: the
    target within reach of the fold (params/MACs), and a --resume whose checkpoint matches these
    settings. A usage error (exit 2, nothing written) otherwise."""
    try:
        cfg = _train_config(args, out.with_name(out.name + ".partial"))
        cfg = dataclasses.replace(cfg, fold=fold_within_reach(res.graph_module, cfg))
        if cfg.target_measure in MEASURES:
            Measure(res.graph_module, cfg)  # raises when closing every gated unit cannot reach the target
        loader = DataLoader(train_set, batch_size=args.batch_size)
        if problems := resume_problems(res.graph_module, loader, cfg):
            raise UsageError(f"--resume: {cfg.out_dir} was started with other settings ({'; '.join(problems)}): "
                             f"resume with that run's flags, or start again with --force")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return cfg


def _check_open_gates_change_nothing(loaded: LoadedModel, gated: Any) -> None:
    """Invariant 1 on the example inputs, before any training: in eval mode the gated model gives the
    model's outputs exactly, twice the same. ValueError (a usage error) when it does not."""
    model = loaded.model
    with modes_restored(model, gated), torch.no_grad():
        model.eval()
        gated.eval()
        want = model(*loaded.example_inputs)
        got, again = gated(*loaded.example_inputs), gated(*loaded.example_inputs)
    want, got, again = ([y for y in torch.utils._pytree.tree_leaves(out) if isinstance(y, torch.Tensor)]
                        for out in (want, got, again))
    if not all(torch.equal(a, b) for a, b in zip(got, again, strict=True)):
        raise ValueError("the model is not deterministic in eval mode (two passes of the gated model on the example "
                         "inputs differ): a dropout called with training=True or the default, or random ops in "
                         "forward. Pass training=self.training to them; hyperflux-compile needs an eval function")
    if len(want) != len(got) or not all(torch.equal(a, b) for a, b in zip(want, got, strict=True)):
        worst = max((float((a.double() - b.double()).abs().max()) for a, b in zip(want, got, strict=False)
                     if a.shape == b.shape and a.numel()), default=float("nan"))
        notes = "; ".join(c.message for c in gated.meta.get(TRAINING_ONLY_META, []))
        raise ValueError(f"the gated model differs from the model in eval mode on the example inputs (max |diff| "
                         f"{worst:.3g}){': ' + notes if notes else ''}. Its graph cannot be kept exact")


def _sequence_length(args: argparse.Namespace) -> None:
    """--seq-len (or text:'s default, min(512, the model's positions)) as the example input shape of an
    hf: source."""
    if not args.source.startswith("hf:") or args.input_shape is not None:
        if args.seq_len is not None:
            raise UsageError("--seq-len is for hf: sources without --input-shape (it sets the input shape to "
                             "2 x seq_len)")
        return
    config = Path(args.source[3:]) / "config.json"
    try:
        settings = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # load_source says what is wrong with the folder
    positions = settings.get("max_position_embeddings") or settings.get("n_positions")
    if args.seq_len is None and (args.data or "").startswith("text:"):
        args.seq_len = min(512, positions or 512)
    if args.seq_len is None:
        return
    if args.seq_len < 1 or (positions and args.seq_len > positions):
        raise UsageError(f"--seq-len {args.seq_len}: the model takes 1 to {positions} positions")
    args.input_shape = (2, args.seq_len)


def _load(args: argparse.Namespace) -> LoadedModel:
    _sequence_length(args)
    try:
        loaded = load_source(args.source, input_shape=args.input_shape, weights=args.weights,
                             num_classes=args.num_classes)
        loaded.frontend = args.frontend or loaded.frontend
        return loaded
    except SourceError as exc:
        raise UsageError(str(exc)) from exc
    except Exception as exc:  # build_model() itself failing
        raise UsageError(f"building the model failed: {type(exc).__name__}: {exc}") from exc


def _datasets(args: argparse.Namespace, loaded: LoadedModel) -> tuple[Dataset, Dataset, str]:
    """(train, val, name) from model.py's datasets() or --data (digits by default)."""
    inputs = loaded.example_inputs
    sample_shape = tuple(inputs[0].shape[1:])
    if (args.data or "").startswith("text:") and loaded.loss_fn is None:
        raise UsageError(f"--data {args.data} trains a language model: give an hf: source of a causal LM (or a "
                         "model.py with a loss_fn for next-token targets)")
    num_classes = None
    try:
        if args.data is None and loaded.datasets is not None:
            train_set, val_set = loaded.datasets()
            data_name = f"{args.source}:datasets()"
        else:
            data_name = args.data or "digits"
            tokenizer_dir = args.source[3:] if args.source.startswith("hf:") else None
            num_classes = _num_classes(loaded.model, inputs)
            train_set, val_set = resolve_datasets(data_name, sample_shape=sample_shape, num_classes=num_classes,
                                                  seed=args.seed, tokenizer_dir=tokenizer_dir)
    except DataError as exc:
        raise UsageError(str(exc)) from exc
    _check_token_ids(train_set, lambda: num_classes or _num_classes(loaded.model, inputs))
    got = tuple(train_set[0][0].shape)
    if got != sample_shape:
        raise UsageError(f"the data's inputs have shape {got} but the model's example input is {sample_shape}")
    return train_set, val_set, data_name


def _check_token_ids(train_set: Dataset, vocabulary: Callable[[], int]) -> None:
    """Token ids (integer inputs) must index the model's vocabulary (its output width, ``vocabulary()``:
    a forward pass, made only for integer inputs and only when the data step has not made it)."""
    tensors = getattr(train_set, "tensors", None)
    if not tensors or tensors[0].is_floating_point() or not tensors[0].numel():
        return
    vocab = vocabulary()
    if int(tensors[0].max()) >= vocab:
        raise UsageError(f"the data's token ids go up to {int(tensors[0].max())} but the model predicts {vocab} "
                         "tokens (the offline text set is bytes, 0-255: give the model a vocab_size >= 256, or "
                         "--data text:PATH with the folder's tokenizer)")


def _print_plan(args: argparse.Namespace, loaded: LoadedModel, res: PassResult, seconds: float) -> int:
    report = res.report
    if args.quiet:
        return 0
    if args.json:
        data = report.to_dict()
        data["source"] = args.source
        data["seconds"] = {"insert_gates": seconds}
        data["latency_cache_key"] = cache_key()
        print(json.dumps(data, indent=2))
        return 0
    total = sum(p.numel() for p in loaded.model.parameters())
    print(f"source: {args.source}  example input: {[tuple(x.shape) for x in loaded.example_inputs]}")
    print(f"parameters: {total:,}  gated units: {report.gated_elements:,}  insert_gates: {seconds:.2f}s")
    print()
    print(report.text(verbose=args.verbose))
    if args.verbose:
        key = cache_key()
        isa = ",".join(key["isa"]) or "-"
        print(f"\nlatency cache key (--target-speedup's op table): cpu {key['cpu']!r}, isa {isa}, "
              f"{key['threads']} thread, onnxruntime {key['ort']}, NCHWc block {key['nchwc_block']}, "
              f"table schema {key['schema']} ({cache_path().name})")
    return 0


def _compile(args: argparse.Namespace, out: Path, loaded: LoadedModel, train_set: Dataset, val_set: Dataset,
             data_name: str, gate_cfg: GateConfig, train_cfg: TrainConfig) -> int:
    """Prepare OUT.partial and its run.log, then run the stages."""
    t_start = time.perf_counter()
    if args.force and out.exists() and not args.resume:
        shutil.rmtree(out)
    partial = out.with_name(out.name + ".partial")
    if args.resume and out.exists() and not partial.exists():
        out.rename(partial)  # a finished run resumed: re-run its tail from the checkpoint
    if not args.resume and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(partial / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("hyperflux_fx")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    device = "cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) else "cpu"
    job = _Job(args=args, out=out, partial=partial, loaded=loaded,
               train_loader=DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers),
               val_loader=DataLoader(val_set, batch_size=max(args.batch_size, 256), num_workers=args.workers),
               data_name=data_name, gate_cfg=gate_cfg, device=device, t_start=t_start, train_cfg=train_cfg)
    try:
        return _pipeline(job)
    finally:
        root.removeHandler(handler)
        handler.close()


def _pipeline(job: _Job) -> int:
    """dense -> Hyperflux -> fold -> export -> report; returns the exit code."""
    args = job.args
    _say(args, f"hyperflux-compile {args.source} -> {job.out}  (data: {job.data_name}, device: {job.device})")
    dense_acc = _dense_stage(job)
    gated_res, result, code = _hyperflux_stage(job)
    if result is None:
        return code
    gated = gated_res.graph_module.cpu()
    folded, summary = _fold_stage(job, gated, result, dense_acc)
    if not args.no_export:
        failure = _export_stage(job, folded.graph_module, summary)
        if failure is not None:
            return failure
    _save_compact(job, folded.graph_module)
    summary.update(_hf_folder(job, folded.graph_module))
    summary["wall_seconds"] = time.perf_counter() - job.t_start
    _report_stage(job, summary, result, gated_res, folded)
    return 0


def _dense_stage(job: _Job) -> float:
    """[1/5] the dense model: --weights, the interrupted run's, trained here, or random init."""
    args, model = job.args, job.loaded.model
    dense_file = job.partial / "dense.pt"
    if args.weights:
        note = f"loaded from {args.weights}"
    elif args.resume and dense_file.exists():
        model.load_state_dict(torch.load(dense_file, map_location="cpu", weights_only=True))
        note = "loaded from the interrupted run"
    elif args.dense_epochs > 0:
        _say(args, f"[1/5] dense training: {args.dense_epochs} epochs")
        train_dense(model, job.train_loader, epochs=args.dense_epochs, lr=args.lr, seed=args.seed, device=job.device,
                    loss_fn=job.loaded.loss_fn, progress=not args.quiet)
        model.cpu()
        torch.save(model.state_dict(), dense_file)
        note = f"trained {args.dense_epochs} epochs"
    else:
        note = "random init (--dense-epochs 0)"
    acc = evaluate(model.to(job.device), job.val_loader)
    model.cpu()
    _say(args, f"      dense model ({note}): val accuracy {acc:.4f}")
    return acc


def _hyperflux_stage(job: _Job) -> tuple[PassResult, TrainResult | None, int]:
    """[2/5] gates + Hyperflux training; (gate result, train result or None to stop, exit code)."""
    args = job.args
    res = insert_gates(job.loaded.model, job.gate_cfg, example_inputs=job.inputs, leaf_modules=tuple(args.leaf),
                       frontend=job.loaded.frontend)
    save_reports(job.partial, gates=res.report.to_dict())  # for `hyperflux-compile report` on any run
    _say(args, f"[2/5] Hyperflux: target sparsity {args.target_sparsity} ({args.target}), granularity "
               f"{args.granularity}, {args.epochs} pruning + {args.regrowth_epochs} regrowth epochs")
    cfg = job.train_cfg
    preferred = resolve_fold_config(_fold_config(args)).round_to
    if job.fold.round_to != preferred:
        _say(args, f"      round_to {job.fold.round_to}: with whole blocks of {preferred} channels (ONNX Runtime's on "
                   f"this CPU) {args.target_sparsity} of the {args.target} is out of reach")
    try:
        latency = _latency_model(job, res.graph_module, cfg) if args.target == "latency" else None
        result = train(res.graph_module, job.train_loader, job.val_loader, cfg, loss_fn=job.loaded.loss_fn,
                       latency_model=latency, teacher=job.loaded.model)  # the dense model is the teacher
        if result.completed:
            (job.partial / "latency_dense.onnx").unlink(missing_ok=True)
    except TrainingError as exc:
        log.error("%s", exc)
        return res, None, _fail(f"training failed: {exc} (resume with --resume after fixing the cause)", code=1)
    except ValueError as exc:  # the checks before any write passed: an error here keeps the partial run
        log.error("%s", exc)
        return res, None, _fail(f"training failed: {exc} (partial run kept in {job.partial})", code=1)
    if not result.completed:
        _say(args, f"stopped after {result.intervals} intervals (--max-intervals); continue with --resume. "
                   f"Partial run in {job.partial}")
        return res, None, 0
    return res, result, 0


def _latency_model(job: _Job, gated: Any, cfg: TrainConfig) -> LatencyModel:
    """The latency table (cached per machine) of the gated model, calibrated on whole models measured
    in ONNX Runtime: the dense one and nine compact ones (:func:`_calibration_closed`). The
    measurements are kept in OUT.partial, so a resumed run uses the same calibration."""
    model = LatencyModel(CostModel(gated, cfg.fold), progress=not job.args.quiet)
    info = f"{model.measured} op timings measured in {model.build_seconds:.1f} s" if model.measured else "cached"
    _say(job.args, f"      latency table of {len(model.ops)} ops: {info} ({model.path})")
    points = _saved_calibration(job)
    if points is None:
        points = _calibration_points(job, gated, model, cfg.fold)
        atomic_write_text(job.partial / CALIBRATION_FILE, json.dumps({"key": cache_key(), "points": points}))
    model.calibrate(points)
    model.measure = lambda: _measured_fraction(job, gated, cfg.fold)
    worst = max(abs(p["predicted_ms"] / p["measured_ms"] - 1) for p in model.calibration)
    _say(job.args, f"      calibrated on {len(points)} whole models (dense {points[0][1]:.3f} ms); "
                   f"largest fit error {100 * worst:.1f}%")
    return model


CALIBRATION_FILE = "latency_calibration.json"


def _saved_calibration(job: _Job) -> list[tuple[dict[int, int], float]] | None:
    """The calibration a resumed run measured, if it was measured on a machine of this cache key."""
    path = job.partial / CALIBRATION_FILE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or saved.get("key") != cache_key():
        _say(job.args, f"      {CALIBRATION_FILE} was measured on another machine (or an older table): measured "
                       "again here")
        return None
    return [({int(g): n for g, n in k.items()}, ms) for k, ms in saved["points"]]


def _dense_onnx(job: _Job) -> Path:
    """The dense model's export the latency target measures against (in OUT.partial while training)."""
    path = job.partial / "latency_dense.onnx"
    if not path.exists():
        export_onnx(job.loaded.model.eval(), job.inputs, path)
    return path


def _measured_fraction(job: _Job, gated: Any, fold: FoldConfig) -> float:
    """Compact / dense ONNX Runtime latency of the current masks, measured side by side."""
    compact = fold_masks(copy.deepcopy(gated).cpu(), fold, inplace=True).graph_module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(compact, job.inputs, Path(tmp) / "landing.onnx")
        dense, mine = compare_latency([_dense_onnx(job), Path(tmp) / "landing.onnx"], batch=int(job.inputs[0].shape[0]))
    _say(job.args, f"      landing check: compact {mine['median_ms']:.3f} ms, dense {dense['median_ms']:.3f} ms")
    return mine["median_ms"] / dense["median_ms"]


CALIBRATION_UNIFORM = (0.25, 0.5, 0.75)  # every group closed at this fraction
CALIBRATION_MIXED = 6  # compact models with each group closed at its own random fraction in [0.1, 0.9]


def _calibration_closed(gated: Any) -> list[list[float]]:
    """Per calibration model, the fraction of each gate's units to close: the dense model, three
    uniform ones and six mixed ones. Learned masks are uneven across layers, and a fit on uniform
    models alone misses mixed ones (docs/BENCHMARKS.md, "Measurements behind the design")."""
    n = len(gates(gated))
    gen = torch.Generator().manual_seed(1234)
    mixed = [(0.1 + 0.8 * torch.rand(n, generator=gen)).tolist() for _ in range(CALIBRATION_MIXED)]
    return [[0.0] * n] + [[c] * n for c in CALIBRATION_UNIFORM] + mixed


def _calibration_points(job: _Job, gated: Any, model: LatencyModel, fold: FoldConfig
                        ) -> list[tuple[dict[int, int], float]]:
    """(kept units per group, measured ms) of the dense model and of the compact models of
    :func:`_calibration_closed` (the flows are restored afterwards)."""
    batch = int(job.inputs[0].shape[0])
    flows = [g.flow.detach().clone() for g in gates(gated)]
    counts, paths = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, closed in enumerate(_calibration_closed(gated)):
                gen = torch.Generator().manual_seed(i)
                with torch.no_grad():
                    for g, f, c in zip(gates(gated), flows, closed, strict=True):
                        g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - c if i else f.abs() + 1e-3)
                counts.append(model.cost_model.counts())
                if not i:
                    paths.append(_dense_onnx(job))
                    continue
                paths.append(Path(tmp) / f"calibration{i}.onnx")
                export_onnx(fold_masks(gated, fold).graph_module.eval(), job.inputs, paths[-1])
            return _paired_ms(counts, paths, batch)
    finally:  # the run's own flows, also when an export or a measurement fails
        with torch.no_grad():
            for g, f in zip(gates(gated), flows, strict=True):
                g.flow.copy_(f)


def _paired_ms(counts: list[dict[int, int]], paths: list[Path], batch: int) -> list[tuple[dict[int, int], float]]:
    """(counts, ms) with paths[0] the dense model: each compact model is timed beside the dense one, as
    the landing checks and the final figures are (the same statistic), and its ms is its measured
    fraction of the dense model times the dense model's median over the pairs: a machine's speed
    drifts between measurements minutes apart, the fraction within a pair, timed in its quietest block
    (``compare_latency``), much less (docs/BENCHMARKS.md, "Measurements behind the design")."""
    pairs = [compare_latency([paths[0], p], batch=batch) for p in paths[1:]]
    dense = statistics.median(d["median_ms"] for d, _ in pairs)
    return [(counts[0], dense)] + [(k, dense * c["median_ms"] / d["median_ms"])
                                   for k, (d, c) in zip(counts[1:], pairs, strict=True)]


def _language_model_figures(job: _Job, dense: Any, gated: Any, compact: Any) -> dict[str, float]:
    """Validation loss per token and perplexity, dense → pruned → compact, for a language model (an hf:
    causal LM's loss); {} for other models."""
    if job.loaded.loss_fn is not language_model_loss:
        return {}
    out = {}
    for name, model in (("dense", dense), ("pruned", gated), ("compact", compact)):
        loss = evaluate_loss(model.to(job.device), job.val_loader, language_model_loss)
        model.cpu()
        out[f"val_loss_{name}"], out[f"perplexity_{name}"] = loss, math.exp(min(loss, 80.0))
    return out


def _fold_stage(job: _Job, gated: Any, result: TrainResult, dense_acc: float) -> tuple[PassResult, dict[str, Any]]:
    """[3/5] fold_masks; (its result, the summary with the accuracy, size and MAC figures)."""
    args, model, inputs = job.args, job.loaded.model, job.inputs
    pruned_acc = evaluate(gated, job.val_loader)
    _say(args, "[3/5] fold_masks")
    folded = fold_masks(gated, job.fold)  # the fold the exact targets counted
    save_reports(job.partial, fold=folded.report.to_dict())
    compact = folded.graph_module.eval()
    lm = _language_model_figures(job, model, gated, compact)
    dense_costs = count_costs(model, inputs, frontend=job.loaded.frontend)
    compact_costs = count_costs(compact, inputs)
    params_dense, macs_dense = dense_costs.params, dense_costs.macs
    params_stored, macs_compact = compact_costs.params, compact_costs.macs
    macs_note = "; ".join(f"{what}: {c.note}" for what, c in (("dense", dense_costs), ("compact", compact_costs))
                          if c.note)
    if macs_note:
        log.warning("MAC count may be incomplete: %s", macs_note)
    return folded, {
        "source": args.source, "data": job.data_name, "target_sparsity": args.target_sparsity,
        "achieved_sparsity": result.sparsity, "target_measure": args.target, "granularity": args.granularity,
        "dense_accuracy": dense_acc, "pruned_accuracy": pruned_acc,
        "compact_accuracy": evaluate(compact, job.val_loader),
        "params_dense": params_dense, "params_compact": sum(int((p != 0).sum()) for p in compact.parameters()),
        "params_compact_stored": params_stored, "macs_dense": macs_dense, "macs_compact": macs_compact,
        "macs_note": macs_note or None,  # what the MAC counts may miss (a model not captured whole)
        **lm,
        "onnx_parity_max_abs_diff": None, "ort_latency_ms_dense": None, "ort_latency_ms_compact": None,
        "deleted_units": folded.report.deleted_units, "closed_units": folded.report.closed_units,
        # what the dynamics reached before the landing put the density on the target (docs/training.md)
        "sparsity_before_landing": (None if result.density_before_landing is None
                                    else 1.0 - result.density_before_landing),
        "controller_lookahead": result.controller_lookahead, "round_to": folded.report.round_to,
        "round_to_width": folded.report.round_to_width,
        "tracking": None if (t := tracking(result.history)) is None else t.to_dict(),
        "land_at": result.land_at, "regrowth_lr": result.regrowth_lr, "pressure": result.pressure,
        "distilled": result.distilled, "distill_alpha": args.distill_alpha if result.distilled else None,
        "distill_temperature": args.distill_temperature if result.distilled else None,
        "target_speedup": args.target_speedup, "latency_predicted_ms_compact": None,  # set beside the measurement
        "latency_predicted_speedup": (result.latency_table["predicted_dense_ms"] / result.predicted_latency_ms
                                      if result.predicted_latency_ms else None),
        "latency_table": (None if result.latency_table is None  # the prediction in the calibration's ms
                          else {**result.latency_table, "predicted_compact_ms": result.predicted_latency_ms}),
    }


def _export_stage(job: _Job, compact: Any, summary: dict[str, Any]) -> int | None:
    """[4/5] ONNX export with the parity check, dense and compact latency; an exit code on failure."""
    _say(job.args, "[4/5] ONNX export, parity check, latency")
    inputs = job.inputs
    # weight masks leave zeros that dense kernels still compute: stored sparsely they at least make the
    # file smaller (export_onnx converts only the tensors whose sparse form is smaller)
    sparse = job.args.granularity in ("weight", "hybrid")
    try:
        rep = export_onnx(compact, inputs, job.partial / "compact.onnx", sparse_storage=sparse)
        batch = int(inputs[0].shape[0])
        with tempfile.TemporaryDirectory() as tmp:
            dense = export_onnx(job.loaded.model.eval(), inputs, Path(tmp) / "dense.onnx")
            lat_d, lat_c = compare_latency([Path(tmp) / "dense.onnx", job.partial / "compact.onnx"], batch=batch)
    except (ExportError, ExportCheckError) as exc:
        return _fail(f"export failed: {exc}", code=1)
    summary.update(onnx_parity_max_abs_diff=rep.max_abs_diff, ort_latency_ms_dense=lat_d["median_ms"],
                   ort_latency_ms_compact=lat_c["median_ms"], onnx_file_bytes=rep.file_bytes,
                   onnx_file_bytes_dense=dense.file_bytes, onnx_sparse_initializers=len(rep.sparse_initializers),
                   latency_batch=batch)
    x = speedup(summary)
    summary.update(speedup=x, faster_than_dense=x >= FASTER, latency_note=slower_note(summary))
    if summary.get("latency_predicted_speedup"):
        # the model predicts a fraction of the dense model; in ms it is anchored on the dense model's ms
        # measured beside the compact one, as the machine's speed drifts between calibration and now
        summary["latency_predicted_ms_compact"] = lat_d["median_ms"] / summary["latency_predicted_speedup"]
    return None


def _save_compact(job: _Job, compact: Any) -> None:
    torch.save({"state_dict": compact.state_dict(), "code": compact.code,
                "example_input_shapes": [list(x.shape) for x in job.inputs]}, job.partial / "compact.pt")


HF_FOLDER = "compact_hf"


def _hf_folder(job: _Job, compact: Any) -> dict[str, Any]:
    """For an hf: causal LM: the compact model as a Hugging Face folder (OUT/compact_hf), loaded back and
    checked against the compact graph; or why there is none."""
    if job.loaded.loss_fn is not language_model_loss or not job.args.source.startswith("hf:"):
        return {}
    path = job.partial / HF_FOLDER
    try:
        folder = save_hf_folder(compact.state_dict(), job.args.source[3:], path)
        diff = check_hf_folder(path, compact, job.inputs)
    except NotUniform as exc:
        shutil.rmtree(path, ignore_errors=True)
        _say(job.args, f"      no {HF_FOLDER}/ written: {exc}")
        return {"hf_folder": None, "hf_folder_note": str(exc)}
    _say(job.args, f"      {HF_FOLDER}/: from_pretrained loads it ({folder.config}); logits within {diff:.2e} of the "
                   "compact graph")
    return {"hf_folder": HF_FOLDER, "hf_folder_config": folder.config, "hf_folder_max_abs_diff": diff}


def _report_stage(job: _Job, summary: dict[str, Any], result: TrainResult, gated: PassResult,
                  folded: PassResult) -> None:
    """[5/5] summary.json and report.html; OUT.partial becomes OUT."""
    _say(job.args, "[5/5] report")
    law = result.law.to_dict() if result.law is not None else None
    summary["law"], summary["law_note"] = law, result.law_note
    atomic_write_text(job.partial / "summary.json", json.dumps(summary, indent=2, default=float))
    lines = timeline(job.partial) if (job.partial / TIMELINE_FILE).exists() else None
    page = render_report(summary, result.history, gated.report.to_dict(), folded.report.to_dict(), law, lines)
    atomic_write_text(job.partial / "report.html", page)
    if job.out.exists():
        shutil.rmtree(job.out)
    os.replace(job.partial, job.out)
    if not job.args.quiet:
        _print_summary(summary, job.out)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    rows = asked_and_got(summary)
    width = max(len(what) for what, _, _ in rows)
    print(f"\n  {headline(summary)}.")
    if (warning := slower_note(summary)) is not None:
        print(f"  WARNING: {warning}")
    print()
    for what, asked, got in rows:
        print(f"  {what:<{width}}  {got}" + (f"   (asked: {asked})" if asked != "-" else ""))
    for note in ("law_note", "macs_note"):
        if summary.get(note):
            print(f"  {summary[note]}")
    hf_folder = f"{summary['hf_folder']}/, " if summary.get("hf_folder") else ""
    print(f"\n  written to {out}/ (compact.onnx, compact.pt, {hf_folder}summary.json, metrics.jsonl, report.html, "
          "run.log)")


if __name__ == "__main__":  # pragma: no cover - `python -m hyperflux_fx.cli`
    sys.exit(main())
