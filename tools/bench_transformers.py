"""Hugging Face transformers through the export front end: tiny random configs of BERT, GPT-2, Llama
(grouped-query attention), Qwen2, ViT and a T5 encoder (tests/models.py: build_hf).

Per model: capture and insert_gates times, the gateable channel share and the gated units (heads, MLP
units, the hidden width); invariant 1 at weight and channel granularity (eval outputs ``torch.equal``
with every gate open); then random masks closing 30/50/90% of every channel group, folded with real
deletion, the largest deviation of the compact model from the masked one in float64 relative to the
input-dependent output scale (exact: <= 1e-9), parameters kept, the ONNX parity of the 50% model and its
ONNX Runtime speed-up over the dense export (measured side by side, batch 2, 1 thread). Needs
``pip install .[hf]``.

With ``--extra`` also Mistral, Phi-3 (fused q/k/v), Gemma (norm by 1 + weight, computed in float32:
its fold check is float32), OPT, RoBERTa and DistilBERT.

Usage: python tools/bench_transformers.py [--extra] [--write docs/BENCHMARKS.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _bench_common as common
from equivalence import close_at_random  # the fold tests' masks
from models import HF_EXTRA, HF_ZOO, build_hf  # the tests' tiny configs

import hyperflux_fx as hf
from hyperflux_fx.export.latency import compare_latency


def _deviation(masked, compact, inputs) -> tuple[float, str]:
    """(max |compact - masked| / max |masked| on the input-dependent part, the precision): float64, or
    float32 when the model casts to float32 itself (Gemma's norm), where ~1e-7 is rounding."""
    for dtype in (torch.float64, torch.float32):
        m, c = copy.deepcopy(masked).to(dtype).eval(), copy.deepcopy(compact).to(dtype).eval()
        xs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
        try:
            with torch.no_grad():
                a, b = c(*xs), m(*xs)
        except RuntimeError:  # a float32 constant in the graph meets float64
            continue
        a, b = a - a.mean(0), b - b.mean(0)
        return float((a - b).abs().max() / b.abs().max()), "fp64" if dtype == torch.float64 else "fp32"
    raise RuntimeError("the models run in neither float64 nor float32")


def _open_equal(model, inputs, kwargs, granularity: str) -> bool:
    res = hf.insert_gates(model, hf.GateConfig(granularity=granularity, seed=0), example_inputs=inputs,
                          example_kwargs=kwargs or None, frontend="export")
    with torch.no_grad():
        want = model(*inputs, **kwargs)
        return torch.equal(want.logits if hasattr(want, "logits") else want, res.graph_module.eval()(*inputs))


def run_model(name: str, tmp: Path) -> dict:
    model, inputs, kwargs = build_hf(name)
    t0 = time.perf_counter()
    gm = hf.trace(copy.deepcopy(model), inputs, example_kwargs=kwargs or None, frontend="export")
    t1 = time.perf_counter()
    res = hf.insert_gates(gm, hf.GateConfig(granularity="channel", seed=0), example_inputs=inputs)
    t2 = time.perf_counter()
    gated = res.graph_module.eval()
    units = {"head": 0, "channel": 0}
    for g in res.report.channel_groups:
        if g.gated:
            units[g.unit] = units.get(g.unit, 0) + 1
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "capture_s": t1 - t0,
           "insert_s": t2 - t1, "share": res.report.gateable_share, "head_groups": units["head"],
           "channel_groups": units["channel"],
           "open_equal": all(_open_equal(model, inputs, kwargs, g) for g in ("weight", "channel")), "cells": []}
    for closed in (0.3, 0.5, 0.9):
        close_at_random(gated, closed)
        folded = hf.fold_masks(gated, hf.FoldConfig(round_to=1))
        compact = folded.graph_module
        deviation, precision = _deviation(gated, compact, inputs)
        cell = {"closed": closed, "deviation": deviation, "precision": precision,
                "deleted": folded.report.deleted_units, "closed_units": folded.report.closed_units,
                "params_kept": sum(p.numel() for p in compact.parameters()) / row["params"]}
        if closed == 0.5:
            dense_onnx, compact_onnx = tmp / f"{name}_dense.onnx", tmp / f"{name}_compact.onnx"
            hf.export_onnx(gm, inputs, dense_onnx)
            cell["parity"] = hf.export_onnx(compact, inputs, compact_onnx).max_abs_diff
            dense_ms, compact_ms = (r["median_ms"] for r in compare_latency([dense_onnx, compact_onnx], batch=2))
            cell["speedup"] = dense_ms / compact_ms
        row["cells"].append(cell)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = [f"Tiny random configs (tests/models.py: build_hf), transformers 5.25.0. Machine: {common.machine()}.", "",
             "| model | params | capture / insert_gates | share | gated groups (head / channel) | open gates equal "
             "(weight, channel) | fold at 30 / 50 / 90% closed: max deviation, units deleted of closed, params "
             "kept | ONNX parity at 50% | ORT speed-up at 50% |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = "; ".join(f"{c['deviation']:.1e}{' (fp32)' if c.get('precision') == 'fp32' else ''}, "
                          f"{c['deleted']}/{c['closed_units']}, {c['params_kept']:.2f}" for c in r["cells"])
        mid = next(c for c in r["cells"] if c["closed"] == 0.5)
        lines.append(f"| {r['model']} | {r['params']:,} | {r['capture_s']:.2f} / {r['insert_s']:.2f} s | "
                     f"{r['share']:.3f} | {r['head_groups']} / {r['channel_groups']} | {r['open_equal']} | {cells} | "
                     f"{mid['parity']:.1e} | {mid['speedup']:.2f}x |")
    lines += ["", "A group whose units all close keeps FoldConfig.min_channels (1) of them, hence deleted "
              "< closed in some cells. (fp32): the model computes in float32 itself; the check ran in float32. "
              "Reproduce: `python tools/bench_transformers.py --extra --write docs/BENCHMARKS.md`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--extra", action="store_true", help="also Mistral, Phi-3, Gemma, OPT, RoBERTa, DistilBERT")
    parser.add_argument("--from-json", default=None, help="render the rows of an earlier --json run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.from_json:
        rows = common.load_rows(args.from_json)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [run_model(name, Path(tmp)) for name in HF_ZOO + (HF_EXTRA if args.extra else [])]
    text = "## Hugging Face transformers through the export front end (tools/bench_transformers.py)\n\n" + table(rows)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.write:
        common.write_section(Path(args.write), "bench_transformers", text)


if __name__ == "__main__":
    main()
