"""Torch-Pruning's Llama recipe on the small Llama of tools/bench_lm_recipe.py: does it prune it?

Issue 25 asks for our LM default against Torch-Pruning 1.6.1's LLM example at 2x and 4x fewer parameters.
The example's settings are used as published: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2,
group_reduction="mean")`` (1.6.1 has no ``GroupNormImportance``, the name the example uses), local pruning,
``num_heads`` for q_proj (query heads) and k_proj / v_proj (KV heads), ``prune_num_heads=True``,
``prune_head_dims=False``, ``head_pruning_ratio`` = ``pruning_ratio``, ``round_to=4``, the LM head ignored;
the model's output is its logits (``output_transform``: 1.6.1 trips over the ``ModelOutput`` otherwise).

Torch-Pruning builds a pruning group by walking its dependency graph until no new (node, indices) pair
appears. On this model (transformers as pinned) the walk does not end: around the attention, the same
nodes come back with new index sets every turn, and the group grows without bound. This tool runs the
recipe with a guard on the group's size (``--max-deps``) and reports either the pruned model's shapes and
parameters, or where the walk went round: the nodes that recur most in the runaway group. The weights do
not matter to the walk, so the tool uses the cached pre-trained folder when there is one and a random
model of the same config otherwise.

Usage: python tools/bench_lm_tp.py [--layers 4] [--kv-heads 2] [--ratio 0.5] [--max-deps 20000]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lm_recipe import CONFIG, cache_dir  # noqa: E402


class RunawayGroup(RuntimeError):
    pass


def _model(layers: int, kv_heads: int):
    import transformers

    folder = cache_dir() / "llama_small_e6"
    if layers == CONFIG["num_hidden_layers"] and kv_heads == CONFIG["num_key_value_heads"] and (
            folder / "model.safetensors").exists():
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), str(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**CONFIG, "num_hidden_layers": layers, "num_key_value_heads": kv_heads})
    return transformers.LlamaForCausalLM(config).eval(), "random weights"


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    p.add_argument("--kv-heads", type=int, default=CONFIG["num_key_value_heads"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--max-deps", type=int, default=20000)
    args = p.parse_args(argv)
    try:
        import torch_pruning  # noqa: F401
        import transformers
    except ImportError:
        raise SystemExit("needs the [bench] and [hf] extras: pip install -e .[bench,hf]") from None
    torch.set_num_threads(1)
    model, weights = _model(args.layers, args.kv_heads)
    dense = sum(q.numel() for q in model.parameters())
    print(f"Torch-Pruning {version('torch-pruning')}, transformers {transformers.__version__}; "
          f"Llama {args.layers} layers, {model.config.num_attention_heads} query / {args.kv_heads} KV heads, "
          f"{dense / 1e6:.2f}M params ({weights})")
    _guard(args.max_deps)
    t0 = time.time()
    try:
        prune(model, args.ratio)
    except RunawayGroup as e:
        print(f"not pruned after {time.time() - t0:.0f} s: {e}")
        return 1
    attn = model.model.layers[0].self_attn
    kept = sum(q.numel() for q in model.parameters())
    print(f"pruned in {time.time() - t0:.0f} s: {dense / 1e6:.2f}M -> {kept / 1e6:.2f}M params; "
          f"layer 0 q/k/v {tuple(attn.q_proj.weight.shape)} {tuple(attn.k_proj.weight.shape)} "
          f"{tuple(attn.v_proj.weight.shape)}, MLP {tuple(model.model.layers[0].mlp.gate_proj.weight.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
