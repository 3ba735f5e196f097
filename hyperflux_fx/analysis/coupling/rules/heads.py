"""Attention heads: a channel space seen as (heads, head_dim) after a reshape, heads that must go alike
across q, k and v, and the head groups of grouped-query attention (k/v heads repeated)."""

from __future__ import annotations

import math
from dataclasses import replace

from torch import fx

from hyperflux_fx.analysis.coupling.labels import Coupling, Label, Producer, Seg
from hyperflux_fx.analysis.coupling.rules.links import request_split, same_layout, tie


def is_head_split(c: Coupling, lab: Label) -> bool:
    """A single linear/conv output split into (..., units, features): attention heads."""
    if len(lab.segs) != 1 or lab.segs[0].expand != 1 or lab.segs[0].space is None:
        return False
    prod = c.producers[lab.segs[0].space]
    return prod.replicas == 1 and prod.unit_rows == 1 and prod.parent is None


def split_heads(c: Coupling, node: fx.Node, lab: Label, dims: tuple[int, ...], j0: int) -> Label:
    """(.., R*U*D) -> (.., R.., U, D): unit u of the new space owns rows r*U*D + u*D + d of the parent
    producer for every replica r. The parent space is deleted only through this one."""
    parent = lab.segs[0].space
    src = c.producers[parent]
    per_unit = c.head_groups.get(src.name, 1)  # heads that move together (the query heads of one KV head)
    units, feat = dims[-2] // per_unit, dims[-1] * per_unit
    replicas = math.prod(dims[:-2])
    prod = Producer(src.node, -1, src.weight, src.bias, src.weight_dim, replicas=replicas, unit_rows=feat,
                    units=units, parent=parent, offset=src.offset, piece=src.piece)
    sid = c.new_space(prod, units)
    if parent in c.revived:
        c.revived.add(sid)
    c.split_parents[parent] = f"split into units of {units} x {feat} by {node.name}: deleted through that group"
    return Label(j0 + len(dims) - 2, (Seg(sid, units, expand=per_unit),))


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


def heads_alike(c: Coupling, node: fx.Node, labs: list[Label | None], rank: int) -> Label | None:
    """Operands of an attention product with one head layout on a batch dim: the label (separate
    projections' head spaces are tied: head h of each operand only meets head h of the others).
    Grouped-query attention (a KV head repeated for R query heads) asks the next pass to group the
    query heads R to a unit, so that a KV head and its query heads move together."""
    if not all(lab is not None and lab.dim < rank - 2 for lab in labs):
        return None
    if _same_label(labs):
        return labs[0]
    if not all(same_layout(labs[0], lab) for lab in labs[1:]):
        asked = [_request_head_groups(c, lab, other) for lab in labs for other in labs if lab is not other]
        if any(asked):
            for lab in labs:
                c.block(lab, "query heads grouped by their KV head on the next pass")
        return None
    for lab in labs[1:]:
        tie(c, labs[0], lab, "attention", node)
    return labs[0]


def repeated_heads(lab: Label | None, heads: int) -> Label | None:
    """``sdpa(..., enable_gqa=True)``: each of a key's KV heads stands for ``heads / KV`` query heads,
    as if repeated (then the query heads are grouped alike)."""
    if lab is None or len(lab.segs) != 1 or lab.segs[0].expand != 1 or heads % lab.width or heads == lab.width:
        return lab
    return Label(lab.dim, (replace(lab.segs[0], expand=heads // lab.width),))


def _request_head_groups(c: Coupling, lab: Label, repeated: Label) -> bool:
    """``lab`` is a plain head split of H heads, ``repeated`` H/R heads each repeated R times: ask for
    ``lab``'s heads in units of R (True when asked)."""
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
