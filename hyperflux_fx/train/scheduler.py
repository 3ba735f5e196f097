"""The pressure scheduler (HYPERFLUX.md §6): planned trajectory, controller, scaling law.

Pure curve functions (:func:`decay_factor`, :func:`planned_remaining`, :func:`find_d0`), a small
stateful :class:`PressureController` run once per scheduler interval, and :func:`fit_scaling_law`
for the pressure/density law ``S(gamma) = c * exp(-(a0 ln gamma + a1 ln^2 gamma))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "PressureController",
    "ScalingLaw",
    "decay_factor",
    "equilibrium_points",
    "find_d0",
    "fit_run_law",
    "fit_scaling_law",
    "planned_remaining",
    "resolve_interval_steps",
    "response_lag_intervals",
]

CONTROLLER_RULES = ("paper", "log")
LOG_GAMMA_MAX = 2.0  # the log rule's largest gamma (decoupled pressure: flow-LR steps per step)
D_MAX = 0.999  # the per-interval decay the curve approaches at the end (pruning nearly stops)


def decay_factor(k: int, intervals: int, d0: float) -> float:
    """``d(k) = d0 + (0.999 - d0) * sigmoid((6 / E) * (k - E / 2))``: fast pruning early, slow late."""
    z = (6.0 / intervals) * (k - intervals / 2.0)
    return d0 + (D_MAX - d0) / (1.0 + math.exp(-z))


def planned_remaining(e: int, intervals: int, d0: float) -> float:
    """Planned remaining fraction after interval ``e`` (1-based) of ``intervals``: ``prod_{k<=e} d(k)``."""
    r = 1.0
    for k in range(1, e + 1):
        r *= decay_factor(k, intervals, d0)
    return r


def find_d0(target_remaining: float, intervals: int, *, tol: float = 1e-12) -> float:
    """``d0`` such that ``planned_remaining(E) == target_remaining`` (bisection; R(E) grows with d0).

    Raises:
        ValueError: the target is not in (0, 1), or is unreachable in ``intervals`` steps of the curve.
    """
    if not 0.0 < target_remaining < 1.0:
        raise ValueError(f"target remaining fraction must be in (0, 1), got {target_remaining}")
    if intervals < 1:
        raise ValueError(f"intervals must be >= 1, got {intervals}")
    # d0 may go below 0 for short runs and deep targets, as long as every d(k) stays > 0 (k = 1 has
    # the smallest sigmoid): R(E) -> 0 at that bound, so every target in (0, 1) has a d0. A target
    # milder than 0.999^E (long runs, light pruning) needs d0 in (0.999, 1): the curve then prunes a
    # little more towards the end instead of less, and still lands on the target.
    s1 = 1.0 / (1.0 + math.exp(-(6.0 / intervals) * (1 - intervals / 2.0)))
    lo, hi = -D_MAX * s1 / (1.0 - s1), 1.0
    if planned_remaining(intervals, intervals, lo) > target_remaining:
        raise ValueError(f"remaining fraction {target_remaining} is below what {intervals} intervals can plan")
    if planned_remaining(intervals, intervals, hi) < target_remaining:
        raise ValueError(f"remaining fraction {target_remaining} is too close to 1 for {intervals} intervals "
                         f"(the mildest curve keeps {planned_remaining(intervals, intervals, hi):.4f})")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if planned_remaining(intervals, intervals, mid) < target_remaining:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def resolve_interval_steps(interval_steps: int | None, steps_per_epoch: int, pruning_epochs: float,
                           min_intervals: int = 20) -> int:
    """Scheduler interval in optimizer steps: the given value, else one epoch when the pruning phase
    has at least ``min_intervals`` epochs, else the pruning steps split into ``min_intervals``."""
    if interval_steps is not None:
        if interval_steps < 1:
            raise ValueError(f"interval_steps must be >= 1, got {interval_steps}")
        return interval_steps
    if pruning_epochs >= min_intervals:
        return steps_per_epoch
    return max(1, round(steps_per_epoch * pruning_epochs) // min_intervals)


def response_lag_intervals(flow_lr: float, interval_steps: int, intervals: int, *, distance: float = 0.35,
                           beta1: float = 0.9) -> int:
    """How many intervals the density lags behind a pressure change, for the controller's look-ahead.

    Adam moves a flow about ``flow_lr`` per step once pressure dominates its gradient, so a flow
    ``distance`` above the threshold needs ``distance / flow_lr`` steps to cross it, and Adam's
    first moment keeps it moving ``1 / (1 - beta1)`` steps after the pressure drops. The lag, in
    intervals, rounded, at least 1 and at most a quarter of the pruning phase's intervals (an
    extrapolation further ahead than that is noise).
    """
    if flow_lr <= 0 or interval_steps < 1 or intervals < 1:
        raise ValueError("flow_lr must be > 0, interval_steps and intervals >= 1")
    lag_steps = distance / flow_lr + 1.0 / (1.0 - beta1)
    return max(1, min(round(lag_steps / interval_steps), max(1, intervals // 4)))


class PressureController:
    """The controller of HYPERFLUX.md §6, with inertia, acting once per interval.

    The pruning phase aims at ``final_remaining * regrowth_compensation`` (regrowth adds weights
    back afterwards). Call :meth:`update` with the measured remaining fraction at the end of each
    interval; it returns the gamma for the next interval. Gamma stays 0 through the first
    ``warmup_intervals`` - 1 updates (so with the default 1, gamma is 0 during the first interval).

    Two extensions for runs whose density answers pressure late relative to the interval (both off
    by default, which is the paper's controller; docs/training.md has the measurements):

    * ``lookahead = L``: judge ``r * (r / r_prev)**L``, the density extrapolated ``L`` intervals at
      its current rate, against the plan ``L`` intervals ahead;
    * ``scale_down``: when that judged density is below the plan, ``g`` is first multiplied by
      judged / planned, then eased as usual: pressure falls in proportion to the overshoot, since
      density that pressure removed does not come back by itself during pruning.
    """

    def __init__(self, final_remaining: float, intervals: int, *, step: float = 0.2,
                 regrowth_compensation: float = 11.5 / 13, warmup_intervals: int = 1,
                 lookahead: int = 0, scale_down: bool = False, rule: str = "paper",
                 gamma0: float = 0.1, gain: float = 4.0) -> None:
        if not 0.0 < final_remaining < 1.0:
            raise ValueError(f"final remaining fraction must be in (0, 1), got {final_remaining}")
        if step <= 0:
            raise ValueError(f"controller step must be > 0, got {step}")
        if not 0.0 < regrowth_compensation <= 1.0:
            raise ValueError(f"regrowth_compensation must be in (0, 1], got {regrowth_compensation}")
        self.final_remaining = float(final_remaining)
        self.prune_target = float(final_remaining * regrowth_compensation)
        self.intervals = int(intervals)
        self.step = float(step)
        self.warmup_intervals = int(warmup_intervals)
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.lookahead = int(lookahead)
        self.scale_down = bool(scale_down)
        if rule not in CONTROLLER_RULES:
            raise ValueError(f"controller rule must be one of {CONTROLLER_RULES}, got {rule!r}")
        self.rule = rule
        self.gamma0 = float(gamma0)
        self.gain = float(gain)
        self.previous = 1.0  # measured remaining fraction at the previous update
        self.d0 = find_d0(self.prune_target, self.intervals)
        self.g = 0.0
        self.up = 0.0
        self.down = 0.0
        self.gamma = 0.0
        self.completed = 0  # intervals completed (updates made)

    def planned(self, e: int | None = None) -> float:
        """Planned remaining fraction after interval ``e`` (default: the last completed one)."""
        e = self.completed if e is None else e
        return planned_remaining(min(e, self.intervals), self.intervals, self.d0)

    def update(self, remaining: float) -> float:
        """Controller step at the end of an interval; returns gamma for the next interval."""
        self.completed += 1
        previous, self.previous = self.previous, remaining
        if self.completed < self.warmup_intervals:
            self.gamma = 0.0
            return self.gamma
        s = self.step
        judged, e = remaining, self.completed
        if self.lookahead:
            rate = min(1.0, remaining / previous) if previous > 0 else 1.0
            judged, e = remaining * rate ** self.lookahead, e + self.lookahead
        planned = self.planned(e)
        if self.rule == "log":
            return self._log_update(judged, planned)
        if judged > planned:  # behind plan: push harder, accelerating
            self.g += s + self.up
            self.up += s / 4
            self.down = 0.0
        else:  # ahead of plan: ease off, accelerating
            if self.scale_down:
                self.g *= judged / planned
            self.g = max(0.0, self.g - s - self.down)
            self.down += s / 4
            self.up = 0.0
        self.gamma = self.g ** 1.5
        return self.gamma

    def _log_update(self, judged: float, planned: float) -> float:
        """Integral action on log-density: gamma is multiplied by ``(judged / planned) ** gain``, so a
        density 10% behind plan raises it by ~1.5x per interval and one 10% ahead lowers it alike. For
        decoupled pressure, where gamma moves the flows in proportion (docs/training.md)."""
        if self.gamma <= 0.0:
            self.gamma = self.gamma0
        else:  # at most 2x up or down per interval (no wind-up while the flows travel to the threshold), and
            # at most LOG_GAMMA_MAX: two Adam steps per step outweigh any flux, more only drives flows deep
            factor = min(max((max(judged, 1e-9) / planned) ** self.gain, 0.5), 2.0)
            self.gamma = min(max(self.gamma * factor, self.gamma0 * 1e-3), LOG_GAMMA_MAX)
        self.g = self.gamma ** (2.0 / 3.0)  # the paper's g, for the record (gamma = g ** 1.5)
        return self.gamma

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("final_remaining", "prune_target", "intervals", "step",
                                                "warmup_intervals", "lookahead", "scale_down", "previous", "d0",
                                                "g", "up", "down", "gamma", "completed", "rule", "gamma0", "gain")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {"lookahead": 0, "scale_down": False, "previous": 1.0, "rule": "paper", **state}  # saved before
        state.setdefault("gamma0", self.gamma0)
        state.setdefault("gain", self.gain)
        for k in ("final_remaining", "intervals", "step", "warmup_intervals", "lookahead", "scale_down", "rule"):
            if state[k] != getattr(self, k):
                raise ValueError(f"controller state was saved with {k}={state[k]}, this run has {getattr(self, k)}")
        for k, v in state.items():
            setattr(self, k, v)


@dataclass(frozen=True)
class ScalingLaw:
    """``S(gamma) = c * exp(-(a0 ln gamma + a1 ln^2 gamma))`` fitted by least squares on logs."""

    c: float
    a0: float
    a1: float
    r2: float  # coefficient of determination of the fit of ln S
    n_points: int

    def predict(self, gamma: float) -> float:
        lg = math.log(gamma)
        return self.c * math.exp(-(self.a0 * lg + self.a1 * lg * lg))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_scaling_law(gammas: Sequence[float], remaining: Sequence[float], *, quadratic: bool = True) -> ScalingLaw:
    """Fit the scaling law to ``(gamma, remaining fraction)`` pairs (gamma > 0, remaining > 0 only).

    Args:
        quadratic: fit ``a1`` too; False fits the pure power law (``a1 = 0``).

    Raises:
        ValueError: fewer usable points than parameters.
    """
    import numpy as np

    pts = [(g, s) for g, s in zip(gammas, remaining, strict=True) if g > 0 and s > 0]
    n_params = 3 if quadratic else 2
    if len(pts) < n_params:
        raise ValueError(f"need at least {n_params} points with gamma > 0 and remaining > 0, got {len(pts)}")
    x = np.log(np.array([p[0] for p in pts], dtype=np.float64))
    y = np.log(np.array([p[1] for p in pts], dtype=np.float64))
    cols = [np.ones_like(x), -x] + ([-x * x] if quadratic else [])
    a = np.stack(cols, axis=1)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    pred = a @ coef
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return ScalingLaw(c=float(math.exp(coef[0])), a0=float(coef[1]), a1=float(coef[2]) if quadratic else 0.0,
                      r2=r2, n_points=len(pts))


LAW_MIN_HOLD = 3  # intervals at one gamma before the density at the end of the hold counts as an equilibrium
LAW_MIN_POINTS = 5  # equilibria needed before a law is fitted
LAW_MIN_R2 = 0.9  # a fit below this is not shown


def equilibrium_points(points: Sequence[tuple[float, float]], *, min_hold: int = LAW_MIN_HOLD,
                       ) -> list[tuple[float, float]]:
    """``(gamma, density)`` at the end of every run of at least ``min_hold`` consecutive intervals held
    at one gamma > 0, from a run's per-interval ``(gamma used, density at the interval's end)``.

    The law describes the density a pressure converges to; a scheduled run changes gamma every
    interval, so its points are not on the law unless the pressure was held.
    """
    out: list[tuple[float, float]] = []
    i = 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1][0] == points[i][0]:
            j += 1
        if points[i][0] > 0 and j - i + 1 >= min_hold:
            out.append(points[j])
        i = j + 1
    return out


def fit_run_law(points: Sequence[tuple[float, float]]) -> tuple[ScalingLaw | None, str]:
    """The scaling law of a run, only when it is fitted on equilibria and passes the validity check
    (at least ``LAW_MIN_POINTS`` equilibria, R² >= ``LAW_MIN_R2``); else None. The note says which."""
    eq = equilibrium_points(points)
    if len(eq) < LAW_MIN_POINTS:
        return None, (f"no law fitted: the run never held a pressure long enough ({len(eq)} equilibria of "
                      f"{LAW_MIN_HOLD}+ intervals at one gamma; {LAW_MIN_POINTS} needed); tools/bench_law.py "
                      "measures the law at fixed pressures")
    try:
        law = fit_scaling_law([g for g, _ in eq], [d for _, d in eq])
    except (ValueError, FloatingPointError) as exc:
        return None, f"no law fitted: {exc}"
    if law.r2 < LAW_MIN_R2:
        return None, f"no law fitted: R² {law.r2:.2f} on {law.n_points} equilibria is below {LAW_MIN_R2}"
    return law, f"fitted on {law.n_points} equilibria, R² {law.r2:.3f}"
