"""A latency model of ONNX Runtime (CPU, one intra-op thread) for the compact model, as a function of
each channel group's kept units.

Every conv (regular or depthwise; 1-D, 2-D or 3-D) and linear whose widths the fold changes is timed alone in ONNX
Runtime at the run's batch, on a grid of (input width, output width) pairs — multiples of the fold's
rounding between one block and the dense width, at most ``GRID`` per side — less the fixed cost of
one ORT run on the same input (a model that only copies it), and interpolated bilinearly in between.
Timed alone, an op also pays what it would not pay inside the model (layout reorders around it), and
the model has costs no timed op has (elementwise ops, pooling, the ops the fold leaves alone). So the
prediction is a non-negative combination of four features of the kept units — the sum of the table's
op times, the MACs (exact, from the cost model), the folded activation volume of the timed ops, and a
constant — fitted on whole models measured in ORT (``calibrate(points)``: the dense model and a few
compact ones). Which features take part is chosen by leave-one-out error on those points: compute-
bound models follow the op table, memory-bound ones (mobilenet_v2's depthwise/pointwise pairs at
small sizes) follow the MACs. ``calibrate_dense(ms)`` fits the dense model alone (table + rest
scaled by volume).

Timings are cached on disk (JSON) per op signature, width pair and batch, in one file per
:func:`cache_key`: the CPU's name and instruction-set features (AVX2 / AVX-512 / VNNI / NEON, ...),
one thread, the ORT version, its NCHWc block and the table's schema. Only the first run on a machine
measures; a file whose key differs (another schema) is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import fx

from hyperflux_fx.analysis.cost_model import CostModel, Width
from hyperflux_fx.analysis.coupling import shape_of
from hyperflux_fx.analysis.runtime import machine_key
from hyperflux_fx.ops import call_spec

__all__ = ["GRID", "SCHEMA", "LatencyModel", "cache_key", "cache_path"]

log = logging.getLogger(__name__)

GRID = 5  # measured widths per side of an op's table


@dataclass(frozen=True)
class _Op:
    """One timed op: its signature, and its input / output widths as functions of the kept units."""

    node: str
    kind: str  # "conv" (groups 1), "dwconv" (groups = channels) or "linear"
    geometry: tuple[Any, ...]  # everything but the widths: kernel, stride, padding, dilation, spatial size, rows
    cin: Width | int
    cout: Width | int
    dense_in: int
    dense_out: int
    positions: int  # output elements per output channel (batch x spatial, or rows)

    def widths(self, k: dict[int, int]) -> tuple[int, int]:
        def at(w: Width | int) -> int:
            return w if isinstance(w, int) else w.at(k)
        return at(self.cin), at(self.cout)


SCHEMA = 2  # the table's layout; a file of another schema is dropped (2: n-d conv geometry, explicit pads)


def cache_key() -> dict[str, Any]:
    """The key of this machine's table: :func:`~hyperflux_fx.analysis.runtime.machine_key` (CPU name and
    instruction-set features, one thread, ORT version, NCHWc block) and the table's schema."""
    return {**machine_key(threads=1), "schema": SCHEMA}


def cache_path(cache_dir: str | Path | None = None) -> Path:
    """The cache file of :func:`cache_key` (``HYPERFLUX_CACHE`` or ``~/.cache/hyperflux_fx`` unless
    ``cache_dir`` is given)."""
    root = Path(cache_dir or os.environ.get("HYPERFLUX_CACHE") or Path.home() / ".cache" / "hyperflux_fx")
    tag = hashlib.sha1(json.dumps(cache_key(), sort_keys=True).encode()).hexdigest()[:12]
    return root / f"latency-{tag}.json"


def _grid(dense: int, step: int) -> list[int]:
    """At most GRID widths from one block to ``dense``, multiples of ``step`` (plus ``dense``)."""
    if dense <= step:
        return [dense]
    lo = step
    points = {dense, lo}
    for i in range(1, GRID - 1):
        points.add(min(dense, max(lo, round((lo + (dense - lo) * i / (GRID - 1)) / step) * step)))
    return sorted(points)


def _interp(xs: list[int], x: float) -> tuple[int, int, float]:
    """Bracketing indices of ``x`` in ``xs`` and the weight of the upper one (clamped at the ends)."""
    if len(xs) == 1 or x <= xs[0]:
        return 0, 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, len(xs) - 1, 0.0
    j = bisect_right(xs, x)
    return j - 1, j, (x - xs[j - 1]) / (xs[j] - xs[j - 1])


class LatencyModel:
    """Predicted ONNX Runtime latency of the compact model (see the module docstring)."""

    def __init__(self, cost_model: CostModel, *, cache_dir: str | Path | None = None, progress: bool = False,
                 repeats: int = 15) -> None:
        self.cost_model = cost_model
        self.step = max(int(cost_model.fold.round_to), 1)
        self.ops = _timed_ops(cost_model)  # at the example inputs' batch (the CLI's latency batch)
        self.path = cache_path(cache_dir)
        self.table: dict[str, float] = _load(self.path)
        t0 = time.perf_counter()
        self.measured = self._fill(progress, repeats)
        self.build_seconds = time.perf_counter() - t0
        dense = {g.id: g.size for g in cost_model.groups}
        self._volume_dense = self._volume(dense)
        self.ops_dense_ms = self._ops_ms(dense)
        self.coef = (1.0, 0.0, 0.0, 0.0)  # per feature (ops, MACs, volume, 1); uncalibrated: the timed ops alone
        self.form = "ops"
        self.measure: Callable[[], float] | None = None  # measured compact/dense of the current masks, if set
        self.calibration: list[dict[str, float]] = []

    # -- the table ----------------------------------------------------------------------------------

    def _key(self, op: _Op, cin: int, cout: int) -> str:
        return json.dumps([op.kind, *op.geometry, cin, cout])

    def _points(self, op: _Op) -> tuple[list[int], list[int]]:
        if op.kind == "dwconv":
            widths = _grid(op.dense_out, self.step)
            return widths, widths
        ins = _grid(op.dense_in, self.step) if not isinstance(op.cin, int) else [op.dense_in]
        outs = _grid(op.dense_out, self.step) if not isinstance(op.cout, int) else [op.dense_out]
        return ins, outs

    def _fill(self, progress: bool, repeats: int) -> int:
        """Measure every grid point missing from the cache; returns how many were measured."""
        todo = []
        for op in self.ops:
            ins, outs = self._points(op)
            pairs = [(c, c) for c in outs] if op.kind == "dwconv" else [(i, o) for i in ins for o in outs]
            todo += [(op, i, o) for i, o in pairs if self._key(op, i, o) not in self.table]
        todo = list({self._key(op, i, o): (op, i, o) for op, i, o in todo}.values())
        if not todo:
            return 0
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        base: dict[tuple[Any, ...], float] = {}
        for op, cin, cout in tqdm(todo, desc="latency table", disable=not progress, leave=False):
            shape = tuple(_input_shape(op, cin))
            if shape not in base:  # what one ORT run of a model that only copies this input costs
                base[shape] = _time_model(_identity_model(shape), shape, repeats)
            raw = _time_model(_op_model(op, cin, cout), shape, repeats)
            self.table[self._key(op, cin, cout)] = max(raw - base[shape], 0.05 * raw)
        _save(self.path, self.table)
        log.info("latency table: measured %d op timings in %.1f s (cached in %s)", len(todo),
                 time.perf_counter() - t0, self.path)
        return len(todo)

    # -- prediction ---------------------------------------------------------------------------------

    def _op_ms(self, op: _Op, k: dict[int, int]) -> float:
        cin, cout = op.widths(k)
        if op.kind == "dwconv":
            xs, _ = self._points(op)
            i, j, t = _interp(xs, cout)
            return (1 - t) * self.table[self._key(op, xs[i], xs[i])] + t * self.table[self._key(op, xs[j], xs[j])]
        ins, outs = self._points(op)
        i0, i1, ti = _interp(ins, cin)
        o0, o1, to = _interp(outs, cout)

        def at(a: int, b: int) -> float:
            return self.table[self._key(op, ins[a], outs[b])]
        return ((1 - ti) * ((1 - to) * at(i0, o0) + to * at(i0, o1))
                + ti * ((1 - to) * at(i1, o0) + to * at(i1, o1)))

    def _ops_ms(self, k: dict[int, int]) -> float:
        return sum(self._op_ms(op, k) for op in self.ops)

    def _volume(self, k: dict[int, int]) -> float:
        return float(sum(op.widths(k)[1] * op.positions for op in self.ops))

    def _features(self, k: dict[int, int]) -> tuple[float, float, float, float]:
        """(table ms, MAC fraction, activation-volume fraction, 1) at ``k``."""
        volume = self._volume(k) / self._volume_dense if self._volume_dense else 1.0
        macs = self.cost_model.cost_at(k).macs / max(self.cost_model.dense.macs, 1)
        return self._ops_ms(k), macs, volume, 1.0

    def calibrate_dense(self, dense_ms: float) -> None:
        """Fit on the whole dense model alone: the rest is its measured time less the timed ops,
        scaled by the activation volume."""
        self.coef, self.form = (1.0, 0.0, max(dense_ms - self.ops_dense_ms, 0.0), 0.0), "ops + volume"
        self.calibration = [{"measured_ms": dense_ms, "predicted_ms": self.dense_ms}]

    def calibrate(self, points: list[tuple[dict[int, int], float]]) -> None:
        """Fit the prediction on whole models measured in ORT, ``(k, ms)`` pairs with the dense model
        first: non-negative least squares on relative errors (every term is a cost; a negative one
        would let the landing buy latency by keeping work), through the dense point (see
        :func:`_nnls_relative`), over the feature set whose leave-one-out error on the compact
        models' fractions of the dense one is smallest. Fewer than 4 points: :meth:`calibrate_dense`."""
        import numpy as np

        if len(points) < 4:
            self.calibrate_dense(points[0][1])
            return
        a = np.array([self._features(k) for k, _ in points])
        b = np.array([ms for _, ms in points])
        best = min(FORMS, key=lambda cols: (_loo_error(a[:, cols], b), len(cols)))
        coef = np.zeros(4)
        coef[list(best)] = _nnls_relative(a[:, best], b)
        if not np.all(np.isfinite(coef)) or not coef[:3].sum() > 0:
            self.calibrate_dense(points[0][1])
            return
        self.coef = tuple(float(c) for c in coef)
        self.form = " + ".join(FEATURES[i] for i in best)
        self.calibration = [{"measured_ms": ms, "predicted_ms": self.predict_ms(k)} for k, ms in points]

    def predict_ms(self, k: dict[int, int]) -> float:
        """Predicted latency (ms) of the compact model when group ``g`` keeps ``k[g]`` units."""
        return max(sum(c * f for c, f in zip(self.coef, self._features(k), strict=True)), 1e-6)

    @property
    def dense_ms(self) -> float:
        return self.predict_ms({g.id: g.size for g in self.cost_model.groups})

    def fraction(self, k: dict[int, int]) -> float:
        """Predicted compact latency over predicted dense latency."""
        return self.predict_ms(k) / self.dense_ms

    def marginal(self, k: dict[int, int]) -> dict[int, float]:
        """Per group: predicted ms saved by closing one more unit at ``k``."""
        now = self.predict_ms(k)
        return {g.id: (now - self.predict_ms({**k, g.id: k[g.id] - 1})) if k[g.id] > 1 else 0.0
                for g in self.cost_model.groups}


FEATURES = ("ops", "macs", "volume", "constant")
FORMS = ((0, 3), (1, 3), (0, 2, 3), (1, 2, 3))  # candidate feature sets (indices into FEATURES)


DENSE_WEIGHT = 1e3  # the dense point's weight in the fit (docs/BENCHMARKS.md, "Measurements behind the design")


def _nnls_relative(a: Any, b: Any) -> Any:
    """Non-negative coefficients minimising the squared *relative* errors of ``a @ x`` against ``b``,
    row 0 (the dense model) weighted by :data:`DENSE_WEIGHT`. Every use of the model is a fraction of
    its dense prediction, so an error there moves every prediction alike (what a fit with the dense
    model as one point among ten did: docs/BENCHMARKS.md, "Measurements behind the design")."""
    import numpy as np
    from scipy.optimize import nnls

    w = np.ones_like(b)
    w[0] = DENSE_WEIGHT
    coef, _ = nnls(a / b[:, None] * w[:, None], w)
    return coef


def _loo_error(a: Any, b: Any) -> float:
    """Largest relative error of a compact model's fraction of the dense one, predicted by a fit on
    the other points (the dense one always among them)."""
    worst = 0.0
    for i in range(1, len(b)):
        rest = [j for j in range(len(b)) if j != i]
        coef = _nnls_relative(a[rest], b[rest])
        predicted = float(a[i] @ coef) / float(a[0] @ coef)
        worst = max(worst, abs(predicted / (float(b[i]) / float(b[0])) - 1))
    return worst


def _timed_ops(cm: CostModel) -> list[_Op]:
    """Every conv (1-D, 2-D, 3-D) / linear term of the cost model whose weight the fold slices."""
    nodes = {n.name: n for n in cm.gm.graph.nodes}
    ops = []
    for name, weight in cm.weight_ops():
        if name in nodes:
            op = _op_of(nodes[name], weight)
            if op is not None:
                ops.append(op)
    return ops


def _op_of(node: fx.Node, w: Any) -> _Op | None:
    spec = call_spec(node)
    x, out = shape_of(node.args[0]) if node.args else None, shape_of(node)
    if spec is None or x is None or out is None:
        return None
    dims = w.dims
    if spec.kind == "linear" and len(w.dense) >= 1:
        shape = w.shape
        rows = math.prod(out[:-1])
        return _Op(node.name, "linear", (rows,), dims.get(1, shape[1]), dims.get(0, shape[0]), shape[1], shape[0],
                   rows)
    if spec.kind != "conv" or len(x) not in (3, 4, 5):  # conv1d, conv2d, conv3d
        return None
    shape, rank = w.shape, len(x) - 2
    kernel = tuple(shape[2:])
    stride, dilation = (_ntuple(spec.arg(node, name, 1), rank) for name in ("stride", "dilation"))
    pads = _pads(spec.arg(node, "padding", 0), kernel, dilation)
    groups = spec.arg(node, "groups", 1)
    geometry = (kernel, stride, pads, dilation, x[0], *x[2:])
    positions = out[0] * math.prod(out[2:])
    if groups == 1:
        return _Op(node.name, "conv", geometry, dims.get(1, shape[1]), dims.get(0, shape[0]), shape[1], shape[0],
                   positions)
    if groups == shape[0] == x[1] and shape[1] == 1:
        return _Op(node.name, "dwconv", geometry, dims.get(0, shape[0]), dims.get(0, shape[0]), shape[0], shape[0],
                   positions)
    return None


def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    return (v,) * n if isinstance(v, int) else tuple(v)


def _pads(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    """ONNX pads (every begin, then every end) of a torch conv's ``padding``: ints, or "valid" / "same"
    (torch puts the odd one of "same" at the end)."""
    if padding == "valid":
        return (0,) * (2 * len(kernel))
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return (*(t // 2 for t in total), *(t - t // 2 for t in total))
    p = _ntuple(padding, len(kernel))
    return (*p, *p)


def _op_model(op: _Op, cin: int, cout: int) -> bytes:
    """A one-node ONNX model of ``op`` at widths (cin, cout)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if op.kind == "linear":
        (rows,) = op.geometry
        w = numpy_helper.from_array(rng.standard_normal((cin, cout)).astype(np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        x_shape, y_shape = [rows, cin], [rows, cout]
    else:
        kernel, stride, pads, dilation, batch, *spatial = op.geometry
        group = cin if op.kind == "dwconv" else 1
        w = numpy_helper.from_array(rng.standard_normal((cout, cin // group, *kernel)).astype(np.float32), "w")
        node = helper.make_node("Conv", ["x", "w"], ["y"], strides=list(stride), pads=list(pads),
                                dilations=list(dilation), group=group)
        x_shape, y_shape = [batch, cin, *spatial], None
    graph = helper.make_graph([node], "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _input_shape(op: _Op, cin: int) -> list[int]:
    return [op.geometry[0], cin] if op.kind == "linear" else [op.geometry[4], cin, *op.geometry[5:]]


def _identity_model(shape: tuple[int, ...]) -> bytes:
    """A model that only copies its input: the fixed cost of one ORT run with that input."""
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "base", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _time_model(model: bytes, shape: tuple[int, ...], repeats: int) -> float:
    """Lower-quartile ms of one run of ``model`` in ORT (CPU, 1 thread, all optimisations) on ``shape``."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    feeds = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.quantiles(times, n=4)[0]  # the lower quartile: interference only ever adds time


def _load(path: Path) -> dict[str, float]:
    """The cached table, or {} when there is none, or it is of another schema or machine (dropped)."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("key") != cache_key():
            return {}
        return {str(k): float(v) for k, v in data["table"].items()}
    except (OSError, ValueError, KeyError, AttributeError):
        return {}


def _save(path: Path, table: dict[str, float]) -> None:
    """Write the cache atomically (a concurrent run at worst re-measures), with its key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"key": cache_key(), "table": table}, f, sort_keys=True)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
