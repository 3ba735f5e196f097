"""ONNX export, checked against ONNX Runtime, optional sparse storage, and latency measurement.

``export_onnx`` runs the torch.onnx dynamo exporter (opset 18), keeps the weights inside the file,
validates it with ``onnx.checker`` (full check), then runs it in ONNX Runtime (CPU) on several
random inputs — including another batch size when the batch is dynamic — and compares with the
GraphModule. The file is written to a temporary name and renamed into place only when every check
passed, so a failed export leaves nothing behind.

Sparse storage (``sparse_storage=True``) stores initializers with enough zeros in ONNX's sparse
tensor format (values + int64 indices: 12 bytes per kept value against 4 per dense value, so it
pays above ~67% zeros), as ``Constant`` nodes with a ``sparse_value`` — the form the checker accepts
for tensors that ops read densely (a bare ``sparse_initializer`` is typed as a sparse tensor). It
makes the *file* smaller; ONNX Runtime densifies such weights when it loads them, so it does not
make inference faster — deleting channels (``fold_masks``) does. Latency is measured by
:mod:`hyperflux_fx.export.latency`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from hyperflux_fx.export.latency import session
from hyperflux_fx.frontend.trace import normalize_inputs
from hyperflux_fx.ir import gates

__all__ = ["ExportCheckError", "ExportError", "ExportReport", "export_onnx"]

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The model could not be exported (unsupported op, unwritable path)."""


class ExportCheckError(RuntimeError):
    """The exported file failed a check (onnx.checker or parity with ONNX Runtime).

    Attributes:
        report: the ExportReport with the figures measured.
    """

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and checked."""

    path: str
    opset: int
    dynamic_batch: bool
    file_bytes: int = 0
    dense_bytes: int | None = None  # with sparse_storage: the size the dense file would have
    sparse_initializers: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None  # over every checked input and output
    max_rel_diff: float | None = None  # max_abs_diff / max |y - mean_batch(y)| of the reference output
    checked_shapes: list[list[int]] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _op_counts(model: Any) -> dict[str, int]:
    counts: Counter[str] = Counter(n.op_type for n in model.graph.node)
    for fn in model.functions:
        counts.update(n.op_type for n in fn.node)
    return dict(sorted(counts.items()))


def _to_sparse(model: Any, min_zero_fraction: float) -> list[str]:
    """Replace float initializers whose sparse form is smaller by ``Constant`` nodes holding a
    ``sparse_value``; returns their names."""
    import numpy as np
    from onnx import helper, numpy_helper

    moved = []
    keep = []
    constants = []
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32 or arr.size < 64:
            keep.append(init)
            continue
        flat = arr.reshape(-1)
        nz = np.flatnonzero(flat)
        zero_fraction = 1.0 - nz.size / flat.size
        if zero_fraction < min_zero_fraction or 12 * nz.size >= 4 * flat.size:
            keep.append(init)
            continue
        values = numpy_helper.from_array(flat[nz].astype(np.float32), name=init.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), name=init.name + "_indices")
        sparse = helper.make_sparse_tensor(values, indices, list(arr.shape))
        # A Constant with sparse_value yields a dense tensor, so every op keeps a dense input; a bare
        # sparse_initializer would be typed sparse_tensor and fail the checker's type inference.
        constants.append(helper.make_node("Constant", [], [init.name], name=f"sparse_{init.name}",
                                          sparse_value=sparse))
        moved.append(init.name)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(constants + nodes)
    # declared types of the moved tensors would say "dense" and contradict the sparse initializer
    gone = set(moved)
    for coll in (model.graph.value_info, model.graph.input):
        kept_vi = [vi for vi in coll if vi.name not in gone]
        del coll[:]
        coll.extend(kept_vi)
    return moved


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten_outputs(o)]
    return []


def _check_inputs(example: tuple[torch.Tensor, ...], dynamic_batch: bool) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)

    def like(x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        shape = list(x.shape)
        if batch is not None:
            shape[0] = batch
        if x.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=x.dtype)
        return torch.randint(0, int(x.max()) + 1 if x.numel() else 2, shape, generator=gen, dtype=x.dtype)

    sets = [example, tuple(like(x) for x in example), tuple(like(x) for x in example)]
    if dynamic_batch:
        b = example[0].shape[0]
        sets.append(tuple(like(x, b + 3) for x in example))
    return sets


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ATEN = re.compile(r"aten[.:]+([A-Za-z0-9_]+)")


def _name_failing_nodes(gm: nn.Module, exc: BaseException) -> tuple[str, str]:
    """(graph nodes the failure names, aten ops named in the error)."""
    text = _ANSI.sub("", str(exc))
    chain = exc.__cause__
    while chain is not None:
        text += "\n" + _ANSI.sub("", str(chain))
        chain = chain.__cause__
    aten = list(dict.fromkeys(m.group(1) for m in _ATEN.finditer(text)))
    hits = []
    if isinstance(gm, fx.GraphModule):
        for n in gm.graph.nodes:
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            name = getattr(n.target, "__name__", str(n.target)).split(".")[-1].lstrip("_")
            name = name.replace("linalg_", "")
            if any(a == name or a.endswith(name) or name.endswith(a) for a in aten if len(a) > 2):
                hits.append(n.format_node())
    return "; ".join(hits[:3]), ", ".join(f"aten.{a}" for a in aten[:3])


def export_onnx(gm: nn.Module, example_inputs: Any, path: str | Path, *, opset: int = 18, dynamic_batch: bool = True,
                check: bool = True, sparse_storage: bool = False, sparse_min_zero_fraction: float = 0.67,
                rtol: float = 1e-4, atol: float = 1e-5) -> ExportReport:
    """Export ``gm`` to ONNX at ``path`` and check it.

    Args:
        gm: the (compact) model; any ``nn.Module`` works, a gated one exports with its masks as ops
            (and a warning: it is not compact).
        example_inputs: a tensor or tuple of tensors.
        path: where to write the ``.onnx`` file (weights inside; the file must stay below 2 GB).
        opset: ONNX opset (18: asking the dynamo exporter for 17 makes it switch to 18 noisily).
        dynamic_batch: make dim 0 of every input dynamic.
        check: run ``onnx.checker`` (full) and the ONNX Runtime parity check.
        sparse_storage: store initializers with >= ``sparse_min_zero_fraction`` zeros sparsely.
        rtol, atol: parity tolerance per output: ``max|ort - torch| <= atol + rtol * s`` with ``s`` the
            scale of the output's input-dependent part, ``max|y - mean_batch(y)|`` (``max|y|`` at batch 1).

    Raises:
        ExportError: the exporter failed (naming the node when it can) or ``path`` is not writable.
        ExportCheckError: a check failed; nothing is left at ``path``.
    """
    import onnx

    t0 = time.perf_counter()
    path = Path(path)
    inputs = normalize_inputs(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ExportError("export_onnx needs example inputs as a tensor or a tuple of tensors")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {path}: directory {parent} does not exist or is not writable")
    report = ExportReport(path=str(path), opset=opset, dynamic_batch=dynamic_batch)
    if gates(gm):
        msg = "the model still has gates: exporting the masked model (masks as ops), not a compact one; run fold_masks"
        warnings.warn(msg, stacklevel=2)
        report.warnings.append(msg)
    model = _run_exporter(gm, inputs, opset, dynamic_batch)
    if sparse_storage:
        report.dense_bytes = model.ByteSize()
        report.sparse_initializers = _to_sparse(model, sparse_min_zero_fraction)
    report.op_counts = _op_counts(model)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        onnx.save_model(model, str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600: follow the umask like every other output
        report.file_bytes = tmp.stat().st_size
        if check:
            _check(gm, tmp, inputs, dynamic_batch, rtol, atol, report)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    report.seconds = time.perf_counter() - t0
    return report


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _run_exporter(gm: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int, dynamic_batch: bool) -> Any:
    """The torch.onnx dynamo exporter's ModelProto (eval mode, no grad); ExportError naming the node."""
    was_training = gm.training
    gm.eval()
    dynamic_shapes = tuple({0: "batch"} for _ in inputs) if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(gm, inputs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                                        verbose=False, external_data=False, optimize=True)
    except Exception as exc:
        nodes, aten = _name_failing_nodes(gm, exc)
        first = _ANSI.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f" at node {nodes}" if nodes else ""
        ops = f" (unsupported: {aten})" if aten else ""
        raise ExportError(f"ONNX export failed{where}{ops}: {type(exc).__name__}: {first}") from exc
    finally:
        gm.train(was_training)
    return program.model_proto


def _check(gm: nn.Module, file: Path, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool, rtol: float,
           atol: float, report: ExportReport) -> None:
    """onnx.checker (full) and ORT parity; ExportCheckError when either fails."""
    import onnx

    try:
        onnx.checker.check_model(str(file), full_check=True)
    except Exception as exc:
        raise ExportCheckError(f"onnx.checker rejected the exported model: {exc}", report) from exc
    _parity(gm, file, inputs, dynamic_batch, rtol, atol, report)


def _signal_scale(y: torch.Tensor) -> float:
    """The scale of an output's input-dependent part, ``max|y - mean_batch(y)|`` (a random model's
    outputs are mostly its biases, which hide errors in the part that depends on the input); the
    plain ``max|y|`` for a single sample, where the two cannot be told apart."""
    if y.numel() == 0:
        return 0.0
    if y.dim() == 0 or y.shape[0] < 2:
        return float(y.abs().max())
    return float((y - y.mean(0, keepdim=True)).abs().max())


def _parity(gm: nn.Module, file: Path, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool, rtol: float,
            atol: float, report: ExportReport) -> None:
    sess = session(str(file))
    names = [i.name for i in sess.get_inputs()]
    worst_abs, worst_rel = 0.0, 0.0
    was_training = gm.training
    gm.eval()
    try:
        for batch in _check_inputs(inputs, dynamic_batch):
            with torch.no_grad():
                ref = _flatten_outputs(gm(*batch))
            got = sess.run(None, {n: x.numpy() for n, x in zip(names, batch, strict=True)})
            report.checked_shapes.append(list(batch[0].shape))
            if len(got) != len(ref):
                raise ExportCheckError(f"ONNX Runtime returned {len(got)} outputs, the model {len(ref)}", report)
            for r, g in zip(ref, got, strict=True):
                r = r.float()
                diff = float((torch.from_numpy(g).float() - r).abs().max()) if r.numel() else 0.0
                scale = _signal_scale(r)
                worst_abs = max(worst_abs, diff)
                worst_rel = max(worst_rel, diff / scale if scale > 0 else diff)
                if not diff <= atol + rtol * scale:
                    report.max_abs_diff, report.max_rel_diff = worst_abs, worst_rel
                    raise ExportCheckError(
                        f"ONNX Runtime output differs from the model: max abs diff {diff:.3g} > "
                        f"{atol:g} + {rtol:g} x {scale:.3g} on input shape {list(batch[0].shape)}", report)
    finally:
        gm.train(was_training)
    report.max_abs_diff, report.max_rel_diff = worst_abs, worst_rel
