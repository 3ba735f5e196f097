"""Parameter and multiply-accumulate counts of a module, measured by running it once."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from hyperflux_fx.runtime.pressure import STATE_ATTRS

__all__ = ["count_params", "count_params_and_macs"]


def count_params(model: nn.Module) -> int:
    """Parameters of the model, without hyperflux's own state (flow parameters)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(STATE_ATTRS))


def _conv_macs(out: torch.Tensor, weight: torch.Tensor, groups: int, transposed: bool, x: torch.Tensor) -> int:
    if transposed:  # every input position scatters into k positions of out/groups channels
        return x.numel() * (weight.shape[1]) * math.prod(weight.shape[2:])
    return out.numel() * weight.shape[1] * math.prod(weight.shape[2:])


class _Counter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.macs = 0

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_function(target, args, kwargs)
        if target in (torch.conv1d, torch.conv2d, torch.conv3d):
            groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
            self.macs += _conv_macs(out, args[1], groups, False, args[0])
        elif target in (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d):
            self.macs += _conv_macs(out, args[1], 1, True, args[0])
        elif target is F.linear:
            self.macs += out.numel() * args[1].shape[1]
        elif target in (torch.matmul, torch.bmm, torch.mm, torch.addmm) or getattr(target, "__name__", "") == "matmul":
            a, _b = (args[1], args[2]) if target is torch.addmm else (args[0], args[1])
            self.macs += out.numel() * a.shape[-1]
        elif target is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.macs += 2 * q.numel() * k.shape[-2]
        return out

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_method(target, args, kwargs)
        if target in ("matmul", "mm", "bmm", "__matmul__"):
            self.macs += out.numel() * args[0].shape[-1]
        return out



def _module_macs(mod: nn.Module, args: Any, out: Any) -> int:
    """MACs of one call of a conv / linear / multi-head-attention module."""
    if isinstance(mod, nn.Linear):
        return out.numel() * mod.in_features
    if isinstance(mod, nn.modules.conv._ConvNd):
        return _conv_macs(out, mod.weight, mod.groups, mod.transposed, args[0])
    if isinstance(mod, nn.MultiheadAttention):
        q, k = args[0], args[1]
        e = mod.embed_dim
        lq, lk = q.numel() // e, k.numel() // e
        return (lq + 2 * lk) * e * e + lq * e * e + 2 * lq * (k.shape[-2] if k.dim() == 3 else 1) * e
    return 0


def count_params_and_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """``(parameters, multiply-accumulates)`` of one forward on ``example_inputs``.

    Parameters exclude hyperflux's own state (flow parameters). MACs count conv, conv-transpose,
    linear, matmul and attention products, whole batch included; for a GraphModule they are read
    off its functional ops, for any other module off forward hooks on its conv/linear layers.
    """
    from hyperflux_fx.trace import normalize_inputs

    inputs = normalize_inputs(example_inputs)
    params = count_params(model)
    was_training = model.training
    model.eval()
    total = [0]
    handles = []

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        total[0] += _module_macs(mod, args, out[0] if isinstance(out, tuple) else out)

    # modules actually called (leaf convs, layers inside opaque leaves, attention); functional ops of a
    # GraphModule are counted by the interpreter (their holder modules are never called)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)):
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            if isinstance(model, fx.GraphModule):
                counter = _Counter(model)
                counter.run(*inputs)
                total[0] += counter.macs
            else:
                model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return params, int(total[0])
