"""Can ONNX Runtime's CPU provider multiply by a sparse weight faster than by the dense one?

A Linear layer ``y = x W^T`` (W: out x in, a fraction ``--sparsity`` of it zero, unstructured, as
weight gates leave it) timed two ways in ONNX Runtime (CPU, 1 intra-op thread, all graph
optimisations), alternating run by run, medians:

* dense: ``MatMul(x, W^T)`` with W^T a constant initializer (what export_onnx writes; sparse
  *storage* is expanded to this at load time);
* sparse: the com.microsoft contrib op ``SparseToDenseMatMul(A, B)`` with A = W as a COO sparse
  tensor and B = x^T, giving (W x^T) = y^T. A sparse constant cannot feed it (ORT densifies sparse
  initializers at load), so W is bound once as a sparse OrtValue input, the best case for the op.

Prints, per size, sparsity and batch: dense ms, sparse ms and dense/sparse.

Usage: python tools/bench_sparse_kernels.py [--sizes 512,1024,2048] [--sparsity 0.9,0.95,0.99]
       [--batch-sizes 1,16] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def _dense_session(w: np.ndarray) -> ort.InferenceSession:
    out_f, in_f = w.shape
    node = helper.make_node("MatMul", ["x", "wt"], ["y"])
    graph = helper.make_graph([node], "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", in_f])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", out_f])],
                              initializer=[numpy_helper.from_array(np.ascontiguousarray(w.T), "wt")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), _options(), providers=["CPUExecutionProvider"])


def _sparse_session(w: np.ndarray) -> ort.InferenceSession:
    out_f, in_f = w.shape
    node = helper.make_node("SparseToDenseMatMul", ["a", "b"], ["yt"], domain="com.microsoft")
    graph = helper.make_graph([node], "sparse",
                              [helper.make_sparse_tensor_value_info("a", TensorProto.FLOAT, [out_f, in_f]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [in_f, "b"])],
                              [helper.make_tensor_value_info("yt", TensorProto.FLOAT, [out_f, "b"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft",
                                                                                                     1)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), _options(), providers=["CPUExecutionProvider"])


def _sparse_value(w: np.ndarray) -> ort.OrtValue:
    rows, cols = np.nonzero(w)
    indices = np.stack([rows, cols], axis=1).astype(np.int64).reshape(-1)
    tensor = ort.SparseTensor.sparse_coo_from_numpy(np.array(w.shape, dtype=np.int64),
                                                    w[rows, cols].astype(np.float32), indices,
                                                    ort.OrtDevice.make("cpu", 0))
    return ort.OrtValue.ort_value_from_sparse_tensor(tensor)


def _time(run, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def measure(size: int, sparsity: float, batch: int, repeats: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((size, size)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0.0
    x = rng.standard_normal((batch, size)).astype(np.float32)
    dense, sparse = _dense_session(w), _sparse_session(w)
    a = _sparse_value(w)
    b = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x.T))
    y_dense = dense.run(None, {"x": x})[0]
    y_sparse = sparse.run_with_ort_values(["yt"], {"a": a, "b": b})[0].numpy().T
    np.testing.assert_allclose(y_sparse, y_dense, rtol=1e-4, atol=1e-3 * float(np.abs(y_dense).max()))
    runs = [lambda: dense.run(None, {"x": x}), lambda: sparse.run_with_ort_values(["yt"], {"a": a, "b": b})]
    times: list[list[float]] = [[], []]
    for r in range(repeats):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            times[i] += _time(runs[i], 1)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024,2048")
    parser.add_argument("--sparsity", default="0.9,0.95,0.99")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"ONNX Runtime {ort.__version__}, CPU, 1 intra-op thread; Linear y = x W^T, W size x size")
    print("| size | zeros | batch | dense MatMul ms | SparseToDenseMatMul ms | dense / sparse |")
    print("|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        for sparsity in (float(s) for s in args.sparsity.split(",")):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                d, s = measure(size, sparsity, batch, args.repeats)
                print(f"| {size} | {sparsity:.0%} | {batch} | {d:.3f} | {s:.3f} | {d / s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
