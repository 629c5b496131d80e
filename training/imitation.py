"""Warm start by imitation: clone a grid-tuned cosine schedule before PPO (``hpo-train --imitation-tasks N``).

PPO starts from a policy that knows nothing; the benchmark's strongest baseline is a cosine schedule
at the best learning rate of a K-point grid, which costs K full runs per task. This module turns that
oracle into a teacher for meta-training:

1. :func:`grid_search`: on ``N`` meta-training tasks (never the held-out families), run cosine
   schedules at the benchmark oracle's K learning rates (:func:`agents.baselines.lr_grid`),
   batched, and keep each task's best final validation loss.
2. :func:`demonstrations`: run the teacher, :class:`OracleCosine`, *through the policy's own action
   space*: from the task's initial learning rate it moves (at most ``lr_step`` decades per decision)
   towards that task's best rate on a cosine decay. The observations it sees are exactly the
   policy's (the same :class:`~hpo_env.EpisodeBatch` code).
3. :func:`clone`: fit the recurrent policy's mean action to the teacher's actions and its value head to
   the discounted returns, on whole episodes (the LSTM sees each run from its start), with the
   observations normalised by the run's ``VecNormalize`` (whose statistics it updates first).

The teacher knows each task's best learning rate; the student only sees the loss curves, so it learns
what can be inferred from them, and PPO then improves on the clone. The cost, ``N * (K + 1)`` inner
runs, is paid once, before the first rollout.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agents.baselines import CosineSchedule, lr_grid, schedule_decoder
from agents.bundle import feature_options_of
from hpo_env import ActionDecoder, ObservationBuilder, TaskDistribution, TaskSpec
from hpo_env.envs import make_distribution
from hpo_env.tasks import DEFAULT_HPARAMS
from training.rollout import EpisodeRecord, run_episodes

__all__ = ["Demonstrations", "OracleCosine", "clone", "demonstrations", "grid_search", "warm_start"]


def grid_search(
    tasks: Sequence[TaskSpec], decoder: ActionDecoder, *, grid_size: int = 8, decades: float = 1.5
) -> np.ndarray:
    """Best cosine-schedule learning rate per task (the lowest final validation loss; diverged runs lose).

    All ``len(tasks) * grid_size`` runs train as slots of one batch.
    """
    tasks = list(tasks)
    lrs = np.array([lr_grid(t.optimizer, grid_size, decades) for t in tasks])  # (n, K)
    runs = [t.replace(lr=float(lr)) for t, row in zip(tasks, lrs) for lr in row]
    records = run_episodes(CosineSchedule(schedule_decoder(decoder)), runs, decoder)
    final = np.array([np.inf if r.diverged or not np.isfinite(r.final_val_loss) else r.final_val_loss for r in records])
    return lrs[np.arange(len(tasks)), final.reshape(len(tasks), grid_size).argmin(axis=1)]


class OracleCosine(CosineSchedule):
    """A cosine decay from a per-run learning rate, followed through a bounded action space.

    Row ``i`` of every batch it is asked about is run ``i``, which starts at ``initial_lr[i]`` and
    targets ``best_lr[i] * (1 + cos(pi * progress)) / 2``; the decoder's ``max_log10_change`` limits
    how fast it gets there, as it limits the policy. It records what it saw and did. With optional
    feature groups on, the environment observes them for the student's sake; the schedule itself
    reads only the base features, which come first.
    """

    def __init__(
        self,
        decoder: ActionDecoder,
        initial_lr: np.ndarray | Sequence[float],
        best_lr: np.ndarray | Sequence[float],
        *,
        gradient_features: bool = False,
        epochs_feature: bool = False,
    ) -> None:
        super().__init__(decoder)
        self.gradient_features, self.epochs_feature = gradient_features, epochs_feature
        self.offset = np.log10(np.asarray(best_lr, np.float64)) - np.log10(np.asarray(initial_lr, np.float64))
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []

    def _targets(self, obs: np.ndarray, state: Any, episode_start: np.ndarray) -> tuple[np.ndarray, Any]:
        target, state = super()._targets(obs, state, episode_start)
        return self.offset + target, state

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        base = np.asarray(observation)[..., : self.obs_dim]
        actions, state = super().predict(base, state, episode_start, deterministic)
        self.seen.append((np.array(observation, np.float32), np.array(actions, np.float32)))
        return actions, state


@dataclass
class Demonstrations:
    """Whole teacher episodes, padded to the longest: ``obs (E, T, d)``, ``actions (E, T, k)``, ``mask (E, T)``."""

    obs: np.ndarray
    actions: np.ndarray
    returns: np.ndarray  # (E, T) discounted returns from each decision
    mask: np.ndarray
    records: list[EpisodeRecord]

    @property
    def num_decisions(self) -> int:
        return int(self.mask.sum())


def demonstrations(
    tasks: Sequence[TaskSpec],
    best_lr: np.ndarray,
    decoder: ActionDecoder,
    *,
    gamma: float,
    gradient_features: bool = False,
    epochs_feature: bool = False,
) -> Demonstrations:
    """Run :class:`OracleCosine` on ``tasks`` in the policy's action space and collect its episodes,
    with the observations the student sees (its optional feature groups included)."""
    tasks = list(tasks)
    options = {"gradient_features": gradient_features, "epochs_feature": epochs_feature}
    teacher = OracleCosine(decoder, [t.lr for t in tasks], best_lr, **options)
    records = run_episodes(teacher, tasks, decoder)
    lengths = [len(r.actions) for r in records]
    e, t_max = len(tasks), max(lengths)
    obs = np.zeros((e, t_max, ObservationBuilder(decoder, **options).dim), np.float32)
    actions = np.zeros((e, t_max, decoder.num_actions), np.float32)
    returns = np.zeros((e, t_max), np.float32)
    mask = np.zeros((e, t_max), bool)
    for step, (o, a) in enumerate(teacher.seen[:t_max]):
        live = np.array([step < n for n in lengths])
        obs[live, step], actions[live, step], mask[live, step] = o[live], a[live], True
    for i, rec in enumerate(records):
        g = 0.0
        for step in reversed(range(lengths[i])):
            g = rec.rewards[step] + gamma * g
            returns[i, step] = g
    return Demonstrations(obs, actions, returns, mask, records)


def clone(
    model: Any,
    demos: Demonstrations,
    vec_normalize: Any | None,
    *,
    epochs: int = 300,
    batch_episodes: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Fit ``model``'s recurrent policy to the demonstrations; returns the final losses.

    The mean action is fitted to the teacher's actions (squared error; the policy's exploration
    noise is left as it was) and the value head to the discounted returns.
    """
    policy = model.policy
    if vec_normalize is not None and getattr(vec_normalize, "norm_obs", False):
        vec_normalize.obs_rms.update(demos.obs[demos.mask].astype(np.float64))
        obs = vec_normalize.normalize_obs(demos.obs.reshape(-1, demos.obs.shape[-1])).reshape(demos.obs.shape)
    else:
        obs = demos.obs
    dev = policy.device
    obs_t = torch.as_tensor(np.asarray(obs, np.float32), device=dev)
    act_t = torch.as_tensor(demos.actions, device=dev)
    ret_t = torch.as_tensor(demos.returns, device=dev)
    mask_t = torch.as_tensor(demos.mask, dtype=torch.float32, device=dev)
    e, t_max, d = obs_t.shape
    opt = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    bc = value = float("nan")
    policy.set_training_mode(True)
    for _ in range(epochs):
        for idx in torch.randperm(e, generator=gen).split(batch_episodes):
            n = len(idx)
            # Zero initial states and no resets inside a sequence: each row is one whole episode.
            lstm = policy.lstm_actor
            zeros = torch.zeros(lstm.num_layers, n, lstm.hidden_size, device=dev)
            starts = torch.zeros(n * t_max, device=dev)
            flat_obs = obs_t[idx].reshape(n * t_max, d)
            dist, _ = policy.get_distribution(flat_obs, (zeros, zeros), starts)
            mean = dist.distribution.mean.reshape(n, t_max, -1)
            values = policy.predict_values(flat_obs, (zeros, zeros), starts).reshape(n, t_max)
            m = mask_t[idx]
            bc_loss = (((mean - act_t[idx]) ** 2).sum(-1) * m).sum() / m.sum()
            value_loss = (((values - ret_t[idx]) ** 2) * m).sum() / m.sum()
            loss = bc_loss + 0.5 * value_loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            bc, value = float(bc_loss.detach()), float(value_loss.detach())
    policy.set_training_mode(False)
    return {"bc_loss": bc, "value_loss": value}


def warm_start(
    model: Any,
    vec_normalize: Any | None,
    decoder: ActionDecoder,
    *,
    n_tasks: int,
    seed: int,
    gamma: float,
    distribution: TaskDistribution | str = "train",
    grid_size: int = 8,
    decades: float = 1.5,
    epochs: int = 300,
    log=print,
) -> dict[str, float]:
    """Grid search, demonstrations and cloning on ``n_tasks`` meta-training tasks; returns a summary."""
    if not hasattr(model.policy, "lstm_actor"):
        raise ValueError(
            f"imitation warm start clones into an LSTM policy (RecurrentPPO), got {type(model.policy).__name__}"
        )
    if not (isinstance(n_tasks, int) and n_tasks >= 1):
        raise ValueError(f"n_tasks must be a positive integer, got {n_tasks!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    dist = make_distribution(distribution)
    tasks = [dist.sample(rng) for _ in range(n_tasks)]
    t0 = time.perf_counter()
    log(f"imitation: grid search, {n_tasks} meta-training tasks ({dist.name}) x {grid_size} learning rates (cosine)...")
    best = grid_search(tasks, decoder, grid_size=grid_size, decades=decades)
    t1 = time.perf_counter()
    demos = demonstrations(tasks, best, decoder, gamma=gamma, **feature_options_of(model, decoder))
    t2 = time.perf_counter()
    losses = clone(model, demos, vec_normalize, epochs=epochs, seed=seed)
    t3 = time.perf_counter()
    teacher_return = float(np.mean([r.episode_return for r in demos.records]))
    summary = {
        "tasks": n_tasks,
        "inner_runs": n_tasks * (grid_size + 1),
        "teacher_mean_return": teacher_return,
        "teacher_divergence": float(np.mean([r.diverged for r in demos.records])),
        "median_log10_best_over_default": float(
            np.median([np.log10(b / DEFAULT_HPARAMS[t.optimizer]["lr"]) for t, b in zip(tasks, best)])
        ),
        "grid_seconds": t1 - t0,
        "demo_seconds": t2 - t1,
        "clone_seconds": t3 - t2,
        **losses,
    }
    log(
        f"imitation: teacher mean return {teacher_return:+.3f} over {demos.num_decisions} decisions; "
        f"clone: action MSE {losses['bc_loss']:.4f}, value MSE {losses['value_loss']:.4f} "
        f"({t1 - t0:.0f} s grid, {t2 - t1:.0f} s demos, {t3 - t2:.0f} s cloning)"
    )
    return summary
