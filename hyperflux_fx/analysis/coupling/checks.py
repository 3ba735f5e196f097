"""Consistency checks run after the rules: reads of a channel count at run time, head splits taken
whole, weights shared by ops that slice them differently. Each blocks the groups it cannot keep exact."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any

import networkx as nx
from torch import fx

from hyperflux_fx.analysis.coupling.labels import Coupling, norm_dim, shape_of
from hyperflux_fx.ops import ChannelRule, node_spec


def check_width_reads(gm: fx.GraphModule, c: Coupling) -> None:
    """A channel count read at run time (``b, n, c = x.shape``, ``x.size(1)``) may only size the
    reshape dim that carries those channels (the fold writes the kept count there), a norm over
    them (its normalized_shape goes with the masked norm in its place) or a channel shuffle's views (the
    fold replaces them with a gather); any other use
    (``c // heads``, a scale, a loop bound) would see the narrower width after the fold and compute
    something else, so it blocks the channels."""
    nodes = {n.name: n for n in gm.graph.nodes}
    written = {(sa.node, sa.dim) for sa in c.shape_args}
    normed = {use.node for use in c.norms}  # a norm's normalized_shape: rewritten by the mask, then the fold
    normed |= {n for sh in c.shuffles.values() for n in sh.nodes}  # a shuffle's views: a gather after the fold
    for name, lab in c.shape_reads:
        read = nodes[name]
        rank = len(shape_of(read.args[0]) or ())
        if (read.op == "call_method" or read.target is not getattr) and len(read.args) + len(read.kwargs) > 1:
            # x.size(d), aten.sym_size(x, d)
            d = read.args[1] if len(read.args) > 1 else next(iter(read.kwargs.values()))
            widths = [read] if norm_dim(d, rank) == lab.dim else []
        else:
            widths = [u for u in read.users if not _width_free_item(gm, u, lab.dim, rank)]
        for width in widths:
            for use in _computing_uses(width, written, normed, rank):
                c.block(lab, f"the channel count is read at run time and used to compute: {use.format_node()}")


def _computing_uses(width: fx.Node, written: set[tuple[str, int]], normed: set[str], rank: int) -> list[fx.Node]:
    """The uses of a channel count other than a norm's shape or a size the fold writes. Scalar arithmetic
    with constants (``c // radix``) is followed: what it computes may size a written dim too (the fold
    writes the kept count there, so the arithmetic is not run on the narrower width)."""
    bad = []
    for use in width.users:
        if use.name in normed or any((use.name, d) in written and _size_arg(use, d) is width for d in range(rank + 1)):
            continue
        scalar = use.op == "call_function" and not use.kwargs and shape_of(use) is None and all(
            a is width or not isinstance(a, fx.Node) for a in use.args)
        bad += _computing_uses(use, written, normed, rank) if scalar else [use]
    return bad


def _width_free_item(gm: fx.GraphModule, use: fx.Node, dim: int, rank: int) -> bool:
    """``shape[i]`` for a dim ``i`` other than the channel dim."""
    spec = node_spec(gm, use)
    if spec is None or spec.channel_rule is not ChannelRule.GETITEM or not isinstance(use.args[1], int):
        return False
    return norm_dim(use.args[1], rank) != dim


def _size_arg(node: fx.Node, dim: int) -> Any:
    """The size argument of a reshape/view node for output dim ``dim`` (None when out of range)."""
    args = node.args
    sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    return sizes[dim] if dim < len(sizes) else None


def check_head_splits(c: Coupling) -> None:
    """A head space deletes rows of its parent's producer: only if nothing else uses the parent space.
    Per-channel parameters of the parent (a BatchNorm on the fused projection: LeViT's qkv) follow
    the head space of a parent split once, each head owning its rows."""
    children: dict[int, list[int]] = defaultdict(list)
    for sid, prod in c.producers.items():
        if prod.parent is not None:
            children[prod.parent].append(sid)
    for parent, sids in children.items():
        if len(sids) == 1:
            _params_to_heads(c, parent, sids[0])
    for sid, prod in c.producers.items():
        if prod.parent is None:
            continue
        parent = prod.parent
        others = c.blocks[parent]
        used = any(parent in cons.label.spaces() for cons in c.consumers) or any(
            cp.space == parent for cp in c.params) or c.ties.degree(parent) > 0
        if others or used:
            c.blocks[sid].append(f"the split space is also used elsewhere: {'; '.join(others) or 'consumed/tied'}")


def _params_to_heads(c: Coupling, parent: int, head: int) -> None:
    """The parent's per-channel parameters indexed by the head space: row r * U * D + u * D + d of the
    parent is feature d of head u in replica r, as the head producer lays its rows out."""
    prod = c.producers[head]
    for k, cp in enumerate(c.params):
        if cp.space == parent and cp.expand == 1 and cp.replicas == 1:
            c.params[k] = replace(cp, space=head, expand=prod.unit_rows, replicas=prod.replicas)


def block_shared_weights(c: Coupling) -> None:
    """A weight shared by several ops would have to be sliced the same way for all of them: allowed
    only when every use that can delete slices the same dim with channels of one tied group (a
    language model's embedding tied to its output head), else it blocks."""
    uses: dict[str, list[tuple[int, list[int]]]] = defaultdict(list)  # weight -> (dim, spaces) per use
    users: dict[str, set[str]] = defaultdict(set)
    for prod in c.producers.values():
        uses[prod.weight].append((prod.weight_dim, [prod.space]))
        users[prod.weight].add(prod.node)
    for cons in c.consumers:
        uses[cons.weight].append((cons.weight_dim, cons.label.spaces()))
        users[cons.weight].add(cons.node)
    for target, nodes_using in users.items():
        if len(nodes_using) > 1 and not _sliced_alike(c, uses[target]):
            reason = f"weight {target} is shared by {sorted(nodes_using)}"
            for prod in c.producers.values():
                if prod.weight == target:
                    c.blocks[prod.space].append(reason)
            for cons in c.consumers:
                if cons.weight == target:
                    c.block(cons.label, reason)


def _sliced_alike(c: Coupling, uses: list[tuple[int, list[int]]]) -> bool:
    """The uses that may delete (their group is not blocked) slice one dim, with spaces of one group."""
    def group(sid: int) -> frozenset[int]:
        return frozenset(nx.node_connected_component(c.ties, sid)) if sid in c.ties else frozenset({sid})

    live = [(dim, group(s)) for dim, spaces in uses for s in spaces if not any(c.blocks.get(t) for t in group(s))]
    return len({dim for dim, _ in live}) <= 1 and len({g for _, g in live}) <= 1
