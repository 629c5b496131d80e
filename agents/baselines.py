"""Hand-designed baseline schedules behind SB3's ``predict`` protocol.

Every baseline here is a *policy* in the sense of :func:`training.rollout.run_episodes`: it has
``predict(obs, state=None, episode_start=None, deterministic=False) -> (actions, state)`` on batches of
raw observations ``(n, obs_dim)`` from :class:`~hpo_env.ObservationBuilder`, so evaluation code treats
learned and hand-designed schedules alike.

Schedules act on the learning rate only (every other controlled hyperparameter gets action 0, i.e. is
held at its initial value) and are written *relative to the initial learning rate* of the run: a
schedule is a function ``f(p)`` giving the target ``log10(lr / lr_0)`` at training progress ``p``.
Following the decision protocol of :mod:`hpo_env.features`, a run has ``T`` intervals; interval ``i``
(``i = 0 .. T-1``) runs at ``lr_0 * 10 ** f(i / T)``, the learning rate a per-step PyTorch scheduler
with ``T_max = T`` would give it (interval 0 always runs at ``lr_0``, since it runs before the first
decision). The observation made after interval ``t`` carries ``progress = t / T``, exactly the ``p``
of the interval the action sets.

The action that moves the learning rate to the target is
``clip((f(p) - lr_log_change) / max_log10_change, -1, 1)`` (:meth:`HyperparameterSpec.action_for`), where ``lr_log_change`` is the observed
number of decades moved since the start. With the environment's default step (0.25 decades per
decision) sharp schedules are followed with lag; :func:`schedule_decoder` builds a decoder with the
same bounds and a large step so that the schedules are exact (the benchmark runs them through it)::

    >>> from hpo_env import ActionDecoder
    >>> decoder = schedule_decoder(ActionDecoder(("lr", "weight_decay")))
    >>> cosine = CosineSchedule(decoder)
    >>> round(float(cosine.log10_factor(0.5)), 3)  # half way: half the initial learning rate
    -0.301

The learning rate is also clipped into the decoder's bounds, like any value an action sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hpo_env import OBS_BOUND, ActionDecoder, HyperparameterSpec, ObservationBuilder
from hpo_env.checks import is_integer, is_number
from hpo_env.tasks import DEFAULT_HPARAMS

__all__ = [
    "BASELINE_SCHEDULES",
    "ConstantSchedule",
    "CosineSchedule",
    "LRSchedule",
    "LinearDecay",
    "OneCycle",
    "RandomPolicy",
    "ReduceLROnPlateau",
    "ReplaySchedule",
    "StepDecay",
    "lr_grid",
    "schedule_decoder",
]

#: Default step of :func:`schedule_decoder`: enough for every schedule here to hit its targets exactly.
EXACT_MAX_LOG10_CHANGE = 3.0
# Targets are kept finite (a decay "to zero" would be -inf decades); the lr bounds clip far above this.
_MIN_LOG10_FACTOR = -OBS_BOUND


def schedule_decoder(decoder: ActionDecoder, max_log10_change: float = EXACT_MAX_LOG10_CHANGE) -> ActionDecoder:
    """A decoder with the hyperparameters and bounds of ``decoder`` but steps of ``max_log10_change`` decades.

    Schedule baselines run through it so that they follow their curves exactly instead of at the
    environment's bounded pace (schedules hold every hyperparameter but the learning rate with action
    0, which means "no change" whatever the step; :class:`ReplaySchedule` moves them all).

    Raises:
        TypeError: ``decoder`` is not an :class:`~hpo_env.ActionDecoder`.
        ValueError: the decoder does not control ``"lr"``, or the step is not positive.
    """
    _lr_index(decoder)
    if not (max_log10_change > 0 and math.isfinite(max_log10_change)):
        raise ValueError(f"max_log10_change must be a positive number of decades, got {max_log10_change!r}")
    return ActionDecoder(
        decoder.names,
        bounds={s.name: (s.lower, s.upper) for s in decoder.specs},
        max_log10_change=float(max_log10_change),
    )


def lr_grid(optimizer: str, size: int, decades: float) -> list[float]:
    """The tuned oracles' learning rates: the optimiser's default times ``10 ** linspace(-decades, decades, size)``.

    An odd ``size`` has the default itself as its middle point; an even one (the benchmark's K = 8)
    brackets it (at 1.5 decades and K = 8: 0.61x and 1.64x the default), so the tuned oracles cannot
    pick exactly the default rate. Used by the benchmark's grid-tuned baselines and by the imitation
    warm start's teacher (:mod:`training.imitation`).
    """
    if optimizer not in DEFAULT_HPARAMS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {sorted(DEFAULT_HPARAMS)}")
    if not is_integer(size) or size < 1:
        raise ValueError(f"size must be a positive integer (the grid's K), got {size!r}")
    if not (is_number(decades) and 0 <= decades < math.inf):
        raise ValueError(
            f"decades must be a finite number >= 0 (the grid spans 10**[-decades, decades]), got {decades!r}"
        )
    default = DEFAULT_HPARAMS[optimizer]["lr"]
    if size == 1:
        return [default]
    return [float(default * 10**e) for e in np.linspace(-decades, decades, size)]


def _lr_index(decoder: ActionDecoder) -> int:
    if not isinstance(decoder, ActionDecoder):
        raise TypeError(f"decoder must be an hpo_env.ActionDecoder, got {type(decoder).__name__}")
    if "lr" not in decoder.names:
        raise ValueError(f"learning-rate schedules need a decoder that controls 'lr', got {list(decoder.names)}")
    return decoder.names.index("lr")


def _number(name: str, value: Any) -> float:
    """``value`` as a float, or a TypeError: ``float()`` would parse ``"0.5"`` and take ``True`` as 1."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _check_positive(name: str, value: float) -> float:
    value = _number(name, value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _check_fraction(name: str, value: float, *, open_low: bool = False, open_high: bool = False) -> float:
    value = _number(name, value)
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name} must lie in {lo}0, 1{hi}, got {value!r}")
    return value


def _raw_batch(policy: Any, observation: np.ndarray) -> tuple[np.ndarray, bool]:
    """Raw observations as ``(n, obs_dim)`` float32, and whether a single one was given."""
    obs = np.asarray(observation, dtype=np.float32)
    if obs.shape[-1:] != (policy.obs_dim,) or obs.ndim > 2:
        raise ValueError(
            f"{type(policy).__name__} expects raw observations of shape (n, {policy.obs_dim}) built by "
            f"ObservationBuilder for {list(policy.decoder.names)}, got shape {obs.shape}"
        )
    return obs.reshape(-1, policy.obs_dim), obs.ndim == 1


class LRSchedule:
    """Base class: a learning-rate schedule relative to the initial rate, as an SB3-style policy.

    Subclasses implement :meth:`log10_factor` (a pure function of progress) or, for schedules that
    react to the run, override :meth:`_targets`.

    Args:
        decoder: the :class:`~hpo_env.ActionDecoder` the actions go through (use
            :func:`schedule_decoder` for exact schedules).
    """

    def __init__(self, decoder: ActionDecoder) -> None:
        self._lr: int | None = _lr_index(decoder)  # None: a ConstantSchedule of a decoder without lr
        self.decoder = decoder
        self.lr_spec: HyperparameterSpec = decoder.specs[self._lr]
        names = ObservationBuilder(decoder).feature_names()
        self.obs_dim = len(names)
        self._progress_col = names.index("progress")
        self._lr_change_col = names.index("lr_log_change")

    # -- the schedule ------------------------------------------------------------------------------
    def log10_factor(self, progress: np.ndarray | float) -> np.ndarray:
        """Target ``log10(lr / lr_0)`` at ``progress`` (fraction of training done when the interval starts)."""
        raise NotImplementedError

    def initial_state(self, n_envs: int = 1) -> Any:
        """The policy state before the first decision (None: this schedule is stateless)."""
        return None

    def _targets(self, obs: np.ndarray, state: Any, episode_start: np.ndarray) -> tuple[np.ndarray, Any]:
        return self.log10_factor(obs[:, self._progress_col]), state

    # -- SB3 protocol ----------------------------------------------------------------------------
    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """Actions ``(n, k)`` that move the learning rate to the schedule's target; others held.

        ``deterministic`` is accepted for protocol compatibility; schedules are deterministic.
        """
        obs, single = self._as_batch(observation)
        n = len(obs)
        actions = np.zeros((n, self.decoder.num_actions), dtype=np.float32)
        if self._lr is None:  # a ConstantSchedule of a decoder without lr: everything held
            return (actions[0] if single else actions), state
        starts = np.ones(n, bool) if episode_start is None else np.asarray(episode_start, bool).reshape(n)
        target, state = self._targets(obs, state, starts)
        target = np.clip(np.nan_to_num(np.asarray(target, np.float64), nan=0.0), _MIN_LOG10_FACTOR, OBS_BOUND)
        delta = target - obs[:, self._lr_change_col].astype(np.float64)
        actions[:, self._lr] = self.lr_spec.action_for(delta)
        return (actions[0] if single else actions), state

    def _as_batch(self, observation: np.ndarray) -> tuple[np.ndarray, bool]:
        return _raw_batch(self, observation)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "decoder")
        return f"{type(self).__name__}({fields})"


class ConstantSchedule(LRSchedule):
    """Shape: flat. The learning rate (and everything else) stays at its initial value (action 0).

    Unlike the other schedules it also takes a decoder that does not control ``lr``: it then holds
    whatever the decoder controls (the reference of a policy trained on, say, weight decay alone).
    """

    def __init__(self, decoder: ActionDecoder) -> None:
        if isinstance(decoder, ActionDecoder) and "lr" not in decoder.names:
            self._lr = None
            self.decoder = decoder
            self.obs_dim = ObservationBuilder(decoder).dim
        else:
            super().__init__(decoder)

    def log10_factor(self, progress: np.ndarray | float) -> np.ndarray:
        return np.zeros_like(np.asarray(progress, np.float64))


class CosineSchedule(LRSchedule):
    """Shape: half a cosine from ``lr_0`` down towards ``min_factor * lr_0`` (PyTorch's ``CosineAnnealingLR``).

    ``lr(p) = lr_0 * (m + (1 - m) * (1 + cos(pi * p)) / 2)`` with ``m = min_factor``; the last of ``T``
    intervals runs at ``p = (T - 1) / T``, within ``(pi / T)^2 / 4`` of the minimum (relative to ``lr_0``).

    Args:
        decoder: see :class:`LRSchedule`.
        min_factor: the floor as a fraction of the initial learning rate (``eta_min / lr_0``), ``>= 0``.
    """

    def __init__(self, decoder: ActionDecoder, min_factor: float = 0.0) -> None:
        super().__init__(decoder)
        min_factor = _number("min_factor", min_factor)
        if not 0 <= min_factor < 1:
            raise ValueError(f"min_factor must lie in [0, 1), got {min_factor!r}")
        self.min_factor = min_factor

    def log10_factor(self, progress: np.ndarray | float) -> np.ndarray:
        p = np.clip(np.asarray(progress, np.float64), 0.0, 1.0)
        m = self.min_factor
        factor = m + (1.0 - m) * 0.5 * (1.0 + np.cos(np.pi * p))
        return np.log10(np.maximum(factor, 10.0**_MIN_LOG10_FACTOR))


class StepDecay(LRSchedule):
    """Shape: a staircase. The learning rate is multiplied by ``gamma`` at each milestone (``MultiStepLR``).

    ``lr(p) = lr_0 * gamma ** (number of milestones <= p)``.

    Args:
        decoder: see :class:`LRSchedule`.
        milestones: fractions of training in ``(0, 1)``, increasing.
        gamma: the factor applied at each milestone, in ``(0, 1]`` for a decay.
    """

    def __init__(self, decoder: ActionDecoder, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1) -> None:
        super().__init__(decoder)
        ms = tuple(_check_fraction("each milestone", m, open_low=True, open_high=True) for m in milestones)
        if not ms or any(b <= a for a, b in zip(ms, ms[1:])):
            raise ValueError(f"milestones must be a non-empty increasing sequence of fractions, got {list(milestones)}")
        self.milestones = ms
        self.gamma = _check_positive("gamma", gamma)

    def log10_factor(self, progress: np.ndarray | float) -> np.ndarray:
        p = np.asarray(progress, np.float64)
        # A tiny tolerance: progress arrives as float32 t/T and must not fall just short of a milestone.
        passed = np.sum(p[..., None] >= np.asarray(self.milestones) - 1e-6, axis=-1)
        return passed * math.log10(self.gamma)


class LinearDecay(LRSchedule):
    """Shape: a straight line from ``lr_0`` to ``end_factor * lr_0`` at the end of training (``LinearLR``).

    ``lr(p) = lr_0 * (1 - (1 - end_factor) * p)``; with ``end_factor = 0`` the last of ``T`` intervals
    runs at ``lr_0 / T``.

    Args:
        decoder: see :class:`LRSchedule`.
        end_factor: the learning rate at the end of training relative to ``lr_0``, in ``[0, 1]``.
    """

    def __init__(self, decoder: ActionDecoder, end_factor: float = 0.0) -> None:
        super().__init__(decoder)
        self.end_factor = _check_fraction("end_factor", end_factor)

    def log10_factor(self, progress: np.ndarray | float) -> np.ndarray:
        p = np.clip(np.asarray(progress, np.float64), 0.0, 1.0)
        factor = 1.0 - (1.0 - self.end_factor) * p
        return np.log10(np.maximum(factor, 10.0**_MIN_LOG10_FACTOR))


class OneCycle(LRSchedule):
    """Shape: a rise then a fall (Smith's 1cycle, PyTorch's ``OneCycleLR`` with cosine annealing).

    The run starts at ``lr_0``, rises along a half cosine to ``max_factor * lr_0`` at ``pct_start`` of
    training, then anneals along a half cosine to ``lr_0 / final_div_factor`` at the end. (PyTorch starts
    at ``max_lr / div_factor``; here the start is the task's initial learning rate, since the first
    interval runs before any decision, so ``max_factor`` plays the role of ``div_factor``.)

    Args:
        decoder: see :class:`LRSchedule`.
        max_factor: peak relative to ``lr_0`` (``>= 1``).
        pct_start: fraction of training spent rising, in ``(0, 1)``.
        final_div_factor: the final learning rate is ``lr_0 / final_div_factor`` (``>= 1``).
    """

    def __init__(
        self,
        decoder: ActionDecoder,
        max_factor: float = 10.0,
        pct_start: float = 0.3,
        final_div_factor: float = 100.0,
    ) -> None:
        super().__init__(decoder)
        self.max_factor = _check_positive("max_factor", max_factor)
        self.final_div_factor = _check_positive("final_div_factor", final_div_factor)
        if self.max_factor < 1 or self.final_div_factor < 1:
            raise ValueError(
                f"OneCycle needs max_factor >= 1 and final_div_factor >= 1, got {max_factor!r} and {final_div_factor!r}"
            )
        self.pct_start = _check_fraction("pct_start", pct_start, open_low=True, open_high=True)

    def log10_factor(self, progress: np.ndarray | float) -> np.ndarray:
        p = np.clip(np.asarray(progress, np.float64), 0.0, 1.0)
        peak, end = self.max_factor, 1.0 / self.final_div_factor

        def cos_anneal(start: float, stop: float, frac: np.ndarray) -> np.ndarray:
            return stop + (start - stop) * 0.5 * (1.0 + np.cos(np.pi * frac))

        rising = cos_anneal(1.0, peak, p / self.pct_start)
        falling = cos_anneal(peak, end, (p - self.pct_start) / (1.0 - self.pct_start))
        return np.log10(np.where(p < self.pct_start, rising, falling))


class ReduceLROnPlateau(LRSchedule):
    """Shape: flat until validation stops improving, then a drop by ``factor``; repeated (PyTorch's rule).

    Follows ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (mode ``"min"``, relative threshold) with
    one scheduler step per decision, on the observed ``log_val_loss`` feature: a validation loss counts
    as an improvement when it is below ``best * (1 - threshold)``; after more than ``patience``
    decisions without one the learning rate is multiplied by ``factor`` and ``cooldown`` decisions
    pass before bad decisions are counted again. ``min_factor`` floors the rate at ``min_factor * lr_0``.

    The per-run bookkeeping lives in the returned ``state``, an array ``(n, 4)`` of (best log
    validation loss, bad decisions, cooldown left, current target in decades), so one instance runs
    a batch of runs; a row restarts where ``episode_start`` is true (or when ``state`` is None).

    Args:
        decoder: see :class:`LRSchedule`.
        factor: multiplicative decay in ``(0, 1)``.
        patience: decisions without improvement tolerated before a decay (``>= 0``).
        threshold: relative improvement that counts, ``>= 0``.
        cooldown: decisions to wait after a decay, ``>= 0``.
        min_factor: lower bound relative to ``lr_0`` (``> 0``).
    """

    def __init__(
        self,
        decoder: ActionDecoder,
        factor: float = 0.1,
        patience: int = 2,
        threshold: float = 1e-4,
        cooldown: int = 0,
        min_factor: float = 1e-4,
    ) -> None:
        super().__init__(decoder)
        self.factor = _check_fraction("factor", factor, open_low=True, open_high=True)
        for name, value in (("patience", patience), ("cooldown", cooldown)):
            if not is_number(value) or int(value) != value or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        self.patience, self.cooldown = int(patience), int(cooldown)
        self.threshold = _number("threshold", threshold)
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must lie in [0, 1), got {threshold!r}")
        self.min_factor = _check_positive("min_factor", min_factor)
        self._val_col = ObservationBuilder(decoder).feature_names().index("log_val_loss")

    def initial_state(self, n_envs: int = 1) -> np.ndarray:
        state = np.zeros((n_envs, 4))
        state[:, 0] = np.nan  # no best yet: the next observation starts the row
        return state

    def log10_factor(self, progress: np.ndarray | float) -> np.ndarray:
        raise TypeError("ReduceLROnPlateau reacts to validation losses; it has no fixed schedule of progress")

    def _targets(self, obs: np.ndarray, state: Any, episode_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(obs)
        if state is None:
            state = self.initial_state(n)
        state = np.array(state, dtype=np.float64, copy=True)
        if state.shape != (n, 4):
            raise ValueError(f"ReduceLROnPlateau state must have shape ({n}, 4), got {state.shape}")
        state[episode_start] = self.initial_state(int(episode_start.sum()))
        val = obs[:, self._val_col].astype(np.float64)
        best, bad, cool, target = state.T  # views: updating them updates state
        fresh = np.isnan(best)
        improved = ~fresh & (val < best + math.log(1.0 - self.threshold))
        best[fresh | improved] = val[fresh | improved]
        bad[fresh | improved] = 0
        bad[~fresh & ~improved] += 1
        cooling = cool > 0
        cool[cooling] -= 1
        bad[cooling] = 0
        reduce = bad > self.patience
        target[reduce] = np.maximum(target[reduce] + math.log10(self.factor), math.log10(self.min_factor))
        cool[reduce] = self.cooldown
        bad[reduce] = 0
        return target.copy(), state


class ReplaySchedule(LRSchedule):
    """Shape: whatever it is given. Replays an average schedule as a function of progress, open loop.

    The control for a learned policy: if replaying the policy's *average* schedule does as well as
    the policy, the policy learned a schedule, not state-dependent control. The curve is given as
    points ``(progress, decades moved since the start)`` and interpolated linearly (held flat beyond
    its ends). ``log10_change`` of shape ``(m,)`` drives the learning rate only (others held); of
    shape ``(m, k)`` it drives every controlled hyperparameter, in the decoder's log space
    (``-log10(1 - momentum)`` for momentum), as :meth:`from_records` builds it.

    Args:
        decoder: see :class:`LRSchedule`.
        progress: increasing progress points in ``[0, 1]``.
        log10_change: the target decades moved since the start at each point, ``(m,)`` or ``(m, k)``.
    """

    def __init__(
        self,
        decoder: ActionDecoder,
        progress: Sequence[float] | np.ndarray,
        log10_change: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    ) -> None:
        super().__init__(decoder)
        p = np.asarray(progress, np.float64).reshape(-1)
        y = np.asarray(log10_change, np.float64)
        if y.ndim == 1:
            y = np.where(np.arange(decoder.num_actions) == self._lr, y[:, None], 0.0)
        if y.ndim != 2 or y.shape != (len(p), decoder.num_actions) or len(p) < 1:
            raise ValueError(
                f"log10_change must have shape ({len(p)},) or ({len(p)}, {decoder.num_actions}) for "
                f"{len(p)} progress points and hyperparameters {list(decoder.names)}, got {np.shape(log10_change)}"
            )
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(y))):
            raise ValueError("progress and log10_change must be finite")
        if np.any(np.diff(p) <= 0) or p[0] < 0 or p[-1] > 1:
            raise ValueError(f"progress must increase strictly within [0, 1], got {p.tolist()}")
        self.progress, self.log10_change = p, y
        names = ObservationBuilder(decoder).feature_names()
        self._change_cols = [names.index(f"{h}_log_change") for h in decoder.names]

    @classmethod
    def from_records(cls, decoder: ActionDecoder, records: Sequence[Any], grid: int = 21) -> ReplaySchedule:
        """The average schedule of finished runs (e.g. a learned policy's), for every controlled hyperparameter.

        Each record (a :class:`training.rollout.EpisodeRecord`, or anything with ``hparams[name]``
        lists and ``task.num_decisions``) gives the decades each hyperparameter moved since the start
        at progress ``i / T`` for its intervals ``i``; each run is interpolated onto ``grid`` points in
        ``[0, 1]`` and the runs are averaged in log space. Diverged runs (which stop early) count up
        to where they stopped.

        Raises:
            ValueError: no record holds a trajectory of every controlled hyperparameter.
        """
        if int(grid) < 2:
            raise ValueError(f"grid must have at least 2 points, got {grid!r}")
        points = np.linspace(0.0, 1.0, int(grid))
        total = np.zeros((len(points), decoder.num_actions))
        count = np.zeros(len(points))
        for rec in records:
            try:
                values = np.stack([np.asarray(rec.hparams[h], np.float64) for h in decoder.names], axis=-1)
            except (KeyError, ValueError):
                continue
            if len(values) == 0:
                continue
            logs = np.stack([s.to_log(s.clip(values[:, j])) for j, s in enumerate(decoder.specs)], axis=-1)
            x = np.arange(len(values)) / rec.task.num_decisions
            covered = np.ones(len(points), bool)
            if len(values) < rec.task.num_decisions:
                covered = points <= x[-1] + 1e-9
            for j in range(decoder.num_actions):
                total[covered, j] += np.interp(points[covered], x, logs[:, j] - logs[0, j])
            count[covered] += 1
        if not count.any():
            raise ValueError(f"no record holds a trajectory of {list(decoder.names)} to replay")
        keep = count > 0
        return cls(decoder, points[keep], total[keep] / count[keep, None])

    def log10_factor(self, progress: np.ndarray | float) -> np.ndarray:
        """The learning-rate curve (decades since the start) at ``progress``."""
        return np.interp(np.asarray(progress, np.float64), self.progress, self.log10_change[:, self._lr])

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """Actions ``(n, k)`` moving every hyperparameter to its replayed value."""
        obs, single = self._as_batch(observation)
        p = obs[:, self._progress_col].astype(np.float64)
        actions = np.zeros((len(obs), self.decoder.num_actions), dtype=np.float32)
        for j, spec in enumerate(self.decoder.specs):
            target = np.interp(p, self.progress, self.log10_change[:, j])
            delta = target - obs[:, self._change_cols[j]].astype(np.float64)
            actions[:, j] = spec.action_for(delta)
        return (actions[0] if single else actions), state


class RandomPolicy:
    """Uniform random actions in the action space ``[-1, 1]^k`` of ``decoder``, every hyperparameter.

    The control that any learned policy must beat. Reproducible: the actions come from an explicit
    ``numpy.random.Generator`` (or one seeded with ``seed``), never from global state. ``deterministic``
    is ignored: this policy is random by definition.

    Args:
        decoder: the decoder of the environment (use the learned policy's, not :func:`schedule_decoder`).
        seed: seed of a fresh generator (ignored when ``rng`` is given).
        rng: the generator to draw from.
    """

    def __init__(self, decoder: ActionDecoder, seed: int | None = None, rng: np.random.Generator | None = None) -> None:
        if not isinstance(decoder, ActionDecoder):
            raise TypeError(f"decoder must be an hpo_env.ActionDecoder, got {type(decoder).__name__}")
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        if seed is not None and (not is_integer(seed) or seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None (fresh entropy), got {seed!r}")
        self.decoder = decoder
        self.seed = seed
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        self.obs_dim = ObservationBuilder(decoder).dim

    def initial_state(self, n_envs: int = 1) -> None:
        return None

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Any]:
        obs, single = _raw_batch(self, observation)
        actions = self.rng.uniform(-1.0, 1.0, size=(len(obs), self.decoder.num_actions)).astype(np.float32)
        return (actions[0] if single else actions), state

    def __repr__(self) -> str:
        return f"RandomPolicy(seed={self.seed!r})"


#: Name -> class of every hand-designed schedule (the benchmark's registry).
BASELINE_SCHEDULES: dict[str, type[LRSchedule]] = {
    "constant": ConstantSchedule,
    "cosine": CosineSchedule,
    "step_decay": StepDecay,
    "linear_decay": LinearDecay,
    "one_cycle": OneCycle,
    "plateau": ReduceLROnPlateau,
}
