"""Stage 1, the source: load the model, its example inputs and data; trace and gate it once to check
it (open gates change nothing); --plan; and the preflight that settles the TrainConfig before the
first byte is written."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from hyperflux_fx.analysis.cost_model import MEASURES
from hyperflux_fx.analysis.latency_model import cache_key, cache_path
from hyperflux_fx.cli.args import fold_config, recipe_fields, resolve_recipe
from hyperflux_fx.cli.job import UsageError
from hyperflux_fx.config import (
    TrainConfig,
)
from hyperflux_fx.frontend.data import DataError, resolve_datasets
from hyperflux_fx.frontend.hf import hidden_size
from hyperflux_fx.frontend.sources import LoadedModel, SourceError, load_source
from hyperflux_fx.frontend.trace import modes_restored
from hyperflux_fx.ir import TRAINING_ONLY_META
from hyperflux_fx.passes import PassResult
from hyperflux_fx.train.loop import resume_problems
from hyperflux_fx.train.measure import Measure, fold_within_reach


def _num_classes(model: Any, inputs: tuple[Any, ...]) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise UsageError("the model's output is not (batch, classes) logits: give model.py a loss_fn and datasets()")
    return int(out.shape[-1])


def _train_config(args: argparse.Namespace, partial: Path) -> TrainConfig:
    return TrainConfig(target_sparsity=args.target_sparsity, epochs=args.epochs, regrowth_epochs=args.regrowth_epochs,
                       lr=args.lr, seed=args.seed, device=args.device, out_dir=str(partial), resume=args.resume,
                       progress=not args.quiet, max_intervals=args.max_intervals,
                       target_measure=args.target, fold=fold_config(args), pressure=args.pressure,
                       flux_normalization=args.flux_normalization,
                       distill=args.distill, distill_alpha=args.distill_alpha,
                       distill_temperature=args.distill_temperature, uniform_layers=args.uniform_layers,
                       **recipe_fields(args))


def preflight(args: argparse.Namespace, out: Path, res: PassResult, train_set: Dataset) -> TrainConfig:
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


def check_open_gates_change_nothing(loaded: LoadedModel, gated: Any) -> None:
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


def load(args: argparse.Namespace) -> LoadedModel:
    _sequence_length(args)
    try:
        loaded = load_source(args.source, input_shape=args.input_shape, weights=args.weights,
                             num_classes=args.num_classes)
        loaded.frontend = args.frontend or loaded.frontend
        resolve_recipe(args, loaded.language_model, loaded.pretrained, hidden_size(loaded.model))
        return loaded
    except SourceError as exc:
        raise UsageError(str(exc)) from exc
    except Exception as exc:  # build_model() itself failing
        raise UsageError(f"building the model failed: {type(exc).__name__}: {exc}") from exc


def datasets(args: argparse.Namespace, loaded: LoadedModel) -> tuple[Dataset, Dataset, str]:
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


def print_plan(args: argparse.Namespace, loaded: LoadedModel, res: PassResult, seconds: float) -> int:
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
