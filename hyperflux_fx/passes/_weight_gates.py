"""Weight gates: one WeightGate per gated parameter, its node right after the placeholders, and the
rewiring of every weight use (operand slots, functionalised conv/linear leaves, module-level calls)."""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
from torch import fx, nn

from hyperflux_fx.analysis.weights import WeightUse, WeightUses, op_name
from hyperflux_fx.config import GateConfig
from hyperflux_fx.ir import CALLS_ATTR, GATE_NODE_META, GATES_ATTR, MODULE_NODE_META, GatedModuleCall, WeightGate
from hyperflux_fx.ops import functional_module_call
from hyperflux_fx.passes._gate_report import GatedTensor, GateReport

__all__ = ["gate_container", "insert_weight_gates", "unique_key"]


def unique_key(name: str, taken: set[str]) -> str:
    """A ModuleDict key for ``name`` (dots become underscores), unique among ``taken`` (updated)."""
    key = name.replace(".", "_")
    base, i = key, 1
    while key in taken:
        key = f"{base}_{i}"
        i += 1
    taken.add(key)
    return key


def gate_container(gm: fx.GraphModule) -> nn.ModuleDict:
    """The gated model's ModuleDict of gates (created when missing)."""
    if not hasattr(gm, GATES_ATTR):
        gm.add_module(GATES_ATTR, nn.ModuleDict())
    return gm.get_submodule(GATES_ATTR)


def insert_weight_gates(gm: fx.GraphModule, names: list[str], found: WeightUses, config: GateConfig,
                        report: GateReport, rules: Counter[str], generator: torch.Generator | None) -> None:
    """Gate ``names`` (parameters) and rewire their uses; with channel/hybrid granularity also turn
    the ungated conv/linear leaves into functional ops (the channel analysis reads those)."""
    graph = gm.graph
    gate_container(gm)
    uses_by_param = found.by_param()
    position = {n: i for i, n in enumerate(graph.nodes)}
    # graph order of first use; ties (several weights of one leaf) keep parameter order: deterministic
    ordered = sorted(names, key=lambda n: min(position[u.node] for u in uses_by_param[n]))
    anchor = next(n for n in graph.nodes if n.op != "placeholder")  # gate nodes go before it, in order
    gate_nodes = {name: _add_gate(gm, name, anchor, config, generator) for name in ordered}
    for name in ordered:
        p = gm.get_parameter(name)
        report.gated.append(GatedTensor(name=name, shape=tuple(p.shape), numel=p.numel(),
                                        gate=str(gate_nodes[name].target), level="op",
                                        via=sorted({op_name(u.node, gm) for u in uses_by_param[name]})))
    if ordered:
        rules["gate"] += len(ordered)
    structured = config.granularity in ("channel", "hybrid")
    module_uses = _rewire(gm, found.uses, gate_nodes, structured, rules)
    _gate_module_calls(gm, module_uses, gate_nodes, report, rules)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()


def _add_gate(gm: fx.GraphModule, name: str, anchor: fx.Node, config: GateConfig,
              generator: torch.Generator | None) -> fx.Node:
    container = gate_container(gm)
    p = gm.get_parameter(name)
    key = unique_key(name, set(container.keys()))
    gate = WeightGate(p.shape, target=name, init_a=config.init_a, kappa=config.kappa, generator=generator)
    gate.to(p.device)
    container.add_module(key, gate)
    graph = gm.graph
    with graph.inserting_before(anchor):
        ga = graph.get_attr(name)
        gn = graph.call_module(f"{GATES_ATTR}.{key}", (ga,))
    gn.meta[GATE_NODE_META] = name
    return gn


def _target_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _rewire(gm: fx.GraphModule, uses: list[WeightUse], gate_nodes: dict[str, fx.Node], structured: bool,
            rules: Counter[str]) -> dict[fx.Node, list[WeightUse]]:
    """Point slot and functionalised uses at their gate; return the module-level uses per call node."""
    graph = gm.graph
    module_uses: dict[fx.Node, list[WeightUse]] = defaultdict(list)
    for u in uses:
        if u.param not in gate_nodes:
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
            rules[f"functionalize:{type(gm.get_submodule(str(u.node.target))).__name__}"] += 1
            _functionalize(gm, u.node, gate_nodes[u.param])
        else:
            module_uses[u.node].append(u)
    return module_uses


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
    new.meta[MODULE_NODE_META] = path
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _gate_module_calls(gm: fx.GraphModule, module_uses: dict[fx.Node, list[WeightUse]],
                       gate_nodes: dict[str, fx.Node], report: GateReport, rules: Counter[str]) -> None:
    """Leaves gated at module level: call them through a GatedModuleCall with the gated weights."""
    if not module_uses:
        return
    graph = gm.graph
    container = nn.ModuleDict()
    gm.add_module(CALLS_ATTR, container)
    for node, mus in module_uses.items():
        path = str(node.target)
        key = unique_key(path, set(container.keys()))
        container.add_module(key, GatedModuleCall(tuple(u.rel_name for u in mus), path))
        with graph.inserting_before(node):
            mod_node = graph.get_attr(path)
            new = graph.call_module(f"{CALLS_ATTR}.{key}",
                                    (mod_node, tuple(gate_nodes[u.param] for u in mus), *node.args), dict(node.kwargs))
        new.meta = dict(node.meta)
        new.meta[MODULE_NODE_META] = path
        rules[f"module:{type(gm.get_submodule(path)).__name__}"] += 1
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        params = {u.param for u in mus}
        for g in report.gated:
            if g.name in params:
                g.level = "module"
