"""Do the targets land? hyperflux-compile with its defaults, exact and latency targets, measured.

1. Exact targets: channel gates, 0.5 and 0.75 of the MACs and of the parameters, on torchvision
   resnet18 (3x32x32, synthetic data, 1 pruning + 1 regrowth epoch, no dense training) and on the
   embedded digits_cnn (its default schedule): the compact model's own count against the target.
2. Latency targets: ``--target-speedup 2`` and ``3`` on torchvision resnet18 and mobilenet_v2
   (3x32x32, synthetic, short run): the measured ONNX Runtime speed-up against the target, the
   model's predicted compact latency against the measured one (the model predicts a fraction of the
   dense latency; its ms are anchored on the dense model measured beside the compact one, as the CLI
   reports them; the dense ms at calibration and at the end show how far the machine moved), and the
   latency table's build time cold (an empty cache) and warm. Each latency target runs ``--repeats``
   times (2 by default), the later runs with a warm table.

Every run is the CLI with its defaults apart from the target and the schedule; nothing is set by hand
that the CLI does not default to. Usage: python tools/bench_targets.py [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--data", "synthetic", "--num-classes", "10", "--input-shape", "2,3,32,32", "--epochs", "1",
         "--regrowth-epochs", "1", "--dense-epochs", "0"]


def _run(args: list[str], out: Path, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "hyperflux_fx.cli", *args, "--out", str(out), "--quiet", "--force"]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return json.loads((out / "summary.json").read_text())


def exact_rows(tmp: Path, env: dict[str, str]) -> list[str]:
    rows = ["| model | target | asked | compact model's own count | off by |", "|---|---|---|---|---|"]
    sources = [("torchvision:resnet18", SHORT), ("examples/digits_cnn.py", ["--no-export"])]
    for source, extra in sources:
        for measure in ("macs", "params"):
            for aim in (0.5, 0.75):
                s = _run([source, *extra, "--target", measure, "--target-sparsity", str(aim)], tmp / "run", env)
                got = 1 - (s["macs_compact"] / s["macs_dense"] if measure == "macs"
                           else s["params_compact_stored"] / s["params_dense"])
                rows.append(f"| {source} | {measure} | {aim:.2f} | {got:.4f} | {100 * (got - aim):+.2f} pt |")
                print(rows[-1], file=sys.stderr)
    return rows


def latency_rows(tmp: Path, env: dict[str, str], repeats: int) -> list[str]:
    rows = ["| model | speed-up asked | measured | off by | predicted ms | measured ms | off by | predicted speed-up "
            "| off by | dense ms at calibration / at the end | table |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in ("resnet18", "mobilenet_v2"):
        for x in [x for x in (2, 3) for _ in range(repeats)]:
            s = _run([f"torchvision:{model}", *SHORT, "--target-speedup", str(x)], tmp / "run", env)
            t = s["latency_table"]
            table = (f"cold: {t['measured']} timings in {t['seconds']:.1f} s" if t["measured"]
                     else f"warm: {t['cached']} cached, {t['seconds']:.2f} s")
            pred, meas = s["latency_predicted_ms_compact"], s["ort_latency_ms_compact"]
            px, dense0 = s["latency_predicted_speedup"], t["calibration"][0]["measured_ms"]
            rows.append(f"| {model} | {x:.2f}x | {s['speedup']:.2f}x | {100 * (s['speedup'] / x - 1):+.1f}% | "
                        f"{pred:.3f} | {meas:.3f} | {100 * (pred / meas - 1):+.1f}% | {px:.2f}x | "
                        f"{100 * (px / s['speedup'] - 1):+.1f}% | {dense0:.3f} / {s['ort_latency_ms_dense']:.3f} | "
                        f"{table} |")
            print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each latency target")
    parser.add_argument("--part", choices=("all", "exact", "latency"), default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "HYPERFLUX_CACHE": str(tmp / "cache")}  # an empty cache: the first table is cold
        exact = exact_rows(tmp, env) if args.part != "latency" else ["(not run)"]
        latency = latency_rows(tmp, env, args.repeats) if args.part != "exact" else ["(not run)"]
    text = "\n".join([f"Machine: {common.machine()}. CLI defaults (channel gates, round_to=\"auto\").", "",
                      "Exact targets (the compact model's own parameter / MAC count):", "", *exact, "",
                      "Latency targets (ONNX Runtime CPU, 1 thread, batch 2, dense and compact measured side by "
                      "side; the first run builds the table in an empty cache):", "", *latency])
    print(text)
    if args.write:
        common.write_section(Path(args.write), "bench_targets", "## Do the targets land? (tools/bench_targets.py)"
                             "\n\n" + text + f"\n\nReproduce: `python tools/bench_targets.py --write {args.write}`")


if __name__ == "__main__":
    main()
