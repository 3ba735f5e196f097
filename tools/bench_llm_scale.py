"""The 1B-parameter point: a Llama-style causal LM (TinyLlama-1.1B's shape, random init, fp32, CPU)
through capture, insert_gates at channel granularity, one training step and fold_masks.

Each phase is timed and its peak resident memory read from the kernel (``VmHWM``, reset before the
phase through ``/proc/self/clear_refs``; Linux only). The training step does what a trainer step
does: the language-modelling loss plus the pressure term (as ``hf.pressure_loss``), backward, SGD with
momentum 0.9 on the weights (without the trainer's weight decay) and Adam on the flows. The fold
closes a random ``--closed`` of every channel group and deletes them (``inplace=True``: no second copy
of the model). Needs ``pip install .[hf]``.

Usage: python tools/bench_llm_scale.py [--layers 22] [--seq 64] [--closed 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import hyperflux_fx as hf
from hyperflux_fx.frontend.hf import HFLogits, language_model_loss


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _phase(rows: list[dict], name: str, fn):
    _reset_peak()
    t0 = time.perf_counter()
    out = fn()
    rows.append({"phase": name, "seconds": round(time.perf_counter() - t0, 1), "peak_gib": round(_peak_gib(), 2)})
    print(f"{name:<28} {rows[-1]['seconds']:>8.1f} s   peak RSS {rows[-1]['peak_gib']:6.2f} GiB", flush=True)
    return out


def _step(gm: torch.nn.Module, ids: torch.Tensor) -> float:
    weights = [p for n, p in gm.named_parameters() if "hyperflux" not in n]
    flows = [g.flow for g in hf.gates(gm)]
    sgd = torch.optim.SGD(weights, lr=0.01, momentum=0.9)
    adam = torch.optim.Adam(flows, lr=1e-3)
    gm.train()
    loss = language_model_loss(gm(ids[:, :-1]), ids[:, 1:]) + hf.pressure_loss(gm, 1e-3)
    loss.backward()
    sgd.step()
    adam.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--closed", type=float, default=0.5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import transformers

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                      num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4)
    rows: list[dict] = []
    model = _phase(rows, "build (random init)", lambda: HFLogits(transformers.LlamaForCausalLM(config).eval()))
    n = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n:,} ({n * 4 / 2**30:.2f} GiB fp32)")
    ids = torch.randint(0, 32000, (2, args.seq + 1), generator=torch.Generator().manual_seed(1))
    example = (ids[:, :-1],)
    gm = _phase(rows, "capture (torch.export)", lambda: hf.trace(model, example, frontend="export"))
    res = _phase(rows, "insert_gates (channel)", lambda: hf.insert_gates(
        gm, hf.GateConfig(granularity="channel", seed=0), example_inputs=example, inplace=True))
    gated = res.graph_module
    print(f"channel groups gated: {sum(g.gated for g in res.report.channel_groups)}, "
          f"share {res.report.gateable_share:.3f}")
    loss = _phase(rows, "one training step", lambda: _step(gated, ids))
    print(f"loss {loss:.3f}")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for g in hf.gates(gated):
            g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - args.closed)
    gated.zero_grad(set_to_none=True)
    folded = _phase(rows, "fold_masks", lambda: hf.fold_masks(gated, hf.FoldConfig(round_to=1), inplace=True))
    after = sum(p.numel() for p in folded.graph_module.parameters())
    print(f"after the fold: {after:,} parameters ({after / n:.3f} of dense)")
    if args.json:
        Path(args.json).write_text(json.dumps({"parameters": n, "after_fold": after, "rows": rows, "seq": args.seq,
                                               "machine": platform.machine(), "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
