"""fold_batchnorm: merge an inference-mode BatchNorm into the convolution that feeds it.

Before::

    conv2d = torch.conv2d(x, self.conv1.weight, None, (1, 1), (1, 1), (1, 1), 1)
    bn1 = self.bn1(conv2d)

After (``s = gamma / sqrt(running_var + eps)``; ``W' = W * s``, ``b' = (b - running_mean) * s + beta``)::

    conv2d = torch.conv2d(x, self.conv1.weight, self.conv1.bias, (1, 1), (1, 1), (1, 1), 1)

Applies where the conv (functional ``torch.conv1d/2d/3d`` with parameter weights) has the BatchNorm
(module in eval mode, or ``F.batch_norm`` with ``training=False``) as its only user and its weight
is used nowhere else. The result is an *inference* model: BatchNorm statistics no longer update.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from hyperflux_fx.passes._attrs import fetch_attr, owner_of, replace_tensor
from hyperflux_fx.passes._result import PassResult

__all__ = ["fold_batchnorm"]

_CONVS = (torch.conv1d, torch.conv2d, torch.conv3d)


def _bn_tensors(gm: fx.GraphModule, bn: fx.Node) -> tuple[torch.Tensor, ...] | None:
    """(mean, var, weight or None, bias or None, eps) of an inference-mode BatchNorm node."""
    if bn.op == "call_module":
        mod = gm.get_submodule(str(bn.target))
        plain = type(mod).forward is nn.modules.batchnorm._BatchNorm.forward  # not timm's BatchNormAct (+act)
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or not plain or mod.training or mod.running_mean is None:
            return None
        return mod.running_mean, mod.running_var, mod.weight, mod.bias, mod.eps
    if bn.op == "call_function" and bn.target is F.batch_norm:
        args = list(bn.args) + [None] * 8
        kw = bn.kwargs
        mean, var = kw.get("running_mean", args[1]), kw.get("running_var", args[2])
        weight, bias = kw.get("weight", args[3]), kw.get("bias", args[4])
        training, eps = kw.get("training", args[5] or False), kw.get("eps", args[7] if args[7] is not None else 1e-5)
        if training or not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (mean, var)):
            return None
        get = (lambda n: fetch_attr(gm, str(n.target)) if isinstance(n, fx.Node) and n.op == "get_attr" else None)
        if (weight is not None and get(weight) is None) or (bias is not None and get(bias) is None):
            return None
        return get(mean), get(var), get(weight), get(bias), eps
    return None


def fold_batchnorm(gm: fx.GraphModule, *, inplace: bool = False) -> PassResult:
    """Merge every foldable inference BatchNorm into its conv. Returns ``PassResult(gm, modified,
    report)`` with ``report = {"folded": [bn node names], "skipped": {bn node: reason}}``."""
    if not inplace:
        gm = copy.deepcopy(gm)
    graph = gm.graph
    folded: list[str] = []
    skipped: dict[str, str] = {}
    weight_uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _CONVS and isinstance(node.args[1], fx.Node):
            weight_uses[str(node.args[1].target)] = weight_uses.get(str(node.args[1].target), 0) + 1
    with torch.no_grad():
        for conv in list(graph.nodes):
            if conv.op != "call_function" or conv.target not in _CONVS or len(conv.users) != 1:
                continue
            bn = next(iter(conv.users))
            if bn.args[0] is not conv:
                continue
            stats = _bn_tensors(gm, bn)
            w_node = conv.args[1]
            b_node = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
            if stats is None:
                skipped[bn.name] = "not an inference-mode BatchNorm with running statistics"
                continue
            if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr") or weight_uses[str(w_node.target)] > 1:
                skipped[bn.name] = "the conv weight is not a parameter used by this conv alone"
                continue
            if b_node is not None and not (isinstance(b_node, fx.Node) and b_node.op == "get_attr"):
                skipped[bn.name] = "the conv bias is not a parameter"
                continue
            mean, var, gamma, beta, eps = stats
            scale = (gamma if gamma is not None else torch.ones_like(var)) / torch.sqrt(var + eps)
            shift = (beta if beta is not None else torch.zeros_like(mean)) - mean * scale
            w_target = str(w_node.target)
            weight = fetch_attr(gm, w_target)
            replace_tensor(gm, w_target, weight * scale.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
            if b_node is not None:
                bias = fetch_attr(gm, str(b_node.target))
                replace_tensor(gm, str(b_node.target), bias * scale + shift)
            else:
                owner, _ = owner_of(gm, w_target)
                name = "bias" if getattr(owner, "bias", None) is None else "folded_bn_bias"
                setattr(owner, name, nn.Parameter(shift.to(weight.dtype).clone()))
                owner_path = w_target.rpartition(".")[0]
                with graph.inserting_before(conv):
                    new_b = graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
                args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
                args[2] = new_b
                conv.args = tuple(args)
            bn.replace_all_uses_with(conv)
            graph.erase_node(bn)
            folded.append(bn.name)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return PassResult(gm, bool(folded), {"folded": folded, "skipped": skipped})
