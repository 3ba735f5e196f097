"""What the target counts: the kept fraction the controller steers, the landing hits and the recorder logs.

* ``"count"``: the fraction of gated units kept (the paper's density).
* ``"params"`` / ``"macs"``: the compact model's parameters / MACs over the dense model's, exactly as
  ``fold_masks`` with the run's ``FoldConfig`` followed by ``count_params_and_macs`` would give them
  (:class:`~hyperflux_fx.analysis.cost_model.CostModel`, rounding included).
* ``"latency"``: the compact model's predicted ONNX Runtime latency over the dense model's
  (:class:`~hyperflux_fx.analysis.latency_model.LatencyModel`, calibrated with
  ``TrainConfig.latency_dense_ms`` when given). When the model has a ``measure`` (the CLI gives it
  one: fold, export and time the current masks side by side with the dense model), the landing measures
  the real compact model and, while it is more than 3% off the target, lands again on a corrected aim:
  at most :data:`LANDING_TRIES` (4) measurements in all, keeping the closest (which may be further off).

For the last three the pressure on each channel group follows what closing one more of its units
would save at the current masks (refreshed every interval), and the landing bisects the flow
threshold on the measure, then rounds every group to whole blocks of the fold (groups with a multiple
above 1: conv channels under ``round_to``), moving the fewest units it must to come within
:data:`LANDING_TOLERANCE` of the target (:func:`round_groups`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable

import torch
from torch import fx, nn

from hyperflux_fx.analysis.cost_model import MEASURES, CostModel
from hyperflux_fx.analysis.coupling import Group, kept_count, round_multiple
from hyperflux_fx.analysis.latency_model import LatencyModel
from hyperflux_fx.analysis.runtime import resolve_fold_config
from hyperflux_fx.config import FoldConfig, TrainConfig
from hyperflux_fx.ir import MODULE_NODE_META, ChannelGate, density, gates
from hyperflux_fx.train.landing import land_on_density
from hyperflux_fx.train.recorder import Landing

LANDING_TOLERANCE = 0.01  # the landing's rounding stops within 1% (relative) of the target

__all__ = ["Measure", "fold_within_reach", "land_on_measure"]


def _floor(cm: CostModel) -> dict[int, int]:
    """Per group, the fewest units the fold keeps: every gated unit closed (rounding as ``cm.fold``)."""
    return {g.id: kept_count(g, g.size, cm.fold)
            if cm.gate_of[g.id] is not None and g.deletable else g.size for g in cm.groups}


def fold_within_reach(gated: nn.Module, cfg: TrainConfig) -> FoldConfig:
    """The run's fold, resolved. With ``round_to="auto"`` and a params or MACs target that the conv floor
    and whole blocks of the runtime cannot reach (a conv group keeps at least ``min_conv_channels``, 16, in
    blocks of 8 or 16), the floor is halved down to the block, then both together, until the target is
    within reach: the target the user set comes before the widths the kernels and the benchmarks prefer.
    An explicit ``min_conv_channels`` is not halved. Explicit ``round_to``, other measures, and reachable
    targets keep the resolved fold."""
    fold = resolve_fold_config(cfg.fold)
    if (cfg.fold.round_to != "auto" or cfg.target_measure not in MEASURES or not isinstance(gated, fx.GraphModule)
            or not any(isinstance(g, ChannelGate) for g in gates(gated))):
        return fold
    target_kept = 1.0 - cfg.target_sparsity
    steps = _fold_steps(fold.round_to, fold.min_conv_channels, halve_floor=cfg.fold.min_conv_channels == "auto")
    for r, m in steps[:-1]:  # the last resort is taken unchecked (the run then says if it is out of reach)
        cm = CostModel(gated, dataclasses.replace(fold, round_to=r, min_conv_channels=m))
        if cm.cost_at(_floor(cm)).of(cfg.target_measure) / max(cm.dense.of(cfg.target_measure), 1) <= target_kept:
            break
    else:
        r, m = steps[-1]
    return dataclasses.replace(fold, round_to=r, min_conv_channels=m)


def _fold_steps(block: int, floor: int, *, halve_floor: bool) -> list[tuple[int, int]]:
    """The (block, conv floor) pairs :func:`fold_within_reach` tries, most preferred first: the floor halved
    down to the block, then both halved together down to 1 (an explicit floor stays as it is)."""
    steps = [(block, floor)]
    while block > 1 or (halve_floor and floor > 1):
        if halve_floor and floor > block:
            floor = max(floor // 2, block)
        else:
            block = max(block // 2, 1)
            floor = min(floor, block) if halve_floor else floor
        steps.append((block, floor))
    return steps


LANDING_TRIES = 4  # measured landings of a latency target (the first one and up to three corrections)
_warned_uncalibrated = False


def _warn_uncalibrated(*, calibrated: bool) -> None:
    """Once per process: a latency target without the CLI's whole-model calibration and measured landing."""
    global _warned_uncalibrated
    if _warned_uncalibrated:
        return
    _warned_uncalibrated = True
    what = ("calibrated on the dense model alone" if calibrated
            else "uncalibrated (the timed ops alone, with no untimed rest)")
    warnings.warn(f"target_measure='latency' from the API runs on the latency table {what}, and the landing is "
                  "not checked in ONNX Runtime: the speed-up reached can differ from the target by more than the "
                  "CLI's. hyperflux-compile --target-speedup calibrates on ten whole models and measures the "
                  "landing; from Python, pass a LatencyModel calibrated with calibrate(points) and with a measure",
                  UserWarning, stacklevel=4)


class Measure:
    """The run's target measure (see the module docstring)."""

    def __init__(self, gated: nn.Module, cfg: TrainConfig, latency_model: LatencyModel | None = None) -> None:
        self.name = cfg.target_measure
        self.gated = gated
        self.cost_exponent = cfg.cost_exponent
        self.cost_basis = cfg.cost_basis
        self.cost_model: CostModel | None = None
        self.latency: LatencyModel | None = None
        self.landing_checks: list[dict[str, float]] = []  # latency: measured compact/dense at the landing
        self._floor: dict[int, int] | None = None  # per group, what the fold keeps with every unit closed
        self._gate_floors: dict[ChannelGate, int] | None = None  # the same per channel gate
        if self.name in (*MEASURES, "latency"):
            if not isinstance(gated, fx.GraphModule) or not any(isinstance(g, ChannelGate) for g in gates(gated)):
                raise ValueError(f"target_measure={self.name!r} needs channel gates (granularity 'channel' or "
                                 f"'hybrid'): weight gates delete nothing, so the {self.name} do not change")
            if self.name == "latency" and latency_model is not None:
                if latency_model.cost_model.gm is not gated:
                    raise ValueError("the latency model was built for another gated model")
                self.cost_model, self.latency = latency_model.cost_model, latency_model
            else:
                self.cost_model = CostModel(gated, cfg.fold)
            if self.name == "latency" and self.latency is None:
                self.latency = LatencyModel(self.cost_model, cache_dir=cfg.latency_cache, progress=cfg.progress)
                if cfg.latency_dense_ms is not None:
                    self.latency.calibrate_dense(cfg.latency_dense_ms)
            if self.name == "latency" and self.latency.measure is None:
                _warn_uncalibrated(calibrated=cfg.latency_dense_ms is not None or bool(self.latency.calibration))
            self._check_reachable(1.0 - cfg.target_sparsity)
        self.families: list[list[int]] = []  # groups whose kept counts the landing makes equal (uniform_layers)
        if cfg.uniform_layers and self.cost_model is not None:
            self.families = layer_families(self.cost_model)
            if not self.families:
                raise ValueError("uniform_layers: no repeated layers here (no two gated groups of the same kind "
                                 "and size at the same place of numbered layers, e.g. model.layers.N.mlp)")

    def _check_reachable(self, target_kept: float) -> None:
        least = self.fraction_at(_floor(self.cost_model))
        if target_kept < least:
            raise ValueError(f"target_sparsity {1 - target_kept:.3f} of the {self.name} is out of reach: closing "
                             f"every gated unit removes {1 - least:.3f} of them (the rest is in ungated or "
                             f"blocked layers; see the gating report)")

    def kept(self, *, rounded: bool = True) -> float:
        """The kept fraction in this measure (``rounded=False``: before the fold's rounding to blocks, smoother
        for the controller, but never below what the fold keeps of a group: :meth:`open_counts`)."""
        if self.cost_model is None:
            return density(self.gated)
        return self.fraction_at(self.cost_model.counts() if rounded else self.open_counts())

    def floors(self) -> dict[int, int]:
        """Per group, the units the fold keeps of it with every unit closed (one block): closing below that
        saves nothing the fold can delete. Fixed for the run, so computed once."""
        if self._floor is None:
            self._floor = _floor(self.cost_model)
        return self._floor

    def gate_floors(self) -> dict[ChannelGate, int]:
        """:meth:`floors` keyed by each group's channel gate (empty without an exact measure)."""
        if self.cost_model is None:
            return {}
        if self._gate_floors is None:
            floors = self.floors()
            self._gate_floors = {gate: floors[gid] for gid, gate in self.cost_model.gate_of.items()
                                 if gate is not None}
        return self._gate_floors

    def open_counts(self, open_now: dict[int, int] | None = None) -> dict[int, int]:
        """Per group, its open units (``open_now``, else counted now), or :meth:`floors` when that is more."""
        floors = self.floors()
        open_now = self.cost_model.counts(rounded=False) if open_now is None else open_now
        return {gid: max(n, floors[gid]) for gid, n in open_now.items()}

    def _uniform(self, open_now: dict[int, int]) -> dict[int, int]:
        """Every gated group at the run's open fraction of its units (``cost_basis="uniform"``)."""
        cm = self.cost_model
        gated = {g.id: g.size for g in cm.groups if cm.gate_of[g.id] is not None and g.deletable}
        share = sum(open_now[gid] for gid in gated) / max(sum(gated.values()), 1)
        return {gid: max(round(share * gated[gid]), 1) if gid in gated else n for gid, n in open_now.items()}

    def fraction_at(self, k: dict[int, int]) -> float:
        """The kept fraction when group ``g`` keeps ``k[g]`` units (exact measures and latency)."""
        if self.latency is not None:
            return self.latency.fraction(k)
        return self.cost_model.cost_at(k).of(self.name) / max(self.cost_model.dense.of(self.name), 1)

    def marginal(self, k: dict[int, int]) -> dict[int, float]:
        """Per group: what closing one more unit saves, in this measure's own unit."""
        if self.latency is not None:
            return self.latency.marginal(k)
        return {gid: float(c.of(self.name)) for gid, c in self.cost_model.marginal(k).items()}

    def predicted_ms(self) -> float | None:
        """Predicted compact latency (ms) at the current masks, rounded as the fold will (latency only)."""
        return None if self.latency is None else self.latency.predict_ms(self.cost_model.counts())

    def latency_info(self) -> dict[str, object] | None:
        """How the latency table was obtained (latency only): op timings measured now and cached, the
        seconds it took, the cache file, the timed ops and the predicted dense latency."""
        lm = self.latency
        if lm is None:
            return None
        return {"measured": lm.measured, "cached": len(lm.table), "seconds": lm.build_seconds, "cache": str(lm.path),
                "timed_ops": len(lm.ops), "predicted_dense_ms": lm.dense_ms, "coefficients": list(lm.coef),
                "form": lm.form, "calibration": lm.calibration, "landing_checks": self.landing_checks}

    @torch.no_grad()
    def refresh_pressure(self) -> None:
        """Scale each channel gate's pressure by what one of its units saves now (to the power
        ``cost_exponent``), over the mean."""
        cm = self.cost_model
        if cm is None:
            return
        open_now = cm.counts(rounded=False)
        basis = self._uniform(open_now) if self.cost_basis == "uniform" else open_now
        marginal = self.marginal(self.open_counts(basis))
        floors = self.floors()
        # a group at its floor (one block) saves nothing the fold can delete by closing more: no pressure on it
        saves = [(gate, 0.0 if open_now[gid] <= floors[gid] else max(marginal[gid], 0.0))
                 for gid, gate in cm.gate_of.items() if gate is not None]
        weight = [m ** self.cost_exponent if m > 0 else 0.0 for _, m in saves]
        units = sum(g.numel for g, _ in saves)
        mean = sum(g.numel * w for (g, _), w in zip(saves, weight, strict=True)) / max(units, 1)
        for (gate, m), w in zip(saves, weight, strict=True):
            gate.unit_cost = m
            gate.pressure_scale = w / mean if mean > 0 else 1.0

    def land(self, target_kept: float) -> Landing:
        """Shift every flow by one constant so this measure lands as close to ``target_kept`` as it can."""
        if self.cost_model is None:
            return land_on_density(self.gated, target_kept)
        reference = self.cost_model.counts(rounded=False)  # the open units the rounding moves fewest of
        before = self.fraction_at(self.open_counts(reference))  # what the dynamics reached: kept(rounded=False)
        landing = self._land_predicted(target_kept, reference)
        landing.density_before = before
        if self.latency is not None and self.latency.measure is not None:
            landing = self._land_measured(landing, target_kept, self.latency.measure, reference)
        return landing

    @torch.no_grad()
    def _land_measured(self, landing: Landing, target_kept: float, check: Callable[[], float],
                       reference: dict[int, int] | None = None) -> Landing:
        """Close the loop on the real runtime: measure the landed masks, land again on an aim corrected
        by the secant through the last two (aim, measured) pairs, until the measured fraction is within
        3% of the target or after :data:`LANDING_TRIES` measurements; keep the closest. Its landing
        record has that try's shift."""
        aims: list[float] = []
        measured: list[float] = []
        snapshots = []
        shifts = [landing.shift]  # per try, the flows' total shift from before the landing
        aim = target_kept
        for _ in range(LANDING_TRIES):
            aims.append(aim)
            measured.append(check())
            snapshots.append([g.flow.detach().clone() for g in gates(self.gated)])
            self.landing_checks.append({"aimed": aim, "predicted": self.kept(), "measured": measured[-1],
                                        "counts": self.cost_model.counts()})
            if abs(measured[-1] / target_kept - 1) <= 0.03:
                break
            slope = (aims[-1] / measured[-1] if len(aims) < 2 or measured[-1] == measured[-2]
                     else (aims[-1] - aims[-2]) / (measured[-1] - measured[-2]))
            step = slope * (target_kept - measured[-1]) if slope > 0 else aim * (target_kept / measured[-1] - 1)
            aim = min(max(aim + step, aim / 1.5, 1e-3), aim * 1.5, 1.0)  # a noisy secant moves at most 1.5x
            shifts.append(shifts[-1] + self._land_predicted(aim, reference).shift)  # from the landed flows: adds up
        best = min(range(len(measured)), key=lambda i: abs(measured[i] - target_kept))
        for g, flow in zip(gates(self.gated), snapshots[best], strict=True):
            g.flow.copy_(flow)
        self.landing_checks[best]["kept"] = 1.0
        return Landing(shift=shifts[best], density_before=landing.density_before, density_after=self.kept())

    def _land_predicted(self, target_kept: float, reference: dict[int, int] | None = None) -> Landing:
        landing = land_on_measure(self.gated, lambda: self.kept(), target_kept)
        if any(round_multiple(g, self.cost_model.fold) > 1 for g in self.cost_model.groups):
            round_groups(self.cost_model, self.fraction_at, target_kept, reference)
            landing.density_after = self.kept()
        if self.families:
            uniform_counts(self.cost_model, self.families, self.fraction_at, target_kept)
            landing.density_after = self.kept()
        return landing


_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")  # the N of ``model.layers.N.mlp``


def _module_paths(gm: fx.GraphModule) -> dict[str, str]:
    """Node name -> the module it came from (its nn_module_stack, the rewrite's record, or its target)."""
    out = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        out[node.name] = (str(list(stack.values())[-1][0]) if stack else
                          str(node.meta.get(MODULE_NODE_META) or (node.target if node.op == "call_module" else "")))
    return out


def _producer_paths(group: Group, paths: dict[str, str]) -> list[str]:
    """The module paths of ``group``'s producers (a piece ``node[a:b]`` by its node)."""
    return [paths.get(p.split("[")[0], p) for p in group.producers]


def layer_families(cm: CostModel) -> list[list[int]]:
    """Gated groups alike across numbered layers: same unit kind, size and rounding, produced by the same
    module path once the layer numbers are set aside (``model.layers.3.mlp.gate_proj`` and
    ``model.layers.7.mlp.gate_proj``). Families of two or more groups, each a list of group ids."""
    paths = _module_paths(cm.gm)
    families: dict[tuple[str, str, int], list[int]] = {}
    for g in cm.groups:
        if not g.deletable or cm.gate_of[g.id] is None:
            continue
        path = _producer_paths(g, paths)[0]
        if _LAYER_NUMBER.search(path):
            families.setdefault((_LAYER_NUMBER.sub("*", path), g.unit, g.size), []).append(g.id)
    return [ids for ids in families.values() if len(ids) > 1]


def uniform_counts(cm: CostModel, families: list[list[int]], fraction_at: Callable[[dict[int, int]], float],
                   target_kept: float) -> dict[int, int]:
    """Give every group of a family one kept count: the family's mean count on its rounding multiple,
    then, family by family, the multiple below or above when that brings the measure closer to
    ``target_kept``. Each group keeps its own strongest units (its flows decide which); the others'
    flows close (they are frozen after the landing)."""
    groups = {g.id: g for g in cm.groups}
    counts = cm.counts()
    step = {tuple(f): round_multiple(groups[f[0]], cm.fold) for f in families}
    floors = _floor(cm)
    low = {tuple(f): floors[f[0]] for f in families}  # the fold keeps no fewer (a block at least)
    common = {}
    for fam in families:
        m, size = step[tuple(fam)], groups[fam[0]].size
        mean = sum(counts[g] for g in fam) / len(fam)
        common[tuple(fam)] = min(size, max(low[tuple(fam)], round(mean / m) * m))

    def at(choice: dict[tuple[int, ...], int]) -> dict[int, int]:
        return {**counts, **{g: k for fam, k in choice.items() for g in fam}}

    for fam in common:  # one pass, family by family: the multiple below or above, if closer to the target
        m, size = step[fam], groups[fam[0]].size
        options = [k for k in (common[fam] - m, common[fam], common[fam] + m) if low[fam] <= k <= size]
        common[fam] = min(options, key=lambda k: abs(fraction_at(at({**common, fam: k})) - target_kept))
    for fam, k in common.items():
        for gid in fam:
            _set_open_count(cm.gate_of[gid], k)
    counts = at(common)
    heads = math.lcm(*(k * _heads_per_unit(cm, groups[fam[0]]) for fam, k in common.items()
                       if groups[fam[0]].unit == "head"))  # 1 without head families
    for gid in _shared_widths(cm, families) if heads > 1 else []:
        options = list(range(heads, groups[gid].size + 1, heads))
        if options:  # a Hugging Face config wants the width a multiple of the heads (LlamaConfig checks it)
            counts[gid] = min(options, key=lambda k: abs(fraction_at({**counts, gid: k}) - target_kept))
            _set_open_count(cm.gate_of[gid], counts[gid])
    return counts


def _heads_per_unit(cm: CostModel, group: Group) -> int:
    """Attention heads in one unit of a head group (under GQA a query position: one query head of each
    KV group)."""
    sid = group.spaces[0]
    return cm.coupling.producers[sid].replicas if cm.coupling.is_query_positions(sid) else 1


def _shared_widths(cm: CostModel, families: list[list[int]]) -> list[int]:
    """Gated channel groups outside the families whose producers sit in several numbered layers: the
    residual width every layer reads and writes."""
    in_family = {gid for fam in families for gid in fam}
    paths = _module_paths(cm.gm)
    out = []
    for g in cm.groups:
        if g.id in in_family or not g.deletable or cm.gate_of[g.id] is None or g.unit != "channel":
            continue
        layers = {m.group() for path in _producer_paths(g, paths) if (m := _LAYER_NUMBER.search(path))}
        if len(layers) > 1:
            out.append(g.id)
    return out


def _block_choices(size: int, kept: int, step: int, floor: int, reach: int = 2) -> list[int]:
    """Kept counts a group may round to: the ``reach`` multiples of ``step`` below and above ``kept``
    (at least the group's ``floor``, what the fold keeps of it with every unit closed: a block, or the
    whole of a group narrower than one; at most ``size``)."""
    down = kept // step * step
    values = {down - i * step for i in range(reach)} | {down + (i + 1) * step for i in range(reach)}
    out = {min(size, v) for v in values if v >= floor}
    if kept >= size:
        out.add(size)
    if kept <= floor:
        out.add(floor)
    return sorted(out)


@torch.no_grad()
def round_groups(cm: CostModel, fraction_at: Callable[[dict[int, int]], float], target_kept: float,
                 reference: dict[int, int] | None = None, tolerance: float = LANDING_TOLERANCE) -> dict[int, int]:
    """Decide the fold's rounding per group, up or down, moving the fewest units the landing must.

    After the landing's shift each group keeps some open units; the fold would round every count *up* to
    the block. Here each gated group instead starts from the multiple of its block nearest to its count in
    ``reference`` (the open units before the landing: what the dynamics chose; default, the counts now),
    and then, while the measure is more than ``tolerance`` (relative) off ``target_kept``, takes the change
    that lowers that error most per unit moved away from the reference: one group by one block (within
    two blocks of its reference or of its count now, never under its floor), or, when no such change
    lowers the error, two groups in opposite directions. So the landing corrects the structure the run
    learned instead of trading a layer's channels for another's, and stops as close to the target as
    those changes reach. Its masks are made to say so: the weakest open units close, or the strongest
    closed units open (their flows set to just below / at zero; the flows are frozen after the landing).
    The masked model then computes what the compact model will.
    """
    gated = {g.id: g for g in cm.groups if g.deletable and cm.gate_of[g.id] is not None
             and round_multiple(g, cm.fold) > 1}
    floors = _floor(cm)  # a count below a group's floor would be predicted, and the fold would keep the floor
    now = cm.counts(rounded=False)
    ref = {gid: min((now if reference is None else reference)[gid], g.size) for gid, g in gated.items()}
    choices = {gid: sorted({*_block_choices(g.size, ref[gid], round_multiple(g, cm.fold), floors[gid]),
                            *_block_choices(g.size, min(now[gid], g.size), round_multiple(g, cm.fold), floors[gid])})
               for gid, g in gated.items()}
    chosen = cm.counts()
    chosen.update({gid: min(options, key=lambda v, r=ref[gid]: (abs(v - r), -v)) for gid, options in choices.items()})

    def error(counts: dict[int, int]) -> float:
        return abs(fraction_at(counts) - target_kept)

    err = error(chosen)
    while err > tolerance * target_kept and (step := _least_costly_step(chosen, choices, ref, error, err)):
        chosen, err = step
    for gid in gated:
        _set_open_count(cm.gate_of[gid], chosen[gid])
    return chosen


def _least_costly_step(chosen: dict[int, int], choices: dict[int, list[int]], ref: dict[int, int],
                       error: Callable[[dict[int, int]], float], err: float) -> tuple[dict[int, int], float] | None:
    """The change of one group to a neighbouring choice, or failing that of two groups in opposite
    directions, that lowers ``error`` most per unit moved away from ``ref`` (one that moves no more units
    comes first; ties: the lower error): (counts, error), or None when no such change lowers it."""
    singles = []
    for gid, options in choices.items():
        i = options.index(chosen[gid])
        singles += [(gid, options[j]) for j in (i - 1, i + 1) if 0 <= j < len(options)]
    pairs = [(a, b) for n, a in enumerate(singles) for b in singles[n + 1:]
             if a[0] != b[0] and (a[1] > chosen[a[0]]) != (b[1] > chosen[b[0]])]

    def moved(counts: dict[int, int]) -> int:
        return sum(abs(counts[gid] - r) for gid, r in ref.items())

    base = moved(chosen)
    for changes in ([(c,) for c in singles], pairs):
        best = None
        for change in changes:
            counts = {**chosen, **dict(change)}
            if (e := error(counts)) < err - 1e-12:
                extra = moved(counts) - base
                key = (math.inf if extra <= 0 else (err - e) / extra, -e)
                if best is None or key > best[0]:
                    best = (key, counts, e)
        if best is not None:
            return best[1], best[2]
    return None


def _set_open_count(gate: ChannelGate, count: int) -> None:
    """Open exactly the ``count`` strongest units of ``gate`` (flows of the others just below 0)."""
    flow = gate.flow.detach()
    order = torch.argsort(flow.flatten(), descending=True)
    flat = flow.view(-1)
    keep, drop = order[:count], order[count:]
    flat[keep] = torch.clamp(flat[keep], min=0.0)
    flat[drop] = torch.clamp(flat[drop], max=-1e-6)


@torch.no_grad()
def land_on_measure(gated: nn.Module, kept: Callable[[], float], target_kept: float) -> Landing:
    """The landing for an exact measure: bisect the flow threshold (one shift of every flow, so the
    flows' order is kept) on ``kept()``, which is non-decreasing in the number of open units, and
    take the threshold whose measure is closest to ``target_kept``."""
    all_gates = gates(gated)
    before = kept()
    saved = [g.flow.detach().clone() for g in all_gates]
    flows = torch.cat([f.flatten().float().cpu() for f in saved])
    order = torch.sort(torch.unique(flows), descending=True).values  # candidate thresholds

    def shift_all(shift: float) -> None:
        for g, f in zip(all_gates, saved, strict=True):
            g.flow.copy_(f + shift)

    def at(j: int) -> float:  # measure with the j+1 largest distinct flows open
        shift_all(-float(order[j]))
        value = kept()
        shift_all(0.0)
        return value

    lo, hi = 0, order.numel() - 1
    while lo < hi:  # smallest j with at(j) >= target
        mid = (lo + hi) // 2
        if at(mid) >= target_kept:
            hi = mid
        else:
            lo = mid + 1
    best = lo
    if lo > 0 and abs(at(lo - 1) - target_kept) < abs(at(lo) - target_kept):
        best = lo - 1
    shift = -float(order[best])
    shift_all(shift)
    return Landing(shift=shift, density_before=before, density_after=kept())
