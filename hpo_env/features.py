"""Observations: scale-invariant features of a training run, for N runs at once.

The decision protocol (shared by :class:`~hpo_env.HPOEnv`, :class:`~hpo_env.HPOVecEnv` and the
deployed :class:`~agents.PolicyScheduler`):

* A run of ``T`` *decision intervals* (``T = total_steps / steps_per_action`` in the environment;
  ``total_steps`` of the scheduler counts these intervals directly). An interval is K optimiser
  steps, or an epoch: whatever the user calls ``scheduler.step(val_loss)`` after.
* The first interval runs with the initial hyperparameters. After interval ``t`` (``t = 1..T``) the
  validation loss ``L_t`` (and, if available, the mean training loss of the interval) is observed,
  the features below are built with progress ``t / T``, and the policy's action sets the
  hyperparameters of interval ``t + 1``. The environment's ``reset()`` therefore runs interval 1
  and returns the first observation; its ``step()`` applies an action, runs one interval and
  returns the next observation and the reward ``log(L_{t-1}) - log(L_t)``.
* Losses are measured relative to ``L_1``, the validation loss after the first interval, which the
  environment and a user's training loop both know (an untrained loss is not always available).

Features (all clipped to ``[-OBS_BOUND, OBS_BOUND]``), named by :meth:`ObservationBuilder.feature_names`:
progress; log validation and training loss relative to ``L_1``; their last change; short-minus-long
EMA trends of both; the train-validation gap; how far validation sits above its best so far; a flag
saying whether a training loss was given; a flag for an adaptive (Adam-type) optimiser, whose
sensible learning rates are an order of magnitude below SGD's; per controlled hyperparameter its log change since the
start, its position within its bounds, and the previous action.
"""

from __future__ import annotations

import numpy as np

from hpo_env.actions import ActionDecoder

__all__ = ["FEATURE_SET_VERSION", "OBS_BOUND", "ObservationBuilder"]

#: Bumped whenever the features change meaning; policy bundles record it.
FEATURE_SET_VERSION = "1"
#: Every feature is clipped into ``[-OBS_BOUND, OBS_BOUND]``.
OBS_BOUND = 10.0

_SHORT, _LONG = 0.5, 0.9  # EMA decay per decision
_BASE_FEATURES = (
    "progress",
    "log_val_loss",
    "log_train_loss",
    "val_loss_change",
    "train_loss_change",
    "val_loss_trend",
    "train_loss_trend",
    "train_val_gap",
    "val_above_best",
    "has_train_loss",
    "adaptive_optimizer",
)


class ObservationBuilder:
    """Builds the observations of ``n`` runs; each row (slot) is reset and updated on its own.

    Args:
        decoder: the :class:`ActionDecoder` whose hyperparameters are observed.
        n: number of runs tracked at once (1 in the environment and the scheduler).
    """

    def __init__(self, decoder: ActionDecoder, n: int = 1) -> None:
        self.decoder = decoder
        self.n = int(n)
        k = decoder.num_actions
        self.dim = len(_BASE_FEATURES) + 3 * k
        self._ref = np.ones(n)
        self._last_val = np.zeros(n)
        self._last_train = np.zeros(n)
        self._ema = np.zeros((n, 4))  # short val, long val, short train, long train
        self._best = np.zeros(n)
        self._h0 = np.ones((n, k))
        self._prev_action = np.zeros((n, k))
        self._adaptive = np.zeros(n)

    def feature_names(self) -> list[str]:
        names = list(_BASE_FEATURES)
        for kind in ("log_change", "position", "prev_action"):
            names += [f"{h}_{kind}" for h in self.decoder.names]
        return names

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _log_rel(loss: np.ndarray, ref: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.log(np.asarray(loss, np.float64)) - np.log(ref)
        # A non-finite loss (divergence) reads as "as bad as it gets".
        return np.clip(np.nan_to_num(x, nan=OBS_BOUND, posinf=OBS_BOUND, neginf=-OBS_BOUND), -OBS_BOUND, OBS_BOUND)

    def reset(
        self,
        slots: np.ndarray | list[int],
        val_loss: np.ndarray,
        train_loss: np.ndarray | None,
        hparams: np.ndarray,
        progress: np.ndarray,
        *,
        adaptive: np.ndarray | bool,
    ) -> np.ndarray:
        """Start runs in ``slots`` from the first interval's losses; returns their observations.

        Args:
            slots: rows to start.
            val_loss: validation loss after the first interval, per slot.
            train_loss: mean training loss of the first interval, or None if unknown.
            hparams: ``(len(slots), k)`` controlled hyperparameters used in the first interval.
            progress: ``1 / T`` per slot.
            adaptive: whether each run's optimiser is Adam-type (AdamW, Adam, ...) rather than SGD.
        """
        slots = np.asarray(slots, dtype=np.intp)
        val = np.asarray(val_loss, np.float64)
        ref = np.where(np.isfinite(val) & (val > 0), val, 1.0)
        self._ref[slots] = ref
        x_val = self._log_rel(val, ref)
        x_tr = x_val if train_loss is None else self._log_rel(train_loss, ref)
        self._last_val[slots], self._last_train[slots] = x_val, x_tr
        self._ema[slots] = np.stack([x_val, x_val, x_tr, x_tr], axis=-1)
        self._best[slots] = x_val
        self._h0[slots] = self.decoder.clip(hparams)
        self._prev_action[slots] = 0.0
        self._adaptive[slots] = np.broadcast_to(np.asarray(adaptive, dtype=np.float64), slots.shape)
        return self._features(
            slots, x_val, x_tr, np.zeros_like(x_val), np.zeros_like(x_tr), train_loss is not None, hparams, progress
        )

    def update(
        self,
        slots: np.ndarray | list[int],
        val_loss: np.ndarray,
        train_loss: np.ndarray | None,
        hparams: np.ndarray,
        action: np.ndarray,
        progress: np.ndarray,
    ) -> np.ndarray:
        """Advance runs in ``slots`` by one interval; ``action`` is what set ``hparams``."""
        slots = np.asarray(slots, dtype=np.intp)
        ref = self._ref[slots]
        x_val = self._log_rel(val_loss, ref)
        x_tr = x_val if train_loss is None else self._log_rel(train_loss, ref)
        d_val, d_tr = x_val - self._last_val[slots], x_tr - self._last_train[slots]
        ema = self._ema[slots]
        ema[:, 0] = _SHORT * ema[:, 0] + (1 - _SHORT) * x_val
        ema[:, 1] = _LONG * ema[:, 1] + (1 - _LONG) * x_val
        ema[:, 2] = _SHORT * ema[:, 2] + (1 - _SHORT) * x_tr
        ema[:, 3] = _LONG * ema[:, 3] + (1 - _LONG) * x_tr
        self._ema[slots] = ema
        self._last_val[slots], self._last_train[slots] = x_val, x_tr
        self._best[slots] = np.minimum(self._best[slots], x_val)
        self._prev_action[slots] = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        return self._features(slots, x_val, x_tr, d_val, d_tr, train_loss is not None, hparams, progress)

    def _features(self, slots, x_val, x_tr, d_val, d_tr, has_train, hparams, progress) -> np.ndarray:
        ema = self._ema[slots]
        hparams = self.decoder.clip(hparams)
        base = np.stack(
            [
                np.broadcast_to(np.asarray(progress, np.float64), x_val.shape),
                x_val,
                x_tr,
                d_val,
                d_tr,
                ema[:, 0] - ema[:, 1],
                ema[:, 2] - ema[:, 3],
                x_tr - x_val,
                x_val - self._best[slots],
                np.full_like(x_val, float(has_train)),
                self._adaptive[slots],
            ],
            axis=-1,
        )
        obs = np.concatenate(
            [
                base,
                self.decoder.log_change(hparams, self._h0[slots]),
                self.decoder.position(hparams),
                self._prev_action[slots],
            ],
            axis=-1,
        )
        return np.clip(obs, -OBS_BOUND, OBS_BOUND).astype(np.float32)

    # -- state (the scheduler checkpoints it) --------------------------------------------------
    def state_dict(self) -> dict:
        return {
            k: getattr(self, k).copy()
            for k in ("_ref", "_last_val", "_last_train", "_ema", "_best", "_h0", "_prev_action", "_adaptive")
        }

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            cur = getattr(self, k)
            v = np.asarray(v, dtype=np.float64)
            if v.shape != cur.shape:
                raise ValueError(f"observation state {k!r} has shape {v.shape}, expected {cur.shape}")
            setattr(self, k, v.copy())
