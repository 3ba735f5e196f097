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
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx

from hyperflux_fx.analysis.cost import count_params
from hyperflux_fx.analysis.coupling import (
    Coupling,
    CutArg,
    Group,
    analyze_channels,
    consumer_input,
    dead_units,
    deletes_dead,
    kept_ranges,
    label_keep,
    param_keep,
    parent_keep,
    plan_keep,
    producer_keep,
    round_field,
    round_multiple,
)
from hyperflux_fx.analysis.runtime import resolve_fold_config
from hyperflux_fx.config import FoldConfig
from hyperflux_fx.frontend.trace import normalize_inputs, propagate_shapes
from hyperflux_fx.ir import (
    FOLD_REPORT_META,
    GATE_REPORT_META,
    INPUTS_META,
    STATE_ATTRS,
    ChannelGate,
    ChannelMask,
    Gate,
    GatedModuleCall,
    MaskedMean,
    MaskedNorm,
    WeightGate,
    gates,
)
from hyperflux_fx.ops import cut_function, gather_function, mean_function, norm_function, sync_module_sizes
from hyperflux_fx.passes._attrs import fetch_attr, owner_of, replace_tensor
from hyperflux_fx.passes._channel_gates import group_name
from hyperflux_fx.passes._result import PassResult
from hyperflux_fx.passes._weight_gates import unique_key
from hyperflux_fx.passes.fold_batchnorm import fold_batchnorm

__all__ = ["FoldConfig", "FoldGroup", "FoldReport", "fold_masks"]

log = logging.getLogger(__name__)

@dataclass
class FoldGroup:
    """What ``fold_masks`` did with one channel group."""

    name: str  # the gate's target, or "group<id>:<producer>" for ungated groups
    unit: str  # "channel" or "head"
    before: int  # units before
    after: int  # units kept
    closed: int  # units whose mask is 0 (or dead: all producer rows zero)
    deleted: int  # units deleted (closed ones kept for round_to / min_channels are not)
    reason: str = ""  # why closed units were kept (blocked group, round_to), empty otherwise
    deletable: bool = True  # False: the coupling blocks deleting this group's units (reason says why)


@dataclass
class FoldReport:
    """What ``fold_masks`` did, per group and in total."""

    groups: list[FoldGroup] = field(default_factory=list)
    weight_masks_folded: int = 0
    channel_masks_folded: int = 0
    module_calls_restored: int = 0
    params_before: int = 0
    params_after: int = 0
    round_to: int = 1  # the multiple kept conv channel counts were rounded to ("auto" resolved)
    round_to_width: int = 1  # the same for every other width (heads are never rounded)
    min_conv_channels: int = 1  # the fewest channels a conv group kept ("auto" resolved), before the rounding
    rule_counts: dict[str, int] = field(default_factory=dict)

    @property
    def closed_units(self) -> int:
        return sum(g.closed for g in self.groups)

    @property
    def deleted_units(self) -> int:
        return sum(g.deleted for g in self.groups)

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
            why = f"  -- {g.reason}" if g.reason else ""
            lines.append(f"  {g.name:<30} {g.before:>6} -> {g.after:<6} closed {g.closed:<6}"
                         f" deleted {g.deleted:<6}{why[:300]}")
        return "\n".join(lines)


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
    config = resolve_fold_config(config or FoldConfig())
    if not isinstance(gm, fx.GraphModule) or not gates(gm):
        raise ValueError("fold_masks needs a GraphModule gated by hyperflux_fx.insert_gates (it has no gates)")
    if not inplace:
        gm = copy.deepcopy(gm)
    inputs = normalize_inputs(example_inputs) if example_inputs is not None else gm.meta.get(INPUTS_META)
    report = FoldReport(params_before=count_params(gm), round_to=int(config.round_to),
                        round_to_width=int(config.round_to_width), min_conv_channels=int(config.min_conv_channels))
    rules: dict[str, int] = defaultdict(int)
    with torch.no_grad():
        _fold_weight_masks(gm, report)
        if inputs is None:
            if any(isinstance(g, ChannelGate) for g in gates(gm)):
                raise ValueError("fold_masks needs example_inputs (none were kept by insert_gates)")
            rules["dead_channels_not_checked_no_example_inputs"] += 1
        else:
            propagate_shapes(gm, inputs)
            _fold_channels(gm, analyze_channels(gm), config, report, rules)
        _remove_gates(gm)
    if config.fold_batchnorm:
        was_training = gm.training
        gm.eval()  # BatchNorm folding uses the running statistics: an inference model
        rules["batchnorm_folded"] += len(fold_batchnorm(gm, inplace=True).report["folded"])
        gm.train(was_training)
    _check_postconditions(gm, inputs)
    report.params_after = count_params(gm)
    report.rule_counts = dict(rules)
    gm.meta[FOLD_REPORT_META] = report
    gm.meta.pop(GATE_REPORT_META, None)
    log.info("%s", report)
    return PassResult(gm, True, report)


def _fold_weight_masks(gm: fx.GraphModule, report: FoldReport) -> None:
    """Weight masks -> weights; module-level gated calls -> plain module calls."""
    graph = gm.graph
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


def _remove_gates(gm: fx.GraphModule) -> None:
    """Remove every remaining gate / mask node and hyperflux's containers."""
    graph = gm.graph
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


def _check_postconditions(gm: fx.GraphModule, inputs: tuple[Any, ...] | None) -> None:
    leftovers = [n.format_node() for n in gm.graph.nodes if n.op == "call_module" and isinstance(
        gm.get_submodule(str(n.target)), (Gate, ChannelMask, MaskedMean, MaskedNorm, GatedModuleCall))]
    assert not leftovers, f"fold_masks left gates in the graph: {leftovers}"
    if inputs is not None:
        propagate_shapes(gm, inputs)  # the compact model runs


def _fold_channels(gm: fx.GraphModule, coupling: Coupling, config: FoldConfig, report: FoldReport,
                   rules: dict[str, int]) -> None:
    """Channel masks into their consumers' weights, then delete what each group no longer needs."""
    _fold_channel_masks(gm, coupling, report)
    groups = coupling.groups()
    gates_by_key = {(g.unit, frozenset(g.producers)): g for g in gates(gm) if isinstance(g, ChannelGate)}
    keep: dict[int, torch.Tensor] = {}
    for g in groups:
        kept = _plan_group(gm, coupling, g, gates_by_key.get((g.unit, frozenset(g.producers))), config, report, rules)
        if kept is not None:
            keep[g.id] = kept
    group_of = {s: g.id for g in groups for s in g.spaces}
    keep = parent_keep(coupling, keep, group_of)
    _slice(gm, coupling, keep, group_of, rules)
    _gather_shuffles(gm, coupling, keep, group_of, rules)
    _narrow_norms(gm, coupling, keep, group_of, rules)
    _narrow_means(gm, coupling, keep, group_of, rules)


def _fold_channel_masks(gm: fx.GraphModule, coupling: Coupling, report: FoldReport) -> None:
    """Every channel mask goes into the weight of the op it feeds (exact: W[:, c] * m_c)."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), ChannelMask):
            continue
        mask_mod: ChannelMask = gm.get_submodule(str(node.target))
        full = mask_mod.full_mask(*(gm.get_submodule(str(a.target)).mask() for a in node.args[1:]))
        consumer = next((c for c in coupling.consumers if consumer_input(c, nodes) is node), None)
        if consumer is None:
            raise RuntimeError(f"fold_masks: channel mask {node.name} does not feed a known conv/linear")
        w = fetch_attr(gm, consumer.weight)
        if full.numel() != w.shape[consumer.weight_dim]:  # a grouped conv: the mask repeats in every group
            full = full.view(-1, w.shape[consumer.weight_dim])[0]
        shape = [1] * w.dim()
        shape[consumer.weight_dim] = full.numel()
        w.mul_(full.to(w.dtype).view(shape))
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        report.channel_masks_folded += 1


def _plan_group(gm: fx.GraphModule, coupling: Coupling, g: Group, gate: ChannelGate | None, config: FoldConfig,
                report: FoldReport, rules: dict[str, int]) -> torch.Tensor | None:
    """The unit indices ``g`` keeps (None: nothing deleted), recorded in the report."""
    closed = gate.mask() == 0 if gate is not None else torch.zeros(g.size, dtype=torch.bool)
    strength = gate.flow.detach().float().cpu() if gate is not None else torch.zeros(g.size)
    if deletes_dead(g, config):
        dead = dead_units(gm, coupling, g)
        if dead.any():
            rules["dead_channels"] += int(dead.sum())
        closed = closed | dead
    n_closed = int(closed.sum())
    info = FoldGroup(name=gate.target if gate is not None else group_name(g), unit=g.unit, before=g.size,
                     after=g.size, closed=n_closed, deleted=0, reason="; ".join(g.blocked),
                     deletable=g.deletable)
    report.groups.append(info)
    if n_closed and not g.deletable:
        rules["blocked_closed_units"] += n_closed
    kept = plan_keep(g, closed, strength, config)
    if kept is None:
        return None
    extra = int(kept.sum()) - (g.size - n_closed)
    if extra > 0:
        knob = round_field(g) or "round_to_width"  # heads: no rounding, so min_channels kept them
        floor = "min_conv_channels" if knob == "round_to" else "min_channels"
        info.reason = f"kept {extra} closed {g.unit}(s) for {knob}={round_multiple(g, config)}/{floor}"
    info.after = int(kept.sum())
    info.deleted = g.size - info.after
    return torch.nonzero(kept).flatten()


def _slice(gm: fx.GraphModule, coupling: Coupling, keep: dict[int, torch.Tensor], group_of: dict[int, int],
           rules: dict[str, int]) -> None:
    """Slice producers (out dim), per-channel params, consumers (in dim); fix sizes in the graph."""
    slices: dict[tuple[str, int], torch.Tensor] = {}

    def add_slice(target: str, dim: int, idx: torch.Tensor) -> None:
        if (target, dim) in slices and not torch.equal(slices[(target, dim)], idx):
            raise RuntimeError(f"fold_masks: {target} dim {dim} is sliced two different ways")
        slices[(target, dim)] = idx

    for (target, dim), idx in producer_keep(coupling, keep, group_of).items():
        add_slice(target, dim, idx)
    for (target, dim), idx in param_keep(coupling, keep, group_of).items():
        add_slice(target, dim, idx)
    for cons in coupling.consumers:
        idx = label_keep(cons.weight_layout, keep, group_of)
        if idx is not None:
            add_slice(cons.weight, cons.weight_dim, idx)
    for (target, dim), idx in slices.items():
        t = fetch_attr(gm, target)
        replace_tensor(gm, target, t.detach().index_select(dim, idx.to(t.device)).clone())
        rules["sliced_tensors"] += 1
    _resize(gm, coupling, keep, group_of, slices, rules)


def _resize(gm: fx.GraphModule, coupling: Coupling, keep: dict[int, torch.Tensor], group_of: dict[int, int],
            slices: dict[tuple[str, int], torch.Tensor], rules: dict[str, int]) -> None:
    """Sizes that follow the deleted channels (``slices``: the kept positions of every sliced tensor
    dim): module attributes, reshape sizes, depthwise groups."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for cp in coupling.params:
        if (cp.target, cp.dim) not in slices:
            continue
        n = int(slices[(cp.target, cp.dim)].numel())
        owner = gm.get_submodule(cp.module) if cp.module is not None else None
        if hasattr(owner, "num_features"):
            owner.num_features = n
        if hasattr(owner, "normalized_shape"):  # a norm module left unused by the masked norm in its place
            owner.normalized_shape = (n,)
        if hasattr(owner, "num_channels"):  # GroupNorm
            owner.num_channels = n
        if cp.groups_arg is not None:  # one group per input channel: the kept outputs over the multiplier
            node_name, pos, multiplier = cp.groups_arg
            args = list(nodes[node_name].args)
            args[pos] = n // multiplier
            nodes[node_name].args = tuple(args)
            rules["depthwise_groups_updated"] += 1
    for sa in coupling.shape_args:  # reshape/view sizes that follow a label's width: constants now
        idx = label_keep(sa.label, keep, group_of)
        _set_size_arg(nodes[sa.node], sa.dim, sa.label.width if idx is None else int(idx.numel()))
        rules["shape_args_updated"] += int(idx is not None)
    for cut in coupling.cut_args:  # split / chunk / narrow / slice bounds in the kept channels
        ranges = kept_ranges(cut, keep, group_of)
        if ranges != list(cut.ranges):
            _set_cut_args(gm.graph, nodes[cut.node], cut, ranges)
            rules["cut_args_updated"] += 1
    for target in {target for target, _ in slices}:  # modules whose weights were sliced keep stale sizes
        owner, attr = owner_of(gm, target)
        if attr == "weight":
            sync_module_sizes(owner)


def _gather_shuffles(gm: fx.GraphModule, coupling: Coupling, keep: dict[int, torch.Tensor],
                     group_of: dict[int, int], rules: dict[str, int]) -> None:
    """A channel shuffle that loses channels: its groups are no longer equal, so its views give way to
    one ``index_select`` of the kept channels in their shuffled order (an index buffer of the model)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    for sh in coupling.shuffles.values():
        kept_in = label_keep(sh.source, keep, group_of)
        if kept_in is None:
            continue
        compact = torch.full((sh.source.width,), -1, dtype=torch.long)  # input position -> kept position
        compact[kept_in] = torch.arange(kept_in.numel())
        index = compact[sh.sources()[label_keep(sh.label, keep, group_of)]]
        if (index < 0).any():
            raise RuntimeError(f"fold_masks: shuffle {sh.first}..{sh.last} keeps channels its input lost")
        first, last = nodes[sh.first], nodes[sh.last]
        name = unique_key(f"{sh.last}_index", set(dir(gm)))
        gm.register_buffer(name, index.to(device))
        with gm.graph.inserting_before(last):
            gather = gm.graph.call_function(gather_function(), (first.args[0], sh.source.dim, gm.graph.get_attr(name)))
        last.replace_all_uses_with(gather)
        for n in reversed(sh.nodes):
            gm.graph.erase_node(nodes[n])
        rules["shuffles_gathered"] += 1


def _narrow_means(gm: fx.GraphModule, coupling: Coupling, keep: dict[int, torch.Tensor], group_of: dict[int, int],
                  rules: dict[str, int]) -> None:
    """Every MaskedMean becomes the plain mean over the channels kept (exact as for norms: the fold
    keeps exactly the open channels of a normalised group)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for use in coupling.means:
        node = nodes[use.node]
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(mod, MaskedMean):
            if label_keep(use.label, keep, group_of) is not None:
                raise RuntimeError(f"fold_masks: the mean {node.name} over deleted channels was not masked")
            continue
        with gm.graph.inserting_before(node):
            plain = gm.graph.call_function(mean_function(), (node.args[0], mod.dim), {"keepdim": mod.keepdim})
        plain.meta = dict(node.meta)
        node.replace_all_uses_with(plain)
        gm.graph.erase_node(node)
        rules["means_narrowed"] += 1


def _narrow_norms(gm: fx.GraphModule, coupling: Coupling, keep: dict[int, torch.Tensor], group_of: dict[int, int],
                  rules: dict[str, int]) -> None:
    """Every MaskedNorm becomes the plain norm over the channels kept (exact: the fold keeps exactly the
    open channels of a normalised group, and the masked norm's statistics counted just those)."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    for use in coupling.norms:
        node = nodes[use.node]
        idx = label_keep(use.label, keep, group_of)
        width = use.label.width if idx is None else int(idx.numel())
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(mod, MaskedNorm):
            if idx is not None:
                raise RuntimeError(f"fold_masks: the norm {node.name} over deleted channels was not masked")
            continue
        x, weight, bias, _mask = node.args
        args = {"layer": (x, (width,), weight, bias, mod.eps), "rms": (x, (width,), weight, mod.eps),
                "group": (x, mod.groups, weight, bias, mod.eps)}[mod.kind]
        with graph.inserting_before(node):
            plain = graph.call_function(norm_function(mod.kind), args)
        plain.meta = dict(node.meta)
        node.replace_all_uses_with(plain)
        graph.erase_node(node)
        rules["norms_narrowed" if idx is not None else "norms_restored"] += 1


def _set_cut_args(graph: fx.Graph, node: fx.Node, cut: CutArg, ranges: list[tuple[int, int]]) -> None:
    """Rewrite a split / chunk (as ``torch.split`` with sizes: the kept pieces need not be equal),
    narrow or channel slice to take ``ranges``."""
    if cut.kind == "split":
        with graph.inserting_before(node):
            new = graph.call_function(cut_function("split"), (node.args[0], [b - a for a, b in ranges], cut.dim))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    elif cut.kind == "narrow":
        (a, b), = ranges
        with graph.inserting_before(node):
            new = graph.call_function(cut_function("narrow"), (node.args[0], cut.dim, a, b - a))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    else:
        (a, b), = ranges
        if cut.index_pos < 0:
            node.args = (node.args[0], slice(a, b))
        else:
            idx = list(node.args[1])
            idx[cut.index_pos] = slice(a, b)
            node.args = (node.args[0], tuple(idx))


def _set_size_arg(node: fx.Node, dim: int, value: int) -> None:
    """Set output-dim ``dim`` of a reshape/view node to ``value`` (unless that size is given as -1)."""
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], (tuple, list)):  # reshape(x, (a, b, c))
        sizes = list(args[1])
        if sizes[dim] != -1:
            sizes[dim] = value
        args[1] = type(args[1])(sizes)
    elif args[1 + dim] != -1:  # x.reshape(a, b, c)
        args[1 + dim] = value
    node.args = tuple(args)
