"""Shape and slicing ops: cat, split/chunk/narrow, getitem/slice/select, reshape/view (with head splits),
permute/transpose, unsqueeze/expand, pooling and shifts, embeddings. Labels move with the dims."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

from torch import fx

from hyperflux_fx.analysis.coupling.labels import (
    Label,
    Producer,
    Rule,
    Seg,
    ShapeArg,
    Shuffle,
    norm_dim,
    only_label,
    param_target,
    permuted,
    shape_of,
    shuffle_sources,
    tuple_valued,
)
from hyperflux_fx.analysis.coupling.rules.heads import is_head_split, split_heads
from hyperflux_fx.analysis.coupling.rules.links import cut, same_layout, tie
from hyperflux_fx.analysis.coupling.rules.params import sliced_operand
from hyperflux_fx.ops import ChannelRule, node_spec


def _split(gm, node, c, labels, spec):  # split / chunk / narrow (x, ..., dim)
    """Along the channel dim: each piece carries the runs it takes (a conv's space cut where a piece
    ends inside it). Along another dim: every piece keeps the label."""
    lab = only_label(node, labels)
    shape = shape_of(node.args[0])
    if lab is None or shape is None:
        return None
    dim = norm_dim(spec.arg(node, "dim", 0), len(shape))
    size = shape[dim]
    if spec.name == "narrow":
        start = spec.arg(node, "start")
        start = start + size if isinstance(start, int) and start < 0 else start
        ranges = [(start, start + spec.arg(node, "length"))]
    else:
        how = spec.arg(node, spec.signature[1])
        if spec.name == "chunk":
            how = -(-size // how) if isinstance(how, int) else None
        if isinstance(how, int):
            ranges = [(i, min(i + how, size)) for i in range(0, size, how)]
        elif isinstance(how, (list, tuple)) and all(isinstance(n, int) for n in how):
            ends = list(itertools.accumulate(how))
            ranges = list(zip([0, *ends[:-1]], ends, strict=True))
        else:
            ranges = None
    if ranges is None or not all(isinstance(v, int) for r in ranges for v in r):
        c.block(lab, f"{spec.name} with sizes known only at run time: {node.format_node()}")
        return None
    items = [lab] * len(ranges) if dim != lab.dim else cut(c, node, lab, ranges, "narrow" if (
        spec.name == "narrow") else "split")
    if spec.name == "narrow":
        return items[0]
    c.items[node.name] = items
    return lab  # the tuple's label: its items are looked up by getitem


def _shape_of_other(gm, node, c, labels, spec):
    """x.view_as(y) / x.reshape_as(y): a reshape of x (:func:`_reshape_like`) to y's shape, read from y
    at run time. After the fold that shape is y's narrowed one, so the result's channels and y's must
    be deleted together: tied, as an add ties them."""
    other = spec.arg(node, "other")
    lo = labels.get(other) if isinstance(other, fx.Node) else None
    out = _reshape_like(gm, node, c, labels, spec) if labels.get(node.args[0]) is not None else None
    if out is None or lo is None:
        why = f"{spec.name} ties channels to ones that cannot be deleted: {node.format_node()}"
        c.block(lo, why)
        c.block(out, why)
        return out
    if not same_layout(out, lo):
        c.block(out, f"{spec.name} of differently laid out channels: {node.format_node()}")
        c.block(lo, f"{spec.name} of differently laid out channels: {node.format_node()}")
        return out
    tie(c, out, lo, spec.name, node)
    return out


def _cat(gm, node, c, labels, spec):  # torch.cat(tensors, dim)
    tensors = node.args[0]
    dim = spec.arg(node, "dim", 0)
    out_shape = shape_of(node)
    if out_shape is None:
        for t in tensors:
            c.block(labels.get(t), f"cat without shape information: {node.format_node()}")
        return None
    dim = norm_dim(dim, len(out_shape))
    labs = [labels.get(t) if isinstance(t, fx.Node) else None for t in tensors]
    if all(lab is None for lab in labs):
        return None
    if any(lab is not None and lab.dim != dim for lab in labs):
        # cat along another dim: every input must carry the same channel layout -> tie
        ref = next(lab for lab in labs if lab is not None)
        for t, lab in zip(tensors, labs, strict=True):
            if lab is None and isinstance(t, fx.Node) and sliced_operand(gm, c, ref, t, len(out_shape)):
                continue  # a class token: sliced with the channels
            if lab is None or lab.dim != ref.dim or len(lab.segs) != len(ref.segs) or lab.order != ref.order:
                c.block(lab, f"cat mixing channel layouts: {node.format_node()}")
                c.block(ref, f"cat mixing channel layouts: {node.format_node()}")
                continue
            for s1, s2 in zip(lab.segs, ref.segs, strict=True):
                if s1.space is not None and s2.space is not None:
                    c.ties.add_edge(s1.space, s2.space)
        return ref
    segs: list[Seg] = []
    order: list[int] = []  # a shuffled input's channels stay permuted within its run of the output
    for t, lab in zip(tensors, labs, strict=True):
        if lab is None:
            shape = shape_of(t)
            if shape is None:
                return None
            lab = Label(dim, (Seg(None, shape[dim]),))
        order += [len(order) + p for p in (lab.order or range(lab.width))]
        segs.extend(lab.segs)
    return permuted(dim, tuple(segs), order)


def _reshape_like(gm, node, c, labels, spec):
    """flatten / view / reshape: keep the label when the channel dim survives, or when it is the first
    of the dims merged into one (C, H, W -> C*H*W: each channel owns H*W consecutive features). The
    first view of a channel shuffle (split into (g, C/g), transposed, merged) passes no label; the last
    gives the channels permuted (:class:`Shuffle`)."""
    if node.name in c.shuffles:
        return c.shuffles[node.name].label
    lab = only_label(node, labels)
    if lab is None:
        return None
    ins, outs = shape_of(node.args[0]), shape_of(node)
    if ins is None or outs is None:
        c.block(lab, f"reshape without shape information: {node.format_node()}")
        return None
    # walk both shapes, grouping dims whose products match
    i = j = 0
    while i < len(ins) and j < len(outs):
        pi, pj = ins[i], outs[j]
        i0, j0 = i, j
        while pi != pj:
            if pi < pj:
                i += 1
                pi *= ins[i]
            else:
                j += 1
                pj *= outs[j]
        if i0 <= lab.dim <= i:
            if i == i0 and j == j0:  # the channel dim maps to one output dim unchanged
                out = replace(lab, dim=j0)
            elif i == i0 and j == j0 + 1 and (sh := shuffle_of(gm, node, lab, j0)) is not None:
                c.shuffles[sh.last] = sh  # the pattern's inner nodes carry no label; its last view the output's
                return None
            elif lab.order is not None:
                c.block(lab, f"reshape of shuffled channels: {node.format_node()}")
                return None
            elif j == j0 and lab.dim == i0:  # merged, channel dim first: expand
                inner = math.prod(ins[i0 + 1:i + 1])
                out = Label(j0, tuple(replace(s, expand=s.expand * inner) for s in lab.segs))
            elif j == j0 and (merged := _merged_replicas(lab, ins[i0:i + 1], lab.dim - i0)) is not None:
                out = Label(j0, (merged,))  # (R, C, Q) -> R*C*Q: every r holds the same channels
            elif i == i0 and (at := _replica_split(lab, outs[j0:j + 1])) is not None:
                out = Label(j0 + at, (replace(lab.segs[0], replicas=1),))  # R*C -> (R, C): the replicas apart
            elif i == i0 and j - j0 >= 1 and is_head_split(c, lab):
                out = split_heads(c, node, lab, outs[j0:j + 1], j0)
            else:
                c.block(lab, f"reshape splits or reorders the channels: {node.format_node()}")
                return None
            if spec.explicit_sizes:  # reshape/view sizes follow the width
                c.shape_args.append(ShapeArg(node.name, out.dim, out))
            return out
        i += 1
        j += 1
        # skip size-1 dims on either side
    c.block(lab, f"reshape not understood: {node.format_node()}")
    return None


def shuffle_of(gm: fx.GraphModule, first: fx.Node, lab: Label, at: int) -> Shuffle | None:
    """The channel shuffle starting at ``first`` (a view of the channels as (g, C/g) at dims ``at``,
    ``at + 1``), when its only path goes through a transpose of those two dims (and copies such as
    ``contiguous``) to a view merging them back into C channels at ``at``; else None."""
    outs = shape_of(first)
    groups, width = outs[at], lab.width
    if groups < 2 or width // groups < 2:
        return None
    nodes, node = [first], first
    while len(node.users) == 1:
        node = next(iter(node.users))
        spec = node_spec(gm, node)
        rule = spec.channel_rule if spec is not None else None
        if rule is ChannelRule.RESHAPE and len(nodes) > 1:
            merged = shape_of(node) == shape_of(first.args[0])
            return Shuffle(first.name, node.name, tuple(n.name for n in nodes + [node]), groups, lab,
                           _shuffled(lab, groups)) if merged else None
        copy = rule is ChannelRule.ELEMENTWISE and spec.moves_elements and len(node.all_input_nodes) == 1
        if not (copy and len(nodes) > 1) and not (len(nodes) == 1 and _swaps(node, rule, at, len(outs))):
            return None  # the transpose first, then only copies
        nodes.append(node)
    return None


def _swaps(node: fx.Node, rule: ChannelRule | None, at: int, rank: int) -> bool:
    """``node`` transposes dims ``at`` and ``at + 1`` and nothing else."""
    if rule is ChannelRule.TRANSPOSE:
        return {norm_dim(d, rank) for d in node.args[1:3]} == {at, at + 1}
    if rule is ChannelRule.PERMUTE:
        dims = node.args[1:] if node.op == "call_method" else (node.args[1],)
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
        swapped = list(range(rank))
        swapped[at], swapped[at + 1] = at + 1, at
        return [norm_dim(d, rank) for d in dims] == swapped
    return False


def _shuffled(lab: Label, groups: int) -> Label:
    """``lab``'s channels after a shuffle in ``groups`` (:func:`~.labels.shuffle_sources`)."""
    before = lab.order or tuple(range(lab.width))
    return permuted(lab.dim, lab.segs, [before[q] for q in shuffle_sources(lab.width, groups)])


def _replica_split(lab: Label, dims: tuple[int, ...]) -> int | None:
    """The channel dim of a space laid out as R replicas of its C units (unit u at r * C + u: a grouped
    conv's output, or a merge below) split into (R, C), size-1 dims anywhere: the position of the C
    dim among ``dims`` (None for any other split)."""
    seg = lab.segs[0] if len(lab.segs) == 1 else None
    if seg is None or seg.space is None or seg.replicas == 1 or seg.expand != 1:
        return None
    sized = [(k, d) for k, d in enumerate(dims) if d != 1]
    if [d for _, d in sized] != [seg.replicas, seg.length]:
        return None
    return sized[1][0]


def _merged_replicas(lab: Label, dims: tuple[int, ...], at: int) -> Seg | None:
    """Dims (R.., C, Q..) merged into one, the channels C at ``at`` (not first): unit u's features sit at
    r * C * Q + u * Q + q for every r, as a run replicated R times with Q features per unit (one
    plain run of one space; None otherwise)."""
    seg = lab.segs[0] if len(lab.segs) == 1 else None
    if seg is None or seg.space is None or seg.replicas != 1 or seg.expand != 1 or at == 0:
        return None
    return replace(seg, expand=math.prod(dims[at + 1:]), replicas=math.prod(dims[:at]))


def _unbind(gm, node, c, labels, spec):  # unbind(x, dim) -> tuple; items keep the label (dim shifted)
    lab = only_label(node, labels)
    if lab is None:
        return None
    rank = len(shape_of(node.args[0]) or ())
    dim = norm_dim(spec.arg(node, "dim", 0), rank)
    if dim == lab.dim:
        c.block(lab, f"unbind over the channels: {node.format_node()}")
        return None
    return replace(lab, dim=lab.dim - (dim < lab.dim))


def _permute(gm, node, c, labels, spec):  # permute(x, dims) / x.permute(*dims)
    lab = only_label(node, labels)
    if lab is None:
        return None
    dims = node.args[1:] if node.op == "call_method" else (spec.arg(node, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    rank = len(shape_of(node) or ())
    dims = [norm_dim(d, rank) for d in dims]
    return replace(lab, dim=dims.index(lab.dim))


def _transpose(gm, node, c, labels, spec):  # transpose(x, d0, d1)
    lab = only_label(node, labels)
    if lab is None:
        return None
    rank = len(shape_of(node) or ())
    d0, d1 = (norm_dim(d, rank) for d in node.args[1:3])
    dim = d1 if lab.dim == d0 else d0 if lab.dim == d1 else lab.dim
    return replace(lab, dim=dim)


def _pool(gm, node, c, labels, spec):  # spatial pooling / interpolation: channels untouched
    return only_label(node, labels)


def _shift(gm, node, c, labels, spec):
    """roll / flip / pad: elements move along the dims named, the channels untouched unless the
    channel dim is one of them; a constant pad value other than 0 revives closed channels."""
    lab = only_label(node, labels)
    if lab is None:
        return None
    rank = len(shape_of(node) or ())
    if spec.name == "pad":
        pads = spec.arg(node, "pad")
        moved = [rank - 1 - i for i in range(len(pads) // 2) if pads[2 * i] or pads[2 * i + 1]]
        value = spec.arg(node, "value")
        if spec.arg(node, "mode", "constant") == "constant" and value not in (None, 0, 0.0):
            c.revived.update(lab.spaces())
    else:
        dims = spec.arg(node, "dims")
        moved = None if dims is None else [norm_dim(d, rank) for d in ((dims,) if isinstance(dims, int) else dims)]
    if moved is None or lab.dim in moved:
        c.block(lab, f"{spec.name} over the channels: {node.format_node()}")
        return None
    return lab


def _getitem(gm, node, c, labels, spec):  # x[idx] on a tensor: the channel dim must be taken whole
    lab = only_label(node, labels)
    if lab is None:
        return None
    if tuple_valued(node.args[0]):
        items = c.items.get(node.args[0].name)
        if items is None:
            return lab  # an item of unbind's tuple
        return items[node.args[1]] if isinstance(node.args[1], int) else None
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
        c.block(lab, f"indexing with ...: {node.format_node()}")
        return None
    dim_in = dim_out = 0
    for pos, i in enumerate(idx):
        if i is None:
            dim_out += 1
            continue
        if dim_in == lab.dim:
            if isinstance(i, slice) and i.step in (None, 1):
                start, stop, _ = i.indices(lab.width)
                if (start, stop) == (0, lab.width):
                    return replace(lab, dim=dim_out)
                pos = pos if isinstance(node.args[1], tuple) else -1
                piece = cut(c, node, lab, [(start, stop)], "getitem", pos)[0] if start < stop else None
                return replace(piece, dim=dim_out) if piece is not None else None
            c.block(lab, f"indexing into the channels: {node.format_node()}")
            return None
        if isinstance(i, int):
            dim_in += 1
        elif isinstance(i, slice):
            dim_in += 1
            dim_out += 1
        else:
            c.block(lab, f"advanced indexing: {node.format_node()}")
            return None
    return replace(lab, dim=lab.dim - dim_in + dim_out)


def _unsqueeze(gm, node, c, labels, spec):  # unsqueeze(x, dim): a size-1 dim inserted
    lab = only_label(node, labels)
    out = shape_of(node)
    if lab is None or out is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return replace(lab, dim=lab.dim + (norm_dim(dim, len(out)) <= lab.dim))


def _expand(gm, node, c, labels, spec):  # expand(x, sizes): broadcasts size-1 dims (new ones in front)
    """The label passes (shifted by the dims added in front); the size written for the channel dim
    follows the kept width after the fold."""
    lab = only_label(node, labels)
    ins, outs = shape_of(node.args[0]), shape_of(node)
    if lab is None or ins is None or outs is None:
        return None
    out = replace(lab, dim=lab.dim + len(outs) - len(ins))
    c.shape_args.append(ShapeArg(node.name, out.dim, out))
    return out


def _slice(gm, node, c, labels, spec):  # aten.slice(x, dim, start, end, step)
    """As ``x[..., start:end:step]`` on one dim: another dim passes the label, the channel dim must
    be taken whole or as one run of step 1 (cut there, as narrow)."""
    lab = only_label(node, labels)
    shape = shape_of(node.args[0])
    if lab is None or shape is None:
        return None
    dim = norm_dim(spec.arg(node, "dim", 0), len(shape))
    if dim != lab.dim:
        return lab
    step = spec.arg(node, "step", 1)
    start, stop, _ = slice(spec.arg(node, "start"), spec.arg(node, "end"), step).indices(lab.width)
    if step != 1 or not start < stop:
        c.block(lab, f"slicing the channels with a step or to nothing: {node.format_node()}")
        return None
    if (start, stop) == (0, lab.width):
        return lab
    return cut(c, node, lab, [(start, stop)], "narrow")[0]


def _select(gm, node, c, labels, spec):  # aten.select(x, dim, index): one index along dim, dim dropped
    lab = only_label(node, labels)
    shape = shape_of(node.args[0])
    if lab is None or shape is None:
        return None
    dim = norm_dim(spec.arg(node, "dim"), len(shape))
    if dim == lab.dim:
        c.block(lab, f"selecting one channel: {node.format_node()}")
        return None
    return replace(lab, dim=lab.dim - (dim < lab.dim))


def _embedding(gm, node, c, labels, spec):  # aten.embedding(weight, indices): rows of a table
    """A look-up produces a new space on its output's last dim: the table's columns (its dim 1),
    sliced like a linear layer's rows."""
    wt = param_target(gm, spec.arg(node, "weight"))
    out = shape_of(node)
    if wt is None or wt not in c.parameters or out is None:
        return None
    width = c.parameters[wt].shape[1]
    return Label(len(out) - 1, (Seg(c.new_space(Producer(node.name, -1, wt, None, 1), width), width),))


#: this family's channel rules (the op table names them; ``rules.RULES`` merges the families)
RULES: dict[ChannelRule, Rule] = {
    ChannelRule.CAT: _cat,
    ChannelRule.RESHAPE: _reshape_like,
    ChannelRule.SHAPE_OF: _shape_of_other,
    ChannelRule.PERMUTE: _permute,
    ChannelRule.TRANSPOSE: _transpose,
    ChannelRule.SPATIAL: _pool,
    ChannelRule.GETITEM: _getitem,
    ChannelRule.SLICE: _slice,
    ChannelRule.UNSQUEEZE: _unsqueeze,
    ChannelRule.EXPAND: _expand,
    ChannelRule.SELECT: _select,
    ChannelRule.EMBEDDING: _embedding,
    ChannelRule.SHIFT: _shift,
    ChannelRule.UNBIND: _unbind,
    ChannelRule.SPLIT: _split,
}
