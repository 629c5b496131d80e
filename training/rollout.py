"""Run any schedule (learned or hand-designed) over whole inner training runs, many at once.

:func:`run_episodes` is the one evaluation loop of the project: meta-training's periodic
evaluation, the benchmark and the examples all call it. A *policy* is anything with SB3's
``predict(obs, state=None, episode_start=None, deterministic=False) -> (actions, state)`` on
batches of raw observations: a :class:`~agents.PolicyBundle`, a baseline schedule, or a plain SB3
model when observations need no normalisation. All tasks run as slots of one
:class:`~hpo_env.EpisodeBatch`, so the inner models train batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpo_env import ActionDecoder, EpisodeBatch, TaskSpec, build_splits

__all__ = ["EpisodeRecord", "run_episodes"]


@dataclass
class EpisodeRecord:
    """Everything observed in one inner training run.

    ``hparams[name][t]`` is the value used in interval ``t + 1``; ``val_loss[t]`` is the
    validation loss after interval ``t + 1`` (so ``val_loss[0]`` is ``L_1``).
    """

    task: TaskSpec
    seed_index: int
    hparams: dict[str, list[float]] = field(default_factory=dict)
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    actions: list[list[float]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    initial_val_loss: float = float("nan")
    final_val_loss: float = float("nan")
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")
    test_macro_f1: float = float("nan")
    diverged: bool = False

    @property
    def episode_return(self) -> float:
        return float(np.sum(self.rewards))

    @property
    def final_val_accuracy(self) -> float:
        return self.val_accuracy[-1] if self.val_accuracy else float("nan")


def run_episodes(
    policy: Any,
    tasks: Sequence[TaskSpec],
    decoder: ActionDecoder,
    *,
    deterministic: bool = True,
    device: str = "cpu",
    divergence_penalty: float = 1.0,
    seed_indices: Sequence[int] | None = None,
    gradient_features: bool | None = None,
    epochs_feature: bool | None = None,
) -> list[EpisodeRecord]:
    """Run ``policy`` on every task for its whole budget and return one record per task.

    Args:
        policy: an object with SB3's ``predict`` protocol, fed raw observations ``(n, obs_dim)``.
        tasks: the tasks (their ``seed`` fields fix initialisation and minibatch order).
        decoder: the action decoder, i.e. controlled hyperparameters and their bounds.
        deterministic: passed to ``predict``.
        device: torch device of the inner models.
        divergence_penalty: as in :class:`~hpo_env.HPOEnv`.
        seed_indices: labels stored in the records (defaults to 0).
        gradient_features: observe the gradient features (default: the policy's ``gradient_features``
            attribute, as a :class:`~agents.PolicyBundle` has it; off for other policies).
        epochs_feature: observe the planned number of epochs (default: the policy's ``epochs_feature``
            attribute; off for other policies).
    """
    tasks = list(tasks)
    n = len(tasks)
    if n == 0:
        return []
    if gradient_features is None:
        gradient_features = bool(getattr(policy, "gradient_features", False))
    if epochs_feature is None:
        epochs_feature = bool(getattr(policy, "epochs_feature", False))
    batch = EpisodeBatch(
        n,
        decoder,
        device=device,
        divergence_penalty=divergence_penalty,
        gradient_features=gradient_features,
        epochs_feature=epochs_feature,
    )
    records = [EpisodeRecord(t, 0 if seed_indices is None else int(seed_indices[i])) for i, t in enumerate(tasks)]
    obs, infos = batch.start(list(range(n)), tasks)
    for rec, info in zip(records, infos):
        _record(rec, info, decoder)
        rec.initial_val_loss = info["initial_val_loss"]
    live = np.ones(n, dtype=bool)
    state = getattr(policy, "initial_state", lambda n: None)(n)
    episode_start = np.ones(n, dtype=bool)
    while live.any():
        actions, state = policy.predict(obs, state=state, episode_start=episode_start, deterministic=deterministic)
        actions = np.asarray(actions, dtype=np.float32).reshape(n, decoder.num_actions)
        episode_start = np.zeros(n, dtype=bool)
        slots = np.flatnonzero(live)
        new_obs, rewards, terminated, step_infos = batch.step(slots.tolist(), actions[slots])
        obs = obs.copy()
        obs[slots] = new_obs
        for j, s in enumerate(slots):
            rec, info = records[s], step_infos[j]
            rec.actions.append(actions[s].tolist())
            rec.rewards.append(float(rewards[j]))
            rec.diverged = rec.diverged or bool(info["diverged"])
            if not info["diverged"]:
                _record(rec, info, decoder)
            if terminated[j]:
                live[s] = False
                rec.final_val_loss = info.get("final_val_loss", float("nan"))
                rec.test_loss = info.get("test_loss", float("nan"))
                rec.test_accuracy = info.get("test_accuracy", float("nan"))
                if rec.task.task_type == "classification" and not rec.diverged:
                    rec.test_macro_f1 = _macro_f1(batch, int(s))
    return records


def _macro_f1(batch: EpisodeBatch, slot: int) -> float:
    """Macro-averaged F1 of a finished classification run on its test split."""
    from sklearn.metrics import f1_score

    pred = batch.trainer.predictions([slot], split="test")[0]
    labels = build_splits(batch.trainer.spec(slot)).y_test.cpu().numpy()  # cached: no rebuild
    return float(f1_score(labels, pred, average="macro"))


def _record(rec: EpisodeRecord, info: dict, decoder: ActionDecoder) -> None:
    for name in decoder.names:
        rec.hparams.setdefault(name, []).append(info["hparams"][name])
    rec.val_loss.append(info["val_loss"])
    rec.train_loss.append(info["train_loss"])
    if "val_accuracy" in info:
        rec.val_accuracy.append(info["val_accuracy"])
