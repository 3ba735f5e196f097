"""Measured ONNX Runtime speed-up of compact models vs dense, against the MAC ratio, with the defaults.

The model zoo of the acceptance criteria at 3x32x32 (the two ViTs built for 32x32 inputs) plus
resnet50, mobilenet_v2 and convnext_atto at 3x224x224: channel gates inserted, structured masks
closing ``--closed`` (50% and 75%) of the units of every group (uniform random per group),
``fold_masks`` with its default ``FoldConfig()`` (``round_to="auto"``: nothing set by hand), exported
with ``export_onnx`` (parity checked), and timed in ONNX Runtime (CPU, 1 intra-op thread, all graph
optimisations) together with the dense model's export in the same process, alternating run by run.
Printed per row: MAC ratio (dense/compact), latency ratio at each batch size (dense/compact, medians)
and latency ratio / MAC ratio (aim: >= 0.85 at batch 16 and >= 0.7 at batch 1 on CNNs; never < 1).

Usage: python tools/bench_speed.py [--closed 0.5,0.75] [--batch-sizes 1,16] [--models a,b] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common

import hyperflux_fx as hf
from hyperflux_fx.analysis.runtime import resolve_fold_config
from hyperflux_fx.export.latency import session as _session

MODELS = [("torchvision", "resnet18", 32), ("torchvision", "resnet50", 32), ("torchvision", "vgg19_bn", 32),
          ("torchvision", "mobilenet_v2", 32), ("timm", "resnet18", 32), ("timm", "mobilenetv3_small_100", 32),
          ("timm", "efficientnet_b0", 32), ("timm", "convnext_atto", 32), ("timm", "deit_tiny_patch16_224", 32),
          ("timm", "vit_tiny_patch16_224", 32), ("torchvision", "resnet50", 224), ("torchvision", "mobilenet_v2", 224),
          ("timm", "convnext_atto", 224)]


def _build(lib: str, name: str, size: int):
    torch.manual_seed(0)
    if lib == "timm":
        import timm

        extra = {"img_size": size} if "patch16" in name else {}
        return timm.create_model(name, pretrained=False, **extra).eval()
    import torchvision

    return torchvision.models.get_model(name, weights=None).eval()


def _alternate(paths: list[str], shape: tuple[int, ...], repeats: int, warmup: int = 3) -> list[float]:
    """Median latency (ms) of each file, run alternately on the same input."""
    sessions = [_session(p) for p in paths]
    x = torch.randn(*shape).numpy()
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds, strict=True):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(repeats):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append((time.perf_counter() - t0) * 1000)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--closed", default="0.5,0.75")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    closed = [float(c) for c in args.closed.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    wanted = set(args.models.split(",")) if args.models else {m[1] for m in MODELS}
    rows = []
    round_to = resolve_fold_config(hf.FoldConfig()).round_to
    tmp = Path(tempfile.mkdtemp(prefix="bench_speed_"))
    for lib, name, size in MODELS:
        if name not in wanted:
            continue
        model = _build(lib, name, size)
        x = torch.randn(1, 3, size, size)
        dense_path = tmp / f"{name}_{size}_dense.onnx"
        hf.export_onnx(model, x, dense_path)
        _, macs_dense = hf.count_params_and_macs(model, x)
        for frac in closed:
            gated = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0),
                                    example_inputs=x).graph_module.eval()
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for g in hf.gates(gated):
                    g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - frac)
            compact = hf.fold_masks(gated).graph_module.eval()  # the defaults: round_to="auto"
            _, macs_compact = hf.count_params_and_macs(compact, x)
            path = tmp / f"{name}_{size}_{frac}.onnx"
            hf.export_onnx(compact, x, path)
            mac_ratio = macs_dense / macs_compact
            lat = {}
            for b in batches:
                reps = args.repeats if (size <= 64 or b == 1) else max(5, args.repeats // 4)
                d, c = _alternate([str(dense_path), str(path)], (b, 3, size, size), reps)
                lat[b] = (d, c, d / c)
            rows.append((f"{lib}:{name} ({size}x{size})", frac, mac_ratio, lat))
            print(f"  {name} closed {frac}: MAC ratio {mac_ratio:.2f} "
                  + " ".join(f"b{b}: {v[2]:.2f}x" for b, v in lat.items()), file=sys.stderr)
    lines = [(f"ONNX Runtime CPU, 1 intra-op thread, all graph optimisations; medians of alternating runs; channel "
             f"masks uniform random per group; fold_masks with its defaults (round_to=\"auto\" = {round_to} on "
             f"this CPU). Machine: {common.machine()}."),
             "",
             "| model | closed | MAC ratio | " + " | ".join(f"b{b} dense ms | b{b} compact ms | b{b} speed-up | "
                                                          f"b{b} speed-up / MAC ratio" for b in batches) + " |",
             "|---|---|---|" + "---|---|---|---|" * len(batches)]
    for model, frac, mac_ratio, lat in rows:
        cells = " | ".join(f"{d:.2f} | {c:.2f} | {r:.2f} | {r / mac_ratio:.2f}" for d, c, r in lat.values())
        lines.append(f"| {model} | {frac:.0%} | {mac_ratio:.2f} | {cells} |")
    slowest = min(v[2] for *_, lat in rows for v in lat.values()) if rows else float("nan")
    lines += ["", f"Slowest compact/dense speed-up over all rows and batch sizes: {slowest:.2f}x."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        common.write_section(Path(args.write), "bench_speed", "## Measured speed-up in ONNX Runtime "
                             "(tools/bench_speed.py)\n\n" + text + f"\n\nReproduce: `python tools/bench_speed.py "
                             f"--write {args.write}`")


if __name__ == "__main__":
    main()
