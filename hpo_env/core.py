"""Episode logic for N concurrent inner training runs.

:class:`EpisodeBatch` turns a :class:`~hpo_env.trainer.BatchedTrainer` into N episodes: it applies
actions through the :class:`~hpo_env.actions.ActionDecoder`, builds observations with the
:class:`~hpo_env.features.ObservationBuilder`, computes rewards and detects the end of episodes.
:class:`~hpo_env.HPOEnv` is the N = 1 case and :class:`~hpo_env.HPOVecEnv` the N-slot one, so both
follow exactly the same protocol (see :mod:`hpo_env.features`).

Reward: ``r_t = log(L_{t-1}) - log(L_t)`` on validation loss, which sums to ``log(L_1 / L_T)`` over
an episode. A divergence (non-finite loss or weights, or an exploded validation loss) ends the
episode with ``r = log(L_{t-1} / L_1) - divergence_penalty``, so a diverged episode returns exactly
``-divergence_penalty`` however far it had got: diverging is never better than a run that ended
``divergence_penalty`` nats worse than its first interval. Losses are floored at ``LOSS_FLOOR``
before the log.

Reference runs (``reference_runs=True``, for meta-training): each slot also trains a hidden twin on
the same task, from the same initialisation and minibatch order, at a constant learning rate equal
to the optimiser's default (the benchmark's untuned baseline; the other hyperparameters as the task
starts them). Its log-loss gain over the same interval is reported as ``info["reference_gain"]``
(0 once the twin has diverged, and for the interval in which it diverges), so that a wrapper can
train the agent on the gain *over* the default, a control variate that removes how much a task can
improve by itself. The environment's own reward is unchanged, up to float rounding (the twins share
the batched kernels). It doubles the inner training work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from hpo_env.actions import ActionDecoder
from hpo_env.checks import as_real_array, is_flag, is_number
from hpo_env.features import ObservationBuilder
from hpo_env.tasks import DEFAULT_HPARAMS, TaskSpec
from hpo_env.trainer import HPARAM_NAMES, BatchedTrainer, ChunkResult

__all__ = ["EpisodeBatch"]

#: Losses are floored here before their log is taken: a float32 cross-entropy can round to exactly 0
#: on an easy validation set, which must not give an infinite reward.
LOSS_FLOOR = 1e-12


def _log_loss(loss: float) -> float:
    return float(np.log(max(float(loss), LOSS_FLOOR)))


@dataclass
class _Episode:
    spec: TaskSpec
    decision: int = 0  # completed intervals t
    first_val: float = np.nan  # L_1
    last_val: float = np.nan
    initial_val: float = np.nan  # L_0, before any training (for reporting only)
    diverged_at_start: bool = False
    done: bool = False
    initial_hp: np.ndarray | None = None  # the controlled values the run started with (for relative caps)
    reference_val: float = np.nan  # last validation loss of the reference twin (nan once it diverged)


class EpisodeBatch:
    """N episodes of inner training, stepped together.

    Args:
        n: number of slots.
        decoder: the action decoder (controlled hyperparameters and bounds).
        device: torch device of the inner models.
        divergence_penalty: return of a diverged episode is ``-divergence_penalty``.
        gradient_features: also observe the gradient features (:data:`~hpo_env.features.GRADIENT_FEATURES`).
        epochs_feature: also observe each run's planned number of epochs
            (:data:`~hpo_env.features.EPOCHS_FEATURE`).
        reference_runs: also train each slot's task at the optimiser's default learning rate in a
            hidden twin (slot ``n + i``) and report its gain per interval as ``info["reference_gain"]``.
    """

    def __init__(
        self,
        n: int,
        decoder: ActionDecoder,
        *,
        device: str = "cpu",
        divergence_penalty: float = 1.0,
        gradient_features: bool = False,
        epochs_feature: bool = False,
        reference_runs: bool = False,
    ) -> None:
        self.divergence_penalty = divergence_penalty
        for name, value in (
            ("gradient_features", gradient_features),
            ("epochs_feature", epochs_feature),
            ("reference_runs", reference_runs),
        ):
            if not is_flag(value):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.n = n
        self.decoder = decoder
        self.gradient_features = bool(gradient_features)
        self.reference_runs = bool(reference_runs)
        self.trainer = BatchedTrainer(
            2 * n if self.reference_runs else n, device=device, gradient_stats=self.gradient_features
        )
        self.epochs_feature = bool(epochs_feature)
        self.features = ObservationBuilder(
            decoder, n, gradient_features=self.gradient_features, epochs_feature=self.epochs_feature
        )
        self._cols = [HPARAM_NAMES.index(h) for h in decoder.names]
        self.episodes: list[_Episode | None] = [None] * n

    @property
    def divergence_penalty(self) -> float:
        """The return of a diverged episode is ``-divergence_penalty`` (settable between steps)."""
        return self._divergence_penalty

    @divergence_penalty.setter
    def divergence_penalty(self, value: float) -> None:
        if not (is_number(value) and 0 <= value < math.inf):
            raise ValueError(f"divergence_penalty must be a finite number >= 0, got {value!r}")
        self._divergence_penalty = float(value)

    @property
    def obs_dim(self) -> int:
        return self.features.dim

    def controlled(self, slot: int) -> np.ndarray:
        return self.trainer.hparams(slot)[self._cols]

    def _episode(self, slot: int) -> _Episode:
        """The episode of a slot known to hold one (just started, or checked by :meth:`step`)."""
        ep = self.episodes[slot]
        assert ep is not None
        return ep

    # ------------------------------------------------------------------------------------------
    def start(self, slots: Sequence[int], specs: Sequence[TaskSpec]) -> tuple[np.ndarray, list[dict]]:
        """Load tasks into ``slots``, run their first interval; returns observations and infos."""
        slots = list(slots)
        for s, spec in zip(slots, specs):
            self.trainer.load(s, spec)
            hp = self.trainer.hparams(s)
            # Initial values outside the controlled bounds are clipped in, as any later value is.
            hp[self._cols] = self.decoder.clip(hp[self._cols])
            self.trainer.set_hparams(s, hp)
            self.episodes[s] = _Episode(spec, initial_hp=hp[self._cols].copy())
            if self.reference_runs:
                self._load_reference(s, spec, hp)
        # Twins too: the untrained loss is the reference their divergence is measured against, as for their slots.
        twins = [self.n + s for s in slots] if self.reference_runs else []
        l0 = self.trainer.evaluate(slots + twins)[0][: len(slots)]
        res = self._train(slots)
        hps = np.stack([self.controlled(s) for s in slots])
        progress = np.array([1.0 / self._episode(s).spec.num_decisions for s in slots])
        adaptive = np.array([self._episode(s).spec.optimizer != "sgd" for s in slots])
        epochs = np.array([self.trainer.planned_epochs(s) for s in slots]) if self.epochs_feature else None
        obs = self.features.reset(
            slots,
            res.val_loss,
            res.train_loss,
            hps,
            progress,
            adaptive=adaptive,
            gradients=self._gradients(res),
            epochs=epochs,
        )
        infos = []
        for j, s in enumerate(slots):
            ep = self._episode(s)
            ep.decision, ep.initial_val = 1, float(l0[j])
            ep.first_val = ep.last_val = float(res.val_loss[j])
            # Interval 1 runs before any decision; if it already diverged, the first step ends
            # the episode with the penalty instead of training on.
            ep.diverged_at_start = bool(res.diverged[j])
            infos.append(self._info(s, res.train_loss[j], res.val_loss[j], res.val_accuracy[j], ep.diverged_at_start))
        return obs, infos

    def step(self, slots: Sequence[int], actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        """Apply ``actions`` (``(len(slots), k)``) and run one interval in each slot."""
        slots = list(slots)
        for s in slots:
            ep = self.episodes[s]
            if ep is None or ep.done:
                raise RuntimeError(f"slot {s} has no running episode; reset it before stepping")
        # Check every action before any slot changes, so that a bad one leaves the batch as it was.
        actions = checked_actions(actions, slots, self.decoder)
        obs = np.zeros((len(slots), self.obs_dim), dtype=np.float32)
        rewards = np.zeros(len(slots))
        terminated = np.zeros(len(slots), dtype=bool)
        infos: list[dict] = [{} for _ in slots]
        live = [j for j, s in enumerate(slots) if not self._episode(s).diverged_at_start]
        for j, s in enumerate(slots):
            if self._episode(s).diverged_at_start:
                ep = self._episode(s)
                ep.done = True
                terminated[j], rewards[j] = True, -self.divergence_penalty
                obs[j] = self.features.update(
                    [s],
                    [np.inf],
                    [np.inf],
                    self.controlled(s)[None],
                    actions[j : j + 1],
                    [ep.decision / ep.spec.num_decisions],
                    gradients=None if not self.gradient_features else ([np.nan], [np.nan]),
                )[0]
                infos[j] = self._info(s, np.nan, np.nan, np.nan, True)
                infos[j]["final_val_loss"] = float("nan")  # as for any diverged episode
                if self.reference_runs:
                    infos[j]["reference_gain"] = 0.0
        if not live:
            return obs, rewards, terminated, infos
        live_slots = [slots[j] for j in live]
        full = np.stack([self.trainer.hparams(s) for s in live_slots])
        initial = np.stack([cast(np.ndarray, self._episode(s).initial_hp) for s in live_slots])  # set by start()
        full[:, self._cols] = self.decoder.decode(actions[live], full[:, self._cols], initial)  # one call for all slots
        for s, hp in zip(live_slots, full):
            self.trainer.set_hparams(s, hp)
        res = self._train(live_slots)
        hps = full[:, self._cols]  # the controlled values just set (training does not change them)
        for ep_slot in live_slots:
            self._episode(ep_slot).decision += 1
        progress = np.array([self._episode(s).decision / self._episode(s).spec.num_decisions for s in live_slots])
        obs[live] = self.features.update(
            live_slots, res.val_loss, res.train_loss, hps, actions[live], progress, gradients=self._gradients(res)
        )
        finished = []
        for i, (j, s) in enumerate(zip(live, live_slots)):
            ep = self._episode(s)
            if res.diverged[i]:
                rewards[j] = _log_loss(ep.last_val) - _log_loss(ep.first_val) - self.divergence_penalty
                terminated[j] = True
            else:
                rewards[j] = _log_loss(ep.last_val) - _log_loss(res.val_loss[i])
                ep.last_val = float(res.val_loss[i])
                terminated[j] = ep.decision >= ep.spec.num_decisions
                if terminated[j]:
                    finished.append(j)
            ep.done = bool(terminated[j])
            infos[j] = self._info(s, res.train_loss[i], res.val_loss[i], res.val_accuracy[i], bool(res.diverged[i]))
            if self.reference_runs:
                infos[j]["reference_gain"] = self._reference_gains.get(s, 0.0)
        if finished:
            test_loss, test_acc = self.trainer.evaluate([slots[j] for j in finished], split="test")
            for j, tl, ta in zip(finished, test_loss, test_acc):
                infos[j]["test_loss"] = float(tl)
                if self._episode(slots[j]).spec.task_type == "classification":
                    infos[j]["test_accuracy"] = float(ta)
        for t in np.flatnonzero(terminated):
            ep = self._episode(slots[t])
            infos[t]["final_val_loss"] = ep.last_val if not infos[t]["diverged"] else float("nan")
        return obs, rewards, terminated, infos

    # -- reference twins ----------------------------------------------------------------------
    def _load_reference(self, s: int, spec: TaskSpec, hp: np.ndarray) -> None:
        twin = self.n + s
        self.trainer.load(twin, spec)  # same seed: same initialisation and minibatch order
        ref = hp.copy()
        ref[HPARAM_NAMES.index("lr")] = DEFAULT_HPARAMS[spec.optimizer]["lr"]
        ref[self._cols] = self.decoder.clip(ref[self._cols])
        self.trainer.set_hparams(twin, ref)

    def _train(self, slots: list[int]) -> ChunkResult:
        """Train ``slots`` for one interval, with their live reference twins in the same batched call.

        Sets ``self._reference_gains`` (slot -> the twin's log-loss gain over this interval; 0 for a
        twin that has diverged, in this interval or before) and returns the slots' own results.
        """
        self._reference_gains: dict[int, float] = {}
        if not self.reference_runs:
            return self.trainer.train_chunk(slots)
        twins = [s for s in slots if self._episode(s).decision == 0 or np.isfinite(self._episode(s).reference_val)]
        res = self.trainer.train_chunk(slots + [self.n + s for s in twins])
        k = len(slots)
        for i, s in enumerate(twins, start=k):
            ep = self._episode(s)
            val = float(res.val_loss[i])
            if res.diverged[i]:
                ep.reference_val = np.nan
            elif ep.decision == 0:  # the first interval, before any decision: no gain to report
                ep.reference_val = val
            else:
                self._reference_gains[s] = _log_loss(ep.reference_val) - _log_loss(val)
                ep.reference_val = val
        own = {f.name: getattr(res, f.name) for f in dataclasses.fields(res)}
        return dataclasses.replace(res, **{name: v[:k] for name, v in own.items() if v is not None})

    def _gradients(self, res) -> tuple[np.ndarray, np.ndarray] | None:
        return (res.grad_cosine, res.grad_log_norm) if self.gradient_features else None

    def _info(self, s: int, train: float, val: float, acc: float, diverged: bool) -> dict:
        ep = self._episode(s)
        hp = self.trainer.hparams(s)
        info = {
            "val_loss": float(val),
            "train_loss": float(train),
            "hparams": {name: float(v) for name, v in zip(HPARAM_NAMES, hp)},
            "task_family": ep.spec.family,
            "task_id": ep.spec.task_id,
            "diverged": diverged,
            "decision": ep.decision,
            "num_decisions": ep.spec.num_decisions,
            "inner_step": self.trainer.steps_done(s),
            "initial_val_loss": ep.initial_val,
            "first_val_loss": ep.first_val,
        }
        if ep.spec.task_type == "classification":
            info["val_accuracy"] = float(acc)
        return info


def checked_actions(actions: object, slots: Sequence[int], decoder: ActionDecoder) -> np.ndarray:
    """``actions`` as a finite ``(len(slots), k)`` array, one row per slot of ``slots``; a ValueError that
    names the shape or the slots otherwise."""
    k = decoder.num_actions
    array = as_real_array(actions)
    # Exactly (n, k), or (n,) with one hyperparameter: a transposed (k, n) array has the right size
    # but would give each slot another slot's values.
    if array.shape != (len(slots), k) and not (k == 1 and array.shape == (len(slots),)):
        raise ValueError(
            f"expected actions of shape ({len(slots)}, {k}) (one row per slot, one value per controlled "
            f"hyperparameter {list(decoder.names)}), got an array of shape {array.shape}"
        )
    array = array.reshape(len(slots), k)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise ValueError(
            f"actions must be finite; slot(s) {[slots[int(j)] for j in np.flatnonzero(bad)]} got {array[bad]}"
        )
    return array
