"""The vocabulary of the channel analysis: spaces, labels, producers, consumers and groups.

Every conv / linear output creates a *channel space* (its output channels). A :class:`Label` says which
runs of which spaces lie along one dim of a tensor; the rules (:mod:`.rules`) propagate labels forward
through the graph and record what the fold must slice in a :class:`Coupling`. Ties between spaces
make *groups*, deleted together. This module holds the records and the small helpers every rule
uses; it imports nothing else of the analysis."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx
import torch
from torch import fx

from hyperflux_fx.ir import WeightGate
from hyperflux_fx.ops import OpSpec

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
    """Which dim of a tensor carries channels, and who owns them.

    The runs lie one after another along the dim, unless a channel shuffle permuted them: then
    ``order[p]`` is the position, in the runs laid one after another, of the channel at position ``p``
    (:func:`placed` maps the one layout to the other)."""

    dim: int
    segs: tuple[Seg, ...]
    order: tuple[int, ...] | None = None

    @property
    def width(self) -> int:
        return sum(s.width for s in self.segs)

    def spaces(self) -> list[int]:
        return [s.space for s in self.segs if s.space is not None]


def permuted(dim: int, segs: tuple[Seg, ...], order: list[int] | tuple[int, ...]) -> Label:
    """A label whose channels lie in ``order`` (:class:`Label`); none kept when it is the runs' own."""
    order = tuple(order)
    return Label(dim, segs, None if order == tuple(range(len(order))) else order)


def placed(order: tuple[int, ...] | None, positions: torch.Tensor) -> torch.Tensor:
    """Where ``positions`` of the runs laid one after another sit along a dim permuted by ``order``
    (:class:`Label`), sorted; unchanged when there is no order."""
    if order is None:
        return positions
    at = torch.empty(len(order), dtype=torch.long)
    at[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return at[positions].sort().values


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


@dataclass
class Shuffle:
    """A channel shuffle (``view(g, C/g)``, ``transpose``, ``view(C)``): a fixed permutation of the
    channels, which the fold turns into a gather of the kept ones when it deletes some."""

    first: str  # the view splitting the channels into (groups, C / groups); its input is the shuffle's
    last: str  # the view merging them back, transposed; its output is the shuffle's
    nodes: tuple[str, ...]  # every node of the pattern, first to last
    groups: int
    source: Label  # the channels going in
    label: Label  # the channels coming out

    def sources(self) -> torch.Tensor:
        """For each output position, the input position it takes."""
        return torch.tensor(shuffle_sources(self.source.width, self.groups), dtype=torch.long)


def shuffle_sources(width: int, groups: int) -> list[int]:
    """The input position each output position of a channel shuffle takes: position p of the output,
    (p div g, p mod g) of the transposed (C/g, g) view, is (p mod g, p div g) of the (g, C/g) one."""
    return [(p % groups) * (width // groups) + p // groups for p in range(width)]


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
    groups_arg: tuple[str, int, int] | None = None  # a depthwise conv's groups: (node, arg index, multiplier)
    offset: int = 0  # where the space's run starts along dim
    expand: int = 1  # as Seg: features per unit (a depthwise conv with a channel multiplier: the multiplier)
    replicas: int = 1  # as Seg (a space split over conv groups)
    order: tuple[int, ...] | None = None  # as Label: the dim's channels permuted by a channel shuffle

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
    rows: dict[str, int] = field(default_factory=dict)  # producer node -> consecutive rows per unit of its space
    rows_requests: dict[str, int] = field(default_factory=dict)  # units of several rows found needed
    requests: dict[str, int] = field(default_factory=dict)  # splits this pass found needed (for the next)
    cuts: dict[str, frozenset[int]] = field(default_factory=dict)  # producer node -> rows its space is cut at
    cut_requests: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # cuts found needed
    head_groups: dict[str, int] = field(default_factory=dict)  # producer (piece) name -> query heads per KV head
    head_group_requests: dict[str, int] = field(default_factory=dict)  # GQA found: split heads by position (next pass)
    items: dict[str, list[Label | None]] = field(default_factory=dict)  # split/chunk node -> its items' labels
    cut_args: list[CutArg] = field(default_factory=list)
    shuffles: dict[str, Shuffle] = field(default_factory=dict)  # a shuffle's last node -> the shuffle

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

    def is_query_positions(self, sid: int) -> bool:
        """``sid`` is a projection's heads split by their position in the KV group (GQA: ``head_groups``)."""
        prod = self.producers[sid]
        return prod.parent is not None and self.producers[prod.parent].name in self.head_groups

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


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The static shape propagate_shapes recorded for a node (None when unknown or not a tensor)."""
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(int(d) for d in tm.shape)


def tuple_valued(node: Any) -> bool:
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


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


#: A rule gets (gm, node, coupling, in_labels, spec), where in_labels maps input nodes to their labels
#: and spec is the op's entry in the op table, and returns the label of the node's output (or None).
#: It may create spaces, tie, block, record slices.
Rule = Callable[[fx.GraphModule, fx.Node, Coupling, dict[fx.Node, Label], OpSpec], Label | None]


def only_label(node: fx.Node, labels: dict[fx.Node, Label]) -> Label | None:
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return labels.get(first) if isinstance(first, fx.Node) else None


def block_inputs(c: Coupling, node: fx.Node, labels: dict[fx.Node, Label], reason: str) -> None:
    for n in node.all_input_nodes:
        c.block(labels.get(n), f"{reason}: {node.format_node()}")
