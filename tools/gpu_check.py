"""One short script for a lent GPU: the CUDA/AMP checks and the GPU step-time benchmark.

Runs, in one process, on the first CUDA device:
1. the trainer on a tiny model with amp="bf16" and amp="fp16" (GradScaler, pressure scaled by the
   loss scale): lands on the target, finite loss; channel gates with exact MAC / parameter targets
   (the cost model and the landing with the model on the GPU): the folded model measures what
   hf.train reported;
2. training-step time of resnet18 (10 classes, 3x32x32, batch 256) dense vs weight-gated, AMP bf16,
   alternating, medians — the ratio is the GPU counterpart of tools/bench_overhead.py;
3. one Hyperflux epoch of resnet18 on synthetic CIFAR-shaped data through ``hf.train`` (AMP), with
   its wall time per step.

Usage (on the device machine): python tools/gpu_check.py   — prints one block of figures; exits 2
without CUDA. ``--cpu-smoke`` runs the same code on the CPU with tiny sizes (checks the script).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hyperflux_fx as hf

DEV = "cuda"  # --cpu-smoke switches to the CPU with tiny sizes, to check the script itself


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def amp_checks() -> list[str]:
    lines = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    for amp in (("bf16", "fp16") if DEV == "cuda" else ("bf16",)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        gated = hf.insert_gates(model, hf.GateConfig(seed=0)).graph_module
        res = hf.train(gated, loader, loader, hf.TrainConfig(target_sparsity=0.8, epochs=4, regrowth_epochs=2,
                                                             lr=0.05, device=DEV, amp=amp))
        ok = abs(res.sparsity - 0.8) < 0.01 and res.val_accuracy > 0.5
        lines.append(f"amp={amp}: sparsity {res.sparsity:.4f} val {res.val_accuracy:.3f} -> {'OK' if ok else 'FAIL'}")
    return lines


def exact_macs_check(n: int = 1024) -> list[str]:
    """Channel gates with the exact MAC target (the CLI's default) trained on the device, AMP: the
    fraction hf.train reports is what the folded model measures, within 1 pt of the target."""
    import torchvision

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    lines = []
    for measure in ("macs", "params"):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        example = torch.randn(2, 3, 32, 32)
        gated = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0),
                                example_inputs=example).graph_module
        t0 = time.perf_counter()
        res = hf.train(gated, loader, None, hf.TrainConfig(target_sparsity=0.5, epochs=2, regrowth_epochs=1,
                                                           target_measure=measure, device=DEV,
                                                           amp="bf16" if DEV == "cuda" else "off"))
        seconds = time.perf_counter() - t0
        compact = hf.fold_masks(gated.cpu()).graph_module
        p, m = hf.count_params_and_macs(compact, example)
        p0, m0 = hf.count_params_and_macs(model, example)
        measured = 1 - (m / m0 if measure == "macs" else p / p0)
        ok = abs(measured - res.sparsity) < 1e-9 and abs(measured - 0.5) <= 0.01
        lines.append(f"exact {measure} target 0.5 (resnet18, channel gates, {seconds:.0f} s): reported "
                     f"{res.sparsity:.4f}, folded model {measured:.4f} -> {'OK' if ok else 'FAIL'}")
    return lines


def train_overhead(n: int = 5120) -> list[str]:
    """Where hf.train's time goes beyond the training step: its fixed setup (1 vs 2 epochs), the
    per-interval bookkeeping (20 intervals vs 1 per epoch) and flux tracking (on vs off)."""
    import torchvision

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    spe = len(loader)
    amp = "bf16" if DEV == "cuda" else "off"
    lines = []
    runs = [("1 epoch, 20 intervals, flux on", 1, None, True), ("1 epoch, 1 interval, flux on", 1, spe, True),
            ("1 epoch, 1 interval, flux off", 1, spe, False), ("2 epochs, 1 interval/epoch, flux on", 2, spe, True)]
    for name, epochs, ivl, flux in [runs[0], *runs]:  # the first run again, as warm-up
        torch.manual_seed(0)
        gated = hf.insert_gates(torchvision.models.resnet18(num_classes=10), hf.GateConfig(seed=0)).graph_module
        _sync()
        t0 = time.perf_counter()
        hf.train(gated, loader, None, hf.TrainConfig(target_sparsity=0.9, epochs=epochs, regrowth_epochs=0,
                                                     interval_steps=ivl, device=DEV, amp=amp, track_flux=flux))
        _sync()
        lines.append(f"  hf.train {name}: {time.perf_counter() - t0:.2f} s for {epochs * spe} steps")
    for i in range(2):  # warm-up, then timed
        torch.manual_seed(0)
        dense = torchvision.models.resnet18(num_classes=10)
        _sync()
        t0 = time.perf_counter()
        hf.train_dense(dense, loader, epochs=1, device=DEV, amp=amp)
        _sync()
        if i:
            lines.append(f"  train_dense 1 epoch: {time.perf_counter() - t0:.2f} s for {spe} steps")
    return ["hf.train overhead (resnet18, batch 128):", *lines[1:]]


def compile_check() -> str:
    """The trainer with ``compile=True`` (torch.compile of the gated model) on a small CNN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, 16, 16, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 2))
    gated = hf.insert_gates(model, hf.GateConfig(seed=0)).graph_module
    t0 = time.perf_counter()
    try:
        res = hf.train(gated, loader, loader, hf.TrainConfig(target_sparsity=0.5, epochs=3, regrowth_epochs=1,
                                                             device=DEV, compile=True))
    except Exception as exc:  # noqa: BLE001 - report it, do not stop the other checks
        return f"compile=True: FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    ok = abs(res.sparsity - 0.5) < 0.01
    seconds = time.perf_counter() - t0
    return (f"compile=True: sparsity {res.sparsity:.4f} val {res.val_accuracy:.3f} in {seconds:.0f} s "
            f"-> {'OK' if ok else 'FAIL'}")


def step_time(steps: int = 30, batch: int = 256) -> str:
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).to(DEV).train()
    gated = hf.insert_gates(dense, hf.GateConfig(seed=0)).graph_module.to(DEV).train()
    hf.set_pressure(gated, 1.0)
    x = torch.randn(batch, 3, 32, 32, device=DEV)
    y = torch.randint(0, 10, (batch,), device=DEV)
    flows = [g.flow for g in hf.gates(gated)]
    ids = {id(f) for f in flows}
    opt_d = [torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9)]
    opt_g = [torch.optim.SGD([p for p in gated.parameters() if id(p) not in ids], lr=0.01, momentum=0.9),
             torch.optim.Adam(flows, lr=1e-3, fused=True)]

    def step(model, opts) -> float:
        _sync()
        t0 = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        for o in opts:
            o.step()
        _sync()
        return time.perf_counter() - t0

    for _ in range(5):
        step(dense, opt_d)
        step(gated, opt_g)
    td, tg = [], []
    for _ in range(steps):
        td.append(step(dense, opt_d))
        tg.append(step(gated, opt_g))
    d, g = statistics.median(td) * 1000, statistics.median(tg) * 1000
    return f"resnet18 3x32x32 batch {batch} AMP bf16 step: dense {d:.2f} ms, gated {g:.2f} ms, ratio {g / d:.3f}"


def hyperflux_epoch(n: int = 5000) -> str:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (x.shape[0],), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    gated = hf.insert_gates(model, hf.GateConfig(seed=0)).graph_module
    dense = torchvision.models.resnet18(num_classes=10)
    amp = "bf16" if DEV == "cuda" else "off"
    hf.train_dense(dense, loader, epochs=1, device=DEV, amp=amp)  # warm-up (cudnn autotuning, allocator)
    _sync()
    t0 = time.perf_counter()
    hf.train_dense(dense, loader, epochs=1, device=DEV, amp=amp)
    _sync()
    td = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = hf.train(gated, loader, None, hf.TrainConfig(target_sparsity=0.9, epochs=1, regrowth_epochs=0,
                                                       device=DEV, amp=amp, track_flux=True))
    _sync()
    dt = time.perf_counter() - t0
    return (f"resnet18 epoch of {len(loader)} steps (batch 128, AMP {amp}): train_dense {1000 * td / len(loader):.1f} "
            f"ms/step, hf.train {1000 * dt / len(loader):.1f} ms/step (ratio {dt / td:.2f}; includes hf.train's own "
            f"setup, {res.history[-1]['interval']} intervals of bookkeeping, flux tracking), density {res.density:.3f}")


def main() -> int:
    global DEV
    if "--cpu-smoke" in sys.argv:
        DEV = "cpu"
        torch.set_num_threads(1)
        for line in amp_checks():
            print(line)
        print("\n".join(exact_macs_check(n=128)))
        print(step_time(steps=2, batch=8))
        print(hyperflux_epoch(n=64))
        print("\n".join(train_overhead(n=256)))
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    if "--overhead-only" in sys.argv:
        print("\n".join(train_overhead()))
        return 0
    for line in amp_checks():
        print(line)
    print("\n".join(exact_macs_check()))
    print(step_time())
    print(hyperflux_epoch())
    print("\n".join(train_overhead()))
    print(compile_check())
    return 0


if __name__ == "__main__":
    sys.exit(main())
