"""How labels are linked: ties between spaces of the same layout, splits over conv groups and cuts into
runs asked of the next pass. Shared by every rule family."""

from __future__ import annotations

import bisect
import itertools

import torch
from torch import fx

from hyperflux_fx.analysis.coupling.labels import Coupling, CutArg, Label, Producer, Seg, permuted


def _plain_producer(c: Coupling, prod: Producer) -> bool:
    """A conv/linear space a next pass can still split or cut: one row per unit, not a head space,
    not split over conv groups."""
    return prod.replicas == 1 and prod.unit_rows == 1 and prod.parent is None and prod.node not in c.split


def _plain_space(c: Coupling, lab: Label, n: int) -> Producer | None:
    """The producer of ``lab``'s one space when a next pass can still rebuild it (one plain conv/linear
    space, as :func:`_plain_producer` says) in units of ``n`` (it divides the space); else None."""
    seg = lab.segs[0] if len(lab.segs) == 1 else None
    if seg is None or seg.space is None or seg.replicas != 1 or seg.expand != 1 or seg.length % n:
        return None
    prod = c.producers[seg.space]
    return prod if _plain_producer(c, prod) else None


def request_split(c: Coupling, lab: Label, groups: int) -> bool:
    """Ask the next pass to split ``lab``'s space over ``groups`` (True when it can: one plain
    conv/linear space); until then the space is blocked, so this pass's result is not used."""
    prod = _plain_space(c, lab, groups)
    if prod is None:
        return False
    c.requests.setdefault(prod.node, groups)
    c.block(lab, f"split over {groups} conv groups on the next pass")
    return True


def request_rows(c: Coupling, lab: Label, rows: int) -> bool:
    """Ask the next pass to build ``lab``'s space in units of ``rows`` consecutive rows of its producer
    (True when it can: one plain conv/linear space, not a piece of one); blocked until then."""
    prod = _plain_space(c, lab, rows)
    if prod is None or prod.piece is not None:
        return False
    c.rows_requests.setdefault(prod.node, rows)
    c.block(lab, f"units of {rows} rows on the next pass")
    return True


def split_alike(c: Coupling, plain: Label, split: Label) -> bool:
    """``split``'s one space is split over conv groups and ``plain``'s is not yet, or its units own
    several consecutive positions each (a depthwise multiplier's output) and ``plain``'s one row each,
    or the two are cut into different runs: ask the next pass to split, group or cut them alike (True
    when asked)."""
    if plain.dim != split.dim or plain.width != split.width:
        return False
    if len(split.segs) == 1 and split.segs[0].replicas > 1:
        return request_split(c, plain, split.segs[0].replicas)
    if len(split.segs) == 1 and split.segs[0].expand > 1 and split.segs[0].replicas == 1:
        return request_rows(c, plain, split.segs[0].expand)
    if any(sg.expand != 1 or sg.replicas != 1 for sg in plain.segs + split.segs):
        return False
    asked = [request_cut(c, plain, _bounds(split)), request_cut(c, split, _bounds(plain))]
    return any(asked) and all(ok is not False for ok in asked)


def _bounds(lab: Label) -> set[int]:
    """Where the runs of a label start and end along its dim."""
    return set(itertools.accumulate((sg.width for sg in lab.segs), initial=0))


def request_cut(c: Coupling, lab: Label, at: set[int]) -> bool | None:
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


def cut(c: Coupling, node: fx.Node, lab: Label, ranges: list[tuple[int, int]], kind: str,
         index_pos: int = 0) -> list[Label | None]:
    """The labels of ``ranges`` of a label's dim (split / chunk / narrow / a slice): the runs inside each,
    the op's bounds recorded to follow the fold (:class:`CutArg`). A range that ends inside a run asks
    for that run's space to be cut there (next pass); meanwhile, or when it cannot be cut, the pieces
    carry no label."""
    at = {p for r in ranges for p in r}
    bounds = tuple(sorted(at | {0, lab.width}))
    if lab.order is not None:
        return _cut_shuffled(c, node, lab, bounds, ranges, kind, index_pos)
    asked = request_cut(c, lab, at)
    if asked is False:
        c.block(lab, f"slicing into channels that cannot be cut: {node.format_node()}")
    if asked is not None:
        return [None] * len(ranges)
    parts = tuple(runs(lab, a, b) for a, b in itertools.pairwise(bounds))
    c.cut_args.append(CutArg(node.name, kind, lab.dim, bounds, parts, tuple(ranges), index_pos))
    return [runs(lab, a, b) if a < b else None for a, b in ranges]


def runs(lab: Label, start: int, stop: int) -> Label:
    """The runs of ``lab`` within [start, stop) (aligned on its runs, or inside runs nobody owns)."""
    segs, offset = [], 0
    for sg in lab.segs:
        lo, hi = max(start, offset), min(stop, offset + sg.width)
        if lo < hi:
            segs.append(sg if (lo, hi) == (offset, offset + sg.width) else Seg(None, hi - lo))
        offset += sg.width
    return Label(lab.dim, tuple(segs))


def _cut_shuffled(c: Coupling, node: fx.Node, lab: Label, bounds: tuple[int, ...], ranges: list[tuple[int, int]],
                  kind: str, index_pos: int) -> list[Label | None]:
    """:func:`cut` of channels a shuffle permuted: each part between the op's bounds must hold whole
    runs, wherever they lie; a run that the bounds divide asks for its space to be cut there, at every
    unit where the part it falls in changes (next pass)."""
    part_at = torch.empty(lab.width, dtype=torch.long)  # part index of every position of the runs' layout
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        part_at[torch.tensor(lab.order[a:b], dtype=torch.long)] = k
    asked, offset = [], 0
    for sg in lab.segs:
        mine = part_at[offset:offset + sg.width].tolist()
        offset += sg.width
        at = {i for i in range(1, sg.width) if mine[i] != mine[i - 1]}
        if at:
            asked.append(False if sg.space is None or sg.expand != 1 else request_cut(c, Label(lab.dim, (sg,)), at))
    if False in asked:
        c.block(lab, f"slicing shuffled channels into runs that cannot be cut: {node.format_node()}")
    if asked:
        return [None] * len(ranges)
    parts = tuple(_shuffled_runs(lab, a, b) for a, b in itertools.pairwise(bounds))
    c.cut_args.append(CutArg(node.name, kind, lab.dim, bounds, parts, tuple(ranges), index_pos))
    return [_shuffled_runs(lab, a, b) if a < b else None for a, b in ranges]


def _shuffled_runs(lab: Label, start: int, stop: int) -> Label:
    """The runs of ``lab`` (channels a shuffle permuted) at positions [start, stop), which hold whole
    runs: those runs in their order, permuted as they lie there."""
    starts = list(itertools.accumulate((sg.width for sg in lab.segs), initial=0))
    taken = lab.order[start:stop]
    run_of = [bisect.bisect_right(starts, p) - 1 for p in taken]
    inside = sorted(set(run_of))
    new_start = dict(zip(inside, itertools.accumulate((lab.segs[k].width for k in inside), initial=0), strict=False))
    order = [new_start[k] + p - starts[k] for p, k in zip(taken, run_of, strict=True)]
    return permuted(lab.dim, tuple(lab.segs[k] for k in inside), order)


def same_layout(la: Label, lb: Label) -> bool:
    """The two labels put the same runs of channels on the same dim (so they can be tied)."""
    return la.dim == lb.dim and la.order == lb.order and [(s.length, s.expand, s.replicas) for s in la.segs] == [
        (s.length, s.expand, s.replicas) for s in lb.segs]


def tie(c: Coupling, la: Label, lb: Label, kind: str, node: fx.Node) -> None:
    """Tie two labels of the same layout segment by segment (their channels go together)."""
    for sa, sb in zip(la.segs, lb.segs, strict=True):
        if sa.space is not None and sb.space is not None:
            if sa.space != sb.space:  # a space tied to itself (x.reshape_as(x)) adds nothing
                c.ties.add_edge(sa.space, sb.space)
        elif sa.space is not None or sb.space is not None:
            c.block(la, f"{kind} ties channels to ones that cannot be deleted: {node.format_node()}")
            c.block(lb, f"{kind} ties channels to ones that cannot be deleted: {node.format_node()}")
