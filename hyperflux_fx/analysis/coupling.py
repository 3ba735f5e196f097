"""Channel-coupling analysis: which channels of which ops must be deleted together.

Every conv / linear output creates a *channel space* (its output channels). Labels describing which
space owns which channels of a tensor are propagated forward through the graph: each op's entry in
the op table (:mod:`hyperflux_fx.ops`) names its :class:`~hyperflux_fx.ops.ChannelRule`, and
:data:`RULES` maps every rule to its code here. Elementwise ops between two labelled
tensors *tie* their spaces; the connected components of the tie graph (networkx) are the *groups*
deleted together. Conv / linear inputs are *consumers* (their weight's input dimension is sliced).
An op that is not in the table, or that mixes channels (LayerNorm over them, softmax, a reshape
that splits them, the graph output), *blocks* every group it touches, with the node and the reason.

Nothing here rewrites the graph: ``insert_gates`` (channel granularity) puts a mask at every consumer
input of an unblocked group, and ``fold_masks`` slices what this analysis lists.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import networkx as nx
import torch
from torch import fx

from hyperflux_fx.config import FoldConfig
from hyperflux_fx.ir import VALUE_META, WeightGate
from hyperflux_fx.ops import ChannelRule, NormOperands, OpSpec, node_spec, norm_operands

__all__ = ["OUTPUT_REASON", "RULES", "ChannelParam", "Consumer", "Coupling", "Group", "Label", "NormUse", "Producer",
           "Seg", "ShapeArg", "Unit", "analyze_channels", "consumer_input", "dead_units", "group_consumers",
           "kept_count", "label_keep", "param_target", "parent_keep", "plan_keep", "round_field", "round_multiple",
           "shape_of"]

OUTPUT_REASON = "consumed by the graph output"  # why a group the model's output reads is not gated

Unit = Literal["channel", "head"]  # what one unit of a group is: a channel (hidden unit), or an attention head


@dataclass(frozen=True)
class Seg:
    """A run of channels owned by one space (``space=None``: channels no op can delete, e.g. the input)."""

    space: int | None
    length: int  # channels (units of the space)
    expand: int = 1  # consecutive features per channel (after flatten of C x H x W: H*W)
    replicas: int = 1  # the run repeats: unit u sits at r * length * expand + u * expand (grouped convs)

    @property
    def width(self) -> int:
        return self.length * self.expand * self.replicas

    def positions(self, units: torch.Tensor) -> torch.Tensor:
        """Feature positions (within the run) of ``units``, in order."""
        own = (units[:, None] * self.expand + torch.arange(self.expand)[None, :]).flatten()
        if self.replicas == 1:
            return own
        return (own[None, :] + torch.arange(self.replicas)[:, None] * self.length * self.expand).flatten()


@dataclass(frozen=True)
class Label:
    """Which dim of a tensor carries channels, and who owns them."""

    dim: int
    segs: tuple[Seg, ...]

    @property
    def width(self) -> int:
        return sum(s.width for s in self.segs)

    def spaces(self) -> list[int]:
        return [s.space for s in self.segs if s.space is not None]


@dataclass
class Producer:
    """A conv/linear op creating a space: slice ``weight`` (and ``bias``) on ``weight_dim``."""

    node: str
    space: int
    weight: str  # parameter target
    bias: str | None
    weight_dim: int
    replicas: int = 1  # heads: q/k/v replicas of every unit along weight_dim
    unit_rows: int = 1  # heads: rows (head_dim) per unit within a replica
    units: int = 0  # heads: units (heads) per replica
    parent: int | None = None  # heads: the space split into this one
    offset: int = 0  # a piece of the op's output (its space cut by a split/slice): its first row
    piece: tuple[int, int] | None = None  # that piece's rows [start, stop)

    @property
    def name(self) -> str:
        """The node, or for a piece ``node[start:stop]`` (unique per space: gate and report names)."""
        return self.node if self.piece is None else f"{self.node}[{self.piece[0]}:{self.piece[1]}]"

    def rows(self, keep: torch.Tensor) -> torch.Tensor:
        """Indices along weight_dim of the kept units (heads: every replica's rows of each kept head)."""
        if self.replicas == 1 and self.unit_rows == 1:
            return keep + self.offset
        return self._replica_rows(keep).flatten() + self.offset  # replica-major, as the weight lays them out

    def rows_per_unit(self, units: torch.Tensor) -> torch.Tensor:
        """Row indices of each of ``units`` (one row per unit: every replica's rows of that unit)."""
        if self.replicas == 1 and self.unit_rows == 1:
            return units[:, None] + self.offset
        return self._replica_rows(units).permute(1, 0, 2).reshape(units.numel(), -1) + self.offset

    def _replica_rows(self, units: torch.Tensor) -> torch.Tensor:
        """(replicas, len(units), unit_rows) row indices."""
        own = units[:, None] * self.unit_rows + torch.arange(self.unit_rows)[None, :]
        return own[None] + torch.arange(self.replicas)[:, None, None] * self.units * self.unit_rows


@dataclass
class ShapeArg:
    """A size argument of a reshape/view that must follow a label's width after deletion."""

    node: str
    dim: int  # output dim whose size is the label's width
    label: Label


@dataclass
class CutArg:
    """A split / chunk / narrow / channel slice whose bounds must follow the deleted channels: the
    channel dim partitioned at every bound (``parts``: the label of each part, in order), and the
    ranges the op takes, in channels before the fold."""

    node: str
    kind: str  # "split" (split and chunk: rewritten as split with sizes), "narrow" or "getitem"
    dim: int
    bounds: tuple[int, ...]  # the partition's bounds, 0 .. width
    parts: tuple[Label, ...]
    ranges: tuple[tuple[int, int], ...]
    index_pos: int = 0  # getitem: the position of the channel slice in the index tuple

    def kept_ranges(self, keep: dict[int, torch.Tensor], group_of: dict[int, int]) -> list[tuple[int, int]]:
        """The ranges in channels after the fold."""
        kept = [part.width if (idx := label_keep(part, keep, group_of)) is None else int(idx.numel())
                for part in self.parts]
        new = dict(zip(self.bounds, itertools.accumulate(kept, initial=0), strict=True))
        return [(new[a], new[b]) for a, b in self.ranges]


@dataclass
class Consumer:
    """A conv/linear op reading labelled channels: slice ``weight`` on ``weight_dim``."""

    node: str
    label: Label  # the channels of its input
    weight: str
    weight_dim: int
    weight_label: Label | None = None  # a grouped conv: the positions within a group its weight dim holds
    input: str | None = None  # the node it reads the channels from, when not its first operand (addmm's x)

    @property
    def weight_layout(self) -> Label:
        return self.weight_label if self.weight_label is not None else self.label


@dataclass
class ChannelParam:
    """A parameter or buffer indexed by a space's channels (BN statistics, depthwise weights, ...):
    positions ``offset + seg.positions(units)`` of its dim ``dim`` (several entries may share a
    tensor: a BatchNorm over a concatenation, one per run)."""

    target: str
    dim: int
    space: int
    module: str | None = None  # a module whose num_features follows the channel count
    groups_arg: tuple[str, int] | None = None  # (node, arg index) of a depthwise conv's groups
    offset: int = 0  # where the space's run starts along dim
    expand: int = 1  # as Seg: features per unit (a depthwise conv with a channel multiplier: the multiplier)
    replicas: int = 1  # as Seg (a space split over conv groups)

    def seg(self, length: int) -> Seg:
        return Seg(self.space, length, self.expand, self.replicas)


@dataclass
class NormUse:
    """A LayerNorm / RMSNorm whose statistics run over a space's channels (the last dim): gated, it
    counts the open channels only (:class:`~hyperflux_fx.ir.MaskedNorm`); folded, it is narrower."""

    node: str
    label: Label


@dataclass
class Group:
    """Spaces deleted together."""

    id: int
    spaces: list[int]
    size: int
    producers: list[str]  # producer node names (stable ids for gates)
    unit: Unit = "channel"  # "head": the group's units are attention heads split off a producer's rows
    blocked: list[str] = field(default_factory=list)
    zero_preserving: bool = True  # every path producer -> consumer keeps an exact zero exactly zero
    normalised: bool = False  # a norm's statistics count its channels: the fold keeps exactly the open ones
    replicas: int = 1  # channels per unit: a space split over conv groups has one per group
    conv: bool = False  # a conv (1-D, 2-D or 3-D) makes or reads these channels: FoldConfig.round_to applies

    @property
    def deletable(self) -> bool:
        return not self.blocked


@dataclass
class Coupling:
    """The analysis result."""

    sizes: dict[int, int] = field(default_factory=dict)  # space -> channels
    producers: dict[int, Producer] = field(default_factory=dict)
    consumers: list[Consumer] = field(default_factory=list)
    params: list[ChannelParam] = field(default_factory=list)
    ties: nx.Graph = field(default_factory=nx.Graph)
    blocks: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    revived: set[int] = field(default_factory=set)  # spaces whose zeros some op turns into non-zeros
    shape_args: list[ShapeArg] = field(default_factory=list)
    shape_reads: list[tuple[str, Label]] = field(default_factory=list)  # x.shape / x.size() of labelled tensors
    split_parents: dict[int, str] = field(default_factory=dict)  # space -> why it is deleted only through its heads
    parameters: dict[str, torch.Tensor] = field(default_factory=dict)  # the graph module's, by (first) name
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[str, Label] = field(default_factory=dict)  # node name -> the label of its output
    norms: list[NormUse] = field(default_factory=list)  # norms over a space's channels
    means: list[NormUse] = field(default_factory=list)  # means over a space's channels (mask-aware, as norms)
    split: dict[str, int] = field(default_factory=dict)  # producer node -> conv groups its space is split over
    requests: dict[str, int] = field(default_factory=dict)  # splits this pass found needed (for the next)
    cuts: dict[str, frozenset[int]] = field(default_factory=dict)  # producer node -> rows its space is cut at
    cut_requests: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # cuts found needed
    head_groups: dict[str, int] = field(default_factory=dict)  # producer (piece) name -> heads per unit of its split
    head_group_requests: dict[str, int] = field(default_factory=dict)  # head groupings found needed (GQA)
    items: dict[str, list[Label | None]] = field(default_factory=dict)  # split/chunk node -> its items' labels
    cut_args: list[CutArg] = field(default_factory=list)

    def new_space(self, producer: Producer, size: int) -> int:
        sid = len(self.sizes)
        self.sizes[sid] = size
        producer.space = sid
        self.producers[sid] = producer
        self.ties.add_node(sid)
        return sid

    def block(self, label: Label | None, reason: str) -> None:
        if label is None:
            return
        for sid in label.spaces():
            if reason not in self.blocks[sid]:
                self.blocks[sid].append(reason)

    def groups(self) -> list[Group]:
        out = []
        normalised = {s for use in self.norms + self.means for s in use.label.spaces()}
        for gid, comp in enumerate(sorted((sorted(c) for c in nx.connected_components(self.ties)), key=lambda c: c[0])):
            sizes = {self.sizes[s] for s in comp}
            blocked = [r for s in comp for r in self.blocks.get(s, [])]
            blocked += [self.split_parents[s] for s in comp if s in self.split_parents]
            if len(sizes) != 1:
                blocked.append(f"tied spaces have different sizes {sorted(sizes)}")
            heads = any(self.producers[s].parent is not None for s in comp)
            out.append(Group(id=gid, spaces=comp, size=min(sizes), producers=[self.producers[s].name for s in comp],
                             unit="head" if heads else "channel", blocked=list(dict.fromkeys(blocked)),
                             zero_preserving=not any(s in self.revived for s in comp),
                             normalised=any(s in normalised for s in comp),
                             replicas=1 if heads else self.producers[comp[0]].replicas,
                             conv=not heads and self._conv_channels(set(comp))))
        return out

    def _conv_channels(self, spaces: set[int]) -> bool:
        """True when a conv (a weight of 3 or more dims) produces or reads any of ``spaces``."""
        weights = [self.producers[s].weight for s in spaces]
        weights += [c.weight for c in self.consumers if spaces & set(c.label.spaces())]
        return any(w in self.parameters and self.parameters[w].dim() >= 3 for w in weights)

    def group_of(self) -> dict[int, int]:
        return {s: g.id for g in self.groups() for s in g.spaces}


# -- helpers ----------------------------------------------------------------------------------------

def shape_of(node: Any) -> tuple[int, ...] | None:
    """The static shape propagate_shapes recorded for a node (None when unknown or not a tensor)."""
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(int(d) for d in tm.shape)


def _tuple_valued(node: Any) -> bool:
    """True when the node returns a tuple of tensors (TensorMetadata is itself a NamedTuple)."""
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return isinstance(tm, (tuple, list)) and not hasattr(tm, "shape")


def param_target(gm: fx.GraphModule, value: Any) -> str | None:
    """The parameter target behind a weight operand: a get_attr, possibly through a weight gate."""
    if not isinstance(value, fx.Node):
        return None
    if value.op == "call_module" and isinstance(gm.get_submodule(str(value.target)), WeightGate):
        value = value.args[0]
    if isinstance(value, fx.Node) and value.op == "get_attr":
        return str(value.target)
    return None


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# -- rules ------------------------------------------------------------------------------------------
# A rule gets (gm, node, coupling, in_labels, spec) where in_labels maps input nodes to their labels
# and spec is the op's entry in the op table, and returns the label of the node's output (or None).
# It may create spaces, tie, block, record slices.

Rule = Callable[[fx.GraphModule, fx.Node, Coupling, dict[fx.Node, Label], OpSpec], Label | None]


def _only_label(node: fx.Node, labels: dict[fx.Node, Label]) -> Label | None:
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return labels.get(first) if isinstance(first, fx.Node) else None


def _block_inputs(c: Coupling, node: fx.Node, labels: dict[fx.Node, Label], reason: str) -> None:
    for n in node.all_input_nodes:
        c.block(labels.get(n), f"{reason}: {node.format_node()}")


def _weight_op(gm: fx.GraphModule, node: fx.Node, c: Coupling, labels: dict[fx.Node, Label], *, kind: str,
               x: Any, weight: Any, bias: Any, groups: int, groups_pos: int | None,
               module: str | None = None) -> Label | None:
    """conv / conv_transpose / linear: the input is consumed, the output is a new space."""
    wt = param_target(gm, weight)
    bt = param_target(gm, bias) if bias is not None else None
    in_label = labels.get(x) if isinstance(x, fx.Node) else None
    out_shape = shape_of(node)
    if wt is None or out_shape is None or (bias is not None and bt is None):
        c.block(in_label, f"{kind} whose weight/bias is not a parameter: {node.format_node()}")
        return None
    w = c.parameters.get(wt)
    if w is None:
        c.block(in_label, f"{kind} weight {wt} is not a parameter")
        return None
    ch_dim = len(out_shape) - 1 if kind in ("linear", "mm") else 1
    in_ch = w.shape[1] * groups if kind == "conv" else (w.shape[0] if kind in ("conv_transpose", "mm") else w.shape[1])
    out_ch = w.shape[0] if kind in ("conv", "linear") else w.shape[1] * groups
    if kind == "conv" and groups > 1 and groups == in_ch and out_ch % in_ch == 0 and groups_pos is not None:
        return _depthwise(c, node, in_label, wt, bt, out_ch // in_ch, groups_pos)
    w_in, w_out = (1, 0) if kind in ("conv", "linear") else (0, 1)
    if groups > 1 and kind == "conv":
        return _grouped_conv(c, node, x, in_label, wt, bt, groups, in_ch, out_ch)
    if groups > 1:
        return _blocked_output(c, node, in_label, wt, bt, w_out, out_ch, ch_dim,
                               f"grouped transposed conv (groups={groups}) is not sliced yet: {node.format_node()}")
    return _consume_produce(c, node, x, in_label, kind=kind, wt=wt, bt=bt, in_ch=in_ch, out_ch=out_ch,
                            ch_dim=ch_dim, w_in=w_in, w_out=w_out)


def _depthwise(c: Coupling, node: fx.Node, in_label: Label | None, wt: str, bt: str | None, mult: int,
               groups_pos: int) -> Label | None:
    """Depthwise (groups = input channels), with a channel multiplier ``mult``: output channels
    i*mult .. i*mult+mult-1 read input channel i only, so the input's label passes, each channel
    owning ``mult`` consecutive outputs; the weight and bias rows and the groups follow."""
    if in_label is None or in_label.dim != 1:
        return None
    if any(seg.expand != 1 for seg in in_label.segs):
        c.block(in_label, f"depthwise conv over flattened channels: {node.format_node()}")
        return None
    offset = 0
    for seg in in_label.segs:  # each run of the input owns its run of outputs and weight rows
        if seg.space is not None:
            c.params.append(ChannelParam(wt, 0, seg.space, groups_arg=(node.name, groups_pos), offset=offset,
                                         expand=mult, replicas=seg.replicas))
            if bt is not None:
                c.params.append(ChannelParam(bt, 0, seg.space, offset=offset, expand=mult, replicas=seg.replicas))
                c.revived.add(seg.space)
        offset += seg.width * mult
    return Label(1, tuple(replace(seg, expand=mult) for seg in in_label.segs))


def _grouped_conv(c: Coupling, node: fx.Node, x: Any, in_label: Label | None, wt: str, bt: str | None, groups: int,
                  in_ch: int, out_ch: int) -> Label:
    """A grouped conv reads, in each of its ``groups``, the same positions of its weight's input dim:
    an input position is deleted in every group at once. Its input space is split over the groups (a
    unit: one position, in every group), which the producer of that space must know from the start:
    this pass requests it of that producer and the next one builds the space so. The output is a new
    space split the same way (a unit: one output position in every group)."""
    per_in = in_ch // groups
    seg = in_label.segs[0] if in_label is not None and len(in_label.segs) == 1 else None
    if in_label is not None:
        if seg is None or seg.space is None or seg.expand != 1 or in_label.dim != 1:
            c.block(in_label, f"grouped conv (groups={groups}) over concatenated or unowned channels: "
                              f"{node.format_node()}")
        elif seg.replicas == groups:
            c.consumers.append(Consumer(node.name, in_label, wt, 1, weight_label=Label(1, (Seg(seg.space, per_in),))))
        elif not _request_split(c, in_label, groups):
            c.block(in_label, f"grouped conv (groups={groups}) over channels split another way: {node.format_node()}")
    sid = c.new_space(Producer(node.name, -1, wt, bt, 0, replicas=groups, units=out_ch // groups), out_ch // groups)
    if bt is not None:
        c.revived.add(sid)
    return Label(1, (Seg(sid, out_ch // groups, replicas=groups),))


def _plain_producer(c: Coupling, prod: Producer) -> bool:
    """A conv/linear space a next pass can still split or cut: one row per unit, not a head space,
    not split over conv groups."""
    return prod.replicas == 1 and prod.unit_rows == 1 and prod.parent is None and prod.node not in c.split


def _request_split(c: Coupling, lab: Label, groups: int) -> bool:
    """Ask the next pass to split ``lab``'s space over ``groups`` (True when it can: one plain
    conv/linear space); until then the space is blocked, so this pass's result is not used."""
    seg = lab.segs[0] if len(lab.segs) == 1 else None
    if seg is None or seg.space is None or seg.replicas != 1 or seg.expand != 1 or seg.length % groups:
        return False
    prod = c.producers[seg.space]
    if not _plain_producer(c, prod):
        return False
    c.requests.setdefault(prod.node, groups)
    c.block(lab, f"split over {groups} conv groups on the next pass")
    return True


def _blocked_output(c: Coupling, node: fx.Node, in_label: Label | None, wt: str, bt: str | None, w_out: int,
                    out_ch: int, ch_dim: int, reason: str) -> Label:
    """A weight op we cannot slice: block what it reads, and give its output a blocked space."""
    c.block(in_label, reason)
    sid = c.new_space(Producer(node.name, -1, wt, bt, w_out), out_ch)
    c.blocks[sid].append(f"output of: {reason}")
    return Label(ch_dim, (Seg(sid, out_ch),))


def _consume_produce(c: Coupling, node: fx.Node, x: Any, in_label: Label | None, *, kind: str, wt: str,
                     bt: str | None, in_ch: int, out_ch: int, ch_dim: int, w_in: int, w_out: int) -> Label:
    """conv / linear: record the input as consumed (weight dim ``w_in``) and the output as a new space
    (weight dim ``w_out``)."""
    if in_label is not None:
        in_dim = len(shape_of(x) or ()) - 1 if kind in ("linear", "mm") else 1
        if in_label.dim != in_dim or in_label.width != in_ch:
            c.block(in_label, f"{kind} reads channels on another dim: {node.format_node()}")
        else:
            read = x.name if isinstance(x, fx.Node) and node.args and x is not node.args[0] else None
            c.consumers.append(Consumer(node.name, in_label, wt, w_in, input=read))
    if node.name in c.cuts:
        return Label(ch_dim, _pieces(c, node, wt, bt, w_out, out_ch))
    g = c.split.get(node.name, 1)  # requested only where it divides out_ch (_request_split)
    sid = c.new_space(Producer(node.name, -1, wt, bt, w_out, replicas=g, units=out_ch // g), out_ch // g)
    if bt is not None:
        c.revived.add(sid)
    return Label(ch_dim, (Seg(sid, out_ch // g, replicas=g),))


def _pieces(c: Coupling, node: fx.Node, wt: str, bt: str | None, w_out: int, out_ch: int) -> tuple[Seg, ...]:
    """The output of a conv/linear whose space a split or slice cuts: one space per piece."""
    bounds = sorted({0, out_ch} | {b for b in c.cuts[node.name] if 0 < b < out_ch})
    segs = []
    for start, stop in itertools.pairwise(bounds):
        sid = c.new_space(Producer(node.name, -1, wt, bt, w_out, offset=start, piece=(start, stop)), stop - start)
        if bt is not None:
            c.revived.add(sid)
        segs.append(Seg(sid, stop - start))
    return tuple(segs)


def _f_conv(gm, node, c, labels, spec):  # torch.convNd(x, w, b, stride, padding, dilation, groups)
    pos = spec.signature.index("groups")
    return _weight_op(gm, node, c, labels, kind="conv", x=node.args[0], weight=spec.arg(node, "weight"),
                      bias=spec.arg(node, "bias"), groups=spec.arg(node, "groups", 1),
                      groups_pos=pos if len(node.args) > pos else None)


def _f_conv_t(gm, node, c, labels, spec):  # torch.conv_transposeNd(x, w, b, stride, padding, output_padding, groups)
    return _weight_op(gm, node, c, labels, kind="conv_transpose", x=node.args[0], weight=spec.arg(node, "weight"),
                      bias=spec.arg(node, "bias"), groups=spec.arg(node, "groups", 1), groups_pos=None)


def _f_linear(gm, node, c, labels, spec):  # F.linear(x, w, b)
    return _weight_op(gm, node, c, labels, kind="linear", x=node.args[0], weight=spec.arg(node, "weight"),
                      bias=spec.arg(node, "bias"), groups=1, groups_pos=None)


def _mm(gm, node, c, labels, spec):  # mm(x, W) / addmm(b, x, W): x @ W + b, W (in, out) a parameter (Conv1D)
    bias = spec.arg(node, "input") if "mat1" in spec.signature else None
    x = spec.arg(node, "mat1") if "mat1" in spec.signature else spec.arg(node, "input")
    return _weight_op(gm, node, c, labels, kind="mm", x=x, weight=spec.arg(node, "mat2"), bias=bias, groups=1,
                      groups_pos=None)


def _elementwise(gm, node, c, labels, spec):  # per element: f(0) != 0 revives zeros
    lab = _only_label(node, labels)
    if lab is not None and not spec.zero_preserving:
        c.revived.update(lab.spaces())
    return lab


def _batch_norm(c: Coupling, node: fx.Node, lab: Label | None, tensors: list[tuple[str, str | None]],
                module: str | None = None) -> Label | None:
    """Per-channel affine with statistics: pass-through; ``tensors`` = (name, target or None) to slice
    (a None target for a tensor that is present but not a parameter/buffer blocks the group)."""
    if lab is None:
        return None
    if lab.dim != 1:
        c.block(lab, f"batch norm over a non-channel dim: {node.format_node()}")
        return lab
    offset = 0
    for seg in lab.segs:  # a concatenation: each run's statistics are sliced with its space
        if seg.space is not None:
            for name, target in tensors:
                if target is None:
                    c.block(lab, f"batch norm {name} is not a parameter/buffer: {node.format_node()}")
                else:
                    c.params.append(ChannelParam(target, 0, seg.space, module=module, offset=offset,
                                                 expand=seg.expand, replicas=seg.replicas))
            c.revived.add(seg.space)  # beta - mean * gamma / sigma turns a zero into a constant
        offset += seg.width
    return lab


def _f_batch_norm(gm, node, c, labels, spec):  # F.batch_norm(x, running_mean, running_var, weight, bias, ...)
    tensors = [(name, param_target(gm, spec.arg(node, name)))
               for name in ("running_mean", "running_var", "weight", "bias")
               if isinstance(spec.arg(node, name), fx.Node)]
    return _batch_norm(c, node, _only_label(node, labels), tensors)


def _norm(gm, node, c, labels, spec):  # LayerNorm / RMSNorm over the last dims
    """Over other dims than the channels: each channel on its own (pass-through). Over the channels
    alone: the statistics must count the open channels only, which the gated model's MaskedNorm does;
    the affine parameters are sliced and the fold keeps exactly the open channels."""
    lab = _only_label(node, labels)
    ops = norm_operands(gm, node)
    if lab is None or ops is None:
        return None
    rank = len(shape_of(node) or ())
    c.revived.update(lab.spaces())  # a zero channel comes out as the bias (or 0 / sqrt(eps))
    if ops.kind == "group":
        return _group_norm(gm, node, c, lab, ops, spec)
    if lab.dim < rank - ops.dims:
        return lab
    if ops.dims != 1 or len(lab.segs) != 1 or lab.segs[0].expand != 1 or lab.segs[0].replicas != 1:
        c.block(lab, f"{spec.name} over the channels together with other dims or other runs: {node.format_node()}")
        return lab
    if lab.segs[0].space is None:
        return lab
    return _masked_norm_use(gm, node, c, lab, ops, spec)


def _masked_norm_use(gm: fx.GraphModule, node: fx.Node, c: Coupling, lab: Label, ops: NormOperands,
                     spec: OpSpec) -> Label:
    """A norm over one space's channels: its affine sliced with them, the norm made mask-aware."""
    seg = lab.segs[0]
    for name, value in (("weight", ops.weight), ("bias", ops.bias)):
        target = value if isinstance(value, str) else param_target(gm, value)
        if value is not None and target is None:
            c.block(lab, f"{spec.name} {name} is not a parameter: {node.format_node()}")
        elif target is not None:
            c.params.append(ChannelParam(target, 0, seg.space, module=ops.module, replicas=seg.replicas))
    c.norms.append(NormUse(node.name, lab))
    return lab


def _group_norm(gm: fx.GraphModule, node: fx.Node, c: Coupling, lab: Label, ops: NormOperands,
                spec: OpSpec) -> Label:
    """GroupNorm: statistics per group of consecutive channels (dim 1). Mask-aware as LayerNorm; with
    several groups every group must keep as many channels, so the space is split over the groups (a
    unit: one position in every group, as for a grouped conv)."""
    seg = lab.segs[0] if len(lab.segs) == 1 else None
    if lab.dim != 1 or seg is None or seg.expand != 1:
        c.block(lab, f"{spec.name} over channels on another dim or over several runs: {node.format_node()}")
        return lab
    if seg.space is None:
        return lab
    if seg.replicas != ops.groups and ops.groups > 1:
        if seg.replicas != 1 or not _request_split(c, lab, ops.groups):
            c.block(lab, f"{spec.name} over channels split another way: {node.format_node()}")
        return lab
    return _masked_norm_use(gm, node, c, lab, ops, spec)


def _broadcast_operand(gm: fx.GraphModule, c: Coupling, node: fx.Node, lab: Label, other: Any) -> bool:
    """An unlabelled operand of a binary op with a labelled one: True if the result keeps the label
    exactly (scalars, size-1 on the channel dim, or a per-channel parameter we can slice)."""
    if not isinstance(other, fx.Node):
        return True
    shape = shape_of(other)
    out_shape = shape_of(node)
    if shape is None or out_shape is None:
        return False
    rank = len(out_shape)
    padded = (1,) * (rank - len(shape)) + shape
    if padded[lab.dim] == 1:
        return True
    return _sliced_operand(gm, c, lab, other, rank)


def _sliced_operand(gm: fx.GraphModule, c: Coupling, lab: Label, operand: fx.Node, rank: int) -> bool:
    """A parameter or buffer that varies over a label's channels (a per-channel scale, a position
    embedding, a class token): True, and recorded to be sliced with the space, when one of its dims
    follows the channels. Through ops that keep its dims (expand, casts, elementwise maths with
    constants: Gemma's ``1 + weight``) it broadcasts against the result right-aligned; through a reshape
    it must have a single non-1 dim."""
    src, aligned, resized, chain = operand, True, [], []
    while (spec := node_spec(gm, src)) is not None and isinstance(src.args[0], fx.Node) and (
            spec.moves_elements or _per_element(src, spec)):
        aligned = aligned and (spec.keeps_dims or not spec.moves_elements)
        if spec.explicit_sizes:
            resized.append(src)
        chain.insert(0, src)
        src = src.args[0]
    t = param_target(gm, src)
    if t is None or len(lab.segs) != 1 or lab.segs[0].space is None:
        return False
    p = c.parameters[t] if t in c.parameters else c.buffers.get(t)
    if p is None:
        return False
    if aligned:
        dim = lab.dim - (rank - p.dim())
        if dim < 0 or p.shape[dim] != lab.width:
            return False
    elif (dim := _single_dim(tuple(p.shape), lab.width)) is not None:
        sizes = [_single_dim(shape_of(n), lab.width) for n in resized]
        if None in sizes:
            return False
        for n, d in zip(resized, sizes, strict=True):  # view(C, 1, 1): the size follows the width
            c.shape_args.append(ShapeArg(n.name, d, Label(d, lab.segs)))
    else:  # a table gathered and rearranged (relative position bias per head): which dim, by probing
        dim = _probed_param_dim(gm, chain, src, p, lab.width, lab.dim - (rank - len(shape_of(operand) or ())))
        if dim is None:
            return False
    seg = lab.segs[0]
    c.params.append(ChannelParam(t, dim, seg.space, expand=seg.expand, replicas=seg.replicas))
    return True


def _per_element(node: fx.Node, spec: OpSpec) -> bool:
    """An op on one tensor element by element (an activation, or arithmetic with a number): slicing
    its operand slices its result alike."""
    others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node)]
    if others or node.op != "call_function":
        return False
    return spec.channel_rule in (ChannelRule.ELEMENTWISE, ChannelRule.ADD, ChannelRule.SUB, ChannelRule.MUL,
                                 ChannelRule.DIV)


def _probed_param_dim(gm: fx.GraphModule, chain: list[fx.Node], src: fx.Node, p: torch.Tensor, width: int,
                      out_dim: int) -> int | None:
    """The dim of parameter ``p`` whose channels the ops of ``chain`` carry, one by one, to dim
    ``out_dim`` of their result (:func:`_channelwise_dim`), or None."""
    call = _replay(gm, chain, src)
    if isinstance(call, str) or out_dim < 0:
        return None
    for d in (d for d in range(p.dim()) if p.shape[d] == width):  # chain: at least the reshape that unaligned it
        if _channelwise_dim(call, tuple(p.shape), p.dtype, d, width, shape_of(chain[-1])) == out_dim:
            return d
    return None


def _single_dim(shape: tuple[int, ...] | None, width: int) -> int | None:
    """The one dim of ``shape`` that is not 1, if it has size ``width``."""
    big = [i for i, d in enumerate(shape or ()) if d != 1]
    return big[0] if len(big) == 1 and shape[big[0]] == width else None


def _addcmul(gm, node, c, labels, spec):
    """input + value * tensor1 * tensor2: labelled operands are tied (as add / mul), the others must
    broadcast (a parameter over the channels is sliced); a closed channel stays zero only if the
    input and one of the factors carry it."""
    operands = [spec.arg(node, name) for name in spec.signature[:3]]
    labs = [labels.get(o) if isinstance(o, fx.Node) else None for o in operands]
    ref = next((lab for lab in labs if lab is not None), None)
    if ref is None:
        return None
    for operand, lab in zip(operands, labs, strict=True):
        if lab is None:
            if not _broadcast_operand(gm, c, node, ref, operand):
                c.block(ref, f"addcmul with an operand that varies over the channels: {node.format_node()}")
        elif lab is not ref:
            if _same_layout(lab, ref):
                _tie(c, ref, lab, "addcmul", node)
            else:
                c.block(ref, f"addcmul of differently laid out channels: {node.format_node()}")
                c.block(lab, f"addcmul of differently laid out channels: {node.format_node()}")
    if labs[0] is None or (labs[1] is None and labs[2] is None):
        c.revived.update(ref.spaces())
    return ref


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
    if la is None and lb is None:
        return None
    if la is not None and lb is not None:
        if not _same_layout(la, lb):
            sa, sb = shape_of(a), shape_of(b)
            # broadcasting against a size-1 channel dim keeps the other label
            if sb is not None and len(sb) > la.dim and sb[la.dim] == 1:
                return la
            if sa is not None and len(sa) > lb.dim and sa[lb.dim] == 1:
                return lb
            if _split_alike(c, la, lb) or _split_alike(c, lb, la):
                return la
            c.block(la, f"{kind} of differently laid out channels: {node.format_node()}")
            c.block(lb, f"{kind} of differently laid out channels: {node.format_node()}")
            return la
        _tie(c, la, lb, kind, node)
        return la
    lab, other = (la, b) if la is not None else (lb, a)
    if not _broadcast_operand(gm, c, node, lab, other):
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
        _block_inputs(c, node, labels, f"a condition over the channels: {node.format_node()}")
        return None
    if out is not None and not _broadcast_operand(gm, c, node, out, cond):
        c.block(out, f"where with a condition that varies over the channels: {node.format_node()}")
    return out


def _split_alike(c: Coupling, plain: Label, split: Label) -> bool:
    """``split``'s one space is split over conv groups and ``plain``'s is not yet, or the two are cut
    into different runs: ask the next pass to split or cut them alike (True when asked)."""
    if plain.dim != split.dim or plain.width != split.width:
        return False
    if len(split.segs) == 1 and split.segs[0].replicas > 1:
        return _request_split(c, plain, split.segs[0].replicas)
    if any(sg.expand != 1 or sg.replicas != 1 for sg in plain.segs + split.segs):
        return False
    asked = [_request_cut(c, plain, _bounds(split)), _request_cut(c, split, _bounds(plain))]
    return any(asked) and all(ok is not False for ok in asked)


def _bounds(lab: Label) -> set[int]:
    """Where the runs of a label start and end along its dim."""
    return set(itertools.accumulate((sg.width for sg in lab.segs), initial=0))


def _request_cut(c: Coupling, lab: Label, at: set[int]) -> bool | None:
    """Ask the next pass to cut ``lab``'s runs at the positions ``at`` (along its dim). True when asked,
    None when nothing needs cutting, False when a run cannot be cut (not a plain conv/linear space)."""
    asked, offset = None, 0
    for sg in lab.segs:
        inner = {p - offset for p in at if offset < p < offset + sg.width}
        offset += sg.width
        if not inner or sg.space is None:
            continue  # runs nobody owns are cut for free
        prod = c.producers[sg.space]
        rows = {prod.offset + p for p in inner}
        if sg.expand != 1 or sg.replicas != 1 or not _plain_producer(c, prod) or rows <= c.cuts.get(
                prod.node, frozenset()):
            return False
        c.cut_requests[prod.node] |= rows
        c.block(Label(lab.dim, (sg,)), f"cut at rows {sorted(rows)} on the next pass")
        asked = True
    return asked


def _cut(c: Coupling, node: fx.Node, lab: Label, ranges: list[tuple[int, int]], kind: str,
         index_pos: int = 0) -> list[Label | None]:
    """The labels of ``ranges`` of a label's dim (split / chunk / narrow / a slice): the runs inside each,
    the op's bounds recorded to follow the fold (:class:`CutArg`). A range that ends inside a run asks
    for that run's space to be cut there (next pass); meanwhile, or when it cannot be cut, the pieces
    carry no label."""
    at = {p for r in ranges for p in r}
    asked = _request_cut(c, lab, at)
    if asked is False:
        c.block(lab, f"slicing into channels that cannot be cut: {node.format_node()}")
    if asked is not None:
        return [None] * len(ranges)
    bounds = tuple(sorted(at | {0, lab.width}))
    parts = tuple(_runs(lab, a, b) for a, b in itertools.pairwise(bounds))
    c.cut_args.append(CutArg(node.name, kind, lab.dim, bounds, parts, tuple(ranges), index_pos))
    return [_runs(lab, a, b) if a < b else None for a, b in ranges]


def _runs(lab: Label, start: int, stop: int) -> Label:
    """The runs of ``lab`` within [start, stop) (aligned on its runs, or inside runs nobody owns)."""
    segs, offset = [], 0
    for sg in lab.segs:
        lo, hi = max(start, offset), min(stop, offset + sg.width)
        if lo < hi:
            segs.append(sg if (lo, hi) == (offset, offset + sg.width) else Seg(None, hi - lo))
        offset += sg.width
    return Label(lab.dim, tuple(segs))


def _split(gm, node, c, labels, spec):  # split / chunk / narrow (x, ..., dim)
    """Along the channel dim: each piece carries the runs it takes (a conv's space cut where a piece
    ends inside it). Along another dim: every piece keeps the label."""
    lab = _only_label(node, labels)
    shape = shape_of(node.args[0])
    if lab is None or shape is None:
        return None
    dim = _norm_dim(spec.arg(node, "dim", 0), len(shape))
    size = shape[dim]
    if spec.name == "narrow":
        start = spec.arg(node, "start")
        start = start + size if isinstance(start, int) and start < 0 else start
        ranges = [(start, start + spec.arg(node, "length"))]
    else:
        how = spec.arg(node, spec.signature[1])
        if spec.name == "chunk":
            how = -(-size // how) if isinstance(how, int) else None
        if isinstance(how, int):
            ranges = [(i, min(i + how, size)) for i in range(0, size, how)]
        elif isinstance(how, (list, tuple)) and all(isinstance(n, int) for n in how):
            ends = list(itertools.accumulate(how))
            ranges = list(zip([0, *ends[:-1]], ends, strict=True))
        else:
            ranges = None
    if ranges is None or not all(isinstance(v, int) for r in ranges for v in r):
        c.block(lab, f"{spec.name} with sizes known only at run time: {node.format_node()}")
        return None
    items = [lab] * len(ranges) if dim != lab.dim else _cut(c, node, lab, ranges, "narrow" if (
        spec.name == "narrow") else "split")
    if spec.name == "narrow":
        return items[0]
    c.items[node.name] = items
    return lab  # the tuple's label: its items are looked up by getitem




def _same_layout(la: Label, lb: Label) -> bool:
    """The two labels put the same runs of channels on the same dim (so they can be tied)."""
    return la.dim == lb.dim and [(s.length, s.expand, s.replicas) for s in la.segs] == [
        (s.length, s.expand, s.replicas) for s in lb.segs]


def _tie(c: Coupling, la: Label, lb: Label, kind: str, node: fx.Node) -> None:
    """Tie two labels of the same layout segment by segment (their channels go together)."""
    for sa, sb in zip(la.segs, lb.segs, strict=True):
        if sa.space is not None and sb.space is not None:
            c.ties.add_edge(sa.space, sb.space)
        elif sa.space is not None or sb.space is not None:
            c.block(la, f"{kind} ties channels to ones that cannot be deleted: {node.format_node()}")
            c.block(lb, f"{kind} ties channels to ones that cannot be deleted: {node.format_node()}")


def _shape_of_other(gm, node, c, labels, spec):
    """x.view_as(y) / x.reshape_as(y): a reshape of x (:func:`_reshape_like`) to y's shape, read from y
    at run time. After the fold that shape is y's narrowed one, so the result's channels and y's must
    be deleted together: tied, as an add ties them."""
    other = spec.arg(node, "other")
    lo = labels.get(other) if isinstance(other, fx.Node) else None
    out = _reshape_like(gm, node, c, labels, spec) if labels.get(node.args[0]) is not None else None
    if out is None or lo is None:
        why = f"{spec.name} ties channels to ones that cannot be deleted: {node.format_node()}"
        c.block(lo, why)
        c.block(out, why)
        return out
    if not _same_layout(out, lo):
        c.block(out, f"{spec.name} of differently laid out channels: {node.format_node()}")
        c.block(lo, f"{spec.name} of differently laid out channels: {node.format_node()}")
        return out
    _tie(c, out, lo, spec.name, node)
    return out


def _cat(gm, node, c, labels, spec):  # torch.cat(tensors, dim)
    tensors = node.args[0]
    dim = spec.arg(node, "dim", 0)
    out_shape = shape_of(node)
    if out_shape is None:
        for t in tensors:
            c.block(labels.get(t), f"cat without shape information: {node.format_node()}")
        return None
    dim = _norm_dim(dim, len(out_shape))
    labs = [labels.get(t) if isinstance(t, fx.Node) else None for t in tensors]
    if all(lab is None for lab in labs):
        return None
    if any(lab is not None and lab.dim != dim for lab in labs):
        # cat along another dim: every input must carry the same channel layout -> tie
        ref = next(lab for lab in labs if lab is not None)
        for t, lab in zip(tensors, labs, strict=True):
            if lab is None and isinstance(t, fx.Node) and _sliced_operand(gm, c, ref, t, len(out_shape)):
                continue  # a class token: sliced with the channels
            if lab is None or lab.dim != ref.dim or len(lab.segs) != len(ref.segs):
                c.block(lab, f"cat mixing channel layouts: {node.format_node()}")
                c.block(ref, f"cat mixing channel layouts: {node.format_node()}")
                continue
            for s1, s2 in zip(lab.segs, ref.segs, strict=True):
                if s1.space is not None and s2.space is not None:
                    c.ties.add_edge(s1.space, s2.space)
        return ref
    segs: list[Seg] = []
    for t, lab in zip(tensors, labs, strict=True):
        if lab is None:
            shape = shape_of(t)
            if shape is None:
                return None
            segs.append(Seg(None, shape[dim]))
        else:
            segs.extend(lab.segs)
    return Label(dim, tuple(segs))


def _reshape_like(gm, node, c, labels, spec):
    """flatten / view / reshape: keep the label when the channel dim survives, or when it is the first
    of the dims merged into one (C, H, W -> C*H*W: each channel owns H*W consecutive features)."""
    lab = _only_label(node, labels)
    if lab is None:
        return None
    ins, outs = shape_of(node.args[0]), shape_of(node)
    if ins is None or outs is None:
        c.block(lab, f"reshape without shape information: {node.format_node()}")
        return None
    # walk both shapes, grouping dims whose products match
    i = j = 0
    while i < len(ins) and j < len(outs):
        pi, pj = ins[i], outs[j]
        i0, j0 = i, j
        while pi != pj:
            if pi < pj:
                i += 1
                pi *= ins[i]
            else:
                j += 1
                pj *= outs[j]
        if i0 <= lab.dim <= i:
            if i == i0 and j == j0:  # the channel dim maps to one output dim unchanged
                out = Label(j0, lab.segs)
            elif j == j0 and lab.dim == i0:  # merged, channel dim first: expand
                inner = math.prod(ins[i0 + 1:i + 1])
                out = Label(j0, tuple(replace(s, expand=s.expand * inner) for s in lab.segs))
            elif i == i0 and j - j0 >= 1 and _is_head_split(c, lab):
                out = _split_heads(c, node, lab, outs[j0:j + 1], j0)
            else:
                c.block(lab, f"reshape splits or reorders the channels: {node.format_node()}")
                return None
            if spec.explicit_sizes:  # reshape/view sizes follow the width
                c.shape_args.append(ShapeArg(node.name, out.dim, out))
            return out
        i += 1
        j += 1
        # skip size-1 dims on either side
    c.block(lab, f"reshape not understood: {node.format_node()}")
    return None


def _is_head_split(c: Coupling, lab: Label) -> bool:
    """A single linear/conv output split into (..., units, features): attention heads."""
    if len(lab.segs) != 1 or lab.segs[0].expand != 1 or lab.segs[0].space is None:
        return False
    prod = c.producers[lab.segs[0].space]
    return prod.replicas == 1 and prod.unit_rows == 1 and prod.parent is None


def _split_heads(c: Coupling, node: fx.Node, lab: Label, dims: tuple[int, ...], j0: int) -> Label:
    """(.., R*U*D) -> (.., R.., U, D): unit u of the new space owns rows r*U*D + u*D + d of the parent
    producer for every replica r. The parent space is deleted only through this one."""
    parent = lab.segs[0].space
    src = c.producers[parent]
    per_unit = c.head_groups.get(src.name, 1)  # heads that move together (the query heads of one KV head)
    units, feat = dims[-2] // per_unit, dims[-1] * per_unit
    replicas = math.prod(dims[:-2])
    prod = Producer(src.node, -1, src.weight, src.bias, src.weight_dim, replicas=replicas, unit_rows=feat,
                    units=units, parent=parent, offset=src.offset, piece=src.piece)
    sid = c.new_space(prod, units)
    if parent in c.revived:
        c.revived.add(sid)
    c.split_parents[parent] = f"split into units of {units} x {feat} by {node.name}: deleted through that group"
    return Label(j0 + len(dims) - 2, (Seg(sid, units, expand=per_unit),))


def _unbind(gm, node, c, labels, spec):  # unbind(x, dim) -> tuple; items keep the label (dim shifted)
    lab = _only_label(node, labels)
    if lab is None:
        return None
    rank = len(shape_of(node.args[0]) or ())
    dim = _norm_dim(spec.arg(node, "dim", 0), rank)
    if dim == lab.dim:
        c.block(lab, f"unbind over the channels: {node.format_node()}")
        return None
    return Label(lab.dim - (dim < lab.dim), lab.segs)


def _same_label(labs: list[Label | None]) -> bool:
    return all(lab is not None for lab in labs) and len({(lab.dim, lab.segs) for lab in labs}) == 1


def _heads_alike(c: Coupling, node: fx.Node, labs: list[Label | None], rank: int) -> Label | None:
    """Operands of an attention product with one head layout on a batch dim: the label (separate
    projections' head spaces are tied: head h of each operand only meets head h of the others).
    Grouped-query attention (a KV head repeated for R query heads) asks the next pass to group the
    query heads R to a unit, so that a KV head and its query heads move together."""
    if not all(lab is not None and lab.dim < rank - 2 for lab in labs):
        return None
    if _same_label(labs):
        return labs[0]
    if not all(_same_layout(labs[0], lab) for lab in labs[1:]):
        asked = [_request_head_groups(c, lab, other) for lab in labs for other in labs if lab is not other]
        if any(asked):
            for lab in labs:
                c.block(lab, "query heads grouped by their KV head on the next pass")
        return None
    for lab in labs[1:]:
        _tie(c, labs[0], lab, "attention", node)
    return labs[0]


def _repeated_heads(lab: Label | None, heads: int) -> Label | None:
    """``sdpa(..., enable_gqa=True)``: each of a key's KV heads stands for ``heads / KV`` query heads,
    as if repeated (then the query heads are grouped alike)."""
    if lab is None or len(lab.segs) != 1 or lab.segs[0].expand != 1 or heads % lab.width or heads == lab.width:
        return lab
    return Label(lab.dim, (replace(lab.segs[0], expand=heads // lab.width),))


def _request_head_groups(c: Coupling, lab: Label, repeated: Label) -> bool:
    """``lab`` is a plain head split of H heads, ``repeated`` H/R heads each repeated R times: ask for
    ``lab``'s heads in units of R (True when asked)."""
    if len(lab.segs) != 1 or len(repeated.segs) != 1 or lab.dim != repeated.dim or lab.width != repeated.width:
        return False
    seg, rep = lab.segs[0], repeated.segs[0]
    if seg.space is None or seg.expand != 1 or seg.replicas != 1 or rep.expand == 1 or rep.replicas != 1:
        return False
    prod = c.producers[seg.space]
    if prod.parent is None or prod.replicas != 1:
        return False
    split = c.producers[prod.parent].name  # the projection (or the piece of a fused one) split into heads
    if c.head_groups.get(split, 1) != 1:
        return False
    c.head_group_requests.setdefault(split, rep.expand)
    return True


def _sdpa(gm, node, c, labels, spec):  # F.scaled_dot_product_attention(q, k, v): heads are independent
    q, k, v = (spec.arg(node, name) for name in ("query", "key", "value"))
    labs = [labels.get(t) if isinstance(t, fx.Node) else None for t in (q, k, v)]
    if spec.arg(node, "enable_gqa", False) is True and labs[0] is not None:  # KV heads not repeated in the graph
        labs = [labs[0], *(_repeated_heads(lab, labs[0].width) for lab in labs[1:])]
    rank = len(shape_of(node) or ())
    out = _heads_alike(c, node, labs, rank)
    if out is None:
        _block_inputs(c, node, labels, "attention over labels that are not one head space on a batch dim")
        return None
    mask = spec.arg(node, "attn_mask")
    shape = shape_of(mask) if isinstance(mask, fx.Node) else None
    d = out.dim - (rank - len(shape)) if shape is not None else -1
    if d >= 0 and shape[d] != 1:  # a mask (a position bias) per head: deleted with the heads, or it blocks
        ml = labels.get(mask)
        if ml is not None and ml.dim == d and _same_layout(ml, out):
            _tie(c, out, ml, "attention mask", node)
        elif ml is not None or not _sliced_operand(gm, c, out, mask, rank):  # a fixed per-head table: sliced
            _block_inputs(c, node, labels, f"an attention mask that varies over the heads: {node.format_node()}")
            return None
    return out


def _matmul(gm, node, c, labels, spec):  # q @ k^T, attn @ v: a head label on a batch dim passes through
    labs = [labels.get(a) if isinstance(a, fx.Node) else None for a in node.args[:2]]
    out = _heads_alike(c, node, labs, len(shape_of(node) or ()))
    if out is None:
        _block_inputs(c, node, labels, "matmul over the channels")
    return out


def _softmax(gm, node, c, labels, spec):  # softmax over a dim other than the channels: pass-through
    lab = _only_label(node, labels)
    if lab is None:
        return None
    rank = len(shape_of(node) or ())
    dim = gm.get_submodule(str(node.target)).dim if node.op == "call_module" else spec.arg(node, "dim")
    if dim is None or _norm_dim(dim, rank) == lab.dim:
        c.block(lab, f"softmax over the channels: {node.format_node()}")
        return None
    return lab


def _permute(gm, node, c, labels, spec):  # permute(x, dims) / x.permute(*dims)
    lab = _only_label(node, labels)
    if lab is None:
        return None
    dims = node.args[1:] if node.op == "call_method" else (spec.arg(node, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    rank = len(shape_of(node) or ())
    dims = [_norm_dim(d, rank) for d in dims]
    return Label(dims.index(lab.dim), lab.segs)


def _transpose(gm, node, c, labels, spec):  # transpose(x, d0, d1)
    lab = _only_label(node, labels)
    if lab is None:
        return None
    rank = len(shape_of(node) or ())
    d0, d1 = (_norm_dim(d, rank) for d in node.args[1:3])
    dim = d1 if lab.dim == d0 else d0 if lab.dim == d1 else lab.dim
    return Label(dim, lab.segs)


def _reduce(gm, node, c, labels, spec):
    """mean/sum/amax over dims: the label passes unless the channel dim is reduced. A mean over the
    channel dim alone of one plain space is made mask-aware (the open channels' mean: MaskedMean in
    the gated model, the kept channels' mean after the fold); any other reduction over it blocks."""
    lab = _only_label(node, labels)
    if lab is None:
        return None
    ins = shape_of(node.args[0])
    if node.op == "call_module":  # a gated model's MaskedMean
        mod = gm.get_submodule(str(node.target))
        dims, keep = mod.dim, mod.keepdim
    else:
        dims, keep = spec.arg(node, "dim"), spec.arg(node, "keepdim", False)
    if ins is None or dims is None:
        c.block(lab, f"reduction over all dims: {node.format_node()}")
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [_norm_dim(d, len(ins)) for d in dims]
    if lab.dim in dims:
        seg = lab.segs[0]
        if (spec.name in ("mean", "MaskedMean") and dims == [lab.dim] and len(lab.segs) == 1
                and seg.space is not None and seg.expand == 1 and seg.replicas == 1):
            c.means.append(NormUse(node.name, lab))
        else:
            c.block(lab, f"reduction over the channels: {node.format_node()}")
        return None
    new_dim = lab.dim if keep else lab.dim - sum(d < lab.dim for d in dims)
    return Label(new_dim, lab.segs)


def _pool(gm, node, c, labels, spec):  # spatial pooling / interpolation: channels untouched
    return _only_label(node, labels)


def _shift(gm, node, c, labels, spec):
    """roll / flip / pad: elements move along the dims named, the channels untouched unless the
    channel dim is one of them; a constant pad value other than 0 revives closed channels."""
    lab = _only_label(node, labels)
    if lab is None:
        return None
    rank = len(shape_of(node) or ())
    if spec.name == "pad":
        pads = spec.arg(node, "pad")
        moved = [rank - 1 - i for i in range(len(pads) // 2) if pads[2 * i] or pads[2 * i + 1]]
        value = spec.arg(node, "value")
        if spec.arg(node, "mode", "constant") == "constant" and value not in (None, 0, 0.0):
            c.revived.update(lab.spaces())
    else:
        dims = spec.arg(node, "dims")
        moved = None if dims is None else [_norm_dim(d, rank) for d in ((dims,) if isinstance(dims, int) else dims)]
    if moved is None or lab.dim in moved:
        c.block(lab, f"{spec.name} over the channels: {node.format_node()}")
        return None
    return lab


def _getitem(gm, node, c, labels, spec):  # x[idx] on a tensor: the channel dim must be taken whole
    lab = _only_label(node, labels)
    if lab is None:
        return None
    if _tuple_valued(node.args[0]):
        items = c.items.get(node.args[0].name)
        if items is None:
            return lab  # an item of unbind's tuple
        return items[node.args[1]] if isinstance(node.args[1], int) else None
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
        c.block(lab, f"indexing with ...: {node.format_node()}")
        return None
    dim_in = dim_out = 0
    for pos, i in enumerate(idx):
        if i is None:
            dim_out += 1
            continue
        if dim_in == lab.dim:
            if isinstance(i, slice) and i.step in (None, 1):
                start, stop, _ = i.indices(lab.width)
                if (start, stop) == (0, lab.width):
                    return Label(dim_out, lab.segs)
                pos = pos if isinstance(node.args[1], tuple) else -1
                piece = _cut(c, node, lab, [(start, stop)], "getitem", pos)[0] if start < stop else None
                return Label(dim_out, piece.segs) if piece is not None else None
            c.block(lab, f"indexing into the channels: {node.format_node()}")
            return None
        if isinstance(i, int):
            dim_in += 1
        elif isinstance(i, slice):
            dim_in += 1
            dim_out += 1
        else:
            c.block(lab, f"advanced indexing: {node.format_node()}")
            return None
    return Label(lab.dim - dim_in + dim_out, lab.segs)


def _unsqueeze(gm, node, c, labels, spec):  # unsqueeze(x, dim): a size-1 dim inserted
    lab = _only_label(node, labels)
    out = shape_of(node)
    if lab is None or out is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return Label(lab.dim + (_norm_dim(dim, len(out)) <= lab.dim), lab.segs)


def _expand(gm, node, c, labels, spec):  # expand(x, sizes): broadcasts size-1 dims (new ones in front)
    """The label passes (shifted by the dims added in front); the size written for the channel dim
    follows the kept width after the fold."""
    lab = _only_label(node, labels)
    ins, outs = shape_of(node.args[0]), shape_of(node)
    if lab is None or ins is None or outs is None:
        return None
    out = Label(lab.dim + len(outs) - len(ins), lab.segs)
    c.shape_args.append(ShapeArg(node.name, out.dim, out))
    return out


def _slice(gm, node, c, labels, spec):  # aten.slice(x, dim, start, end, step)
    """As ``x[..., start:end:step]`` on one dim: another dim passes the label, the channel dim must
    be taken whole or as one run of step 1 (cut there, as narrow)."""
    lab = _only_label(node, labels)
    shape = shape_of(node.args[0])
    if lab is None or shape is None:
        return None
    dim = _norm_dim(spec.arg(node, "dim", 0), len(shape))
    if dim != lab.dim:
        return lab
    step = spec.arg(node, "step", 1)
    start, stop, _ = slice(spec.arg(node, "start"), spec.arg(node, "end"), step).indices(lab.width)
    if step != 1 or not start < stop:
        c.block(lab, f"slicing the channels with a step or to nothing: {node.format_node()}")
        return None
    if (start, stop) == (0, lab.width):
        return lab
    return _cut(c, node, lab, [(start, stop)], "narrow")[0]


def _select(gm, node, c, labels, spec):  # aten.select(x, dim, index): one index along dim, dim dropped
    lab = _only_label(node, labels)
    shape = shape_of(node.args[0])
    if lab is None or shape is None:
        return None
    dim = _norm_dim(spec.arg(node, "dim"), len(shape))
    if dim == lab.dim:
        c.block(lab, f"selecting one channel: {node.format_node()}")
        return None
    return Label(lab.dim - (dim < lab.dim), lab.segs)


def _embedding(gm, node, c, labels, spec):  # aten.embedding(weight, indices): rows of a table
    """A look-up produces a new space on its output's last dim: the table's columns (its dim 1),
    sliced like a linear layer's rows."""
    wt = param_target(gm, spec.arg(node, "weight"))
    out = shape_of(node)
    if wt is None or wt not in c.parameters or out is None:
        return None
    width = c.parameters[wt].shape[1]
    return Label(len(out) - 1, (Seg(c.new_space(Producer(node.name, -1, wt, None, 1), width), width),))


def _block(gm, node, c, labels, spec):  # an op that mixes the channels (e.g. layer_norm over them)
    _block_inputs(c, node, labels, spec.block_reason)


def _no_channels(gm, node, c, labels, spec):  # shape reads (checked by _check_width_reads), gates
    lab = _only_label(node, labels)
    if lab is not None and spec.reads_sizes and (node.op == "call_method" or node.args[1:] == ("shape",)
                                                 or spec.name == "sym_size"):
        c.shape_reads.append((node.name, lab))
    return None


def _plain_module_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A conv/linear leaf called on one positional input, with zeros padding: like its functional op."""
    mod = gm.get_submodule(str(node.target))
    return len(node.args) == 1 and not node.kwargs and getattr(mod, "padding_mode", "zeros") == "zeros"


def _conv_module(gm, node, c, labels, spec):  # a plain nn.ConvNd leaf: as the functional conv
    if not _plain_module_call(gm, node):
        return _unsupported_module(gm, node, c, labels, spec)
    return _module_weight(gm, node, c, labels, gm.get_submodule(str(node.target)), str(node.target), "conv")


def _linear_module(gm, node, c, labels, spec):  # a plain nn.Linear leaf: as F.linear
    if not _plain_module_call(gm, node):
        return _unsupported_module(gm, node, c, labels, spec)
    return _module_weight(gm, node, c, labels, gm.get_submodule(str(node.target)), str(node.target), "linear")


def _batch_norm_module(gm, node, c, labels, spec):  # a BatchNorm leaf: its parameters and statistics are sliced
    path = str(node.target)
    mod = gm.get_submodule(path)
    x = node.args[0] if node.args else None
    tensors = [(name, f"{path}.{name}") for name in ("weight", "bias", "running_mean", "running_var")
               if getattr(mod, name, None) is not None]
    return _batch_norm(c, node, labels.get(x) if isinstance(x, fx.Node) else None, tensors, module=path)


def _unsupported_module(gm, node, c, labels, spec):
    mod = gm.get_submodule(str(node.target))
    _block_inputs(c, node, labels, f"leaf module {node.target} ({type(mod).__name__}) is not in the support table")


def _unsupported(gm, node, c, labels, spec):
    """An op outside the table: it passes the channels if probing shows it acts on each channel alone
    (:func:`_probe_channelwise`); otherwise it blocks them."""
    lab = _only_label(node, labels)
    found = _probe_channelwise(gm, node, lab) if lab is not None else "no labelled first operand"
    if isinstance(found, int):
        return Label(found, lab.segs)
    if node.op == "call_module":
        return _unsupported_module(gm, node, c, labels, spec)
    name = getattr(node.target, "__name__", str(node.target))
    _block_inputs(c, node, labels, f"{name} is not in the channel support table ({found})")
    return None


def _node_function(gm: fx.GraphModule, node: fx.Node) -> Callable[..., Any] | str:
    """What a call node calls, or why it cannot be replayed outside the graph."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if next(itertools.chain(mod.parameters(), mod.buffers()), None) is not None:
            return "a leaf module with parameters"
        return mod
    if node.op == "call_method":
        return lambda t, *a, **k: getattr(t, str(node.target))(*a, **k)
    return node.target


def _replay(gm: fx.GraphModule, chain: list[fx.Node], src: fx.Node) -> Callable[[torch.Tensor], Any] | str:
    """The ops of ``chain`` (each reading the one before, the first reading ``src``) as a function
    of ``src``'s value, every other operand a constant (a literal, a size recorded on the example
    inputs, a tensor attribute); or why they cannot be replayed so."""
    steps, prev, missing = [], src, []
    for node in chain:
        fn = _node_function(gm, node)
        if isinstance(fn, str):
            return fn

        def value(a: Any, prev: fx.Node = prev) -> Any:
            if a is prev or not isinstance(a, fx.Node):
                return a
            if a.op == "get_attr":
                return functools.reduce(getattr, str(a.target).split("."), gm)
            if VALUE_META not in a.meta:
                missing.append(a.name)
            return a.meta.get(VALUE_META)

        steps.append((fn, prev, fx.node.map_aggregate(node.args, value), fx.node.map_aggregate(node.kwargs, value)))
        prev = node
    if missing:
        return f"operands that are not constants: {missing}"

    def run(t: torch.Tensor) -> Any:
        for fn, reads, args, kwargs in steps:
            t = fn(*fx.node.map_aggregate(args, lambda a, reads=reads, t=t: t if a is reads else a), **kwargs)
        return t

    return run


def _probe_channelwise(gm: fx.GraphModule, node: fx.Node, lab: Label) -> int | str:
    """An op outside the table, run on random inputs of the example shape: the output dim carrying
    the channels of its first operand if it acts on each of them alone (:func:`_channelwise_dim`),
    or why not."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    tm = x.meta.get("tensor_meta")
    if shape_of(x) is None or not tm.dtype.is_floating_point:
        return "no floating-point example shape"
    call = _replay(gm, [node], x)
    if isinstance(call, str):
        return call
    return _channelwise_dim(call, shape_of(x), tm.dtype, lab.dim, lab.width, shape_of(node))


def _channelwise_dim(call: Callable[[torch.Tensor], Any], shape: tuple[int, ...], dtype: torch.dtype, dim: int,
                     width: int, out_shape: tuple[int, ...] | None) -> int | str:
    """The output dim of ``call`` that carries input dim ``dim``'s ``width`` channels one by one, or why
    there is none. ``call`` must be deterministic, and for a random half of the channels, taking them
    alone must give exactly those channels of the output (so the fold may call it narrower), and
    zeroing the others must leave those exactly zero and the kept ones unchanged (a closed channel
    stays closed and leaks into no open one). Window partition/reverse functions, ops that move
    elements along other dims and per-element ops pass."""
    if out_shape is None or width < 2:
        return "no example shape"
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=gen, dtype=dtype)
    kept = torch.randperm(width, generator=gen)[: width // 2].sort().values
    closed = torch.tensor(sorted(set(range(width)) - set(kept.tolist())), dtype=torch.long)
    try:
        with torch.no_grad():
            y, again = call(t), call(t)
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != out_shape or not torch.equal(y, again):
                return "not a deterministic tensor of the recorded shape"
            alone = call(t.index_select(dim, kept))
            zeroed = call(t.index_fill(dim, closed, 0.0))
    except Exception as exc:  # noqa: BLE001 - any failure means "not channelwise"
        return f"fails on a narrower input ({type(exc).__name__})"
    aligned = dim - len(shape) + len(out_shape)
    why = "mixes the channels"
    for d in sorted((d for d in range(len(out_shape)) if out_shape[d] == width), key=lambda d: d != aligned):
        y_kept = y.index_select(d, kept)
        if alone.shape != y_kept.shape or not torch.equal(alone, y_kept):
            continue
        if not torch.equal(zeroed.index_select(d, kept), alone):
            continue
        if zeroed.index_select(d, closed).any():
            why = "makes a zeroed channel non-zero"
            continue
        return d
    return why


#: ChannelRule (named by each op's entry in hyperflux_fx.ops) -> its code.
RULES: dict[ChannelRule, Rule] = {
    ChannelRule.CONV: _f_conv,
    ChannelRule.CONV_TRANSPOSE: _f_conv_t,
    ChannelRule.LINEAR: _f_linear,
    ChannelRule.MM: _mm,
    ChannelRule.CONV_MODULE: _conv_module,
    ChannelRule.LINEAR_MODULE: _linear_module,
    ChannelRule.BATCH_NORM: _f_batch_norm,
    ChannelRule.BATCH_NORM_MODULE: _batch_norm_module,
    ChannelRule.NORM: _norm,
    ChannelRule.ELEMENTWISE: _elementwise,
    ChannelRule.ADD: _binary("add"),
    ChannelRule.SUB: _binary("sub"),
    ChannelRule.MUL: _binary("mul"),
    ChannelRule.DIV: _binary("div"),
    ChannelRule.CAT: _cat,
    ChannelRule.WHERE: _where,
    ChannelRule.RESHAPE: _reshape_like,
    ChannelRule.SHAPE_OF: _shape_of_other,
    ChannelRule.PERMUTE: _permute,
    ChannelRule.TRANSPOSE: _transpose,
    ChannelRule.REDUCE: _reduce,
    ChannelRule.SPATIAL: _pool,
    ChannelRule.GETITEM: _getitem,
    ChannelRule.SLICE: _slice,
    ChannelRule.UNSQUEEZE: _unsqueeze,
    ChannelRule.EXPAND: _expand,
    ChannelRule.SELECT: _select,
    ChannelRule.EMBEDDING: _embedding,
    ChannelRule.SHIFT: _shift,
    ChannelRule.ADDCMUL: _addcmul,
    ChannelRule.SOFTMAX: _softmax,
    ChannelRule.ATTENTION: _sdpa,
    ChannelRule.MATMUL: _matmul,
    ChannelRule.UNBIND: _unbind,
    ChannelRule.SPLIT: _split,
    ChannelRule.BLOCK: _block,
    ChannelRule.NO_CHANNELS: _no_channels,
}


def _module_weight(gm, node, c, labels, mod, path, kind):
    """A conv/linear leaf module: as the functional op, parameters under the module's path."""
    x = node.args[0]
    in_label = labels.get(x) if isinstance(x, fx.Node) else None
    out_shape = shape_of(node)
    if out_shape is None:
        c.block(in_label, f"{kind} without shape information: {node.format_node()}")
        return None
    wt, bt = f"{path}.weight", (f"{path}.bias" if mod.bias is not None else None)
    groups = getattr(mod, "groups", 1)
    in_ch, out_ch = (mod.in_channels, mod.out_channels) if kind == "conv" else (mod.in_features, mod.out_features)
    ch_dim = len(out_shape) - 1 if kind == "linear" else 1
    if kind == "conv" and groups > 1 and groups == in_ch:  # its groups would follow the channel count
        return _blocked_output(c, node, in_label, wt, bt, 0, out_ch, ch_dim,
                               f"depthwise conv module (functionalise it with insert_gates first): {path}")
    if kind == "conv" and groups > 1:  # the group count stays: the sliced weight sets the module's sizes
        return _grouped_conv(c, node, x, in_label, wt, bt, groups, in_ch, out_ch)
    return _consume_produce(c, node, x, in_label, kind=kind, wt=wt, bt=bt, in_ch=in_ch, out_ch=out_ch, ch_dim=ch_dim,
                            w_in=1, w_out=0)


def analyze_channels(gm: fx.GraphModule) -> Coupling:
    """Propagate channel labels through ``gm`` (which must carry ``tensor_meta``, see
    :func:`hyperflux_fx.frontend.trace.propagate_shapes`) and return spaces, ties, consumers and blocks.

    A pass may find that a space must be split over conv groups (a grouped conv reads it, or an add
    ties it to such a space) or cut into pieces (a split, chunk, narrow or slice takes part of it, or
    an add ties it to a space cut so): the analysis then runs again with those spaces split or cut
    from their producer on, until no pass asks for more (each pass adds a split or a cut)."""
    split: dict[str, int] = {}
    cuts: dict[str, frozenset[int]] = {}
    heads: dict[str, int] = {}
    while True:
        c = _analyze(gm, split, cuts, heads)
        new = {k: v for k, v in c.requests.items() if k not in split}
        new_cuts = {k: cuts.get(k, frozenset()) | v for k, v in c.cut_requests.items()
                    if not v <= cuts.get(k, frozenset())}
        new_heads = {k: v for k, v in c.head_group_requests.items() if k not in heads}
        if not new and not new_cuts and not new_heads:
            return c
        split.update(new)
        cuts.update(new_cuts)
        heads.update(new_heads)


def _analyze(gm: fx.GraphModule, split: dict[str, int], cuts: dict[str, frozenset[int]],
             heads: dict[str, int] | None = None) -> Coupling:
    """One pass of :func:`analyze_channels`: the spaces of ``split``'s producers split over conv groups,
    those of ``cuts``' cut into pieces, the head splits of ``heads``' in units of that many heads."""
    c = Coupling(parameters=dict(gm.named_parameters()), buffers=dict(gm.named_buffers()), split=dict(split),
                 cuts=dict(cuts), head_groups=dict(heads or {}))
    labels: dict[fx.Node, Label] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            for n in node.all_input_nodes:
                c.block(labels.get(n), OUTPUT_REASON)
            continue
        spec = node_spec(gm, node)
        rule = RULES[spec.channel_rule] if spec is not None and spec.channel_rule is not None else _unsupported
        _keep_label(c, labels, node, rule(gm, node, c, labels, spec))
    _check_head_splits(c)
    _check_width_reads(gm, c)
    _block_shared_weights(c)
    return c


def _check_width_reads(gm: fx.GraphModule, c: Coupling) -> None:
    """A channel count read at run time (``b, n, c = x.shape``, ``x.size(1)``) may only size the
    reshape dim that carries those channels (the fold writes the kept count there) or a norm over
    them (its normalized_shape goes with the masked norm in its place); any other use
    (``c // heads``, a scale, a loop bound) would see the narrower width after the fold and compute
    something else, so it blocks the channels."""
    nodes = {n.name: n for n in gm.graph.nodes}
    written = {(sa.node, sa.dim) for sa in c.shape_args}
    normed = {use.node for use in c.norms}  # a norm's normalized_shape: rewritten by the mask, then the fold
    for name, lab in c.shape_reads:
        read = nodes[name]
        rank = len(shape_of(read.args[0]) or ())
        if (read.op == "call_method" or read.target is not getattr) and len(read.args) + len(read.kwargs) > 1:
            # x.size(d), aten.sym_size(x, d)
            d = read.args[1] if len(read.args) > 1 else next(iter(read.kwargs.values()))
            widths = [read] if _norm_dim(d, rank) == lab.dim else []
        else:
            widths = [u for u in read.users if not _width_free_item(gm, u, lab.dim, rank)]
        for width in widths:
            for use in width.users:
                if use.name not in normed and not any((use.name, d) in written and _size_arg(use, d) is width
                                                      for d in range(rank + 1)):
                    c.block(lab, f"the channel count is read at run time and used to compute: {use.format_node()}")


def _width_free_item(gm: fx.GraphModule, use: fx.Node, dim: int, rank: int) -> bool:
    """``shape[i]`` for a dim ``i`` other than the channel dim."""
    spec = node_spec(gm, use)
    if spec is None or spec.channel_rule is not ChannelRule.GETITEM or not isinstance(use.args[1], int):
        return False
    return _norm_dim(use.args[1], rank) != dim


def _size_arg(node: fx.Node, dim: int) -> Any:
    """The size argument of a reshape/view node for output dim ``dim`` (None when out of range)."""
    args = node.args
    sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    return sizes[dim] if dim < len(sizes) else None


def _keep_label(c: Coupling, labels: dict[fx.Node, Label], node: fx.Node, out: Label | None) -> None:
    """Record a node's output label after checking it against the node's shape."""
    if out is None:
        return
    if _tuple_valued(node):
        labels[node] = out  # a tuple of tensors (unbind/split): checked where its items are taken
        return
    shape = shape_of(node)
    if shape is None or out.dim >= len(shape) or shape[out.dim] != out.width:
        c.block(out, f"channel bookkeeping lost track (shape {shape}, label width {out.width}): {node.format_node()}")
    else:
        labels[node] = out
        c.labels[node.name] = out


def _check_head_splits(c: Coupling) -> None:
    """A head space deletes rows of its parent's producer: only if nothing else uses the parent space."""
    for sid, prod in c.producers.items():
        if prod.parent is None:
            continue
        parent = prod.parent
        others = c.blocks[parent]
        used = any(parent in cons.label.spaces() for cons in c.consumers) or any(
            cp.space == parent for cp in c.params) or c.ties.degree(parent) > 0
        if others or used:
            c.blocks[sid].append(f"the split space is also used elsewhere: {'; '.join(others) or 'consumed/tied'}")


def _block_shared_weights(c: Coupling) -> None:
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


def consumer_input(cons: Consumer, nodes: dict[str, fx.Node]) -> Any:
    """The operand a consumer reads its channels from (``nodes``: the graph's nodes by name)."""
    return nodes[cons.input] if cons.input is not None else nodes[cons.node].args[0]


def group_consumers(c: Coupling, group: Group) -> list[Consumer]:
    """The consumers that read some of ``group``'s channels."""
    spaces = set(group.spaces)
    return [cons for cons in c.consumers if any(s in spaces for s in cons.label.spaces())]


def label_keep(label: Label, keep: dict[int, torch.Tensor], group_of: dict[int, int]) -> torch.Tensor | None:
    """Kept feature positions along a label's dim, given the kept units of each group (None when
    nothing is deleted there)."""
    parts, offset, changed = [], 0, False
    for seg in label.segs:
        gid = group_of.get(seg.space) if seg.space is not None else None
        width = seg.width
        if gid is not None and gid in keep:
            idx = keep[gid]
            changed = changed or idx.numel() != seg.length
            pos = seg.positions(idx) + offset
        else:
            pos = torch.arange(offset, offset + width)
        parts.append(pos)
        offset += width
    return torch.cat(parts) if changed else None


def parent_keep(c: Coupling, keep: dict[int, torch.Tensor], group_of: dict[int, int]) -> dict[int, torch.Tensor]:
    """``keep`` plus, for every space split into heads, the units its head space keeps (its rows of
    the kept heads): a reshape that still carries the parent space before the head split (GPT-2's
    ``view(B, S, 3C)``) writes that kept width."""
    out = dict(keep)
    for sid, prod in c.producers.items():
        gid, pid = group_of.get(sid), group_of.get(prod.parent) if prod.parent is not None else None
        if gid in keep and pid is not None and pid not in keep:
            out[pid] = (prod.rows(keep[gid]) - prod.offset).sort().values
    return out


def _gone_units(c: Coupling, sid: int, keep: dict[int, torch.Tensor], group_of: dict[int, int]) -> torch.Tensor | None:
    """The units of space ``sid`` its group deletes (None when the group deletes nothing)."""
    gid = group_of.get(sid)
    if gid is None or gid not in keep:
        return None
    gone = torch.ones(c.sizes[sid], dtype=torch.bool)
    gone[keep[gid]] = False
    return torch.nonzero(gone).flatten()


def _kept_positions(c: Coupling, dropped: list[tuple[str, int, torch.Tensor]]) -> dict[tuple[str, int], torch.Tensor]:
    """Per (tensor, dim) named in ``dropped`` (target, dim, positions deleted): the positions kept."""
    kept: dict[tuple[str, int], torch.Tensor] = {}
    for target, dim, positions in dropped:
        if (target, dim) not in kept:
            t = c.parameters[target] if target in c.parameters else c.buffers[target]
            kept[(target, dim)] = torch.ones(t.shape[dim], dtype=torch.bool)
        kept[(target, dim)][positions] = False
    return {key: torch.nonzero(k).flatten() for key, k in kept.items()}


def producer_keep(c: Coupling, keep: dict[int, torch.Tensor],
                  group_of: dict[int, int]) -> dict[tuple[str, int], torch.Tensor]:
    """Kept rows of every producer weight (and bias) that loses some: each space made by the op (one,
    or one per piece of a cut output) drops the rows of its group's deleted units."""
    dropped = []
    for sid, prod in c.producers.items():
        gone = _gone_units(c, sid, keep, group_of)
        if gone is not None:
            rows = prod.rows(gone)
            dropped += [(t, dim, rows) for t, dim in ((prod.weight, prod.weight_dim), (prod.bias, 0)) if t is not None]
    return _kept_positions(c, dropped)


def param_keep(c: Coupling, keep: dict[int, torch.Tensor],
               group_of: dict[int, int]) -> dict[tuple[str, int], torch.Tensor]:
    """Kept positions of every (per-channel parameter or buffer, dim) that loses some: each of its runs
    (:class:`ChannelParam`) drops the positions of its group's deleted units; the rest is kept."""
    dropped = []
    for cp in c.params:
        gone = _gone_units(c, cp.space, keep, group_of)
        if gone is not None:
            dropped.append((cp.target, cp.dim, cp.seg(c.sizes[cp.space]).positions(gone) + cp.offset))
    return _kept_positions(c, dropped)


def dead_units(gm: fx.GraphModule, c: Coupling, group: Group,
               params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Units of ``group`` whose producer rows (and biases) are all exactly zero in every producer
    (a bool per unit): zeroed by weight masks alone. Heads own several rows each. ``params``
    overrides the coupling's parameters (e.g. with weight masks applied)."""
    params = c.parameters if params is None else params
    dead = torch.ones(group.size, dtype=torch.bool)
    for sid in group.spaces:
        prod = c.producers[sid]
        w = params[prod.weight].detach()
        rows = w.movedim(prod.weight_dim, 0).reshape(w.shape[prod.weight_dim], -1)
        zero_rows = (rows == 0).all(dim=1).cpu()
        if prod.bias is not None:
            zero_rows &= (params[prod.bias].detach() == 0).cpu()
        dead &= zero_rows[prod.rows_per_unit(torch.arange(group.size))].all(dim=1)
    return dead


def round_field(group: Group) -> str | None:
    """The FoldConfig field ``group``'s kept count is rounded by: ``round_to`` for conv channels,
    ``round_to_width`` for every other width (linear/matmul features), None for heads (never rounded)."""
    if group.unit == "head":
        return None
    return "round_to" if group.conv else "round_to_width"


def round_multiple(group: Group, config: FoldConfig) -> int:
    """The multiple ``group``'s kept count is rounded to (:func:`round_field`; 1 for heads)."""
    if not isinstance(config.round_to, int) or not isinstance(config.round_to_width, int):
        raise ValueError("round_multiple needs a resolved FoldConfig (analysis.runtime.resolve_fold_config)")
    field_name = round_field(group)
    return 1 if field_name is None else getattr(config, field_name)


def kept_count(group: Group, n_closed: int, config: FoldConfig) -> int:
    """Units ``group`` keeps when ``n_closed`` are closed: at least ``config.min_channels``, rounded up
    to a multiple of :func:`round_multiple` (never above its size). A normalised group (a norm's
    statistics count its channels) keeps exactly its open units: a closed one kept would enter the
    folded norm's statistics."""
    size = group.size
    if n_closed == 0:
        return size
    if group.normalised and n_closed < size:
        return size - n_closed
    n_keep = max(size - n_closed, config.min_channels)
    multiple = round_multiple(group, config)
    return min(size, math.ceil(n_keep / multiple) * multiple)


def plan_keep(group: Group, closed: torch.Tensor, strength: torch.Tensor, config: FoldConfig) -> torch.Tensor | None:
    """The units ``group`` keeps (a bool per unit; None when nothing is deleted): the open ones, plus
    the strongest closed ones that :func:`kept_count` asks for."""
    n_closed = int(closed.sum())
    if not group.deletable or n_closed == 0:
        return None
    kept = ~closed
    extra = kept_count(group, n_closed, config) - int(kept.sum())
    if extra > 0:
        cand = torch.nonzero(closed).flatten()
        kept[cand[torch.argsort(strength[cand], descending=True)][:extra]] = True
    return kept
