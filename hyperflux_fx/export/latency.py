"""Latency of an ONNX file in ONNX Runtime (CPU), with fixed session options."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["compare_latency", "measure_latency", "session"]


def session(path: str, threads: int = 1, optimize: bool = True) -> Any:
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, 1 inter-op, sequential."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _feeds(sess: Any, batch: int) -> dict[str, Any]:
    """Random inputs with the file's shapes, dim 0 set to ``batch``."""
    feeds = {}
    for i in sess.get_inputs():
        shape = [batch if k == 0 else (d if isinstance(d, int) else 1) for k, d in enumerate(i.shape)]
        dtype = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64}.get(i.type, torch.float32)
        t = torch.randn(shape) if dtype == torch.float32 else torch.zeros(shape, dtype=dtype)
        feeds[i.name] = t.numpy()
    return feeds


def _time_ms(sess: Any, feeds: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    sess.run(None, feeds)
    return (time.perf_counter() - t0) * 1000


def _stats(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    p90 = times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
    return {"median_ms": statistics.median(times), "p90_ms": p90}


def measure_latency(onnx_path: str | Path, *, batch_sizes: tuple[int, ...] = (1, 64), threads: int = 1,
                    warmup: int = 5, repeats: int = 20) -> dict[int, dict[str, float]]:
    """Median and p90 latency (ms) of ONNX Runtime (CPU) per batch size, fixed session options
    (``threads`` intra-op threads, 1 inter-op, sequential, all graph optimisations). Inputs are
    random with the file's shapes (dim 0 set to the batch size)."""
    sess = session(str(onnx_path), threads=threads)
    out: dict[int, dict[str, float]] = {}
    for b in batch_sizes:
        feeds = _feeds(sess, b)
        for _ in range(warmup):
            sess.run(None, feeds)
        out[b] = _stats([_time_ms(sess, feeds) for _ in range(repeats)])
    return out


def compare_latency(paths: list[str | Path], *, batch: int, threads: int = 1, warmup: int = 10,
                    seconds: float = 3.0, block_seconds: float = 0.15, min_blocks: int = 4,
                    repeats: int | None = None) -> list[dict[str, float]]:
    """Latency (ms) of several ONNX files measured side by side, on the machine at its quietest.

    The runs alternate file by file, so a slow spell falls on all of them alike. They are grouped in
    blocks of about ``block_seconds`` (at least 3 rounds), for ``seconds`` in all (at least
    ``min_blocks`` blocks). Each file's figures are taken from the one block where the files ran
    fastest together (the smallest sum of medians): ``median_ms`` and ``p90_ms`` of that block, and
    ``median_all_ms`` over every block.

    Why the quietest block: on a shared machine a neighbour's load comes and goes in spells of
    seconds, and it slows a small model relatively more than a big one. A median over a short window
    then reports whichever spell it fell in. The quietest block is the machine's own speed, and it
    repeats far better than the median (the figures: docs/BENCHMARKS.md, "Measurements behind the
    design").

    ``repeats`` (tests): exactly that many rounds in one block, with no time budget.
    """
    sessions = [session(str(p), threads=threads) for p in paths]
    feeds = [_feeds(sess, batch) for sess in sessions]
    for sess, f in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            sess.run(None, f)

    def block(rounds: int | None, budget: float) -> list[list[float]]:
        times: list[list[float]] = [[] for _ in sessions]
        t0 = time.perf_counter()
        while len(times[0]) < (rounds or 3) or (rounds is None and time.perf_counter() - t0 < budget):
            for k, (sess, f) in enumerate(zip(sessions, feeds, strict=True)):
                times[k].append(_time_ms(sess, f))
        return times

    blocks: list[list[list[float]]] = []
    t0 = time.perf_counter()
    while not blocks or (repeats is None and (len(blocks) < min_blocks or time.perf_counter() - t0 < seconds)):
        blocks.append(block(repeats, block_seconds))
    quiet = min(blocks, key=lambda b: sum(statistics.median(t) for t in b))
    return [{**_stats(t), "median_all_ms": statistics.median(x for b in blocks for x in b[k])}
            for k, t in enumerate(quiet)]
