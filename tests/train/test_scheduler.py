"""Scheduler: trajectory and bisection properties, controller direction, scaling-law fit."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperflux_fx.train.scheduler import (
    PressureController,
    decay_factor,
    equilibrium_points,
    find_d0,
    fit_run_law,
    fit_scaling_law,
    planned_remaining,
    resolve_interval_steps,
    response_lag_intervals,
)


@settings(max_examples=60, deadline=None)
@given(target=st.floats(0.001, 0.9), intervals=st.integers(5, 200))
def test_bisection_hits_the_target_and_the_curve_decays_fast_then_slow(target, intervals):
    d0 = find_d0(target, intervals)
    assert math.isclose(planned_remaining(intervals, intervals, d0), target, rel_tol=1e-8)
    traj = [planned_remaining(e, intervals, d0) for e in range(intervals + 1)]
    assert traj[0] == 1.0 and all(a > b for a, b in itertools.pairwise(traj))  # strictly decreasing
    factors = [decay_factor(k, intervals, d0) for k in range(1, intervals + 1)]
    if target < 0.999 ** intervals:  # the paper's regime (d0 < 0.999): pruning per interval slows down
        assert all(a < b for a, b in itertools.pairwise(factors))
        assert factors[-1] < 0.999
    else:  # a target milder than 0.999^E: d0 goes above 0.999, the curve still reaches the target
        assert d0 > 0.999


def test_bisection_rejects_impossible_targets():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            find_d0(bad, 20)
    with pytest.raises(ValueError, match="too close to 1"):
        find_d0(0.9999, 20)


def test_controller_pushes_when_behind_and_eases_when_ahead():
    c = PressureController(0.1, 20, step=0.2)
    assert math.isclose(c.prune_target, 0.1 * 11.5 / 13)
    gammas = [c.update(1.0) for _ in range(4)]  # far behind plan: g grows, and accelerates
    gs = [0.2, 0.2 + 0.25, 0.45 + 0.3, 0.75 + 0.35]
    assert [round(g ** (2 / 3), 10) for g in gammas] == pytest.approx(gs)
    assert all(b - a > 0 for a, b in itertools.pairwise(gammas))
    g_before = c.g
    c.update(0.0)  # ahead of plan: g drops by s, then accelerating
    assert c.g == pytest.approx(g_before - 0.2) and c.up == 0
    c.update(0.0)
    assert c.g == pytest.approx(g_before - 0.2 - 0.25)
    for _ in range(20):
        c.update(0.0)
    assert c.g == 0.0 and c.gamma == 0.0  # never negative


def test_controller_warmup_and_state_roundtrip():
    c = PressureController(0.05, 10, warmup_intervals=3)
    assert c.update(1.0) == 0.0 and c.update(1.0) == 0.0
    assert c.update(1.0) > 0
    c2 = PressureController(0.05, 10, warmup_intervals=3)
    c2.load_state_dict(c.state_dict())
    assert c2.previous == 1.0 and c2.lookahead == 0
    assert c2.update(0.9) == c.update(0.9)
    with pytest.raises(ValueError, match="intervals"):
        PressureController(0.05, 11, warmup_intervals=3).load_state_dict(c.state_dict())


def test_lookahead_eases_off_a_fast_fall_the_paper_controller_keeps_pushing():
    paper, ahead = PressureController(0.1, 20), PressureController(0.1, 20, lookahead=2)
    for c in (paper, ahead):
        c.update(1.0)
        c.update(0.95)
    # still above the plan now, but falling fast: extrapolated two intervals it is below the plan
    r = 0.6
    assert r > paper.planned(3)
    g_paper, g_ahead = paper.g, ahead.g
    paper.update(r)
    ahead.update(r)
    assert paper.g > g_paper and ahead.g < g_ahead
    with pytest.raises(ValueError, match="lookahead"):
        PressureController(0.1, 20, lookahead=-1)


def test_scale_down_cuts_pressure_in_proportion_to_the_overshoot():
    plain, scaled = PressureController(0.1, 20), PressureController(0.1, 20, scale_down=True)
    for c in (plain, scaled):
        for _ in range(5):
            c.update(1.0)  # far behind: g builds up
    assert plain.g == scaled.g
    g = plain.g
    half = 0.5 * plain.planned(6)
    plain.update(half)
    scaled.update(half)
    assert plain.g == pytest.approx(g - 0.2)
    assert scaled.g == pytest.approx(0.5 * g - 0.2)  # halved (judged = half the plan), then eased
    with pytest.raises(ValueError, match="scale_down"):
        PressureController(0.1, 20).load_state_dict(scaled.state_dict())


def test_response_lag_in_intervals():
    # the paper's regime: flow LR 1e-3, one epoch of 391 steps per interval: the flows answer within it
    assert response_lag_intervals(1e-3, 391, 100) == 1
    # digits, 10 epochs of 23 steps: travel rule 5/230 per step, 11-step intervals -> about 2.4
    assert response_lag_intervals(5 / 230, 11, 21) == 2
    # two-step intervals: the lag would be 7 intervals, capped at a quarter of the phase
    assert response_lag_intervals(5 / 48, 2, 24) == 6
    assert response_lag_intervals(5 / 48, 2, 200) == 7
    with pytest.raises(ValueError):
        response_lag_intervals(0.0, 2, 24)


def _lagged_plant(lookahead: int, gain: float, delay: int, intervals: int = 20, scale_down: bool = False
                  ) -> tuple[float, float]:
    """A toy plant with the shape seen in short runs: density keeps falling while pressure is on
    (d *= exp(-gain * gamma)) and reacts to gamma ``delay`` intervals late. Returns (lowest
    density / plan, end density / pruning-phase aim)."""
    c = PressureController(0.05, intervals, lookahead=lookahead, scale_down=scale_down)
    d, applied, worst = 1.0, [0.0] * (delay + 1), math.inf
    for e in range(1, intervals + 1):
        d *= math.exp(-gain * applied[-1 - delay])
        applied.append(c.update(d))
        worst = min(worst, d / c.planned(e))
    return worst, d / c.prune_target


@pytest.mark.parametrize("delay", [0, 1])
def test_lookahead_reduces_the_undershoot_of_a_lagged_plant(delay):
    better = 0
    for gain in (0.3, 1.0, 3.0):
        paper, ahead = _lagged_plant(0, gain, delay), _lagged_plant(2, gain, delay)
        ours = _lagged_plant(2, gain, delay, scale_down=True)
        assert ahead[0] >= paper[0] and ahead[1] >= paper[1]
        assert ours[0] >= paper[0] and ours[1] >= paper[1]
        better += ahead[0] > 1.5 * paper[0]
    assert better >= 2


def test_interval_resolution():
    assert resolve_interval_steps(None, 50, 100) == 50  # >= 20 epochs: one epoch
    assert resolve_interval_steps(None, 50, 10) == 25  # short run: 20 intervals
    assert resolve_interval_steps(None, 3, 2) == 1
    assert resolve_interval_steps(7, 50, 10) == 7
    with pytest.raises(ValueError):
        resolve_interval_steps(0, 50, 10)


def test_scaling_law_fit_recovers_known_constants():
    c, a0, a1 = 3.0, 0.65, 0.025
    gammas = [2.0 ** k for k in range(8)]
    rem = [c * math.exp(-(a0 * math.log(g) + a1 * math.log(g) ** 2)) for g in gammas]
    law = fit_scaling_law(gammas, rem)
    assert law.c == pytest.approx(c, rel=1e-6) and law.a0 == pytest.approx(a0, rel=1e-6)
    assert law.a1 == pytest.approx(a1, rel=1e-6) and law.r2 == pytest.approx(1.0)
    assert law.predict(8.0) == pytest.approx(rem[3])
    power = fit_scaling_law(gammas, [2.0 * g ** -0.5 for g in gammas], quadratic=False)
    assert power.a0 == pytest.approx(0.5) and power.a1 == 0.0
    with pytest.raises(ValueError, match="at least 3"):
        fit_scaling_law([1.0, 2.0], [0.5, 0.3])


def _law(g: float) -> float:
    return 0.02 * math.exp(-(0.7 * math.log(g) - 0.04 * math.log(g) ** 2))


def test_a_run_law_is_fitted_on_held_pressures_only():
    held = []  # 6 pressures held 4 intervals each: the density approaches the law, the last point is on it
    for g in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0):
        held += [(g, _law(g) * (1 + 0.5 / k)) for k in (1, 2, 4)] + [(g, _law(g))]
    assert [p for p in equilibrium_points(held)] == [(g, _law(g)) for g in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)]
    law, note = fit_run_law(held)
    assert law is not None and law.r2 > 0.999 and law.n_points == 6 and "6 equilibria" in note
    assert law.a0 == pytest.approx(0.7, abs=1e-6)
    # a scheduled run: gamma changes every interval, so no point is an equilibrium and no law is shown
    scheduled = [(0.1 * (1 + i % 7), _law(0.1 * (1 + i % 7)) * (1.3 if i % 2 else 0.8)) for i in range(40)]
    law, note = fit_run_law(scheduled)
    assert law is None and note.startswith("no law fitted: the run never held a pressure long enough")
    # holds too short (2 intervals), gamma 0 (warm-up), or too few equilibria: none
    assert equilibrium_points([(1.0, 0.5), (1.0, 0.4), (0.0, 1.0)] * 3) == []
    assert fit_run_law(held[:16])[0] is None  # 4 equilibria < 5


def test_a_poor_fit_on_equilibria_is_not_shown():
    noisy = []
    for i, g in enumerate((0.125, 0.25, 0.5, 1.0, 2.0, 4.0)):
        noisy += [(g, 0.5)] * 2 + [(g, 0.05 if i % 2 else 0.5)]  # density jumps, not a law
    law, note = fit_run_law(noisy)
    assert law is None and "below 0.9" in note



def test_the_log_rule_moves_gamma_at_most_2x_per_interval_and_caps_it():
    from hyperflux_fx.train.scheduler import LOG_GAMMA_MAX

    c = PressureController(0.0625, 20, rule="log", gamma0=0.1, gain=4.0)
    gammas = [c.update(1.0) for _ in range(12)]  # the density never moves: a plant that has not answered yet
    assert gammas[0] == pytest.approx(0.1)  # gamma0 for the interval after the warm-up
    assert all(b <= 2 * a + 1e-12 for a, b in itertools.pairwise(gammas))  # no wind-up
    assert max(gammas) == LOG_GAMMA_MAX
    assert c.update(1e-6) == pytest.approx(LOG_GAMMA_MAX / 2)  # far ahead of plan: halved, not zeroed
    with pytest.raises(ValueError, match="rule"):
        PressureController(0.1, 20, rule="pid")
