"""Fixed-pressure sweep: converged density per gamma and the fitted scaling law (HYPERFLUX.md §6).

From a dense digits model (examples/digits_cnn.py, trained first), one run per gamma (doubling):
gates inserted, gamma held fixed through the pressure hooks, a plain training loop (SGD on the
weights, Adam on the flows — no scheduler, no regrowth phase). The converged density is the mean
over the last ``--tail`` epochs; its drift over those epochs is printed as a convergence check.
Then ``S(gamma) = c * exp(-(a0 ln gamma + a1 ln^2 gamma))`` is fitted (least squares on logs) and
R^2 reported; the densities must decrease monotonically with gamma.

Usage: python tools/bench_law.py [--gammas 0.125,...] [--epochs 30] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

import _bench_common as common

import hyperflux_fx as hf


def run_fixed_gamma(dense, loader, gamma: float, epochs: int, flow_lr: float, lr: float, seed: int) -> list[float]:
    """Density after each epoch of training at a fixed gamma."""
    torch.manual_seed(seed)
    gated = hf.insert_gates(dense, hf.GateConfig(seed=seed)).graph_module.train()
    hf.set_pressure(gated, gamma)
    flows = [g.flow for g in hf.gates(gated)]
    flow_ids = {id(f) for f in flows}
    weights = [p for p in gated.parameters() if id(p) not in flow_ids]
    opt_w = torch.optim.SGD(weights, lr=lr, momentum=0.9, weight_decay=5e-4)
    opt_t = torch.optim.Adam(flows, lr=flow_lr, fused=True)
    densities = []
    for _ in range(epochs):
        for x, y in loader:
            opt_w.zero_grad(set_to_none=True)
            opt_t.zero_grad(set_to_none=True)
            F.cross_entropy(gated(x), y, label_smoothing=0.1).backward()  # the hooks add the pressure
            opt_w.step()
            opt_t.step()
        densities.append(hf.density(gated))
    return densities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gammas", default="0.125,0.25,0.5,1,2,4,8")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--tail", type=int, default=4, help="epochs averaged for the converged density")
    parser.add_argument("--dense-epochs", type=int, default=15)
    parser.add_argument("--flow-lr", type=float, default=1e-2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gammas = [float(g) for g in args.gammas.split(",")]
    loader, _ = common.digits_loaders()
    torch.manual_seed(args.seed)
    dense = common.digits_cnn()
    hf.train_dense(dense, loader, epochs=args.dense_epochs, seed=args.seed)
    t0 = time.time()
    rows = []
    for gamma in gammas:
        dens = run_fixed_gamma(dense, loader, gamma, args.epochs, args.flow_lr, args.lr, args.seed)
        tail = dens[-args.tail:]
        rows.append((gamma, statistics.mean(tail), (max(tail) - min(tail)) / statistics.mean(tail)))
        print(f"  gamma {gamma:g}: density {rows[-1][1]:.4f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    law = hf.fit_scaling_law([r[0] for r in rows], [r[1] for r in rows])
    monotone = all(b[1] < a[1] for a, b in itertools.pairwise(rows))
    lines = [(f"digits_cnn from a dense model ({args.dense_epochs} epochs); one run per gamma, {args.epochs} epochs at "
             f"fixed gamma (SGD lr {args.lr}, Adam flow lr {args.flow_lr}), converged density = mean of the last "
             f"{args.tail} epochs. Machine: {common.machine()}."),
             "",
             "| gamma | converged density | relative drift over the tail | law prediction |",
             "|---|---|---|---|"]
    for gamma, d, drift in rows:
        lines.append(f"| {gamma:g} | {d:.4f} | {drift:.3f} | {law.predict(gamma):.4f} |")
    lines += ["", (f"Fit: c = {law.c:.4f}, a0 = {law.a0:.4f}, a1 = {law.a1:.4f}, R^2 = {law.r2:.4f} "
              f"({law.n_points} points); density monotone decreasing in gamma: {monotone}.")]
    text = "\n".join(lines)
    print(text)
    if args.write:
        common.write_section(Path(args.write), "bench_law", "## Pressure scaling law (tools/bench_law.py)\n\n" + text
                             + f"\n\nReproduce: `python tools/bench_law.py --write {args.write}`")
    if not monotone or law.r2 < 0.95:
        print("WARNING: the sweep misses its targets (monotone density, R^2 >= 0.95)", file=sys.stderr)


if __name__ == "__main__":
    main()
