"""Attention: scaled_dot_product_attention and the q @ k^T / attn @ v products of written-out attention.
Heads are independent, so a head label passes through, tying q, k and v."""

from __future__ import annotations

from torch import fx

from hyperflux_fx.analysis.coupling.labels import Rule, block_inputs, shape_of
from hyperflux_fx.analysis.coupling.rules.heads import heads_alike, repeated_heads
from hyperflux_fx.analysis.coupling.rules.links import same_layout, tie
from hyperflux_fx.analysis.coupling.rules.params import sliced_operand
from hyperflux_fx.ops import ChannelRule


def _sdpa(gm, node, c, labels, spec):  # F.scaled_dot_product_attention(q, k, v): heads are independent
    q, k, v = (spec.arg(node, name) for name in ("query", "key", "value"))
    operands = tuple(t if isinstance(t, fx.Node) else None for t in (q, k, v))
    labs = [labels.get(t) if t is not None else None for t in operands]
    if spec.arg(node, "enable_gqa", False) is True and labs[0] is not None:  # KV heads not repeated in the graph
        labs = [labs[0], *(repeated_heads(lab, labs[0].width) for lab in labs[1:])]
        operands = (operands[0], None, None)
    rank = len(shape_of(node) or ())
    out = heads_alike(c, node, labs, rank, gm, operands)
    if out is None:
        block_inputs(c, node, labels, "attention over labels that are not one head space on a batch dim")
        return None
    mask = spec.arg(node, "attn_mask")
    shape = shape_of(mask) if isinstance(mask, fx.Node) else None
    d = out.dim - (rank - len(shape)) if shape is not None else -1
    if d >= 0 and shape[d] != 1:  # a mask (a position bias) per head: deleted with the heads, or it blocks
        ml = labels.get(mask)
        if ml is not None and ml.dim == d and same_layout(ml, out):
            tie(c, out, ml, "attention mask", node)
        elif ml is not None or not sliced_operand(gm, c, out, mask, rank):  # a fixed per-head table: sliced
            block_inputs(c, node, labels, f"an attention mask that varies over the heads: {node.format_node()}")
            return None
    return out


def _matmul(gm, node, c, labels, spec):  # q @ k^T, attn @ v: a head label on a batch dim passes through
    operands = tuple(a if isinstance(a, fx.Node) else None for a in node.args[:2])
    labs = [labels.get(a) if a is not None else None for a in operands]
    out = heads_alike(c, node, labs, len(shape_of(node) or ()), gm, operands)
    if out is None:
        block_inputs(c, node, labels, "matmul over the channels")
    return out


#: this family's channel rules (the op table names them; ``rules.RULES`` merges the families)
RULES: dict[ChannelRule, Rule] = {
    ChannelRule.ATTENTION: _sdpa,
    ChannelRule.MATMUL: _matmul,
}
