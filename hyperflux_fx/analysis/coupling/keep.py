"""What the fold keeps: from a mask per group to the rows and columns of every producer, consumer and
per-channel parameter, the bounds of cut ops, the kept count of a group (its rounding), and the
units a closed neighbour leaves dead. Read by passes/ (the fold and the gates) and train/ (Measure)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import fx

from hyperflux_fx.analysis.coupling.labels import Consumer, Coupling, CutArg, Group, Label, placed
from hyperflux_fx.config import FoldConfig


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
    return placed(label.order, torch.cat(parts)) if changed else None


def kept_ranges(cut: CutArg, keep: dict[int, torch.Tensor], group_of: dict[int, int]) -> list[tuple[int, int]]:
    """The ranges a split / narrow / channel slice takes, in channels after the fold."""
    kept = [part.width if (idx := label_keep(part, keep, group_of)) is None else int(idx.numel())
            for part in cut.parts]
    new = dict(zip(cut.bounds, itertools.accumulate(kept, initial=0), strict=True))
    return [(new[a], new[b]) for a, b in cut.ranges]


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
            dropped.append((cp.target, cp.dim, placed(cp.order, cp.seg(c.sizes[cp.space]).positions(gone) + cp.offset)))
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


def deletes_dead(group: Group, config: FoldConfig) -> bool:
    """Whether the fold deletes ``group``'s dead units (zeroed by weight masks alone) besides the closed
    ones: only where their zeros change nothing downstream. Not in a normalised group: a norm or a mean
    over its channels (mask-aware: it leaves out the *closed* ones) counts a dead channel's zeros in its
    statistics, and deleting it would change them."""
    return config.delete_dead and group.zero_preserving and group.deletable and not group.normalised


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
    """Units ``group`` keeps when ``n_closed`` are closed: at least ``config.min_channels`` (conv channels:
    at least ``config.min_conv_channels``), rounded up to a multiple of :func:`round_multiple` (never above
    its size). A normalised group (a norm's statistics count its channels) keeps exactly its open units: a
    closed one kept would enter the folded norm's statistics."""
    size = group.size
    if n_closed == 0:
        return size
    if group.normalised and n_closed < size:
        return size - n_closed
    multiple = round_multiple(group, config)
    floor = config.min_conv_channels if round_field(group) == "round_to" else 1
    n_keep = max(size - n_closed, config.min_channels, floor)
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
