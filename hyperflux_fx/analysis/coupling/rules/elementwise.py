"""Elementwise and broadcast ops: unary maths keeps the label (and notes ops that revive zeros); add,
sub, mul, div, where and addcmul tie the labels of their operands or keep the one label with a
broadcast operand."""

from __future__ import annotations

from typing import Any

from torch import fx

from hyperflux_fx.analysis.coupling.labels import Coupling, Label, Rule, block_inputs, norm_dim, only_label, shape_of
from hyperflux_fx.analysis.coupling.rules.links import request_cut, runs, same_layout, split_alike, tie
from hyperflux_fx.analysis.coupling.rules.params import broadcast_operand
from hyperflux_fx.ops import ChannelRule


def _elementwise(gm, node, c, labels, spec):  # per element: f(0) != 0 revives zeros
    lab = only_label(node, labels)
    if lab is not None and not spec.zero_preserving:
        c.revived.update(lab.spaces())
    return lab


def _addcmul(gm, node, c, labels, spec):
    """input + value * tensor1 * tensor2: a mul of the two factors, then an add of the input and that
    product, each by the rules of :func:`_binary` (ties, broadcasting, sliced parameters, revived zeros).
    The product's stand-in operand is the factor that carries its label (its shape for the broadcast
    checks); with neither factor labelled, both must broadcast against the input's label."""
    x, t1, t2 = (spec.arg(node, name) for name in spec.signature[:3])
    product = _combine(gm, node, c, labels, "mul", t1, t2)
    lx = labels.get(x) if isinstance(x, fx.Node) else None
    if product is None:
        out = _join(gm, node, c, "add", x, lx, t1, None)
        if out is not None and not broadcast_operand(gm, c, node, out, t2):
            c.block(out, f"mul with an operand that varies over the channels: {node.format_node()}")
        return out
    carrier = t1 if isinstance(t1, fx.Node) and t1 in labels else t2
    return _join(gm, node, c, "add", x, lx, carrier, product)


def _binary(kind: str) -> Rule:
    """add/sub/mul/div: two labelled operands are tied; one labelled with a scalar or broadcast passes."""
    def rule(gm, node, c, labels, spec):
        return _combine(gm, node, c, labels, kind, node.args[0], spec.arg(node, spec.signature[1]))
    return rule


def _combine(gm: fx.GraphModule, node: fx.Node, c: Coupling, labels: dict[fx.Node, Label], kind: str, a: Any,
             b: Any) -> Label | None:
    """The label of an elementwise op of ``a`` and ``b`` (see :func:`_binary`)."""
    la = labels.get(a) if isinstance(a, fx.Node) else None
    lb = labels.get(b) if isinstance(b, fx.Node) else None
    return _join(gm, node, c, kind, a, la, b, lb)


def _join(gm: fx.GraphModule, node: fx.Node, c: Coupling, kind: str, a: Any, la: Label | None, b: Any,
          lb: Label | None) -> Label | None:
    """:func:`_combine` with the operands' labels given (an operand may stand for an intermediate value)."""
    if la is None and lb is None:
        return None
    if la is not None and lb is not None:
        if not same_layout(la, lb):
            sa, sb = shape_of(a), shape_of(b)
            # broadcasting against a size-1 channel dim keeps the other label
            if sb is not None and len(sb) > la.dim and sb[la.dim] == 1:
                return la
            if sa is not None and len(sa) > lb.dim and sa[lb.dim] == 1:
                return lb
            if split_alike(c, la, lb) or split_alike(c, lb, la):
                return la
            c.block(la, f"{kind} of differently laid out channels: {node.format_node()}")
            c.block(lb, f"{kind} of differently laid out channels: {node.format_node()}")
            return la
        tie(c, la, lb, kind, node)
        return la
    lab, other = (la, b) if la is not None else (lb, a)
    if not broadcast_operand(gm, c, node, lab, other):
        c.block(lab, f"{kind} with an operand that varies over the channels: {node.format_node()}")
    if kind in ("add", "sub", "where") and other is not None and not (isinstance(other, (int, float)) and other == 0):
        c.revived.update(lab.spaces())
    if kind == "div" and lab is lb:
        c.block(lab, f"division by channels: {node.format_node()}")
    return lab


def _where(gm, node, c, labels, spec):  # where(condition, x, y): as an add of x and y, the condition broadcast
    cond = spec.arg(node, "condition")
    out = _combine(gm, node, c, labels, "where", spec.arg(node, "input"), spec.arg(node, "other"))
    if isinstance(cond, fx.Node) and cond in labels:
        block_inputs(c, node, labels, f"a condition over the channels: {node.format_node()}")
        return None
    if out is not None and not broadcast_operand(gm, c, node, out, cond):
        c.block(out, f"where with a condition that varies over the channels: {node.format_node()}")
    return out


def _glu(gm, node, c, labels, spec):
    """glu(x, dim) = a * sigmoid(b), a and b the two halves of x along dim. Over the channels, channel i
    of a goes with channel i of b: the space is cut between the halves (by the next pass, when a
    producer makes both), the halves are tied unit by unit and the output carries a's runs. Over
    another dim the label passes. f(0) = 0: nothing is revived."""
    lab = only_label(node, labels)
    shape = shape_of(node.args[0])
    if lab is None or shape is None:
        return None
    dim = gm.get_submodule(str(node.target)).dim if node.op == "call_module" else spec.arg(node, "dim", -1)
    if norm_dim(dim, len(shape)) != lab.dim:
        return lab
    half = lab.width // 2
    asked = request_cut(c, lab, {half})
    if asked is False:
        c.block(lab, f"glu over channels that cannot be cut in halves: {node.format_node()}")
    if asked is not None:
        return None
    a, b = runs(lab, 0, half), runs(lab, half, lab.width)
    if not same_layout(a, b):
        c.block(lab, f"glu over halves laid out differently: {node.format_node()}")
        return None
    tie(c, a, b, "glu", node)
    return a


#: this family's channel rules (the op table names them; ``rules.RULES`` merges the families)
RULES: dict[ChannelRule, Rule] = {
    ChannelRule.ELEMENTWISE: _elementwise,
    ChannelRule.ADD: _binary('add'),
    ChannelRule.SUB: _binary('sub'),
    ChannelRule.MUL: _binary('mul'),
    ChannelRule.DIV: _binary('div'),
    ChannelRule.WHERE: _where,
    ChannelRule.ADDCMUL: _addcmul,
    ChannelRule.GLU: _glu,
}
