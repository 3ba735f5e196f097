"""Per-channel parameters and buffers met by an op (a scale, a position embedding, a bias table): found
through the ops that broadcast or rearrange them, and recorded to be sliced with the space."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from hyperflux_fx.analysis.coupling.labels import ChannelParam, Coupling, Label, ShapeArg, param_target, shape_of
from hyperflux_fx.analysis.coupling.rules.probe import channelwise_dim, replay
from hyperflux_fx.ops import ChannelRule, OpSpec, node_spec


def broadcast_operand(gm: fx.GraphModule, c: Coupling, node: fx.Node, lab: Label, other: Any) -> bool:
    """An unlabelled operand of a binary op with a labelled one: True if the result keeps the label
    exactly (scalars, size-1 on the channel dim, or a per-channel parameter we can slice)."""
    if not isinstance(other, fx.Node):
        return True
    shape = shape_of(other)
    out_shape = shape_of(node)
    if shape is None or out_shape is None:
        return False
    rank = len(out_shape)
    padded = (1,) * (rank - len(shape)) + shape
    if padded[lab.dim] == 1:
        return True
    return sliced_operand(gm, c, lab, other, rank)


def sliced_operand(gm: fx.GraphModule, c: Coupling, lab: Label, operand: fx.Node, rank: int) -> bool:
    """A parameter or buffer that varies over a label's channels (a per-channel scale, a position
    embedding, a class token): True, and recorded to be sliced with the space, when one of its dims
    follows the channels. Through ops that keep its dims (expand, casts, elementwise maths with
    constants: Gemma's ``1 + weight``) it broadcasts against the result right-aligned; through a reshape
    it must have a single non-1 dim."""
    src, aligned, resized, chain = operand, True, [], []
    while (spec := node_spec(gm, src)) is not None and isinstance(src.args[0], fx.Node) and (
            spec.moves_elements or _per_element(src, spec)):
        aligned = aligned and (spec.keeps_dims or not spec.moves_elements)
        if spec.explicit_sizes:
            resized.append(src)
        chain.insert(0, src)
        src = src.args[0]
    t = param_target(gm, src)
    if t is None or len(lab.segs) != 1 or lab.segs[0].space is None:
        return False
    p = c.parameters[t] if t in c.parameters else c.buffers.get(t)
    if p is None:
        return False
    if aligned:
        dim = lab.dim - (rank - p.dim())
        if dim < 0 or p.shape[dim] != lab.width:
            return False
    elif (dim := _single_dim(tuple(p.shape), lab.width)) is not None:
        sizes = [_single_dim(shape_of(n), lab.width) for n in resized]
        if None in sizes:
            return False
        for n, d in zip(resized, sizes, strict=True):  # view(C, 1, 1): the size follows the width
            c.shape_args.append(ShapeArg(n.name, d, Label(d, lab.segs)))
    else:  # a table gathered and rearranged (relative position bias per head): which dim, by probing
        dim = _probed_param_dim(gm, chain, src, p, lab.width, lab.dim - (rank - len(shape_of(operand) or ())))
        if dim is None:
            return False
    seg = lab.segs[0]
    c.params.append(ChannelParam(t, dim, seg.space, expand=seg.expand, replicas=seg.replicas))
    return True


def _per_element(node: fx.Node, spec: OpSpec) -> bool:
    """An op on one tensor element by element (an activation, or arithmetic with a number): slicing
    its operand slices its result alike."""
    others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node)]
    if others or node.op != "call_function":
        return False
    return spec.channel_rule in (ChannelRule.ELEMENTWISE, ChannelRule.ADD, ChannelRule.SUB, ChannelRule.MUL,
                                 ChannelRule.DIV)


def _probed_param_dim(gm: fx.GraphModule, chain: list[fx.Node], src: fx.Node, p: torch.Tensor, width: int,
                      out_dim: int) -> int | None:
    """The dim of parameter ``p`` whose channels the ops of ``chain`` carry, one by one, to dim
    ``out_dim`` of their result (:func:`channelwise_dim`), or None."""
    call = replay(gm, chain, src)
    if isinstance(call, str) or out_dim < 0:
        return None
    for d in (d for d in range(p.dim()) if p.shape[d] == width):  # chain: at least the reshape that unaligned it
        if channelwise_dim(call, tuple(p.shape), p.dtype, d, width, shape_of(chain[-1])) == out_dim:
            return d
    return None


def _single_dim(shape: tuple[int, ...] | None, width: int) -> int | None:
    """The one dim of ``shape`` that is not 1, if it has size ``width``."""
    big = [i for i, d in enumerate(shape or ()) if d != 1]
    return big[0] if len(big) == 1 and shape[big[0]] == width else None
