"""fold_masks: turn a trained gated model into a compact one that computes exactly the same thing.

Before (channel granularity; ``m`` is group 0's mask, ``x`` carries group 0's channels)::

    m = self.hyperflux_gates.group0()
    x_m = self.hyperflux_masks.conv2d_1_in(x, m)
    y = torch.conv2d(x_m, self.conv2.weight, ...)

After: the masks are multiplied into the weights that consume them (exact), then every channel
whose mask is 0 is deleted wherever it lives — the producers' output rows and biases, BatchNorm
statistics, depthwise filters (and the conv's ``groups``), per-channel scales, the consumers' input
columns — for every group the coupling analysis finds deletable::

    y = torch.conv2d(x, self.conv2.weight, ...)        # conv2.weight now has fewer input channels

Weight masks are multiplied into their weights, module-level gated calls become plain module calls,
and channels made dead by weight masks alone (all weights and bias of an output channel zero, on a
path that keeps zeros) are deleted too. Postconditions, checked here: no gate, mask or gated call
left in the graph, and the compact model runs on the example inputs.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from hyperflux_fx.graph.cost import count_params
from hyperflux_fx.graph.coupling import Coupling, Label, analyze_channels
from hyperflux_fx.passes._attrs import fetch_attr, owner_of, replace_tensor
from hyperflux_fx.passes._result import PassResult
from hyperflux_fx.passes.insert_gates import INPUTS_META
from hyperflux_fx.runtime.gates import ChannelGate, ChannelMask, Gate, GatedModuleCall, WeightGate, gates
from hyperflux_fx.runtime.pressure import STATE_ATTRS
from hyperflux_fx.trace import normalize_inputs, propagate_shapes

__all__ = ["FoldConfig", "FoldReport", "fold_masks"]

log = logging.getLogger(__name__)

FOLD_META = "hyperflux.fold_report"


@dataclass(frozen=True)
class FoldConfig:
    """How ``fold_masks`` compacts."""

    round_to: int = 1  # keep channel counts multiples of this (8 suits most CPU kernels); extra = strongest closed
    min_channels: int = 1  # never delete a group down to fewer channels
    delete_dead: bool = True  # also delete channels whose weights and bias are all zero (weight masks alone)
    fold_batchnorm: bool = False  # merge inference BatchNorms into their convs (the result is for inference)

    def __post_init__(self) -> None:
        if self.round_to < 1 or self.min_channels < 1:
            raise ValueError(f"round_to and min_channels must be >= 1, got {self.round_to}, {self.min_channels}")


@dataclass
class FoldReport:
    """What ``fold_masks`` did, per group and in total."""

    groups: list[dict[str, Any]] = field(default_factory=list)  # name, before, after, closed, deleted, reason
    weight_masks_folded: int = 0
    channel_masks_folded: int = 0
    module_calls_restored: int = 0
    params_before: int = 0
    params_after: int = 0
    rule_counts: dict[str, int] = field(default_factory=dict)

    @property
    def closed_units(self) -> int:
        return sum(g["closed"] for g in self.groups)

    @property
    def deleted_units(self) -> int:
        return sum(g["deleted"] for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["closed_units"], out["deleted_units"] = self.closed_units, self.deleted_units
        return out

    def __str__(self) -> str:
        lines = [(f"fold_masks: params {self.params_before:,} -> {self.params_after:,}; "
                 f"{self.deleted_units} of {self.closed_units} closed units deleted; "
                 f"{self.weight_masks_folded} weight masks and {self.channel_masks_folded} channel masks folded, "
                 f"{self.module_calls_restored} module calls restored")]
        for g in self.groups:
            why = f"  -- {g['reason']}" if g["reason"] else ""
            lines.append(f"  {g['name']:<30} {g['before']:>6} -> {g['after']:<6} closed {g['closed']:<6}"
                         f" deleted {g['deleted']:<6}{why[:300]}")
        return "\n".join(lines)


def _label_keep(label: Label, keep: dict[int, torch.Tensor], group_of: dict[int, int]) -> torch.Tensor | None:
    """Kept feature positions along a label's dim (None when nothing is deleted there)."""
    parts, offset, changed = [], 0, False
    for seg in label.segs:
        gid = group_of.get(seg.space) if seg.space is not None else None
        width = seg.length * seg.expand
        if gid is not None and gid in keep:
            idx = keep[gid]
            changed = changed or idx.numel() != seg.length
            pos = (idx[:, None] * seg.expand + torch.arange(seg.expand)[None, :]).flatten() + offset
        else:
            pos = torch.arange(offset, offset + width)
        parts.append(pos)
        offset += width
    return torch.cat(parts) if changed else None


def fold_masks(gm: fx.GraphModule, config: FoldConfig | None = None, *, example_inputs: Any = None,
               inplace: bool = False) -> PassResult:
    """Fold every mask of a gated model into its weights and delete closed channels where exact.

    Args:
        gm: a GraphModule produced by ``insert_gates`` (and usually trained).
        config: ``FoldConfig()`` by default.
        example_inputs: inputs to propagate shapes with; defaults to those kept by ``insert_gates``.
        inplace: rewrite ``gm`` itself instead of a deep copy.

    Returns:
        ``PassResult(compact GraphModule, modified, FoldReport)``.

    Raises:
        ValueError: ``gm`` is not a gated GraphModule, or no example inputs are known.
    """
    config = config or FoldConfig()
    if not isinstance(gm, fx.GraphModule) or not gates(gm):
        raise ValueError("fold_masks needs a GraphModule gated by hyperflux_fx.insert_gates (it has no gates)")
    if not inplace:
        gm = copy.deepcopy(gm)
    inputs = normalize_inputs(example_inputs) if example_inputs is not None else gm.meta.get(INPUTS_META)
    graph = gm.graph
    report = FoldReport()
    rules: dict[str, int] = defaultdict(int)
    report.params_before = count_params(gm)

    with torch.no_grad():
        # 1. weight masks -> weights; module-level gated calls -> plain module calls
        for node in list(graph.nodes):
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, WeightGate):
                src = node.args[0]
                weight = fetch_attr(gm, str(src.target))
                weight.mul_(mod.mask().to(weight.dtype))
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                report.weight_masks_folded += 1
            elif isinstance(mod, GatedModuleCall):
                mod_node, _weights, *args = node.args
                with graph.inserting_before(node):
                    plain = graph.call_module(mod.module_path, tuple(args), dict(node.kwargs))
                plain.meta = dict(node.meta)
                node.replace_all_uses_with(plain)
                graph.erase_node(node)
                if not mod_node.users:
                    graph.erase_node(mod_node)
                report.module_calls_restored += 1
        graph.eliminate_dead_code()
        gm.recompile()

        # 2. channel groups: fold masks into consumers, decide what to delete, slice
        has_channels = any(isinstance(g, ChannelGate) for g in gates(gm))
        if inputs is None:
            if has_channels:
                raise ValueError("fold_masks needs example_inputs (none were kept by insert_gates)")
            rules["dead_channels_not_checked_no_example_inputs"] += 1
        else:
            propagate_shapes(gm, inputs)
            coupling = analyze_channels(gm)
            _fold_channels(gm, coupling, config, report, rules)

        # 3. remove every remaining gate / mask node and the containers
        for node in list(graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), (Gate, ChannelMask)):
                if node.users and isinstance(gm.get_submodule(str(node.target)), ChannelMask):
                    node.replace_all_uses_with(node.args[0])
                if not node.users:
                    graph.erase_node(node)
        graph.eliminate_dead_code()
        for name in STATE_ATTRS:
            if hasattr(gm, name):
                delattr(gm, name)
        graph.lint()
        gm.recompile()

    if config.fold_batchnorm:
        from hyperflux_fx.passes.fold_batchnorm import fold_batchnorm

        was_training = gm.training
        gm.eval()  # BatchNorm folding uses the running statistics: an inference model
        bn = fold_batchnorm(gm, inplace=True)
        gm.train(was_training)
        rules["batchnorm_folded"] += len(bn.report["folded"])
    leftovers = [n.format_node() for n in graph.nodes if n.op == "call_module" and isinstance(
        gm.get_submodule(str(n.target)), (Gate, ChannelMask, GatedModuleCall))]
    assert not leftovers, f"fold_masks left gates in the graph: {leftovers}"
    if inputs is not None:
        propagate_shapes(gm, inputs)  # postcondition: the compact model runs
    report.params_after = count_params(gm)
    report.rule_counts = dict(rules)
    gm.meta[FOLD_META] = report
    gm.meta.pop("hyperflux.gate_report", None)
    log.info("%s", report)
    return PassResult(gm, True, report)


def _fold_channels(gm: fx.GraphModule, coupling: Coupling, config: FoldConfig, report: FoldReport,
                   rules: dict[str, int]) -> None:
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    groups = coupling.groups()
    group_of = {s: g.id for g in groups for s in g.spaces}
    gate_by_producers = {frozenset(g.producers): g for g in gates(gm) if isinstance(g, ChannelGate)}

    # (a) every channel mask goes into the weight of the op it feeds (exact: W[:, c] * m_c)
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), ChannelMask):
            continue
        mask_mod: ChannelMask = gm.get_submodule(str(node.target))
        masks = [gm.get_submodule(str(a.target)).mask() for a in node.args[1:]]
        full = mask_mod.full_mask(*masks)
        consumer = next((c for c in coupling.consumers if any(a is node for a in nodes[c.node].args[:1])), None)
        if consumer is None:
            raise RuntimeError(f"fold_masks: channel mask {node.name} does not feed a known conv/linear")
        w = fetch_attr(gm, consumer.weight)
        shape = [1] * w.dim()
        shape[consumer.weight_dim] = full.numel()
        w.mul_(full.to(w.dtype).view(shape))
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        report.channel_masks_folded += 1

    # (b) decide what each group keeps
    keep: dict[int, torch.Tensor] = {}
    params = dict(gm.named_parameters())
    for g in groups:
        gate = gate_by_producers.get(frozenset(g.producers))
        name = gate.target if gate is not None else f"group{g.id}:{g.producers[0]}"
        closed = torch.zeros(g.size, dtype=torch.bool)
        strength = torch.zeros(g.size)
        if gate is not None:
            closed |= gate.mask() == 0
            strength = gate.flow.detach().float().cpu()
        if config.delete_dead and g.zero_preserving and g.deletable:
            dead = torch.ones(g.size, dtype=torch.bool)
            for sid in g.spaces:
                prod = coupling.producers[sid]
                w = params[prod.weight].detach()
                rows = w.movedim(prod.weight_dim, 0).reshape(w.shape[prod.weight_dim], -1)
                zero_rows = (rows == 0).all(dim=1).cpu()
                if prod.bias is not None:
                    zero_rows &= (params[prod.bias].detach() == 0).cpu()
                # a unit is dead when all its rows are (heads own several rows)
                unit_rows = torch.stack([prod.rows(torch.tensor([u])) for u in range(g.size)])
                dead &= zero_rows[unit_rows].all(dim=1)
            if dead.any():
                rules["dead_channels"] += int(dead.sum())
            closed |= dead
        n_closed = int(closed.sum())
        info = {"name": name, "before": g.size, "after": g.size, "closed": n_closed, "deleted": 0,
                "reason": "; ".join(g.blocked)}
        report.groups.append(info)
        if not g.deletable or n_closed == 0:
            if n_closed and not g.deletable:
                rules["blocked_closed_units"] += n_closed
            continue
        n_keep = max(g.size - n_closed, config.min_channels)
        n_keep = min(g.size, math.ceil(n_keep / config.round_to) * config.round_to)
        kept = ~closed
        extra = n_keep - int(kept.sum())
        if extra > 0:  # round_to / min_channels: keep the strongest closed channels (zero where consumed)
            cand = torch.nonzero(closed).flatten()
            order = cand[torch.argsort(strength[cand], descending=True)]
            kept[order[:extra]] = True
            info["reason"] = f"kept {extra} closed channel(s) for round_to={config.round_to}/min_channels"
        keep[g.id] = torch.nonzero(kept).flatten()
        info["after"] = int(kept.sum())
        info["deleted"] = g.size - info["after"]

    # (c) slice: producers (out dim), per-channel params, consumers (in dim)
    slices: dict[tuple[str, int], torch.Tensor] = {}

    def add_slice(target: str, dim: int, idx: torch.Tensor) -> None:
        key = (target, dim)
        if key in slices and not torch.equal(slices[key], idx):
            raise RuntimeError(f"fold_masks: {target} dim {dim} is sliced two different ways")
        slices[key] = idx

    for sid, prod in coupling.producers.items():
        gid = group_of[sid]
        if gid in keep:
            rows = prod.rows(keep[gid])
            add_slice(prod.weight, prod.weight_dim, rows)
            if prod.bias is not None:
                add_slice(prod.bias, 0, rows)
    modules_to_resize: dict[str, int] = {}
    groups_args: dict[tuple[str, int], int] = {}
    for cp in coupling.params:
        gid = group_of[cp.space]
        if gid in keep:
            add_slice(cp.target, cp.dim, keep[gid])
            if cp.module is not None:
                modules_to_resize[cp.module] = int(keep[gid].numel())
            if cp.groups_arg is not None:
                groups_args[cp.groups_arg] = int(keep[gid].numel())
    for cons in coupling.consumers:
        idx = _label_keep(cons.label, keep, group_of)
        if idx is not None:
            add_slice(cons.weight, cons.weight_dim, idx)
    for (target, dim), idx in slices.items():
        t = fetch_attr(gm, target)
        replace_tensor(gm, target, t.detach().index_select(dim, idx.to(t.device)).clone())
        rules["sliced_tensors"] += 1
    for path, n in modules_to_resize.items():
        mod = gm.get_submodule(path)
        if hasattr(mod, "num_features"):
            mod.num_features = n
    for sa in coupling.shape_args:  # reshape/view sizes that follow a label's width
        idx = _label_keep(sa.label, keep, group_of)
        if idx is not None:
            _set_size_arg(nodes[sa.node], sa.dim, int(idx.numel()))
            rules["shape_args_updated"] += 1
    for (node_name, pos), n in groups_args.items():
        node = nodes[node_name]
        args = list(node.args)
        args[pos] = n
        node.args = tuple(args)
        rules["depthwise_groups_updated"] += 1
    # modules whose weights were sliced keep stale size attributes; refresh the common ones
    for target, dim in slices:
        owner, attr = owner_of(gm, target)
        if attr != "weight":
            continue
        w = getattr(owner, attr)
        if isinstance(owner, nn.Linear):
            owner.out_features, owner.in_features = w.shape[0], w.shape[1]
        elif isinstance(owner, nn.modules.conv._ConvNd):
            transposed = owner.transposed
            owner.out_channels = w.shape[1] * owner.groups if transposed else w.shape[0]
            owner.in_channels = w.shape[0] if transposed else w.shape[1] * owner.groups


def _set_size_arg(node: fx.Node, dim: int, value: int) -> None:
    """Set output-dim ``dim`` of a reshape/view node to ``value`` (unless that size is given as -1)."""
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], (tuple, list)):  # reshape(x, (a, b, c))
        sizes = list(args[1])
        if sizes[dim] != -1:
            sizes[dim] = value
        args[1] = type(args[1])(sizes)
    else:  # x.reshape(a, b, c)
        if args[1 + dim] != -1:
            args[1 + dim] = value
    node.args = tuple(args)
