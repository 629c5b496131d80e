"""Baseline schedules: each produces the shape it claims when run through the evaluation loop."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from agents.baselines import (
    BASELINE_SCHEDULES,
    ConstantSchedule,
    CosineSchedule,
    LinearDecay,
    OneCycle,
    RandomPolicy,
    ReduceLROnPlateau,
    ReplaySchedule,
    StepDecay,
    schedule_decoder,
)
from hpo_env import ActionDecoder, ObservationBuilder, ToyTaskDistribution
from training.rollout import run_episodes

DECODER = ActionDecoder(("lr", "weight_decay"))
EXACT = schedule_decoder(DECODER)


@pytest.fixture(scope="module")
def tasks():
    rng = np.random.default_rng(7)
    return [ToyTaskDistribution().sample(rng) for _ in range(2)]  # T = 10 decisions each


def _log_lr(record) -> np.ndarray:
    lr = np.asarray(record.hparams["lr"])
    return np.log10(lr / lr[0])


def _progress(record) -> np.ndarray:
    return np.arange(len(record.hparams["lr"])) / record.task.num_decisions


def test_schedule_decoder_keeps_bounds_and_widens_lr_step():
    assert [(s.name, s.lower, s.upper) for s in EXACT.specs] == [(s.name, s.lower, s.upper) for s in DECODER.specs]
    assert [s.max_log10_change for s in EXACT.specs] == [3.0, 3.0]
    with pytest.raises(ValueError, match="controls 'lr'"):
        schedule_decoder(ActionDecoder(("weight_decay",)))
    with pytest.raises(TypeError, match="ActionDecoder"):
        CosineSchedule("lr")


@pytest.mark.parametrize(
    "schedule",
    [CosineSchedule(EXACT), StepDecay(EXACT), LinearDecay(EXACT), OneCycle(EXACT), CosineSchedule(EXACT, 0.1)],
    ids=repr,
)
def test_progress_schedules_are_followed_exactly(schedule, tasks):
    for rec in run_episodes(schedule, tasks[:1], EXACT):
        np.testing.assert_allclose(_log_lr(rec), schedule.log10_factor(_progress(rec)), atol=1e-5)
        # The held hyperparameter never moves.
        np.testing.assert_allclose(rec.hparams["weight_decay"], rec.hparams["weight_decay"][0], rtol=1e-12)
        assert not rec.diverged and np.isfinite(rec.final_val_loss)


def test_cosine_decays_monotonically_to_near_its_minimum(tasks):
    rec = run_episodes(CosineSchedule(EXACT, min_factor=0.01), tasks[:1], EXACT)[0]
    factor = 10 ** _log_lr(rec)
    assert np.all(np.diff(factor) < 0)
    t = rec.task.num_decisions
    assert factor[0] == 1.0
    assert 0.01 < factor[-1] <= 0.01 + (math.pi / t) ** 2 / 4


def test_step_decay_drops_by_gamma_at_each_milestone(tasks):
    rec = run_episodes(StepDecay(EXACT, milestones=(0.3, 0.7), gamma=0.5), tasks[:1], EXACT)[0]
    ratios = 10 ** np.diff(_log_lr(rec))
    p = _progress(rec)[1:]
    crossing = [int(np.argmax(p >= m - 1e-9)) for m in (0.3, 0.7)]
    np.testing.assert_allclose(ratios[crossing], 0.5, rtol=1e-5)
    np.testing.assert_allclose(np.delete(ratios, crossing), 1.0, rtol=1e-5)


def test_linear_decay_is_a_straight_line(tasks):
    rec = run_episodes(LinearDecay(EXACT, end_factor=0.0), tasks[:1], EXACT)[0]
    factor = 10 ** _log_lr(rec)
    np.testing.assert_allclose(np.diff(factor), -1 / rec.task.num_decisions, atol=1e-5)


def test_one_cycle_rises_to_its_peak_then_falls(tasks):
    sched = OneCycle(EXACT, max_factor=8.0, pct_start=0.3, final_div_factor=10.0)
    rec = run_episodes(sched, tasks[:1], EXACT)[0]
    factor = 10 ** _log_lr(rec)
    peak = int(np.argmax(factor))
    assert _progress(rec)[peak] == pytest.approx(0.3)
    assert factor[peak] == pytest.approx(8.0, rel=1e-5)
    assert np.all(np.diff(factor[: peak + 1]) > 0) and np.all(np.diff(factor[peak:]) < 0)
    assert factor[-1] < 1.0


def test_constant_holds_everything(tasks):
    for rec in run_episodes(ConstantSchedule(EXACT), tasks, EXACT):
        # Action 0 decodes to the same value up to one rounding of 10 ** log10(lr).
        np.testing.assert_allclose(rec.hparams["lr"], rec.hparams["lr"][0], rtol=1e-12)
        np.testing.assert_allclose(rec.hparams["weight_decay"], rec.hparams["weight_decay"][0], rtol=1e-12)
        assert np.all(np.asarray(rec.actions) == 0)


def test_bounded_decoder_follows_the_schedule_with_lag(tasks):
    """Through the env's 0.25-decade decoder, steep parts are clipped to full-size actions."""
    rec = run_episodes(StepDecay(DECODER, milestones=(0.5,), gamma=0.01), tasks[:1], DECODER)[0]
    log_lr = _log_lr(rec)
    assert np.all(np.asarray(rec.actions)[:, 0] >= -1.0)
    assert np.all(np.diff(log_lr) >= -0.25 - 1e-6)  # never more than one step per decision
    assert log_lr[-1] == pytest.approx(-1.25, abs=1e-5)  # 5 decisions after the milestone, not yet at -2


def _obs(decoder: ActionDecoder, log_val: list[float], lr_change: float = 0.0) -> np.ndarray:
    names = ObservationBuilder(decoder).feature_names()
    obs = np.zeros((len(log_val), len(names)), np.float32)
    obs[:, names.index("log_val_loss")] = log_val
    obs[:, names.index("lr_log_change")] = lr_change
    return obs


def test_plateau_reduces_after_patience_without_improvement_per_row():
    sched = ReduceLROnPlateau(EXACT, factor=0.1, patience=1, threshold=0.01)
    # Row 0 keeps improving; row 1 stalls from the third decision on.
    rows = [[0.0, -0.1, -0.2, -0.3, -0.4, -0.5], [0.0, -0.1, -0.1, -0.1, -0.1, -0.1]]
    state, starts, targets = None, np.ones(2, bool), []
    for t in range(6):
        actions, state = sched.predict(_obs(EXACT, [rows[0][t], rows[1][t]]), state, starts)
        starts = np.zeros(2, bool)
        targets.append(actions[:, 0] * EXACT.specs[0].max_log10_change)  # lr_log_change observed as 0
    targets = np.array(targets)
    np.testing.assert_allclose(targets[:, 0], 0.0, atol=1e-6)
    # Stalls at t=2,3 (two bad decisions > patience 1) -> decay; then t=4,5 -> decay again.
    np.testing.assert_allclose(targets[:, 1], [0, 0, 0, -1, -1, -2], atol=1e-6)
    # An episode start resets its row only.
    _, state = sched.predict(_obs(EXACT, [0.0, 0.0]), state, np.array([False, True]))
    assert state[1, 3] == 0.0 and state[0, 3] == 0.0 and state[1, 0] == 0.0


def test_plateau_cooldown_and_floor():
    sched = ReduceLROnPlateau(EXACT, factor=0.1, patience=0, cooldown=2, min_factor=0.05)
    state, start = None, np.ones(1, bool)
    for _ in range(8):
        _, state = sched.predict(_obs(EXACT, [0.0]), state, start)
        start = np.zeros(1, bool)
    assert state[0, 3] == pytest.approx(math.log10(0.05))
    with pytest.raises(ValueError, match="patience"):
        ReduceLROnPlateau(EXACT, patience=-1)
    with pytest.raises(ValueError, match="factor"):
        ReduceLROnPlateau(EXACT, factor=1.5)


def test_plateau_reduces_in_a_real_run(tasks):
    # A threshold no change of loss can meet: every decision after the first is "bad".
    rec = run_episodes(ReduceLROnPlateau(EXACT, factor=0.5, patience=2, threshold=0.99), tasks[:1], EXACT)[0]
    steps = np.round(np.diff(_log_lr(rec)) / math.log10(0.5), 6)
    # Decisions 2, 3, 4 are bad -> decay after the third, and so on every third decision.
    np.testing.assert_allclose(steps, [0, 0, 0, 1, 0, 0, 1, 0, 0], atol=1e-5)


def test_random_policy_is_reproducible_and_covers_the_box(tasks):
    a = run_episodes(RandomPolicy(DECODER, seed=3), tasks, DECODER)
    b = run_episodes(RandomPolicy(DECODER, rng=np.random.default_rng(3)), tasks, DECODER)
    assert a[0].actions != a[1].actions  # one generator, different draws per slot
    c = run_episodes(RandomPolicy(DECODER, seed=4), tasks[:1], DECODER)
    assert [r.actions for r in a] == [r.actions for r in b]
    assert a[0].actions != c[0].actions
    draws, _ = RandomPolicy(DECODER, seed=0).predict(np.zeros((2000, ObservationBuilder(DECODER).dim)))
    assert draws.shape == (2000, 2) and draws.min() >= -1 and draws.max() <= 1
    assert draws.min(0).max() < -0.99 and draws.max(0).min() > 0.99
    assert np.all(np.abs(draws.mean(0)) < 0.06)
    with pytest.raises(TypeError, match="Generator"):
        RandomPolicy(DECODER, rng=3)
    # A bad seed is refused here, not as NumPy's "expected non-negative integer"; NumPy ints are seeds.
    for seed in (-1, 1.5, "3"):
        with pytest.raises(ValueError, match=rf"seed must be an integer >= 0 or None .*, got {re.escape(repr(seed))}"):
            RandomPolicy(DECODER, seed=seed)
    assert RandomPolicy(DECODER, seed=np.int64(3)).predict(np.zeros(ObservationBuilder(DECODER).dim))[0].shape == (2,)


def test_schedule_parameters_must_be_numbers():
    # float() parsed "0.1" and took True as 1; "abc" and None failed inside float() with Python's message.
    for make, name, value in [
        (lambda v: CosineSchedule(EXACT, min_factor=v), "min_factor", "0.1"),
        (lambda v: StepDecay(EXACT, gamma=v), "gamma", None),
        (lambda v: LinearDecay(EXACT, end_factor=v), "end_factor", True),
        (lambda v: ReduceLROnPlateau(EXACT, threshold=v), "threshold", "abc"),
    ]:
        with pytest.raises(TypeError, match=rf"{name} must be a number, got {re.escape(repr(value))}"):
            make(value)
    with pytest.raises(ValueError, match="patience must be a non-negative integer, got None"):
        ReduceLROnPlateau(EXACT, patience=None)
    assert CosineSchedule(EXACT, min_factor=np.float32(0.5)).min_factor == 0.5


def test_replay_of_an_average_schedule(tasks):
    records = run_episodes(CosineSchedule(EXACT), tasks, EXACT)
    replay = ReplaySchedule.from_records(EXACT, records, grid=11)
    np.testing.assert_allclose(replay.progress, np.linspace(0, 1, 11))
    # Toy tasks have T = 10: the grid points up to 0.9 are the cosine's own values.
    np.testing.assert_allclose(
        replay.log10_change[:10, 0], CosineSchedule(EXACT).log10_factor(replay.progress[:10]), atol=1e-5
    )
    np.testing.assert_allclose(replay.log10_change[:, 1], 0.0, atol=1e-12)  # weight decay was held
    rec = run_episodes(replay, tasks[:1], EXACT)[0]
    np.testing.assert_allclose(_log_lr(rec), _log_lr(records[0]), atol=1e-4)
    # A replay of several hyperparameters moves each to its curve.
    both = ReplaySchedule(EXACT, [0.0, 1.0], [[0.0, 0.0], [-1.0, 1.0]])
    rec = run_episodes(both, tasks[:1], EXACT)[0]
    p = _progress(rec)
    np.testing.assert_allclose(_log_lr(rec), -p, atol=1e-5)
    wd = np.asarray(rec.hparams["weight_decay"])
    np.testing.assert_allclose(np.log10(wd / wd[0]), p, atol=1e-5)
    with pytest.raises(ValueError, match="increase"):
        ReplaySchedule(EXACT, [0.5, 0.2], [0.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        ReplaySchedule(EXACT, [0.0, 0.5], [[0.0, 0.0, 0.0]] * 2)
    with pytest.raises(ValueError, match="no record"):
        ReplaySchedule.from_records(EXACT, [])


def test_bad_observations_and_parameters_are_rejected():
    with pytest.raises(ValueError, match="raw observations of shape"):
        CosineSchedule(EXACT).predict(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="min_factor"):
        CosineSchedule(EXACT, min_factor=1.0)
    with pytest.raises(ValueError, match="milestones"):
        StepDecay(EXACT, milestones=(0.7, 0.3))
    with pytest.raises(ValueError, match="pct_start"):
        OneCycle(EXACT, pct_start=1.0)
    with pytest.raises(ValueError, match="end_factor"):
        LinearDecay(EXACT, end_factor=2.0)
    one, _ = CosineSchedule(EXACT).predict(np.zeros(ObservationBuilder(EXACT).dim, np.float32))
    assert one.shape == (2,)
    assert set(BASELINE_SCHEDULES) == {"constant", "cosine", "step_decay", "linear_decay", "one_cycle", "plateau"}
