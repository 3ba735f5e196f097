"""Torch-Pruning's Llama recipe against our default, on the small Llama of tools/bench_lm_recipe.py.

Issue 25 asks for our LM default against Torch-Pruning 1.6.1's LLM example at 2x and 4x fewer parameters.
The example's settings are used as published: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2,
group_reduction="mean")`` (1.6.1 has no ``GroupNormImportance``, the name the example uses), local pruning
(every layer the same shapes), ``num_heads`` for q_proj (query heads) and k_proj / v_proj (KV heads),
``prune_num_heads=True``, ``prune_head_dims=False``, ``head_pruning_ratio`` = ``pruning_ratio``,
``round_to=4``, the LM head ignored; the model's output is its logits (``output_transform``: 1.6.1 trips
over the ``ModelOutput`` otherwise).

**Where it runs.** With transformers as pinned (5.x) Torch-Pruning's dependency walk does not end on this
Llama: around the attention the same nodes come back with new index sets every turn and a pruning group
grows without bound (``--walk`` shows it, with a guard on the group's size). The example was written for
transformers 4.x, where the same walk takes well under a second. So the pruning step runs in a side
environment with transformers 4.46.3 (made once, by pip with exact pins, under the cache folder; or
``--side-python``), which writes the pruned model as a Hugging Face folder (config with the new sizes) and
its logits on a fixed batch. Back in the pinned environment the folder is loaded with ``from_pretrained``
(no missing or unexpected keys), its logits are compared with the side environment's, and it is
fine-tuned with our language-model recipe (AdamW, betas 0.9/0.95, weight decay 0.1, warm-up 3%, cosine to
``regrowth_lr_final``, gradient norms clipped at 1.0), on the same text, batch and epochs as one
``hyperflux-compile`` run of tools/bench_lm_prune.py (``--epochs`` + ``--regrowth-epochs``: the same token
budget), with and without the same distillation from the same dense model (DISTILL_ALPHA, T).

The fine-tune LR is chosen as ours was: on the first of ``--seeds`` alone, best validation loss of
``--lrs`` (with distillation), then kept for every seed and for the runs without distillation. The parameter target is
the fraction of the dense model's parameters our runs keep (``--sparsities``); Torch-Pruning's uniform
ratio is bisected to the closest parameter count. Our side's rows come from tools/bench_lm_prune.py's
JSON (``--ours``).

Usage: python tools/bench_lm_tp.py [--seeds 0,1,2] [--sparsities 0.5,0.75] [--lrs 3e-4,1e-3,3e-3]
                                   [--parallel 2] [--ours rows.json] [--json FILE] [--from-json FILE]
                                   [--write docs/BENCHMARKS.md]
       python tools/bench_lm_tp.py --walk [--layers 4] [--kv-heads 2] [--max-deps 20000]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402
from bench_lm_recipe import CONFIG, PRETRAIN_EPOCHS, cache_dir, pretrained  # noqa: E402

SIDE_PINS = ("torch==2.14.1", "transformers==4.46.3", "torch-pruning==1.6.1")
SIDE_PROBE = 16  # tokens of the fixed batch whose logits both environments compute


class RunawayGroup(RuntimeError):
    pass


def _guard(max_deps: int):
    """Make Torch-Pruning's Group.add_dep raise once a group holds ``max_deps`` dependencies."""
    from torch_pruning.dependency import group as tp_group

    original = tp_group.Group.add_dep

    def add_dep(self, dep, idxs):
        original(self, dep, idxs)
        if len(self._group) >= max_deps:
            counts = collections.Counter(str(getattr(d.target, "name", d.target)) for d, _ in self._group)
            raise RunawayGroup(f"a pruning group reached {len(self._group)} dependencies; the nodes it keeps "
                               f"revisiting: {counts.most_common(6)}")

    tp_group.Group.add_dep = add_dep


def prune(model, ratio: float):
    """Torch-Pruning's LLM example, as published (see the module docstring)."""
    import torch_pruning as tp

    cfg = model.config
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = num_heads[m.v_proj] = cfg.num_key_value_heads
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=torch.randint(0, cfg.vocab_size, (1, 16)),
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"), global_pruning=False,
        pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=ratio, round_to=4, output_transform=lambda out: out.logits)
    for group in pruner.step(interactive=True):
        group.prune()
    return model


def _sizes(model) -> dict:
    """The pruned model's sizes as config fields; raises when the layers differ (local pruning keeps them
    alike: a Hugging Face config has one value per field)."""
    layers = model.model.layers
    head_dim = model.config.head_dim
    per_layer = {(layer.self_attn.q_proj.out_features // head_dim, layer.self_attn.k_proj.out_features // head_dim,
                  layer.mlp.gate_proj.out_features) for layer in layers}
    if len(per_layer) != 1:
        raise RuntimeError(f"Torch-Pruning left layers of different sizes: {sorted(per_layer)}")
    heads, kv_heads, mlp = per_layer.pop()
    return {"hidden_size": model.model.embed_tokens.weight.shape[1], "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": mlp}


def _prune_to(folder: Path, params: int, out: Path) -> None:
    """Side environment: prune ``folder`` to about ``params`` parameters, save it as a Hugging Face folder
    with its logits on the probe batch and what was done (tp.json)."""
    import transformers

    torch.set_num_threads(1)
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tried: dict[float, tuple[int, dict]] = {}  # ratio: (parameters, sizes)

    def pruned(r: float):
        m = prune(copy.deepcopy(dense), r)
        tried[r] = count(m), _sizes(m)
        return m

    t0 = time.time()
    lo, hi = 0.0, 0.9
    for _ in range(12):  # bisect the uniform ratio: more pruning, fewer parameters
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(pruned(mid)) > params else (lo, mid)
    # a config the pinned transformers loads: the width a multiple of the query heads (its validator's rule)
    loadable = [r for r, (_, z) in tried.items() if z["hidden_size"] % z["num_attention_heads"] == 0]
    ratio = min(loadable, key=lambda r: (abs(tried[r][0] - params), r))
    model = pruned(ratio)
    seconds = time.time() - t0
    sizes = tried[ratio][1]
    model.config.update(sizes)
    probe = torch.randint(0, model.config.vocab_size, (2, SIDE_PROBE), generator=torch.Generator().manual_seed(0))
    for layer in model.model.layers:  # 4.x attention reads these attributes in forward
        attn = layer.self_attn
        attn.num_heads, attn.num_key_value_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        attn.num_key_value_groups = attn.num_heads // attn.num_key_value_heads
        attn.hidden_size = model.config.hidden_size
    with torch.no_grad():
        logits = model(probe, use_cache=False).logits
    model.save_pretrained(out)
    torch.save({"probe": probe, "logits": logits}, out / "probe.pt")
    (out / "tp.json").write_text(json.dumps({
        "ratio": ratio, "params": count(model), "params_dense": count(dense), "params_asked": params,
        "seconds_bisect_and_prune": seconds, "sizes": sizes, "refused": len(tried) - len(loadable),
        "versions": {n: version(n) for n in ("torch", "transformers", "torch-pruning")}}))


def side_python(args: argparse.Namespace) -> str:
    """The side environment's interpreter: ``--side-python``, or a venv under the cache folder made once
    with SIDE_PINS."""
    if args.side_python:
        return args.side_python
    env = cache_dir() / "tp-side-env"
    python = env / "bin" / "python"
    if not (env / "ready").exists():
        print(f"making the side environment {env} ({', '.join(SIDE_PINS)}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SIDE_PINS], check=True)
        (env / "ready").write_text("\n".join(SIDE_PINS))
    return str(python)


def load_pruned(out: Path):
    """The side environment's folder in the pinned transformers; the loading report and the logits' distance."""
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                    output_loading_info=True)
    model.eval()
    saved = torch.load(out / "probe.pt")
    with torch.no_grad():
        logits = model(saved["probe"], use_cache=False).logits
    spread = float(saved["logits"].max() - saved["logits"].min())
    keys = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    return model, keys, float((logits - saved["logits"]).abs().max()) / spread


def finetune(student_dir: Path, dense_dir: Path, seed: int, lr: float, distill: bool, epochs: int) -> dict:
    """Our language-model recipe on the pruned folder (the module docstring); its validation loss."""
    from torch.utils.data import DataLoader

    from hyperflux_fx.config import DISTILL_ALPHA
    from hyperflux_fx.config import LANGUAGE_MODEL_RECIPE as R
    from hyperflux_fx.frontend.hf import SEQUENCE, HFLogits, language_model_loss, text_datasets
    from hyperflux_fx.train.distill import Distiller, frozen_teacher
    from hyperflux_fx.train.evaluate import evaluate_loss
    from hyperflux_fx.train.optim import clip_gradients, warmup_cosine, weight_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model, keys, diff = load_pruned(student_dir)
    student = HFLogits(model)
    distiller = None
    if distill:  # the blend and the frozen teacher hyperflux-compile's distillation uses
        import transformers

        dense = HFLogits(transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32))
        distiller = Distiller(frozen_teacher(dense), DISTILL_ALPHA, R["distill_temperature"], required=True)
    train, val = text_datasets(SEQUENCE)
    loader = DataLoader(train, batch_size=64, shuffle=True)
    val_loader = DataLoader(val, batch_size=256)
    before = evaluate_loss(student, val_loader, language_model_loss)
    opt = weight_optimizer(student, list(student.parameters()), lr=lr, momentum=0.0,
                           weight_decay=R["weight_decay"], optimizer="adamw", betas=R["betas"])
    steps = epochs * len(loader)
    warmup = int(R["warmup_fraction"] * steps)
    t0, i = time.time(), 0
    student.train()
    for _ in range(epochs):
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = warmup_cosine(lr, R["regrowth_lr_final"], i, steps, warmup)
            opt.zero_grad(set_to_none=True)
            out = student(x)
            loss = language_model_loss(out, y)
            if distiller is not None:
                loss = distiller.loss(loss, out, distiller.teacher_outputs((x,)))[0]
            loss.backward()
            clip_gradients(opt, R["clip_grad_norm"])
            opt.step()
            i += 1
    student.eval()
    after = evaluate_loss(student, val_loader, language_model_loss)
    return {"seed": seed, "lr": lr, "distill": distill, "val_loss_pruned": before, "val_loss_compact": after,
            "perplexity_compact": math.exp(after), "params_compact": sum(p.numel() for p in model.parameters()),
            "load_report": keys, "logits_vs_side": diff, "seconds": time.time() - t0}


def _run_self(*flags: str) -> dict:
    """One fine-tune in its own process (one thread): the JSON row it prints last."""
    cmd = [sys.executable, __file__, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def run_all(args: argparse.Namespace, work: Path) -> dict:
    """Prune at each sparsity in the side environment, then the LR sweep on the first seed and every seed's runs."""
    import transformers

    dense_dir = pretrained(args.pretrain_epochs)
    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    n_dense = sum(p.numel() for p in dense.parameters())
    python = side_python(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    pruned = {}
    for s in (float(x) for x in args.sparsities.split(",")):
        out = work / f"tp_{s}"
        subprocess.run([python, __file__, "--prune-to", str(out), "--folder", str(dense_dir), "--params",
                        str(round((1 - s) * n_dense))], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        pruned[s] = {**json.loads((out / "tp.json").read_text()), "dir": str(out)}
        print(f"sparsity {s}: {pruned[s]}", flush=True)

    def job(s: float, seed: int, lr: float, distill: bool) -> dict:
        row = _run_self("--finetune", pruned[s]["dir"], "--folder", str(dense_dir), "--seed", str(seed),
                        "--lr", str(lr), "--distill", "on" if distill else "off", "--epochs", str(args.epochs))
        return {**row, "sparsity": s}

    with ThreadPoolExecutor(args.parallel) as pool:
        sweep = list(pool.map(lambda j: job(*j), [(s, seeds[0], lr, True) for s in pruned for lr in lrs]))
        chosen = {s: min((r for r in sweep if r["sparsity"] == s), key=lambda r: r["val_loss_compact"])["lr"]
                  for s in pruned}
        rest = [(s, seed, chosen[s], distill) for s in pruned for distill in (True, False) for seed in seeds
                if (seed, distill) != (seeds[0], True)]
        rows = list(pool.map(lambda j: job(*j), rest))
    rows += [r for r in sweep if r["lr"] == chosen[r["sparsity"]]]
    return {"rows": rows, "sweep": sweep, "chosen_lr": {str(s): lr for s, lr in chosen.items()},
            "pruned": {str(s): {k: v for k, v in p.items() if k != "dir"} for s, p in pruned.items()},
            "meta": {"machine": common.machine(), "seeds": seeds, "epochs": args.epochs, "lrs": lrs,
                     "pretrain_epochs": args.pretrain_epochs, "pinned": {n: version(n) for n in
                                                                         ("torch", "transformers")}}}


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def render(data: dict, ours: list[dict] | None) -> str:
    meta = data["meta"]
    side = next(iter(data["pruned"].values()))["versions"]
    lines = [f"{meta['machine']}; the pre-trained Llama ({meta['pretrain_epochs']} epochs); Torch-Pruning "
             f"{side['torch-pruning']} pruning under transformers {side['transformers']}, everything else under "
             f"transformers {meta['pinned']['transformers']}; {meta['epochs']} epochs after pruning for every "
             f"method; seeds {meta['seeds']}", "",
             "| params kept | method | distillation | compact val loss (mean ± std) | perplexity | params | LR |",
             "|---|---|---|---|---|---|---|"]
    for s in sorted(data["pruned"], key=float):
        for distill in (True, False):
            mine = [r for r in (ours or []) if r["sparsity"] == float(s)
                    and (("--distill" in r["flags"]) != distill)]
            if mine:
                loss = [r["val_loss_compact"] for r in mine]
                lines.append(f"| {1 - float(s):.2f} | hyperflux-compile `--uniform-layers` | "
                             f"{'on' if distill else 'off'} | {_mean_sd(loss)} | {math.exp(statistics.mean(loss)):.2f} "
                             f"| {statistics.mean(r['params_compact'] for r in mine) / 1e6:.2f}M | recipe |")
            tp = [r for r in data["rows"] if r["sparsity"] == float(s) and r["distill"] == distill]
            if tp:
                loss = [r["val_loss_compact"] for r in tp]
                lines.append(f"| {1 - float(s):.2f} | Torch-Pruning LLM example + our recipe | "
                             f"{'on' if distill else 'off'} | {_mean_sd(loss)} | {math.exp(statistics.mean(loss)):.2f} "
                             f"| {tp[0]['params_compact'] / 1e6:.2f}M | {tp[0]['lr']:g} |")
    lines += ["", "Torch-Pruning's pruned models (the side environment's folder, loaded by the pinned transformers):",
              "",
              "| params kept asked | ratio | sizes (width, heads, KV heads, MLP) | params | loading report | "
              f"logits vs side env (of the spread) | LR sweep on seed {meta['seeds'][0]} (val loss) |",
              "|---|---|---|---|---|---|---|"]
    for s, p in sorted(data["pruned"].items(), key=lambda kv: float(kv[0])):
        z = p["sizes"]
        first = next(r for r in data["rows"] if r["sparsity"] == float(s))
        sweep = ", ".join(f"{r['lr']:g}: {r['val_loss_compact']:.3f}" for r in data["sweep"]
                          if r["sparsity"] == float(s))
        lines.append(f"| {1 - float(s):.2f} | {p['ratio']:.3f} | {z['hidden_size']}, {z['num_attention_heads']}, "
                     f"{z['num_key_value_heads']}, {z['intermediate_size']} | {p['params'] / 1e6:.2f}M | "
                     f"{first['load_report'] or 'no missing or unexpected keys'} | {first['logits_vs_side']:.1e} | "
                     f"{sweep} |")
    return "\n".join(lines)


def walk(args: argparse.Namespace) -> int:
    """Torch-Pruning's recipe in the pinned environment, its groups guarded: pruned, or where the walk went round."""
    import transformers

    folder = cache_dir() / f"llama_small_e{args.pretrain_epochs}"
    if args.layers == CONFIG["num_hidden_layers"] and args.kv_heads == CONFIG["num_key_value_heads"] and (
            folder / "model.safetensors").exists():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        weights = str(folder)
    else:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**{**CONFIG, "num_hidden_layers": args.layers,
                                             "num_key_value_heads": args.kv_heads})
        model, weights = transformers.LlamaForCausalLM(config).eval(), "random weights"
    dense = sum(q.numel() for q in model.parameters())
    print(f"Torch-Pruning {version('torch-pruning')}, transformers {transformers.__version__}; "
          f"Llama {args.layers} layers, {model.config.num_attention_heads} query / {args.kv_heads} KV heads, "
          f"{dense / 1e6:.2f}M params ({weights})")
    _guard(args.max_deps)
    t0 = time.time()
    try:
        prune(model, 0.5)
    except RunawayGroup as e:
        print(f"not pruned after {time.time() - t0:.0f} s: {e}")
        return 1
    print(f"pruned in {time.time() - t0:.1f} s: {dense / 1e6:.2f}M -> "
          f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f}M params")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sparsities", default="0.5,0.75")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    p.add_argument("--epochs", type=int, default=3, help="fine-tune epochs: ours' --epochs + --regrowth-epochs")
    p.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS)
    p.add_argument("--parallel", type=int, default=1, help="fine-tunes at once (one thread each)")
    p.add_argument("--side-python", default=None, help="an interpreter with SIDE_PINS (default: made once)")
    p.add_argument("--ours", default=None, help="tools/bench_lm_prune.py's --json, for our rows")
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", default=None)
    p.add_argument("--write", default=None)
    p.add_argument("--walk", action="store_true", help="only: does the walk end under the pinned transformers?")
    p.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    p.add_argument("--kv-heads", type=int, default=CONFIG["num_key_value_heads"])
    p.add_argument("--max-deps", type=int, default=20000)
    p.add_argument("--prune-to", default=None, help=argparse.SUPPRESS)  # the side environment's step
    p.add_argument("--finetune", default=None, help=argparse.SUPPRESS)  # one fine-tune, in its own process
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--params", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--distill", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        import torch_pruning  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("needs the [bench] and [hf] extras: pip install -e .[bench,hf]") from None
    torch.set_num_threads(1)
    if args.prune_to:
        _prune_to(Path(args.folder), args.params, Path(args.prune_to))
        return 0
    if args.finetune:
        print(json.dumps(finetune(Path(args.finetune), Path(args.folder), args.seed, args.lr, args.distill == "on",
                                  args.epochs)))
        return 0
    if args.walk:
        return walk(args)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            data = run_all(args, Path(tmp))
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=1))
    ours = json.loads(Path(args.ours).read_text())["rows"] if args.ours else None
    text = render(data, ours)
    print(text)
    if args.write:
        common.write_section(Path(args.write), "lm-tp", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
