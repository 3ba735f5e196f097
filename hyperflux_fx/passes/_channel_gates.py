"""Channel gates: one ChannelGate per deletable channel group, a ChannelMask at every consumer
input that reads a gated group, and a MaskedNorm in place of every LayerNorm / RMSNorm over a gated
group's channels (channel and hybrid granularity).

Before (``x`` carries group 0's channels)::

    y = torch.conv2d(x, self.conv2.weight, ...)

After::

    group0 = self.hyperflux_gates.group0_conv2d()
    x_m = self.hyperflux_masks.conv2d_1_in(x, group0)
    y = torch.conv2d(x_m, self.conv2.weight, ...)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from hyperflux_fx.analysis.cost import unit_costs
from hyperflux_fx.analysis.coupling import (
    Coupling,
    Group,
    NormUse,
    analyze_channels,
    consumer_input,
    group_consumers,
)
from hyperflux_fx.config import GateConfig
from hyperflux_fx.frontend.trace import propagate_shapes
from hyperflux_fx.ir import (
    GATE_NODE_META,
    GATES_ATTR,
    MASK_NODE_META,
    MASKS_ATTR,
    ChannelGate,
    ChannelMask,
    MaskedMean,
    MaskedNorm,
)
from hyperflux_fx.ops import node_spec, norm_operands
from hyperflux_fx.passes._gate_report import ChannelGroupReport, GateReport
from hyperflux_fx.passes._weight_gates import gate_container, unique_key

__all__ = ["group_name", "insert_channel_gates"]


def group_name(group: Group) -> str:
    """The display name of a group (the target of its gate)."""
    return f"group{group.id}:{group.producers[0]}"


def insert_channel_gates(gm: fx.GraphModule, config: GateConfig, inputs: tuple[Any, ...], report: GateReport,
                         rules: Counter[str], generator: torch.Generator | None) -> None:
    """Gate every deletable group of ``gm`` and mask its consumers' inputs."""
    propagate_shapes(gm, inputs)
    coupling = analyze_channels(gm)
    anchor = next(n for n in gm.graph.nodes if n.op != "placeholder")
    group_gate: dict[int, fx.Node] = {}
    groups = coupling.groups()
    through = _head_groups(coupling, groups)
    for group in groups:
        blocked = _why_not_gated(coupling, group)
        report.channel_groups.append(ChannelGroupReport(
            name=group_name(group), size=group.size, unit=group.unit, producers=list(group.producers),
            consumers=len(group_consumers(coupling, group)), gated=not blocked, blocked=blocked,
            through=group_name(through[group.id]) if group.id in through else "", replicas=group.replicas))
        if not blocked:
            group_gate[group.id] = _add_gate(gm, coupling, group, anchor, config, generator)
    if group_gate:
        rules["channel_gate"] += len(group_gate)
    if group_gate and config.cost != "count":
        _scale_pressure(gm, group_gate)
    masks = nn.ModuleDict()
    gm.add_module(MASKS_ATTR, masks)
    _mask_consumers(gm, coupling, group_gate, rules)
    _mask_norms(gm, coupling, group_gate, rules)
    _mask_means(gm, coupling, group_gate, rules)
    if not len(masks):
        delattr(gm, MASKS_ATTR)
    gm.graph.lint()
    gm.recompile()


def _head_groups(coupling: Coupling, groups: list[Group]) -> dict[int, Group]:
    """Group id of a projection's space -> the head group it is deleted through."""
    group_of = {s: g for g in groups for s in g.spaces}
    return {group_of[prod.parent].id: group_of[sid] for sid, prod in coupling.producers.items()
            if prod.parent is not None}


def _why_not_gated(coupling: Coupling, group: Group) -> list[str]:
    blocked = list(group.blocked)
    if not group_consumers(coupling, group) and not blocked:
        blocked.append("no conv/linear consumes it")
    if group.size < 2 and not blocked:
        blocked.append("a single channel")
    return blocked


def _add_gate(gm: fx.GraphModule, coupling: Coupling, group: Group, anchor: fx.Node, config: GateConfig,
              generator: torch.Generator | None) -> fx.Node:
    container = gate_container(gm)
    cost = 1.0 if config.cost == "count" else unit_costs(gm, coupling, group)[("params", "macs").index(config.cost)]
    name = group_name(group)
    key = unique_key(re.sub(r"\W", "_", name), set(container.keys()))  # e.g. "group3:conv2d[0:8]"
    gate = ChannelGate(group.size, target=name, producers=tuple(group.producers), unit=group.unit, unit_cost=cost,
                       init_a=config.init_a, kappa=config.kappa, generator=generator)
    gate.to(next(gm.parameters()).device)
    container.add_module(key, gate)
    with gm.graph.inserting_before(anchor):
        gn = gm.graph.call_module(f"{GATES_ATTR}.{key}", ())
    gn.meta[GATE_NODE_META] = name
    return gn


def _scale_pressure(gm: fx.GraphModule, group_gate: dict[int, fx.Node]) -> None:
    """Cost-weighted pressure: each gate's pressure scaled by its unit cost over the mean unit cost."""
    gate_mods = [gm.get_submodule(str(gn.target)) for gn in group_gate.values()]
    mean_cost = sum(g.unit_cost * g.numel for g in gate_mods) / sum(g.numel for g in gate_mods)
    for g in gate_mods:
        g.pressure_scale = g.unit_cost / mean_cost


def _mask_consumers(gm: fx.GraphModule, coupling: Coupling, group_gate: dict[int, fx.Node],
                    rules: Counter[str]) -> None:
    """A ChannelMask before every consumer input that reads a gated group."""
    masks = gm.get_submodule(MASKS_ATTR)
    nodes = {n.name: n for n in gm.graph.nodes}
    group_of = coupling.group_of()
    for cons in coupling.consumers:
        gids = [group_of.get(sg.space) if sg.space is not None else None for sg in cons.label.segs]
        used = [g for g in dict.fromkeys(gids) if g in group_gate]
        if not used:
            continue
        layout = tuple((used.index(g) if g in group_gate else -1, sg.length, sg.expand, sg.replicas)
                       for g, sg in zip(gids, cons.label.segs, strict=True))
        node = nodes[cons.node]
        x = consumer_input(cons, nodes)
        mn = _call_mask(gm, masks, f"{cons.node}_in", ChannelMask(cons.label.dim, layout, cons.label.order), node,
                        (x, *(group_gate[g] for g in used)))
        node.replace_input_with(x, mn)
        rules["channel_mask"] += 1


def _call_mask(gm: fx.GraphModule, masks: nn.ModuleDict, name: str, module: nn.Module, before: fx.Node,
               args: tuple[Any, ...]) -> fx.Node:
    """Add ``module`` to the masks container under a free key based on ``name`` and call it on
    ``args`` just before ``before`` (the node it serves, recorded in MASK_NODE_META)."""
    key = unique_key(name, set(masks.keys()))
    masks.add_module(key, module)
    with gm.graph.inserting_before(before):
        call = gm.graph.call_module(f"{MASKS_ATTR}.{key}", args)
    call.meta[MASK_NODE_META] = before.name
    return call


def _gated_uses(gm: fx.GraphModule, coupling: Coupling, uses: list[NormUse],
                group_gate: dict[int, fx.Node]) -> Iterator[tuple[NormUse, fx.Node, fx.Node]]:
    """(use, its node, its group's gate output) for each norm / mean over a gated group."""
    nodes = {n.name: n for n in gm.graph.nodes}
    group_of = coupling.group_of()
    for use in uses:
        gid = group_of[use.label.segs[0].space]
        if gid in group_gate:
            yield use, nodes[use.node], group_gate[gid]


def _replace(gm: fx.GraphModule, node: fx.Node, new: fx.Node) -> None:
    """``new`` in place of ``node``, keeping the node's shapes and module stack."""
    new.meta = {**node.meta, **new.meta}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _mask_means(gm: fx.GraphModule, coupling: Coupling, group_gate: dict[int, fx.Node],
                rules: Counter[str]) -> None:
    """A MaskedMean (the open channels' mean) in place of every mean over a gated group's channels."""
    for use, node, mask in _gated_uses(gm, coupling, coupling.means, group_gate):
        mean = MaskedMean(use.label.dim, bool(node_spec(gm, node).arg(node, "keepdim", False)))
        _replace(gm, node, _call_mask(gm, gm.get_submodule(MASKS_ATTR), f"{node.name}_mean", mean, node,
                                      (node.args[0], mask)))
        rules["masked_mean"] += 1


def _mask_norms(gm: fx.GraphModule, coupling: Coupling, group_gate: dict[int, fx.Node],
                rules: Counter[str]) -> None:
    """A MaskedNorm (statistics over the open channels) in place of every norm over a gated group."""
    for use, node, mask in _gated_uses(gm, coupling, coupling.norms, group_gate):
        ops = norm_operands(gm, node)
        with gm.graph.inserting_before(node):
            weight, bias = (gm.graph.get_attr(v) if isinstance(v, str) else v for v in (ops.weight, ops.bias))
        norm = MaskedNorm(ops.kind, use.label.width, ops.eps, ops.groups)
        _replace(gm, node, _call_mask(gm, gm.get_submodule(MASKS_ATTR), f"{node.name}_norm", norm, node,
                                      (ops.input, weight, bias, mask)))
        rules["masked_norm"] += 1
