"""Weight uses: where each parameter of a traced graph is consumed as the weight of a weight op.

The op table says which operand of which op is a weight (``weights`` / ``weight_attrs``) and which
ops only move elements on the way (``moves_elements``); this module walks the graph with it and
returns every use, every op whose weight is not a parameter, and the other uses of parameters. It
never rewrites the graph: ``insert_gates`` decides what to gate from this.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import fx, nn

from hyperflux_fx.analysis.attention import AttentionInfo, attention_projections, input_dependence
from hyperflux_fx.ir import MODULE_NODE_META, is_gate_module
from hyperflux_fx.ops import (
    call_spec,
    functional_module_call,
    gateable_module_weights,
    node_spec,
    slot_value,
    weight_slots,
)

__all__ = ["ComputedWeight", "WeightUse", "WeightUses", "end_ops", "find_weight_uses", "op_name"]

UseKind = Literal["slot", "functionalize", "module"]


@dataclass
class WeightUse:
    """One weight use of a parameter found in the graph."""

    node: fx.Node  # the consuming op (call_function / call_method / call_module)
    param: str  # canonical parameter name
    kind: UseKind  # slot: an operand of a functional op; functionalize: a plain conv/linear leaf; module: other leaf
    head: fx.Node | None = None  # slot: node whose input is the get_attr
    getattr_node: fx.Node | None = None  # slot: the get_attr node feeding the chain
    rel_name: str = ""  # module: parameter name relative to the called module


@dataclass
class ComputedWeight:
    """A weight operand that is not a parameter reached through get_attr (it stays dense)."""

    node: str  # the op's node name
    reason: str


@dataclass
class WeightUses:
    """Every weight use of a graph, and what else uses its parameters."""

    uses: list[WeightUse] = field(default_factory=list)
    computed: list[ComputedWeight] = field(default_factory=list)  # weight operands that are not parameters
    non_weight_users: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # param -> other ops
    leaf_params: dict[str, str] = field(default_factory=dict)  # param -> "leaf path (Type)" for params in leaves

    def by_param(self) -> dict[str, list[WeightUse]]:
        out: dict[str, list[WeightUse]] = defaultdict(list)
        for u in self.uses:
            out[u.param].append(u)
        return out


def op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """``target@where`` for reports."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(str(node.target))).__name__}@{node.target}"
    if node.op == "call_method":
        return f".{node.target}()@{node.name}"
    target = getattr(node.target, "__name__", str(node.target))
    where = node.meta.get(MODULE_NODE_META, node.name)
    return f"{target}@{where}"


def _moves_elements(node: fx.Node) -> bool:
    spec = call_spec(node)
    return spec is not None and spec.moves_elements


def _passthrough_source(value: Any) -> tuple[fx.Node | None, fx.Node | None]:
    """Walk back from an operand through element-moving ops. Returns ``(get_attr node, head)`` where
    head is the node consuming the get_attr (None when the operand is the get_attr itself)."""
    head: fx.Node | None = None
    while isinstance(value, fx.Node):
        if value.op == "get_attr":
            return value, head
        if not _moves_elements(value) or not value.args:
            return None, None
        head = value
        value = value.args[0]
    return None, None


def _canonical_names(gm: fx.GraphModule) -> dict[int, str]:
    canonical: dict[int, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), name)
    return canonical


def _param_at(gm: fx.GraphModule, target: str) -> nn.Parameter | None:
    """The parameter at a get_attr target (None for buffers, modules and missing targets)."""
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return None


def find_weight_uses(gm: fx.GraphModule) -> WeightUses:
    """Every weight use in ``gm``, the ops whose weight is computed, and other parameter uses."""
    canonical = _canonical_names(gm)
    dep = input_dependence(gm.graph)
    found = WeightUses()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            _slot_uses(gm, node, canonical, dep, found)
        elif node.op == "call_module":
            _module_uses(gm, node, canonical, found)
    for node in gm.graph.nodes:  # other uses of parameters (for the report)
        if node.op == "get_attr" and (p := _param_at(gm, str(node.target))) is not None:
            for user in node.users:
                if not any(u.getattr_node is node and u.head is user for u in found.uses):
                    found.non_weight_users[canonical[id(p)]].add(op_name(user, gm))
    return found


def _slot_uses(gm: fx.GraphModule, node: fx.Node, canonical: dict[int, str], dep: dict[fx.Node, bool],
               found: WeightUses) -> None:
    for slot in weight_slots(node):
        value = slot_value(node, slot)
        src, head = _passthrough_source(value)
        param = _param_at(gm, str(src.target)) if src is not None else None
        if param is not None:
            found.uses.append(WeightUse(node, canonical[id(param)], "slot", head or node, src))
        elif isinstance(value, fx.Node) and (slot.computed_is_skip or not dep[value]):
            what = "an activation" if dep[value] else "computed from parameters"
            found.computed.append(ComputedWeight(node.name, (
                f"weight operand '{value.name}' of {op_name(node, gm)} is {what}, not a parameter reached through "
                f"get_attr and element-moving ops: {node.format_node()}")))


def _module_uses(gm: fx.GraphModule, node: fx.Node, canonical: dict[int, str], found: WeightUses) -> None:
    module = gm.get_submodule(str(node.target))
    if is_gate_module(module):
        return
    names = gateable_module_weights(module)
    if functional_module_call(module, node) is not None and names == ["weight"]:
        found.uses.append(WeightUse(node, canonical[id(module.weight)], "functionalize"))
    else:
        for rel in names:
            found.uses.append(WeightUse(node, canonical[id(module.get_parameter(rel))], "module", rel_name=rel))
    for _, p in module.named_parameters():
        found.leaf_params.setdefault(canonical[id(p)], f"{node.target} ({type(module).__name__})")


def end_ops(gm: fx.GraphModule, uses: list[WeightUse], attention: AttentionInfo) -> tuple[set[fx.Node], set[fx.Node]]:
    """(first, last) weight ops: single conv/linear ops with no weight op before / after them.

    A patch embedding or a classifier is one conv/linear op: module-level leaves (attention blocks,
    opaque modules) and attention projections are never "the first op" or "the head" even at the
    graph's ends. Behind an embedding look-up nothing is the first op: the look-up is (a token
    model's first layers are its attention projections).
    """
    weight_nodes = {u.node for u in uses}
    lookups = {n for n in gm.graph.nodes if (spec := node_spec(gm, n)) is not None and spec.kind == "embedding"}
    upstream: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        upstream[node] = any(upstream[a] or a in weight_nodes or a in lookups for a in node.all_input_nodes)
    downstream: dict[fx.Node, bool] = {}
    for node in reversed(gm.graph.nodes):
        downstream[node] = any(downstream[u] or u in weight_nodes for u in node.users)
    single_ops = {u.node for u in uses if u.kind != "module"} - attention_projections(gm, attention, weight_nodes)
    return {n for n in single_ops if not upstream[n]}, {n for n in single_ops if not downstream[n]}
