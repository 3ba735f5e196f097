"""insert_gates: trace a model and gate every conv / linear / attention-projection weight.

Before (a traced ``nn.Conv2d`` called as a module)::

    conv1 = self.conv1(x)

After (weight granularity; the module stays as the holder of ``conv1.weight``/``conv1.bias``, so
the original state dict still loads)::

    conv1_weight = self.conv1.weight
    hyperflux_gates_conv1_weight = self.hyperflux_gates.conv1_weight(conv1_weight)
    conv1_bias = self.conv1.bias
    conv2d = torch.conv2d(x, hyperflux_gates_conv1_weight, conv1_bias, (1, 1), (1, 1), (1, 1), 1)

Every gated parameter gets one gate node right after the placeholders, shared by all of its weight
uses. Weights are found through the support table of :mod:`hyperflux_fx.graph.weight_ops`:

* functional ops (``F.linear``, ``F.conv*``, ``matmul``/``@``/``mm``/``bmm``/``addmm``) whose weight
  operand is a parameter reached through ``get_attr`` (possibly via transpose/reshape/slicing);
* leaf ``nn.Linear`` / ``nn.Conv*`` / ``nn.ConvTranspose*`` calls, rewritten to the functional op;
* other leaves holding such weights (``nn.MultiheadAttention``, conv subclasses with their own
  forward, opaque modules from the trace fallback): gated at module level through
  :class:`~hyperflux_fx.runtime.gates.GatedModuleCall`.

Every parameter of the model ends up either gated or in the report's skipped list with a reason.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import operator
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from hyperflux_fx.config import GateConfig
from hyperflux_fx.graph.weight_ops import (
    PASSTHROUGH_FUNCTIONS,
    PASSTHROUGH_METHODS,
    functional_module_call,
    gateable_module_weights,
    never_gated_reason,
    slot_value,
    weight_slots,
)
from hyperflux_fx.passes._attrs import fetch_attr
from hyperflux_fx.passes._result import PassResult
from hyperflux_fx.runtime.gates import (
    CALLS_ATTR,
    GATES_ATTR,
    MASKS_ATTR,
    ChannelGate,
    ChannelMask,
    GatedModuleCall,
    WeightGate,
    gates,
    is_gate_module,
)
from hyperflux_fx.runtime.pressure import PRESSURE_ATTR, PressureState
from hyperflux_fx.trace import OPAQUE_META, normalize_inputs, propagate_shapes, trace

__all__ = ["CALLS_ATTR", "GATES_ATTR", "REPORT_META", "GateReport", "GatedTensor", "SkippedItem", "insert_gates"]

log = logging.getLogger(__name__)

INPUTS_META = "hyperflux.example_inputs"  # gm.meta key: example inputs kept for later passes
REPORT_META = "hyperflux.gate_report"  # gm.meta key holding the GateReport


@dataclass
class GatedTensor:
    """One gated tensor."""

    name: str  # qualified parameter name (loadable from the original state dict)
    shape: tuple[int, ...]
    numel: int
    gate: str  # qualified name of its gate module
    level: str  # "op": the gate feeds the op directly; "module": gated at module level
    via: list[str] = field(default_factory=list)  # the ops that consume it


@dataclass
class SkippedItem:
    """A parameter or op left dense, and why."""

    name: str  # parameter name, or the node for ops
    kind: str  # "parameter" or "op"
    reason: str


@dataclass
class GateReport:
    """What ``insert_gates`` gated and skipped."""

    granularity: str
    model_kind: str  # "cnn" or "transformer" (decides the first/last-op defaults)
    gate_first: bool
    gate_last: bool
    gated: list[GatedTensor] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    opaque: list[dict[str, str]] = field(default_factory=list)  # modules made leaves by the trace fallback
    rule_counts: dict[str, int] = field(default_factory=dict)  # rewrites per rule
    channel_groups: list[dict[str, Any]] = field(default_factory=list)  # channel/hybrid: every group, gated or why not

    @property
    def gated_elements(self) -> int:
        return sum(g.numel for g in self.gated) + sum(g["size"] for g in self.channel_groups if g["gated"])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gated_elements"] = self.gated_elements
        return out

    def __str__(self) -> str:
        lines = [
            (f"insert_gates: {len(self.gated)} tensors gated ({self.gated_elements:,} elements), "
            f"{sum(s.kind == 'parameter' for s in self.skipped)} parameters and "
            f"{sum(s.kind == 'op' for s in self.skipped)} ops skipped, {len(self.opaque)} opaque modules"),
            (f"granularity={self.granularity}  model kind={self.model_kind}  "
            f"first op gated={self.gate_first}  last op gated={self.gate_last}"),
        ]
        if self.rule_counts:
            lines.append("rewrites: " + ", ".join(f"{k}={v}" for k, v in sorted(self.rule_counts.items())))
        if self.gated:
            width = max(len(g.name) for g in self.gated)
            lines.append("")
            lines.append(f"{'gated tensor':<{width}}  {'shape':<20} {'elements':>12}  level   via")
            for g in self.gated:
                lines.append(f"{g.name:<{width}}  {list(g.shape)!s:<20} {g.numel:>12,}  {g.level:<6}  "
                             + ", ".join(g.via))
        if self.skipped:
            width = max(len(s.name) for s in self.skipped)
            lines.append("")
            lines.append(f"{'skipped':<{width}}  kind       reason")
            for s in self.skipped:
                lines.append(f"{s.name:<{width}}  {s.kind:<9}  {s.reason}")
        if self.channel_groups:
            lines.append("")
            lines.append("channel groups: size  gated  producers  (why not gated)")
            for g in self.channel_groups:
                why = "" if g["gated"] else "  -- " + "; ".join(g["blocked"])[:300]
                lines.append(f"  {g['name']:<28} {g['size']:>5}  {'yes' if g['gated'] else 'no ':<5}  "
                             f"{', '.join(g['producers'])[:80]}{why}")
        if self.opaque:
            lines.append("")
            lines.append("opaque modules (traced as leaves; gated at module level):")
            for o in self.opaque:
                lines.append(f"  {o['path']} ({o['type']}): {o['error']}")
        return "\n".join(lines)


@dataclass
class _Use:
    """One weight use of a parameter found in the graph."""

    node: fx.Node  # the consuming op (call_function / call_method / call_module)
    param: str  # canonical parameter name
    kind: str  # "slot" | "functionalize" | "module"
    head: fx.Node | None = None  # slot: node whose input is the get_attr
    getattr_node: fx.Node | None = None  # slot: the get_attr node feeding the chain
    rel_name: str = ""  # module: parameter name relative to the called module


def _op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(str(node.target))).__name__}@{node.target}"
    if node.op == "call_method":
        return f".{node.target}()@{node.name}"
    target = getattr(node.target, "__name__", str(node.target))
    where = node.meta.get("hyperflux.module", node.name)
    return f"{target}@{where}"


_MATMULS = frozenset({torch.matmul, operator.matmul, torch.bmm, torch.baddbmm, torch.einsum})
# Ops an attention tensor passes through between a projection and the attention op itself.
_ATTN_GLUE_FUNCS = frozenset({operator.getitem, operator.mul, operator.truediv, torch.unbind, torch.chunk,
                              torch.split, F.softmax, torch.softmax, F.dropout}) | PASSTHROUGH_FUNCTIONS
_ATTN_GLUE_METHODS = frozenset({"unbind", "chunk", "split", "softmax", "mul", "div"}) | PASSTHROUGH_METHODS


def _attention_anchors(gm: fx.GraphModule, dep: dict[fx.Node, bool]) -> set[fx.Node]:
    """Nodes that compute attention: sdpa, ``nn.MultiheadAttention`` and products of two activations
    (``q @ k^T``, ``attn @ v``) that feed or come from a softmax."""
    anchors: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention or node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.MultiheadAttention):
            anchors.add(node)
        elif ((node.op == "call_function" and node.target in _MATMULS)
              or (node.op == "call_method" and node.target in ("matmul", "bmm"))):
            operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(operands) == 2 and all(dep[a] for a in operands) and _near_softmax(node):
                anchors.add(node)
    return anchors


def _is_glue(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ATTN_GLUE_FUNCS) or (
        node.op == "call_method" and node.target in _ATTN_GLUE_METHODS)


def _near_softmax(node: fx.Node) -> bool:
    def is_softmax(n: fx.Node) -> bool:
        return (n.op == "call_function" and n.target in (F.softmax, torch.softmax)) or (
            n.op == "call_method" and n.target == "softmax")
    for start, step in ((node, lambda n: list(n.users)), (node, lambda n: n.all_input_nodes)):
        frontier, seen = [start], 0
        while frontier and seen < 8:  # a few ops either way: scaling, masking, dropout
            cur = frontier.pop()
            seen += 1
            for nxt in step(cur):
                if is_softmax(nxt):
                    return True
                frontier.append(nxt)
    return False


def _attention_projections(anchors: set[fx.Node], weight_nodes: set[fx.Node]) -> set[fx.Node]:
    """Weight ops joined to an attention op through shape/glue ops only: q/k/v and output projections.
    They belong to attention, so they are never taken for a patch embedding or a classifier head."""
    found: set[fx.Node] = set()
    for anchor in anchors:
        for step in (lambda n: n.all_input_nodes, lambda n: list(n.users)):
            frontier = list(step(anchor))
            seen: set[fx.Node] = set()
            while frontier:
                cur = frontier.pop()
                if cur in seen:
                    continue
                seen.add(cur)
                if cur in weight_nodes:
                    found.add(cur)
                elif _is_glue(cur) or cur in anchors:
                    frontier.extend(step(cur))
    return found


def _passthrough_source(value: Any) -> tuple[fx.Node | None, fx.Node | None]:
    """Walk back from an operand through element-moving ops. Returns ``(get_attr node, head)`` where
    head is the node consuming the get_attr (None when the operand is the get_attr itself)."""
    head: fx.Node | None = None
    while isinstance(value, fx.Node):
        if value.op == "get_attr":
            return value, head
        moving = (value.op == "call_function" and value.target in PASSTHROUGH_FUNCTIONS) or (
            value.op == "call_method" and value.target in PASSTHROUGH_METHODS)
        if not moving or not value.args:
            return None, None
        head = value
        value = value.args[0]
    return None, None


def _input_dependence(graph: fx.Graph) -> dict[fx.Node, bool]:
    dep: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        dep[node] = node.op == "placeholder" or any(dep[a] for a in node.all_input_nodes)
    return dep


def _sanitize(name: str, taken: set[str]) -> str:
    key = name.replace(".", "_")
    base, i = key, 1
    while key in taken:
        key = f"{base}_{i}"
        i += 1
    taken.add(key)
    return key


def insert_gates(model_or_gm: nn.Module, config: GateConfig | None = None, *, example_inputs: Any = None,
                 inplace: bool = False, leaf_modules: tuple[type | str, ...] = (),
                 concrete_args: dict[str, Any] | None = None) -> PassResult:
    """Trace ``model_or_gm`` (if needed) and insert gates on its weights and/or channel groups.

    Args:
        model_or_gm: an ``nn.Module`` (traced with :func:`hyperflux_fx.trace`) or a GraphModule.
        config: what to gate (defaults: ``GateConfig()``).
        example_inputs: optional inputs; when given, shapes are propagated and checked.
        inplace: rewrite the given GraphModule itself (or share parameters with the given module)
            instead of a deep copy.
        leaf_modules: forwarded to :func:`hyperflux_fx.trace`.
        concrete_args: forwarded to :func:`hyperflux_fx.trace`.

    Returns:
        ``PassResult(graph_module, modified, report)``; the report is also in
        ``graph_module.meta["hyperflux.gate_report"]``.

    Raises:
        TypeError: ``model_or_gm`` is not an ``nn.Module``.
        ValueError: the model is already gated, or channel/hybrid granularity without example_inputs.
        TraceError / ExampleInputError: from tracing.
    """
    config = config or GateConfig()
    if not isinstance(model_or_gm, nn.Module):
        raise TypeError(f"insert_gates expects a torch.nn.Module or GraphModule, got "
                        f"{type(model_or_gm).__module__}.{type(model_or_gm).__qualname__}")
    if not isinstance(config, GateConfig):
        raise TypeError(f"config must be a hyperflux_fx.GateConfig, got {type(config).__name__}")
    if config.granularity in ("channel", "hybrid") and example_inputs is None:
        raise ValueError(f"granularity={config.granularity!r} needs example_inputs: the tensor shapes decide how "
                         "channels flow through the graph")
    if gates(model_or_gm):
        raise ValueError("the model is already gated (it contains hyperflux gate modules)")

    original_params: dict[str, nn.Parameter] = {}
    if isinstance(model_or_gm, fx.GraphModule):
        gm = model_or_gm if inplace else copy.deepcopy(model_or_gm)
        gm.meta.setdefault(OPAQUE_META, [])
        if example_inputs is not None:
            propagate_shapes(gm, normalize_inputs(example_inputs))
    else:
        original_params = dict(model_or_gm.named_parameters())
        model = model_or_gm if inplace else copy.deepcopy(model_or_gm)
        gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)

    graph = gm.graph
    rules: Counter[str] = Counter()
    canonical: dict[int, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), name)

    def param_of(target: str) -> nn.Parameter | None:
        try:
            obj = fetch_attr(gm, target)
        except AttributeError:
            return None
        return obj if isinstance(obj, nn.Parameter) else None

    dep = _input_dependence(graph)
    anchors = _attention_anchors(gm, dep)
    model_kind = "transformer" if anchors else "cnn"
    gate_first = config.gate_first if config.gate_first is not None else model_kind == "cnn"
    gate_last = config.gate_last if config.gate_last is not None else model_kind == "cnn"

    # -- 1. find every weight use ----------------------------------------------------------------
    uses: list[_Use] = []
    skipped_ops: list[SkippedItem] = []
    non_weight_users: dict[str, set[str]] = defaultdict(set)  # param -> ops that use it otherwise
    leaf_params: dict[str, str] = {}  # param -> "leaf module path (Type)" for params inside leaves
    for node in graph.nodes:
        if node.op in ("call_function", "call_method"):
            for slot in weight_slots(node):
                value = slot_value(node, slot)
                src, head = _passthrough_source(value)
                param = param_of(str(src.target)) if src is not None else None
                if param is not None:
                    uses.append(_Use(node, canonical[id(param)], "slot", head or node, src))
                elif isinstance(value, fx.Node) and (slot.computed_is_skip or not dep[value]):
                    what = "an activation" if dep[value] else "computed from parameters"
                    skipped_ops.append(SkippedItem(node.name, "op",
                                                   f"weight operand '{value.name}' of {_op_name(node, gm)} is {what}, "
                                                   "not a parameter reached through get_attr and element-moving ops: "
                                                   f"{node.format_node()}"))
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if is_gate_module(module):
                continue
            names = gateable_module_weights(module)
            if functional_module_call(module, node) is not None and names == ["weight"]:
                uses.append(_Use(node, canonical[id(module.weight)], "functionalize"))
            else:
                for rel in names:
                    p = fetch_attr(module, rel)
                    uses.append(_Use(node, canonical[id(p)], "module", rel_name=rel))
            for rel, p in module.named_parameters():
                leaf_params.setdefault(canonical[id(p)], f"{node.target} ({type(module).__name__})")
    weight_params = {u.param for u in uses}
    for node in graph.nodes:  # record other uses of parameters (for the report)
        if node.op == "get_attr" and (p := param_of(str(node.target))) is not None:
            for user in node.users:
                is_weight_path = any(u.getattr_node is node and (u.head is user) for u in uses)
                if not is_weight_path:
                    non_weight_users[canonical[id(p)]].add(_op_name(user, gm))

    # -- 2. first / last weight ops ----------------------------------------------------------------
    weight_nodes = {u.node for u in uses}
    upstream: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        upstream[node] = any(upstream[a] or a in weight_nodes for a in node.all_input_nodes)
    downstream: dict[fx.Node, bool] = {}
    for node in reversed(graph.nodes):
        downstream[node] = any(downstream[u] or u in weight_nodes for u in node.users)
    # A patch embedding or a classifier is one conv/linear op: module-level leaves (attention
    # blocks, opaque modules) are never "the first op" or "the head" even at the graph's ends.
    single_ops = {u.node for u in uses if u.kind != "module"} - _attention_projections(anchors, weight_nodes)
    first_nodes = {n for n in single_ops if not upstream[n]}
    last_nodes = {n for n in single_ops if not downstream[n]}

    # -- 3. decide, parameter by parameter ---------------------------------------------------------
    params_by_name = {name: p for name, p in gm.named_parameters()}
    uses_by_param: dict[str, list[_Use]] = defaultdict(list)
    for u in uses:
        uses_by_param[u.param].append(u)
    gated_names: list[str] = []
    skipped: list[SkippedItem] = []
    for name, p in params_by_name.items():
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        reason = _skip_reason(name, p, owner, attr, config, uses_by_param.get(name, []), first_nodes, last_nodes,
                              gate_first, gate_last, model_kind)
        if reason is None and name not in weight_params:
            reason = never_gated_reason(owner, attr)
        if reason is None and name not in weight_params:
            if name in non_weight_users:
                reason = f"used by {', '.join(sorted(non_weight_users[name]))}: not a weight of a supported op"
            elif name in leaf_params:
                reason = f"inside leaf module {leaf_params[name]}: not a conv/linear/attention weight"
            else:
                reason = "not used by the traced forward"
        if reason is None:
            gated_names.append(name)
            if name in non_weight_users:
                log.info("insert_gates: %s also feeds %s; those uses stay ungated", name, non_weight_users[name])
        else:
            skipped.append(SkippedItem(name, "parameter", reason))
    for name in original_params:
        if name not in params_by_name and name not in canonical.values():
            skipped.append(SkippedItem(name, "parameter", "not used by the traced forward"))
    skipped.extend(skipped_ops)

    structured = config.granularity in ("channel", "hybrid")
    if config.granularity == "channel":  # weights are pruned through their channel groups only
        skipped.extend(SkippedItem(n, "parameter", "granularity='channel': pruned through its channel group")
                       for n in gated_names)
        gated_names = []
    report = GateReport(granularity=config.granularity, model_kind=model_kind, gate_first=gate_first,
                        gate_last=gate_last, skipped=skipped, opaque=list(gm.meta.get(OPAQUE_META, [])))

    # -- 4. gate modules and gate nodes (right after the placeholders) ----------------------------
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    gate_container = nn.ModuleDict()
    call_container = nn.ModuleDict()
    gm.add_module(GATES_ATTR, gate_container)
    taken: set[str] = set()
    gate_nodes: dict[str, fx.Node] = {}
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    gated_set = set(gated_names)
    position = {n: i for i, n in enumerate(graph.nodes)}
    # graph order of first use; ties (several weights of one leaf) keep parameter order: deterministic
    ordered = sorted(gated_names, key=lambda n: min(position[u.node] for u in uses_by_param[n]))
    for name in ordered:
        p = params_by_name[name]
        key = _sanitize(name, taken)
        gate = WeightGate(p.shape, target=name, init_a=config.init_a, kappa=config.kappa, generator=generator)
        gate.to(p.device)
        gate_container.add_module(key, gate)
        with graph.inserting_before(anchor):
            ga = graph.get_attr(name)
            gn = graph.call_module(f"{GATES_ATTR}.{key}", (ga,))
        gn.meta["hyperflux.gate"] = name
        gate_nodes[name] = gn
        report.gated.append(GatedTensor(name=name, shape=tuple(p.shape), numel=p.numel(),
                                        gate=f"{GATES_ATTR}.{key}", level="op",
                                        via=sorted({_op_name(u.node, gm) for u in uses_by_param[name]})))
        rules["gate"] += 1

    # -- 5. rewire the uses ------------------------------------------------------------------------
    module_uses: dict[fx.Node, list[_Use]] = defaultdict(list)
    for u in uses:
        if u.param not in gated_set:
            if structured and u.kind == "functionalize" and u.node.op == "call_module":
                # channel analysis reads functional ops: rewrite with the plain weight
                with graph.inserting_before(u.node):
                    plain = graph.get_attr(u.param)
                _functionalize(gm, u.node, plain)
                rules["functionalize(ungated)"] += 1
            continue
        if u.kind == "slot":
            u.head.replace_input_with(u.getattr_node, gate_nodes[u.param])
            rules[f"slot:{_target_name(u.node)}"] += 1
        elif u.kind == "functionalize":
            _functionalize(gm, u.node, gate_nodes[u.param])
            rules[f"functionalize:{type(gm.get_submodule(str(u.node.target))).__name__}"] += 1
        else:
            module_uses[u.node].append(u)
    if module_uses:
        gm.add_module(CALLS_ATTR, call_container)
    for node, mus in module_uses.items():
        path = str(node.target)
        module = gm.get_submodule(path)
        key = _sanitize(path, set(call_container.keys()))
        call_container.add_module(key, GatedModuleCall(tuple(u.rel_name for u in mus), path))
        with graph.inserting_before(node):
            mod_node = graph.get_attr(path)
            new = graph.call_module(f"{CALLS_ATTR}.{key}",
                                    (mod_node, tuple(gate_nodes[u.param] for u in mus), *node.args), dict(node.kwargs))
        new.meta = dict(node.meta)
        new.meta["hyperflux.module"] = path
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for g in report.gated:
            if g.name in {u.param for u in mus}:
                g.level = "module"
        rules[f"module:{type(module).__name__}"] += 1

    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()

    if example_inputs is not None:  # kept for later passes (fold_masks propagates shapes with them)
        gm.meta[INPUTS_META] = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x
                                     for x in normalize_inputs(example_inputs))
    if structured:
        _insert_channel_gates(gm, config, example_inputs, report, rules, generator, taken)
    all_gates = gates(gm)
    if not all_gates:
        log.warning("insert_gates: nothing to gate in %s", type(model_or_gm).__name__)
        report.rule_counts = dict(rules)
        gm.meta[REPORT_META] = report
        return PassResult(gm, False, report)

    state = PressureState(sum(g.numel for g in all_gates))
    state.to(all_gates[0].flow.device)
    gm.add_module(PRESSURE_ATTR, state)
    for g in gates(gm):
        g.attach_pressure(state)
    report.rule_counts = dict(rules)
    gm.meta[REPORT_META] = report
    log.info("insert_gates: %d tensors gated (%d elements)", len(report.gated), report.gated_elements)
    return PassResult(gm, True, report)


def _target_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _skip_reason(name: str, p: nn.Parameter, owner: nn.Module, attr: str, config: GateConfig, uses: list[_Use],
                 first_nodes: set[fx.Node], last_nodes: set[fx.Node], gate_first: bool, gate_last: bool,
                 model_kind: str) -> str | None:
    """Why parameter ``name`` stays dense, or None to gate it (only meaningful when it has weight uses)."""
    if not uses:
        return None  # the caller explains parameters without weight uses
    if isinstance(p, nn.parameter.UninitializedParameter):
        return "uninitialised lazy parameter: run the model once before gating"
    reason = never_gated_reason(owner, attr)
    if reason is not None:
        return reason
    if not p.is_floating_point():
        return f"dtype {p.dtype} is not floating point"
    if not p.requires_grad:
        return "frozen (requires_grad=False)"
    if not any(fnmatch.fnmatchcase(name, pat) for pat in config.include):
        return f"not matched by GateConfig.include={config.include}"
    if any(fnmatch.fnmatchcase(name, pat) for pat in config.exclude):
        return f"matched by GateConfig.exclude={config.exclude}"
    if p.numel() < config.min_numel:
        return f"{p.numel()} elements < GateConfig.min_numel={config.min_numel}"
    nodes = {u.node for u in uses}
    if not gate_first and nodes & first_nodes:
        why = "patch embedding of a transformer" if model_kind == "transformer" else "first weight op"
        return f"{why}: stays dense (GateConfig.gate_first=False)"
    if not gate_last and nodes & last_nodes:
        why = "classifier head of a transformer" if model_kind == "transformer" else "last weight op"
        return f"{why}: stays dense (GateConfig.gate_last=False)"
    return None


def _functionalize(gm: fx.GraphModule, node: fx.Node, gated_weight: fx.Node) -> None:
    """Replace ``call_module conv/linear(x)`` by the functional op with the gated weight."""
    path = str(node.target)
    module = gm.get_submodule(path)
    spec = functional_module_call(module, node)
    assert spec is not None, f"{path} was selected for functionalisation but has no functional form"
    fn, consts = spec
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    graph = gm.graph
    with graph.inserting_before(node):
        bias = graph.get_attr(f"{path}.bias") if getattr(module, "bias", None) is not None else None
        new = graph.call_function(fn, (x, gated_weight, bias, *consts.values()))
    new.meta = dict(node.meta)
    new.meta["hyperflux.module"] = path
    node.replace_all_uses_with(new)
    graph.erase_node(node)



def _unit_costs(gm: fx.GraphModule, coupling: Any, group: Any, consumers: list[Any]) -> tuple[float, float]:
    """(parameters, MACs) that one unit of ``group`` costs: its slice of every producer's weight
    and bias and of every consumer's weight, times the output positions for MACs."""
    from hyperflux_fx.graph.coupling import _shape

    params = dict(gm.named_parameters())
    nodes = {n.name: n for n in gm.graph.nodes}
    p_cost = m_cost = 0.0
    for sid in group.spaces:
        prod = coupling.producers[sid]
        w = params[prod.weight]
        per = w.numel() / w.shape[prod.weight_dim] * prod.replicas * prod.unit_rows  # heads own several rows
        positions = math.prod(_shape(nodes[prod.node]) or (1,)) / max(w.shape[prod.weight_dim], 1)
        p_cost += per + (1 if prod.bias else 0)
        m_cost += per * positions
    for cons in consumers:
        w = params[cons.weight]
        per = w.numel() / w.shape[cons.weight_dim]
        expand = sum(s.expand for s in cons.label.segs if s.space in group.spaces) / max(
            sum(1 for s in cons.label.segs if s.space in group.spaces), 1)
        out = _shape(nodes[cons.node]) or (1,)
        positions = math.prod(out) / max(w.shape[1 - cons.weight_dim] if w.dim() > 1 else 1, 1)
        p_cost += per * expand
        m_cost += per * expand * positions
    return p_cost, m_cost


def _insert_channel_gates(gm: fx.GraphModule, config: GateConfig, example_inputs: Any, report: GateReport,
                          rules: Counter[str], generator: torch.Generator | None, taken: set[str]) -> None:
    """Channel granularity: one ChannelGate per deletable group, a ChannelMask at each consumer input."""
    from hyperflux_fx.graph.coupling import analyze_channels

    inputs = normalize_inputs(example_inputs)
    propagate_shapes(gm, inputs)
    coupling = analyze_channels(gm)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    gate_container = gm.get_submodule(GATES_ATTR) if hasattr(gm, GATES_ATTR) else None
    if gate_container is None:
        gate_container = nn.ModuleDict()
        gm.add_module(GATES_ATTR, gate_container)
    mask_container = nn.ModuleDict()
    gm.add_module(MASKS_ATTR, mask_container)
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    group_gate: dict[int, fx.Node] = {}
    costs: dict[int, float] = {}
    group_of = coupling.group_of()
    for group in coupling.groups():
        consumers = [cn for cn in coupling.consumers if any(group_of.get(sg.space) == group.id
                                                            for sg in cn.label.segs if sg.space is not None)]
        name = f"group{group.id}:{group.producers[0]}"
        blocked = list(group.blocked)
        if not consumers and not blocked:
            blocked.append("no conv/linear consumes it")
        if group.size < 2 and not blocked:
            blocked.append("a single channel")
        info = {"name": name, "size": group.size, "producers": group.producers, "consumers": len(consumers),
                "gated": not blocked, "blocked": blocked}
        report.channel_groups.append(info)
        if blocked:
            continue
        p_cost, m_cost = _unit_costs(gm, coupling, group, consumers)
        cost = {"count": 1.0, "params": p_cost, "macs": m_cost}[config.cost]
        key = _sanitize(name.replace(":", "_"), taken)
        gate = ChannelGate(group.size, target=name, producers=tuple(group.producers), unit_cost=cost,
                           init_a=config.init_a, kappa=config.kappa, generator=generator)
        gate.to(next(gm.parameters()).device)
        gate_container.add_module(key, gate)
        with graph.inserting_before(anchor):
            gn = graph.call_module(f"{GATES_ATTR}.{key}", ())
        gn.meta["hyperflux.gate"] = name
        group_gate[group.id] = gn
        costs[group.id] = cost
        rules["channel_gate"] += 1
    if costs and config.cost != "count":  # pressure scaled by relative cost per unit
        mean_cost = sum(costs[g] * gm.get_submodule(str(group_gate[g].target)).numel for g in costs) / sum(
            gm.get_submodule(str(group_gate[g].target)).numel for g in costs)
        for gid, gn in group_gate.items():
            gm.get_submodule(str(gn.target)).pressure_scale = costs[gid] / mean_cost
    for cons in coupling.consumers:
        gids = [group_of.get(sg.space) if sg.space is not None else None for sg in cons.label.segs]
        used = [g for g in dict.fromkeys(gids) if g in group_gate]
        if not used:
            continue
        layout = tuple((used.index(g) if g in group_gate else -1, sg.length, sg.expand)
                       for g, sg in zip(gids, cons.label.segs, strict=True))
        node = nodes[cons.node]
        x = node.args[0]
        key = _sanitize(f"{cons.node}_in", set(mask_container.keys()))
        mask_container.add_module(key, ChannelMask(cons.label.dim, layout))
        with graph.inserting_before(node):
            mn = graph.call_module(f"{MASKS_ATTR}.{key}", (x, *(group_gate[g] for g in used)))
        mn.meta["hyperflux.mask"] = cons.node
        node.replace_input_with(x, mn)
        rules["channel_mask"] += 1
    if not len(mask_container):
        delattr(gm, MASKS_ATTR)
    graph.lint()
    gm.recompile()
