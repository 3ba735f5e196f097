"""Attention heads: a channel space seen as (heads, head_dim) after a reshape, heads that must go alike
across q, k and v, and grouped-query attention (k/v heads repeated): there the unit is a query
position, the r-th query head of every KV group, and the KV heads are kept whole."""

from __future__ import annotations

import math
from dataclasses import replace

from torch import fx

from hyperflux_fx.analysis.coupling.labels import Coupling, Label, Producer, Seg, ShapeArg, shape_of
from hyperflux_fx.analysis.coupling.rules.links import request_split, same_layout, tie
from hyperflux_fx.ops import ChannelRule, node_spec

#: why the KV heads of grouped-query attention are not gated (the query positions are)
KV_KEPT = "KV heads kept whole under grouped-query attention: the unit is a query head position in every KV group"


def is_head_split(c: Coupling, lab: Label) -> bool:
    """A single linear/conv output split into (..., units, features): attention heads."""
    if len(lab.segs) != 1 or lab.segs[0].expand != 1 or lab.segs[0].space is None:
        return False
    prod = c.producers[lab.segs[0].space]
    return prod.replicas == 1 and prod.unit_rows == 1 and prod.parent is None


def split_heads(c: Coupling, node: fx.Node, lab: Label, dims: tuple[int, ...], j0: int) -> Label:
    """(.., R*U*D) -> (.., R.., U, D): unit u of the new space owns rows r*U*D + u*D + d of the parent
    producer for every replica r. The parent space is deleted only through this one.

    Under grouped-query attention (``c.head_groups``: P query heads per KV head) the unit is a query
    position p instead: the p-th query head of each of the U / P KV groups, so that every group keeps
    as many query heads (rows (r*G + g)*P*D + p*D + d, the G groups as replicas)."""
    parent = lab.segs[0].space
    src = c.producers[parent]
    per_group = c.head_groups.get(src.name, 1)
    units, groups = (per_group, dims[-2] // per_group) if per_group > 1 else (dims[-2], 1)
    prod = Producer(src.node, -1, src.weight, src.bias, src.weight_dim, replicas=math.prod(dims[:-2]) * groups,
                    unit_rows=dims[-1], units=units, parent=parent, offset=src.offset, piece=src.piece)
    sid = c.new_space(prod, units)
    if parent in c.revived:
        c.revived.add(sid)
    c.split_parents[parent] = (f"split into {units} units of {prod.replicas} x {dims[-1]} rows by {node.name}: "
                               "deleted through that group")
    return Label(j0 + len(dims) - 2, (Seg(sid, units, replicas=groups),))


def heads_as_replicas(c: Coupling, lab: Label) -> bool:
    """An op that mixes the units of a head split (a softmax across them: ResNeSt's radix softmax) reads
    the split the other way round: not U heads of D channels but U replicas of D channels, each
    channel present once in every replica. Ask the next pass to split the parent space over U
    replicas (True when asked); the reshape then puts the replicas on their own dim
    (``rules.shapes``), and the op mixes only the copies of one channel."""
    seg = lab.segs[0] if len(lab.segs) == 1 else None
    if seg is None or seg.space is None or seg.expand != 1:
        return False
    prod = c.producers[seg.space]
    if prod.parent is None or prod.replicas != 1:
        return False
    return request_split(c, Label(lab.dim, (Seg(prod.parent, c.sizes[prod.parent]),)), prod.units)


def _same_label(labs: list[Label | None]) -> bool:
    return all(lab is not None for lab in labs) and len({(lab.dim, lab.segs) for lab in labs}) == 1


def heads_alike(c: Coupling, node: fx.Node, labs: list[Label | None], rank: int, gm: fx.GraphModule | None = None,
                operands: tuple[fx.Node | None, ...] = ()) -> Label | None:
    """Operands of an attention product with one head layout on a batch dim: the label (separate
    projections' head spaces are tied: head h of each operand only meets head h of the others).
    Grouped-query attention (a KV head repeated for P query heads) asks the next pass to split the
    query heads by their position within the KV group (:func:`split_heads`); on that pass the KV
    operands are kept whole and the repeat follows the kept positions (:func:`_query_positions`).
    ``operands``: the nodes of ``gm`` the labels came from (None for a KV operand repeated inside the op)."""
    if not all(lab is not None and lab.dim < rank - 2 for lab in labs):
        return None
    if _same_label(labs):
        return labs[0]
    if (out := _query_positions(gm, c, labs, operands)) is not None:
        return out
    if not all(same_layout(labs[0], lab) for lab in labs[1:]):
        asked = [_request_head_groups(c, lab, other) for lab in labs for other in labs if lab is not other]
        if any(asked):
            for lab in labs:
                c.block(lab, "query heads split by their position in the KV group on the next pass")
        return None
    for lab in labs[1:]:
        tie(c, labs[0], lab, "attention", node)
    return labs[0]


def _positions_of(c: Coupling, lab: Label) -> Seg | None:
    """The run of query positions (:func:`split_heads` under GQA) that ``lab`` is, else None."""
    seg = lab.segs[0] if len(lab.segs) == 1 else None
    if seg is None or seg.space is None or seg.expand != 1:
        return None
    if not c.is_query_positions(seg.space) or seg.length != c.producers[seg.space].units:
        return None
    return seg


def _query_positions(gm: fx.GraphModule | None, c: Coupling, labs: list[Label | None],
                     operands: tuple[fx.Node | None, ...]) -> Label | None:
    """One operand is a run of query positions (G groups of P), the others KV heads repeated P times
    (or that same run): the KV heads are kept whole (their spaces blocked) and the output carries the
    positions. A repeat written in the graph (``repeat_kv``: expand then reshape) gets its sizes
    rewritten to the kept positions, so that the fold repeats each KV head as often as its group keeps
    query heads. None when the labels are not so."""
    found = [(k, seg) for k, lab in enumerate(labs) if (seg := _positions_of(c, lab)) is not None]
    if not found or len({seg for _, seg in found}) != 1:
        return None
    at, seg = found[0]
    query = labs[at]
    for lab in labs:
        if lab == query:
            continue
        kv = lab.segs[0] if len(lab.segs) == 1 else None
        if kv is None or lab.dim != query.dim or kv.expand != seg.length or kv.length != seg.replicas:
            return None
    for k, lab in enumerate(labs):
        if lab == query:
            continue
        c.block(lab, KV_KEPT)
        operand = operands[k] if k < len(operands) else None
        if operand is not None and (gm is None or not _repeat_follows(gm, c, operand, seg)):
            c.block(query, "a KV repeat the fold cannot resize to the kept query positions")
    return query


def _repeat_follows(gm: fx.GraphModule, c: Coupling, operand: fx.Node, seg: Seg) -> bool:
    """The ``repeat_kv`` behind ``operand`` (an expand of a size-1 dim after the KV heads, merged
    into them by a reshape, then moves only): its sizes follow the kept positions ``seg``."""
    node = operand
    for _ in range(8):
        if not isinstance(node, fx.Node) or not node.args:
            return False
        if _rule(gm, node) is ChannelRule.RESHAPE and _rule(gm, node.args[0]) is ChannelRule.EXPAND:
            break
        if node.all_input_nodes != [node.args[0]]:  # only moves of one tensor (transpose, copy) in between
            return False
        node = node.args[0]
    else:
        return False
    expand, merged = node.args[0], c.labels.get(node.name)
    before, after = c.labels.get(expand.name), shape_of(expand)
    src = shape_of(expand.args[0]) if isinstance(expand.args[0], fx.Node) else None
    if merged is None or before is None or after is None or src is None:
        return False
    d = before.dim + 1  # the repeat's dim, right after the KV heads
    if d >= len(after) or after[d] != seg.length or src[d] != 1:
        return False
    written = {(node.name, merged.dim), (expand.name, d)}
    c.shape_args[:] = [sa for sa in c.shape_args if (sa.node, sa.dim) not in written]
    c.shape_args.append(ShapeArg(node.name, merged.dim, Label(merged.dim, (seg,))))
    c.shape_args.append(ShapeArg(expand.name, d, Label(d, (Seg(seg.space, seg.length),))))
    return True


def _rule(gm: fx.GraphModule, node: object) -> ChannelRule | None:
    spec = node_spec(gm, node) if isinstance(node, fx.Node) else None
    return spec.channel_rule if spec is not None else None


def repeated_heads(lab: Label | None, heads: int) -> Label | None:
    """``sdpa(..., enable_gqa=True)``: each of a key's KV heads stands for ``heads / KV`` query heads,
    as if repeated (then the query heads are grouped alike)."""
    if lab is None or len(lab.segs) != 1 or lab.segs[0].expand != 1 or heads % lab.width or heads == lab.width:
        return lab
    return Label(lab.dim, (replace(lab.segs[0], expand=heads // lab.width),))


def _request_head_groups(c: Coupling, lab: Label, repeated: Label) -> bool:
    """``lab`` is a plain head split of H heads, ``repeated`` H/R heads each repeated R times: ask for
    ``lab``'s heads split by their position among the R of each KV head (True when asked)."""
    if len(lab.segs) != 1 or len(repeated.segs) != 1 or lab.dim != repeated.dim or lab.width != repeated.width:
        return False
    seg, rep = lab.segs[0], repeated.segs[0]
    if seg.space is None or seg.expand != 1 or seg.replicas != 1 or rep.expand == 1 or rep.replicas != 1:
        return False
    prod = c.producers[seg.space]
    if prod.parent is None or prod.replicas != 1:
        return False
    split = c.producers[prod.parent].name  # the projection (or the piece of a fused one) split into heads
    if c.head_groups.get(split, 1) != 1:
        return False
    c.head_group_requests.setdefault(split, rep.expand)
    return True
