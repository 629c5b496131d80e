"""The Gymnasium environment: one whole inner training run per episode."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from hpo_env.actions import ActionDecoder
from hpo_env.checks import as_real_array, is_integer
from hpo_env.core import EpisodeBatch
from hpo_env.features import OBS_BOUND
from hpo_env.tasks import DEFAULT_LR_SPREAD, SPLITS, TaskDistribution, TaskSpec, ToyTaskDistribution

__all__ = ["HPOEnv", "make_distribution"]


def make_distribution(
    task_distribution: TaskDistribution | str | None,
    *,
    lr_spread: float = DEFAULT_LR_SPREAD,
    lr_center: float = 0.0,
    lr_gain_spread: float = 0.0,
) -> TaskDistribution:
    """A :class:`TaskDistribution` from an instance (used as is), a split name (``"train"``,
    ``"validation"``, ``"test"``, ``"all"``; with initial learning rates spread by ``lr_spread`` decades
    around the default shifted by ``lr_center`` decades, and hidden learning-rate gains spread by
    ``lr_gain_spread`` decades) or ``"toy"``."""
    if task_distribution is None:
        task_distribution = "train"
    if isinstance(task_distribution, TaskDistribution):
        return task_distribution
    if task_distribution == "toy":
        if lr_spread != DEFAULT_LR_SPREAD or lr_center != 0 or lr_gain_spread != 0:
            raise ValueError(
                "the 'toy' task distribution has its own fixed learning rates; lr_spread, lr_center and lr_gain_spread"
                f" apply to the built-in splits {list(SPLITS)} only"
            )
        return ToyTaskDistribution()
    if isinstance(task_distribution, str) and task_distribution in SPLITS:
        return TaskDistribution.default(
            task_distribution, lr_spread=lr_spread, lr_center=lr_center, lr_gain_spread=lr_gain_spread
        )
    raise ValueError(
        f"task_distribution must be a TaskDistribution or one of {[*SPLITS, 'toy']}, got {task_distribution!r}"
    )


class EpisodeSettings:
    """What :class:`HPOEnv` and :class:`~hpo_env.HPOVecEnv` share about their episodes (both hold an
    :class:`~hpo_env.core.EpisodeBatch` as ``_batch``): the settings that may change between steps, and
    those fixed at construction."""

    _batch: EpisodeBatch
    _task_distribution: TaskDistribution

    @property
    def divergence_penalty(self) -> float:
        """The return of a diverged episode is ``-divergence_penalty``; settable (``set_attr`` too)."""
        return self._batch.divergence_penalty

    @divergence_penalty.setter
    def divergence_penalty(self, value: float) -> None:
        self._batch.divergence_penalty = value

    @property
    def task_distribution(self) -> TaskDistribution:
        """Where the next tasks come from; settable (``set_attr`` too), to a distribution or a split name."""
        return self._task_distribution

    @task_distribution.setter
    def task_distribution(self, value: TaskDistribution | str | None) -> None:
        self._task_distribution = make_distribution(value)

    @property
    def decoder(self) -> ActionDecoder:
        """The actions' meaning (fixed at construction: the action and observation spaces follow from it)."""
        return self._batch.decoder

    @property
    def feature_names(self) -> list[str]:
        return self._batch.features.feature_names()

    @property
    def gradient_features(self) -> bool:
        """Whether the observations include the gradient features."""
        return self._batch.gradient_features

    @property
    def epochs_feature(self) -> bool:
        """Whether the observations include the run's planned number of epochs."""
        return self._batch.epochs_feature


class HPOEnv(EpisodeSettings, gym.Env):
    """Schedule the hyperparameters of an inner training run.

    Each episode trains one inner model on one task (sampled from ``task_distribution`` at reset, or
    given as ``reset(options={"task": spec})``) for its whole step budget. ``reset`` runs the first
    decision interval with the task's initial hyperparameters; each ``step(action)`` changes the
    controlled hyperparameters multiplicatively (see :class:`~hpo_env.actions.ActionDecoder`), runs
    ``steps_per_action`` inner optimiser steps and returns the validation gain
    ``log(L_{t-1}) - log(L_t)`` as reward. The episode terminates when the budget is spent, or at a
    divergence, with a penalty and ``info["diverged"] = True``.

    Args:
        task_distribution: where tasks come from: a :class:`TaskDistribution`, a split name
            (``"train"``, ``"test"``, ``"all"``) or ``"toy"``. Default: the training split.
        hyperparameters: the controlled hyperparameters, in action order.
        bounds: ``{name: (lower, upper)}`` overriding the default bounds.
        max_log10_change: largest change per action in decades (one number, or per name).
        max_log10_increase: largest increase per action, per name, where it differs (``{"lr": 0.25}``).
        max_log10_above_initial: cap per name relative to the episode's initial value, in decades
            (``{"lr": 1.5}``: the learning rate stays below 31.6x the task's starting one).
        divergence_penalty: the return of a diverged episode is ``-divergence_penalty``.
        gradient_features: also observe the gradient features (``grad_cosine``, ``grad_norm``; see
            :mod:`hpo_env.features`), at the cost of a copy and a batched matmul per inner step.
        epochs_feature: also observe how many passes over its training set the run makes
            (``log_epochs``, constant over the episode; see :mod:`hpo_env.features`).
        device: torch device of the inner model.
        render_mode: ``None`` or ``"ansi"``.

    Example:
        >>> import gymnasium as gym, hpo_env
        >>> env = gym.make("hpo_env/HPOToy-v0")
        >>> obs, info = env.reset(seed=0)
        >>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        >>> obs.shape == env.observation_space.shape and env.observation_space.contains(obs)
        True
        >>> sorted(info["hparams"])  # the optimiser's values; the policy controls lr and weight_decay
        ['lr', 'momentum', 'weight_decay']
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        task_distribution: TaskDistribution | str | None = None,
        *,
        hyperparameters: Sequence[str] = ("lr", "weight_decay"),
        bounds: Mapping[str, tuple[float, float]] | None = None,
        max_log10_change: float | Mapping[str, float] | None = None,
        max_log10_increase: Mapping[str, float] | None = None,
        max_log10_above_initial: Mapping[str, float] | None = None,
        divergence_penalty: float = 1.0,
        gradient_features: bool = False,
        epochs_feature: bool = False,
        device: str = "cpu",
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.task_distribution = task_distribution  # (through make_distribution: EpisodeSettings)
        decoder = ActionDecoder(hyperparameters, bounds, max_log10_change, max_log10_increase, max_log10_above_initial)
        self._batch = EpisodeBatch(
            1,
            decoder,
            device=device,
            divergence_penalty=divergence_penalty,
            gradient_features=gradient_features,
            epochs_feature=epochs_feature,
        )
        self.render_mode = render_mode
        k = self.decoder.num_actions
        self.action_space = gym.spaces.Box(-1.0, 1.0, (k,), np.float32)
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (self._batch.obs_dim,), np.float32)
        self._last_info: dict[str, Any] = {}
        self._last_reward = 0.0

    @property
    def task(self) -> TaskSpec | None:
        ep = self._batch.episodes[0]
        return None if ep is None else ep.spec

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        # A NumPy integer (a seed from np.arange, a config array) is a seed, as HPOVecEnv takes it; Gymnasium's
        # seeding accepts Python ints only.
        super().reset(seed=int(seed) if seed is not None and is_integer(seed) else seed)
        options = options or {}
        unknown = set(options) - {"task"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; supported: ['task']")
        spec = options.get("task")
        if spec is None:
            spec = self.task_distribution.sample(self.np_random)
        elif not isinstance(spec, TaskSpec):
            raise TypeError(f"options['task'] must be a TaskSpec, got {type(spec).__name__}")
        obs, infos = self._batch.start([0], [spec])
        self._last_info, self._last_reward = infos[0], 0.0
        return obs[0], infos[0]

    def step(self, action):
        episode = self._batch.episodes[0]
        if episode is None:
            raise RuntimeError("call reset() before step()")
        if episode.done:
            raise RuntimeError("the episode has ended (terminated or truncated): call reset() before step()")
        action = as_real_array(action, "the action")
        k = self.decoder.num_actions
        if action.shape != (k,) and not (k == 1 and action.shape == ()):
            raise ValueError(
                f"expected an action of shape ({k},) (one value in [-1, 1] per controlled hyperparameter "
                f"{list(self.decoder.names)}), got an array of shape {action.shape}"
            )
        obs, rewards, terminated, infos = self._batch.step([0], action.reshape(1, k))
        self._last_info, self._last_reward = infos[0], float(rewards[0])
        return obs[0], float(rewards[0]), bool(terminated[0]), False, infos[0]

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        info = self._last_info
        if not info:
            return "HPOEnv: call reset() first\n"
        hp = ", ".join(f"{k}={info['hparams'][k]:.3g}" for k in self.decoder.names)
        acc = f" val_acc={info['val_accuracy']:.3f}" if "val_accuracy" in info else ""
        flag = " DIVERGED" if info["diverged"] else ""
        return (
            f"[{info['task_id']}] decision {info['decision']}/{info['num_decisions']} "
            f"step {info['inner_step']}: {hp} | train={info['train_loss']:.4g} val={info['val_loss']:.4g}"
            f"{acc} reward={self._last_reward:+.4f}{flag}\n"
        )
