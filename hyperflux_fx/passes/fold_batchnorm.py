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
from torch import fx, nn

from hyperflux_fx.ops import function_spec, is_plain_batch_norm, node_spec
from hyperflux_fx.passes._attrs import fetch_attr, owner_of, replace_tensor
from hyperflux_fx.passes._result import PassResult

__all__ = ["fold_batchnorm"]


def _is_conv(node: fx.Node) -> bool:
    spec = function_spec(node.target) if node.op == "call_function" else None
    return spec is not None and spec.kind == "conv"


def _bn_tensors(gm: fx.GraphModule, bn: fx.Node) -> tuple[torch.Tensor, ...] | None:
    """(mean, var, weight or None, bias or None, eps) of an inference-mode BatchNorm node."""
    spec = node_spec(gm, bn)
    if spec is None or spec.kind != "batch_norm":
        return None
    if bn.op == "call_module":
        mod = gm.get_submodule(str(bn.target))
        if not is_plain_batch_norm(mod) or mod.training or mod.running_mean is None:
            return None
        return mod.running_mean, mod.running_var, mod.weight, mod.bias, mod.eps
    mean, var = spec.arg(bn, "running_mean"), spec.arg(bn, "running_var")
    weight, bias = spec.arg(bn, "weight"), spec.arg(bn, "bias")
    training, eps = spec.arg(bn, "training") or False, spec.arg(bn, "eps", 1e-5)
    if training or not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (mean, var)):
        return None

    def get(n: object) -> torch.Tensor | None:
        return fetch_attr(gm, str(n.target)) if isinstance(n, fx.Node) and n.op == "get_attr" else None

    if (weight is not None and get(weight) is None) or (bias is not None and get(bias) is None):
        return None
    return get(mean), get(var), get(weight), get(bias), eps


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
        if _is_conv(node) and isinstance(w := function_spec(node.target).arg(node, "weight"), fx.Node):
            weight_uses[str(w.target)] = weight_uses.get(str(w.target), 0) + 1
    with torch.no_grad():
        for conv in list(graph.nodes):
            if not _is_conv(conv) or len(conv.users) != 1:
                continue
            bn = next(iter(conv.users))
            if bn.args[0] is not conv:
                continue
            reason = _fold_one(gm, conv, bn, weight_uses)
            if reason is None:
                folded.append(bn.name)
            else:
                skipped[bn.name] = reason
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return PassResult(gm, bool(folded), {"folded": folded, "skipped": skipped})


def _fold_one(gm: fx.GraphModule, conv: fx.Node, bn: fx.Node, weight_uses: dict[str, int]) -> str | None:
    """Fold ``bn`` into ``conv``; return why not, or None when folded."""
    stats = _bn_tensors(gm, bn)
    spec = function_spec(conv.target)
    w_node, b_node = spec.arg(conv, "weight"), spec.arg(conv, "bias")
    if stats is None:
        return "not an inference-mode BatchNorm with running statistics"
    if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr") or weight_uses[str(w_node.target)] > 1:
        return "the conv weight is not a parameter used by this conv alone"
    if b_node is not None and not (isinstance(b_node, fx.Node) and b_node.op == "get_attr"):
        return "the conv bias is not a parameter"
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
        with gm.graph.inserting_before(conv):
            new_b = gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
        if len(conv.args) > spec.signature.index("bias"):
            args = list(conv.args)
            args[spec.signature.index("bias")] = new_b
            conv.args = tuple(args)
        else:
            conv.kwargs = {**conv.kwargs, "bias": new_b}
    bn.replace_all_uses_with(conv)
    gm.graph.erase_node(bn)
    return None
