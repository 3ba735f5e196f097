"""Convolutions, linears and matrix products with a weight: each creates a channel space from its output
and consumes the label of its input (grouped and depthwise convs split the space over their groups)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from torch import fx

from hyperflux_fx.analysis.coupling.labels import (
    ChannelParam,
    Consumer,
    Coupling,
    Label,
    Producer,
    Rule,
    Seg,
    param_target,
    shape_of,
)
from hyperflux_fx.analysis.coupling.rules.generic import unsupported_module
from hyperflux_fx.analysis.coupling.rules.links import request_split
from hyperflux_fx.ops import ChannelRule


def _weight_op(gm: fx.GraphModule, node: fx.Node, c: Coupling, labels: dict[fx.Node, Label], *, kind: str,
               x: Any, weight: Any, bias: Any, groups: int, groups_pos: int | None,
               module: str | None = None) -> Label | None:
    """conv / conv_transpose / linear: the input is consumed, the output is a new space."""
    wt = param_target(gm, weight)
    bt = param_target(gm, bias) if bias is not None else None
    in_label = labels.get(x) if isinstance(x, fx.Node) else None
    out_shape = shape_of(node)
    if wt is None or out_shape is None or (bias is not None and bt is None):
        c.block(in_label, f"{kind} whose weight/bias is not a parameter: {node.format_node()}")
        return None
    w = c.parameters.get(wt)
    if w is None:
        c.block(in_label, f"{kind} weight {wt} is not a parameter")
        return None
    ch_dim = len(out_shape) - 1 if kind in ("linear", "mm") else 1
    in_ch = w.shape[1] * groups if kind == "conv" else (w.shape[0] if kind in ("conv_transpose", "mm") else w.shape[1])
    out_ch = w.shape[0] if kind in ("conv", "linear") else w.shape[1] * groups
    if kind == "conv" and groups > 1 and groups == in_ch and out_ch % in_ch == 0 and groups_pos is not None:
        return _depthwise(c, node, in_label, wt, bt, out_ch // in_ch, groups_pos)
    w_in, w_out = (1, 0) if kind in ("conv", "linear") else (0, 1)
    if groups > 1 and kind == "conv":
        return _grouped_conv(c, node, x, in_label, wt, bt, groups, in_ch, out_ch)
    if groups > 1:
        return _blocked_output(c, node, in_label, wt, bt, w_out, out_ch, ch_dim,
                               f"grouped transposed conv (groups={groups}) is not sliced yet: {node.format_node()}")
    return _consume_produce(c, node, x, in_label, kind=kind, wt=wt, bt=bt, in_ch=in_ch, out_ch=out_ch,
                            ch_dim=ch_dim, w_in=w_in, w_out=w_out)


def _depthwise(c: Coupling, node: fx.Node, in_label: Label | None, wt: str, bt: str | None, mult: int,
               groups_pos: int) -> Label | None:
    """Depthwise (groups = input channels), with a channel multiplier ``mult``: output channels
    i*mult .. i*mult+mult-1 read input channel i only, so the input's label passes, each channel
    owning ``mult`` consecutive outputs; the weight and bias rows and the groups follow. A unit that
    already owns ``e`` consecutive positions (the output of an earlier multiplier) owns ``e * mult``."""
    if in_label is None or in_label.dim != 1:
        return None
    if in_label.order is not None and mult != 1:
        c.block(in_label, f"depthwise conv with a channel multiplier over shuffled channels: {node.format_node()}")
        return None
    offset = 0
    for seg in in_label.segs:  # each run of the input owns its run of outputs and weight rows
        if seg.space is not None:
            c.params.append(ChannelParam(wt, 0, seg.space, groups_arg=(node.name, groups_pos, mult), offset=offset,
                                         expand=seg.expand * mult, replicas=seg.replicas, order=in_label.order))
            if bt is not None:
                c.params.append(ChannelParam(bt, 0, seg.space, offset=offset, expand=seg.expand * mult,
                                             replicas=seg.replicas, order=in_label.order))
                c.revived.add(seg.space)
        offset += seg.width * mult
    return replace(in_label, segs=tuple(replace(seg, expand=seg.expand * mult) for seg in in_label.segs))


def _grouped_conv(c: Coupling, node: fx.Node, x: Any, in_label: Label | None, wt: str, bt: str | None, groups: int,
                  in_ch: int, out_ch: int) -> Label:
    """A grouped conv reads, in each of its ``groups``, the same positions of its weight's input dim:
    an input position is deleted in every group at once. Its input space is split over the groups (a
    unit: one position, in every group), which the producer of that space must know from the start:
    this pass requests it of that producer and the next one builds the space so. The output is a new
    space split the same way (a unit: one output position in every group)."""
    per_in = in_ch // groups
    seg = in_label.segs[0] if in_label is not None and len(in_label.segs) == 1 else None
    if in_label is not None:
        if seg is None or seg.space is None or seg.expand != 1 or in_label.dim != 1 or in_label.order is not None:
            c.block(in_label, f"grouped conv (groups={groups}) over concatenated or unowned channels: "
                              f"{node.format_node()}")
        elif seg.replicas == groups:
            c.consumers.append(Consumer(node.name, in_label, wt, 1, weight_label=Label(1, (Seg(seg.space, per_in),))))
        elif not request_split(c, in_label, groups):
            c.block(in_label, f"grouped conv (groups={groups}) over channels split another way: {node.format_node()}")
    sid = c.new_space(Producer(node.name, -1, wt, bt, 0, replicas=groups, units=out_ch // groups), out_ch // groups)
    if bt is not None:
        c.revived.add(sid)
    return Label(1, (Seg(sid, out_ch // groups, replicas=groups),))


def _blocked_output(c: Coupling, node: fx.Node, in_label: Label | None, wt: str, bt: str | None, w_out: int,
                    out_ch: int, ch_dim: int, reason: str) -> Label:
    """A weight op we cannot slice: block what it reads, and give its output a blocked space."""
    c.block(in_label, reason)
    sid = c.new_space(Producer(node.name, -1, wt, bt, w_out), out_ch)
    c.blocks[sid].append(f"output of: {reason}")
    return Label(ch_dim, (Seg(sid, out_ch),))


def _consume_produce(c: Coupling, node: fx.Node, x: Any, in_label: Label | None, *, kind: str, wt: str,
                     bt: str | None, in_ch: int, out_ch: int, ch_dim: int, w_in: int, w_out: int) -> Label:
    """conv / linear: record the input as consumed (weight dim ``w_in``) and the output as a new space
    (weight dim ``w_out``)."""
    if in_label is not None:
        in_dim = len(shape_of(x) or ()) - 1 if kind in ("linear", "mm") else 1
        if in_label.dim != in_dim or in_label.width != in_ch:
            c.block(in_label, f"{kind} reads channels on another dim: {node.format_node()}")
        else:
            read = x.name if isinstance(x, fx.Node) and node.args and x is not node.args[0] else None
            c.consumers.append(Consumer(node.name, in_label, wt, w_in, input=read))
    if node.name in c.cuts:
        return Label(ch_dim, _pieces(c, node, wt, bt, w_out, out_ch))
    g = c.split.get(node.name, 1)  # requested only where it divides out_ch (request_split)
    e = c.rows.get(node.name, 1)  # consecutive rows per unit (request_rows), never with a split
    units = out_ch // (g * e)
    sid = c.new_space(Producer(node.name, -1, wt, bt, w_out, replicas=g, unit_rows=e, units=units), units)
    if bt is not None:
        c.revived.add(sid)
    return Label(ch_dim, (Seg(sid, units, expand=e, replicas=g),))


def _pieces(c: Coupling, node: fx.Node, wt: str, bt: str | None, w_out: int, out_ch: int) -> tuple[Seg, ...]:
    """The output of a conv/linear whose space a split or slice cuts: one space per piece."""
    bounds = sorted({0, out_ch} | {b for b in c.cuts[node.name] if 0 < b < out_ch})
    segs = []
    for start, stop in itertools.pairwise(bounds):
        sid = c.new_space(Producer(node.name, -1, wt, bt, w_out, offset=start, piece=(start, stop)), stop - start)
        if bt is not None:
            c.revived.add(sid)
        segs.append(Seg(sid, stop - start))
    return tuple(segs)


def _f_conv(gm, node, c, labels, spec):  # torch.convNd(x, w, b, stride, padding, dilation, groups)
    pos = spec.signature.index("groups")
    return _weight_op(gm, node, c, labels, kind="conv", x=node.args[0], weight=spec.arg(node, "weight"),
                      bias=spec.arg(node, "bias"), groups=spec.arg(node, "groups", 1),
                      groups_pos=pos if len(node.args) > pos else None)


def _f_conv_t(gm, node, c, labels, spec):  # torch.conv_transposeNd(x, w, b, stride, padding, output_padding, groups)
    return _weight_op(gm, node, c, labels, kind="conv_transpose", x=node.args[0], weight=spec.arg(node, "weight"),
                      bias=spec.arg(node, "bias"), groups=spec.arg(node, "groups", 1), groups_pos=None)


def _f_linear(gm, node, c, labels, spec):  # F.linear(x, w, b)
    return _weight_op(gm, node, c, labels, kind="linear", x=node.args[0], weight=spec.arg(node, "weight"),
                      bias=spec.arg(node, "bias"), groups=1, groups_pos=None)


def _mm(gm, node, c, labels, spec):  # mm(x, W) / addmm(b, x, W): x @ W + b, W (in, out) a parameter (Conv1D)
    bias = spec.arg(node, "input") if "mat1" in spec.signature else None
    x = spec.arg(node, "mat1") if "mat1" in spec.signature else spec.arg(node, "input")
    return _weight_op(gm, node, c, labels, kind="mm", x=x, weight=spec.arg(node, "mat2"), bias=bias, groups=1,
                      groups_pos=None)


def _plain_module_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A conv/linear leaf called on one positional input, with zeros padding: like its functional op."""
    mod = gm.get_submodule(str(node.target))
    return len(node.args) == 1 and not node.kwargs and getattr(mod, "padding_mode", "zeros") == "zeros"


def _conv_module(gm, node, c, labels, spec):  # a plain nn.ConvNd leaf: as the functional conv
    if not _plain_module_call(gm, node):
        return unsupported_module(gm, node, c, labels, spec)
    return _module_weight(gm, node, c, labels, gm.get_submodule(str(node.target)), str(node.target), "conv")


def _linear_module(gm, node, c, labels, spec):  # a plain nn.Linear leaf: as F.linear
    if not _plain_module_call(gm, node):
        return unsupported_module(gm, node, c, labels, spec)
    return _module_weight(gm, node, c, labels, gm.get_submodule(str(node.target)), str(node.target), "linear")


def _module_weight(gm, node, c, labels, mod, path, kind):
    """A conv/linear leaf module: as the functional op, parameters under the module's path."""
    x = node.args[0]
    in_label = labels.get(x) if isinstance(x, fx.Node) else None
    out_shape = shape_of(node)
    if out_shape is None:
        c.block(in_label, f"{kind} without shape information: {node.format_node()}")
        return None
    wt, bt = f"{path}.weight", (f"{path}.bias" if mod.bias is not None else None)
    groups = getattr(mod, "groups", 1)
    in_ch, out_ch = (mod.in_channels, mod.out_channels) if kind == "conv" else (mod.in_features, mod.out_features)
    ch_dim = len(out_shape) - 1 if kind == "linear" else 1
    if kind == "conv" and groups > 1 and groups == in_ch:  # its groups would follow the channel count
        return _blocked_output(c, node, in_label, wt, bt, 0, out_ch, ch_dim,
                               f"depthwise conv module (functionalise it with insert_gates first): {path}")
    if kind == "conv" and groups > 1:  # the group count stays: the sliced weight sets the module's sizes
        return _grouped_conv(c, node, x, in_label, wt, bt, groups, in_ch, out_ch)
    return _consume_produce(c, node, x, in_label, kind=kind, wt=wt, bt=bt, in_ch=in_ch, out_ch=out_ch, ch_dim=ch_dim,
                            w_in=1, w_out=0)


#: this family's channel rules (the op table names them; ``rules.RULES`` merges the families)
RULES: dict[ChannelRule, Rule] = {
    ChannelRule.CONV: _f_conv,
    ChannelRule.CONV_TRANSPOSE: _f_conv_t,
    ChannelRule.LINEAR: _f_linear,
    ChannelRule.MM: _mm,
    ChannelRule.CONV_MODULE: _conv_module,
    ChannelRule.LINEAR_MODULE: _linear_module,
}
