"""Reductions and norms: BatchNorm (its parameters and statistics sliced), LayerNorm / RMSNorm /
GroupNorm over the channels (deletable with their mask-aware form), means and sums, softmax."""

from __future__ import annotations

from torch import fx

from hyperflux_fx.analysis.coupling.labels import (
    ChannelParam,
    Coupling,
    Label,
    NormUse,
    Rule,
    norm_dim,
    only_label,
    param_target,
    shape_of,
)
from hyperflux_fx.analysis.coupling.rules.heads import heads_as_replicas
from hyperflux_fx.analysis.coupling.rules.links import request_split
from hyperflux_fx.ops import ChannelRule, NormOperands, OpSpec, norm_operands


def _batch_norm(c: Coupling, node: fx.Node, lab: Label | None, tensors: list[tuple[str, str | None]],
                module: str | None = None) -> Label | None:
    """Per-channel affine with statistics: pass-through; ``tensors`` = (name, target or None) to slice
    (a None target for a tensor that is present but not a parameter/buffer blocks the group)."""
    if lab is None:
        return None
    if lab.dim != 1:
        c.block(lab, f"batch norm over a non-channel dim: {node.format_node()}")
        return lab
    offset = 0
    for seg in lab.segs:  # a concatenation: each run's statistics are sliced with its space
        if seg.space is not None:
            for name, target in tensors:
                if target is None:
                    c.block(lab, f"batch norm {name} is not a parameter/buffer: {node.format_node()}")
                else:
                    c.params.append(ChannelParam(target, 0, seg.space, module=module, offset=offset,
                                                 expand=seg.expand, replicas=seg.replicas, order=lab.order))
            c.revived.add(seg.space)  # beta - mean * gamma / sigma turns a zero into a constant
        offset += seg.width
    return lab


def _f_batch_norm(gm, node, c, labels, spec):  # F.batch_norm(x, running_mean, running_var, weight, bias, ...)
    tensors = [(name, param_target(gm, spec.arg(node, name)))
               for name in ("running_mean", "running_var", "weight", "bias")
               if isinstance(spec.arg(node, name), fx.Node)]
    return _batch_norm(c, node, only_label(node, labels), tensors)


def _norm(gm, node, c, labels, spec):  # LayerNorm / RMSNorm over the last dims
    """Over other dims than the channels: each channel on its own (pass-through). Over the channels
    alone: the statistics must count the open channels only, which the gated model's MaskedNorm does;
    the affine parameters are sliced and the fold keeps exactly the open channels."""
    lab = only_label(node, labels)
    ops = norm_operands(gm, node)
    if lab is None or ops is None:
        return None
    rank = len(shape_of(node) or ())
    c.revived.update(lab.spaces())  # a zero channel comes out as the bias (or 0 / sqrt(eps))
    if ops.kind == "group":
        return _group_norm(gm, node, c, lab, ops, spec)
    if lab.dim < rank - ops.dims:
        return lab
    if ops.dims != 1 or len(lab.segs) != 1 or lab.segs[0].expand != 1 or lab.segs[0].replicas != 1:
        c.block(lab, f"{spec.name} over the channels together with other dims or other runs: {node.format_node()}")
        return lab
    if lab.segs[0].space is None:
        return lab
    return _masked_norm_use(gm, node, c, lab, ops, spec)


def _masked_norm_use(gm: fx.GraphModule, node: fx.Node, c: Coupling, lab: Label, ops: NormOperands,
                     spec: OpSpec) -> Label:
    """A norm over one space's channels: its affine sliced with them, the norm made mask-aware."""
    seg = lab.segs[0]
    for name, value in (("weight", ops.weight), ("bias", ops.bias)):
        target = value if isinstance(value, str) else param_target(gm, value)
        if value is not None and target is None:
            c.block(lab, f"{spec.name} {name} is not a parameter: {node.format_node()}")
        elif target is not None:
            c.params.append(ChannelParam(target, 0, seg.space, module=ops.module, replicas=seg.replicas))
    c.norms.append(NormUse(node.name, lab))
    return lab


def _group_norm(gm: fx.GraphModule, node: fx.Node, c: Coupling, lab: Label, ops: NormOperands,
                spec: OpSpec) -> Label:
    """GroupNorm: statistics per group of consecutive channels (dim 1). Mask-aware as LayerNorm; with
    several groups every group must keep as many channels, so the space is split over the groups (a
    unit: one position in every group, as for a grouped conv)."""
    seg = lab.segs[0] if len(lab.segs) == 1 else None
    if lab.dim != 1 or seg is None or seg.expand != 1:
        c.block(lab, f"{spec.name} over channels on another dim or over several runs: {node.format_node()}")
        return lab
    if seg.space is None:
        return lab
    if seg.replicas != ops.groups and ops.groups > 1:
        if seg.replicas != 1 or not request_split(c, lab, ops.groups):
            c.block(lab, f"{spec.name} over channels split another way: {node.format_node()}")
        return lab
    return _masked_norm_use(gm, node, c, lab, ops, spec)


def _softmax(gm, node, c, labels, spec):  # softmax over a dim other than the channels: pass-through
    lab = only_label(node, labels)
    if lab is None:
        return None
    rank = len(shape_of(node) or ())
    dim = gm.get_submodule(str(node.target)).dim if node.op == "call_module" else spec.arg(node, "dim")
    if dim is None or norm_dim(dim, rank) == lab.dim:
        if dim is None or not heads_as_replicas(c, lab):  # across a radix split's copies: asked anew
            c.block(lab, f"softmax over the channels: {node.format_node()}")
        return None
    return lab


def _reduce(gm, node, c, labels, spec):
    """mean/sum/amax over dims: the label passes unless the channel dim is reduced. A mean over the
    channel dim alone of one plain space is made mask-aware (the open channels' mean: MaskedMean in
    the gated model, the kept channels' mean after the fold); any other reduction over it blocks."""
    lab = only_label(node, labels)
    if lab is None:
        return None
    ins = shape_of(node.args[0])
    if node.op == "call_module":  # a gated model's MaskedMean
        mod = gm.get_submodule(str(node.target))
        dims, keep = mod.dim, mod.keepdim
    else:
        dims, keep = spec.arg(node, "dim"), spec.arg(node, "keepdim", False)
    if ins is None or dims is None:
        c.block(lab, f"reduction over all dims: {node.format_node()}")
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [norm_dim(d, len(ins)) for d in dims]
    if lab.dim in dims:
        seg = lab.segs[0]
        if (spec.name in ("mean", "MaskedMean") and dims == [lab.dim] and len(lab.segs) == 1
                and seg.space is not None and seg.expand == 1 and seg.replicas == 1):
            c.means.append(NormUse(node.name, lab))
        else:
            c.block(lab, f"reduction over the channels: {node.format_node()}")
        return None
    new_dim = lab.dim if keep else lab.dim - sum(d < lab.dim for d in dims)
    return Label(new_dim, lab.segs)


def _batch_norm_module(gm, node, c, labels, spec):  # a BatchNorm leaf: its parameters and statistics are sliced
    path = str(node.target)
    mod = gm.get_submodule(path)
    x = node.args[0] if node.args else None
    tensors = [(name, f"{path}.{name}") for name in ("weight", "bias", "running_mean", "running_var")
               if getattr(mod, name, None) is not None]
    return _batch_norm(c, node, labels.get(x) if isinstance(x, fx.Node) else None, tensors, module=path)


#: this family's channel rules (the op table names them; ``rules.RULES`` merges the families)
RULES: dict[ChannelRule, Rule] = {
    ChannelRule.BATCH_NORM: _f_batch_norm,
    ChannelRule.BATCH_NORM_MODULE: _batch_norm_module,
    ChannelRule.NORM: _norm,
    ChannelRule.REDUCE: _reduce,
    ChannelRule.SOFTMAX: _softmax,
}
