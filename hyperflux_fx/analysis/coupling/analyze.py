"""The driver: propagate labels through a graph with the rules, node by node, pass after pass.

A pass may find that a space must be split over conv groups or cut into pieces; the analysis then
runs again with those spaces split or cut from their producer on, until no pass asks for more."""

from __future__ import annotations

from torch import fx

from hyperflux_fx.analysis.coupling.checks import block_shared_weights, check_head_splits, check_width_reads
from hyperflux_fx.analysis.coupling.labels import (
    OUTPUT_REASON,
    Coupling,
    Label,
    block_inputs,
    shape_of,
    tuple_valued,
)
from hyperflux_fx.analysis.coupling.rules import RULES
from hyperflux_fx.analysis.coupling.rules.generic import unsupported
from hyperflux_fx.ops import ChannelRule, node_spec


def analyze_channels(gm: fx.GraphModule) -> Coupling:
    """Propagate channel labels through ``gm`` (which must carry ``tensor_meta``, see
    :func:`hyperflux_fx.frontend.trace.propagate_shapes`) and return spaces, ties, consumers and blocks.

    A pass may find that a space must be split over conv groups (a grouped conv reads it, or an add
    ties it to such a space) or cut into pieces (a split, chunk, narrow or slice takes part of it, or
    an add ties it to a space cut so): the analysis then runs again with those spaces split or cut
    from their producer on, until no pass asks for more (each pass adds a split or a cut). So may a
    space tied to channels that each own several consecutive positions (a depthwise multiplier's
    output): its producer then makes units of that many rows."""
    split: dict[str, int] = {}
    cuts: dict[str, frozenset[int]] = {}
    heads: dict[str, int] = {}
    rows: dict[str, int] = {}
    while True:
        c = _analyze(gm, split, cuts, heads, rows)
        new = {k: v for k, v in c.requests.items() if k not in split}
        new_cuts = {k: cuts.get(k, frozenset()) | v for k, v in c.cut_requests.items()
                    if not v <= cuts.get(k, frozenset())}
        new_heads = {k: v for k, v in c.head_group_requests.items() if k not in heads}
        new_rows = {k: v for k, v in c.rows_requests.items() if k not in rows}
        if not new and not new_cuts and not new_heads and not new_rows:
            return c
        split.update(new)
        cuts.update(new_cuts)
        heads.update(new_heads)
        rows.update(new_rows)


def _analyze(gm: fx.GraphModule, split: dict[str, int], cuts: dict[str, frozenset[int]],
             heads: dict[str, int] | None = None, rows: dict[str, int] | None = None) -> Coupling:
    """One pass of :func:`analyze_channels`: the spaces of ``split``'s producers split over conv groups,
    those of ``cuts``' cut into pieces, the head splits of ``heads``' in units of that many heads, the
    spaces of ``rows``' producers in units of that many consecutive rows."""
    c = Coupling(parameters=dict(gm.named_parameters()), buffers=dict(gm.named_buffers()), split=dict(split),
                 cuts=dict(cuts), head_groups=dict(heads or {}), rows=dict(rows or {}))
    labels: dict[fx.Node, Label] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            for n in node.all_input_nodes:
                c.block(labels.get(n), OUTPUT_REASON)
            continue
        spec = node_spec(gm, node)
        rule = RULES[spec.channel_rule] if spec is not None and spec.channel_rule is not None else unsupported
        if _shuffled_into(node, labels) and (spec is None or spec.channel_rule not in FOLLOW_SHUFFLES):
            block_inputs(c, node, labels, "shuffled channels reach an op that does not follow the permutation")
            continue
        _keep_label(c, labels, node, rule(gm, node, c, labels, spec))
    check_head_splits(c)
    check_width_reads(gm, c)
    block_shared_weights(c)
    return c


#: the rules that keep a permuted label's ``order`` (:class:`~.labels.Label`) right; any other op reading
#: channels a shuffle permuted blocks them
FOLLOW_SHUFFLES = frozenset({
    ChannelRule.ELEMENTWISE, ChannelRule.CONV, ChannelRule.CONV_MODULE, ChannelRule.LINEAR, ChannelRule.LINEAR_MODULE,
    ChannelRule.BATCH_NORM, ChannelRule.BATCH_NORM_MODULE, ChannelRule.SPLIT, ChannelRule.CAT, ChannelRule.RESHAPE,
    ChannelRule.SPATIAL, ChannelRule.GETITEM, ChannelRule.SLICE, ChannelRule.SELECT, ChannelRule.PERMUTE,
    ChannelRule.TRANSPOSE, ChannelRule.UNSQUEEZE, ChannelRule.UNBIND, ChannelRule.EXPAND, ChannelRule.SHIFT,
    ChannelRule.NO_CHANNELS,
})


def _shuffled_into(node: fx.Node, labels: dict[fx.Node, Label]) -> bool:
    """Some input of ``node`` carries channels a shuffle permuted."""
    return any(n in labels and labels[n].order is not None for n in node.all_input_nodes)


def _keep_label(c: Coupling, labels: dict[fx.Node, Label], node: fx.Node, out: Label | None) -> None:
    """Record a node's output label after checking it against the node's shape."""
    if out is None:
        return
    if tuple_valued(node):
        labels[node] = out  # a tuple of tensors (unbind/split): checked where its items are taken
        return
    shape = shape_of(node)
    if shape is None or out.dim >= len(shape) or shape[out.dim] != out.width:
        c.block(out, f"channel bookkeeping lost track (shape {shape}, label width {out.width}): {node.format_node()}")
    else:
        labels[node] = out
        c.labels[node.name] = out
