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

Optional *gradient features* (``gradient_features=True``, appended after those): the mean cosine
between consecutive minibatch gradients within the interval (``grad_cosine``: near 1 while steps keep
going the same way, negative when the learning rate makes the iterate oscillate; the signal that
hypergradient descent follows), and the interval's mean log gradient norm relative to the first
interval's (``grad_norm``). :class:`GradientStats` accumulates both from the gradients of every
optimiser step, in the environment's trainer (N models at once) and in the deployed scheduler alike.

Optional *epochs feature* (``epochs_feature=True``, appended last): how many passes over its training
set the whole run makes, ``log10(epochs) - 1.5`` (:func:`log_epochs_feature`), constant over the
run. In the environment, ``epochs = total_steps * batch_size / n_train`` (``total_steps`` counting
optimiser steps there); a :class:`~agents.PolicyScheduler` is told it as ``epochs=`` (with one
``step()`` per epoch, its ``total_steps``). Small datasets trained for hundreds of epochs overfit, and
their best learning rate is often below the default; without this feature the policy's first
decision cannot tell such a run from one that needs a larger rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from hpo_env.actions import ActionDecoder
from hpo_env.checks import check_device, is_flag, is_integer

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = [
    "EPOCHS_FEATURE",
    "FEATURE_SET_VERSION",
    "GRADIENT_FEATURES",
    "OBS_BOUND",
    "OPTIONAL_FEATURES",
    "GradientStats",
    "ObservationBuilder",
    "log_epochs_feature",
]

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
#: Names of the optional gradient features, appended after the base and hyperparameter features.
GRADIENT_FEATURES = ("grad_cosine", "grad_norm")
#: Name of the optional epochs feature, appended last.
EPOCHS_FEATURE = "log_epochs"
#: The optional feature groups, by their option name (an ObservationBuilder, environment, config and
#: bundle keyword), in the order their columns follow the base and hyperparameter features.
OPTIONAL_FEATURES: dict[str, tuple[str, ...]] = {
    "gradient_features": GRADIENT_FEATURES,
    "epochs_feature": (EPOCHS_FEATURE,),
}


def log_epochs_feature(epochs) -> np.ndarray:
    """The epochs feature of runs making ``epochs`` passes over their training sets (> 0):
    ``log10(epochs) - 1.5``, so about 32 epochs read as 0, 3.2 as -1 and 316 as +1."""
    epochs = np.asarray(epochs, dtype=np.float64)
    if not np.all(np.isfinite(epochs) & (epochs > 0)):
        raise ValueError(f"epochs must be finite and > 0, got {epochs}")
    return np.clip(np.log10(epochs) - 1.5, -OBS_BOUND, OBS_BOUND)


class GradientStats:
    """Per-interval gradient statistics of ``n`` runs, fed the flat gradient of every optimiser step.

    For each run: the mean cosine between consecutive gradients of the interval (0 with fewer than
    two steps) and the mean log L2 norm of its gradients (NaN with none). Observing a step costs a
    copy and one batched matmul on the gradients' device (its dot products with itself and with the
    previous gradient), with no host synchronisation; the nonlinear work happens once, in
    :meth:`result`.

    Rows are observed as a suffix ``[start, n)`` whose ``start`` never decreases within an interval:
    all runs at first, then only the runs with more steps left (as the trainer's stacks do). A run's
    steps are therefore consecutive, and each pairs with the one before.

    Args:
        n: number of runs (rows).
        device: the gradients' device.
        steps_hint: expected steps per interval (the buffers grow past it as needed).
    """

    def __init__(self, n: int = 1, device: str | torch.device = "cpu", steps_hint: int = 16) -> None:
        self.n = int(n)
        self.device = check_device(device)
        self._capacity = max(int(steps_hint), 2)
        self._pair: torch.Tensor | None = None  # (n, 2, P): each run's last two gradients, alternating
        self.reset()

    def reset(self) -> None:
        """Forget the interval (call at the start of each one)."""
        # Per step and run, the new gradient's dot products with both slots of the pair: one is its
        # squared norm, the other its dot with the previous gradient (which slot is which alternates).
        self._dots = torch.zeros(self._capacity, self.n, 1, 2, dtype=torch.float32, device=self.device)
        self._steps = np.zeros(self.n, dtype=np.int64)
        self._t = 0
        self._start = 0

    @torch.no_grad()
    def observe(self, grad: torch.Tensor, start: int = 0) -> None:
        """Add one optimiser step of rows ``[start, n)``; ``grad`` is ``(n - start, P)``."""
        if grad.dim() != 2 or grad.shape[0] != self.n - start:
            raise ValueError(
                f"expected gradients of rows [{start}, {self.n}) as ({self.n - start}, P), got {tuple(grad.shape)}"
            )
        if start < self._start:
            raise ValueError(f"rows [{start}, {self.n}) observed after rows [{self._start}, {self.n}) in one interval")
        self._start = start
        pair = self._pair
        if pair is None or pair.shape[2] != grad.shape[1] or pair.device != grad.device:
            self._pair = pair = torch.zeros(self.n, 2, grad.shape[1], dtype=torch.float32, device=grad.device)
        if self._t == self._capacity:  # grow the per-step buffer
            self._capacity *= 2
            self._dots = torch.cat([self._dots, torch.zeros_like(self._dots)])
        cur = self._t % 2
        rows = pair[start:]
        rows[:, cur].copy_(grad.detach())  # (converts to float32 on the way)
        torch.bmm(rows[:, cur : cur + 1], rows.transpose(1, 2), out=self._dots[self._t, start:])
        self._steps[start:] += 1
        self._t += 1

    def steps_observed(self) -> np.ndarray:
        """Optimiser steps observed since the last :meth:`reset`, per run."""
        return self._steps.copy()

    @torch.no_grad()
    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean cosine, mean log norm)`` per run, as float64 arrays ``(n,)``."""
        t = self._t
        dots = self._dots[:t, :, 0].double()  # (t, n, 2)
        cur = torch.arange(t, device=dots.device) % 2
        sq = dots.gather(2, cur.view(t, 1, 1).expand(t, self.n, 1))[..., 0]
        dot = dots.gather(2, (1 - cur).view(t, 1, 1).expand(t, self.n, 1))[..., 0]
        steps = torch.as_tensor(self._steps, device=sq.device)
        seen = torch.arange(t, device=sq.device)[:, None] < steps[None, :]  # (t, n): step k of run r observed
        pair = seen[1:]  # steps k >= 1 of a run pair with its step k - 1
        cos = dot[1:] / (sq[1:] * sq[:-1]).sqrt().clamp_min(1e-30)
        cos_sum = torch.where(pair, cos, 0.0).sum(0)
        log_sum = torch.where(seen, 0.5 * sq.clamp_min(1e-60).log(), 0.0).sum(0)
        both = torch.stack([cos_sum, log_sum]).cpu().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            return both[0] / np.maximum(self._steps - 1, 1), both[1] / self._steps


class ObservationBuilder:
    """Builds the observations of ``n`` runs; each row (slot) is reset and updated on its own.

    Args:
        decoder: the :class:`ActionDecoder` whose hyperparameters are observed.
        n: number of runs tracked at once (1 in the environment and the scheduler).
        gradient_features: also observe :data:`GRADIENT_FEATURES`; ``reset`` and ``update`` then
            need each interval's :meth:`GradientStats.result` as ``gradients``.
        epochs_feature: also observe :data:`EPOCHS_FEATURE`; ``reset`` then needs each run's
            planned number of epochs as ``epochs``.
    """

    def __init__(
        self, decoder: ActionDecoder, n: int = 1, *, gradient_features: bool = False, epochs_feature: bool = False
    ) -> None:
        if not isinstance(decoder, ActionDecoder):
            raise TypeError(
                f"decoder must be an ActionDecoder (e.g. a bundle's .decoder), got {type(decoder).__name__}"
            )
        if not is_integer(n) or n < 1:
            raise ValueError(f"n (runs tracked at once) must be an integer >= 1, got {n!r}")
        for name, value in (("gradient_features", gradient_features), ("epochs_feature", epochs_feature)):
            if not is_flag(value):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.decoder = decoder
        self.n = int(n)
        self.gradient_features = bool(gradient_features)
        self.epochs_feature = bool(epochs_feature)
        self._started = np.zeros(self.n, bool)  # reset() before update(), per slot
        k = decoder.num_actions
        self.dim = len(_BASE_FEATURES) + 3 * k + len(self._optional_names())
        self._grad_ref = np.full(n, np.nan)  # log gradient norm of the first interval with gradients
        self._epochs = np.zeros(n)  # the epochs feature of each run
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
        return names + self._optional_names()

    def _optional_names(self) -> list[str]:
        return [name for option, names in OPTIONAL_FEATURES.items() if getattr(self, option) for name in names]

    def _gradient_columns(self, slots: np.ndarray, gradients, first: bool) -> np.ndarray | None:
        """The gradient features of ``slots`` from ``(mean cosine, mean log norm)``; sets the reference on ``first``."""
        if not self.gradient_features:
            if gradients is not None:
                raise ValueError("gradients were given, but this ObservationBuilder has gradient_features=False")
            return None
        if gradients is None:
            raise ValueError(
                "this ObservationBuilder observes gradient features: pass gradients=(mean cosine, mean log norm) "
                "per slot, from GradientStats.result()"
            )
        cos, log_norm = (np.broadcast_to(np.asarray(g, np.float64), slots.shape) for g in gradients)
        # The reference is the first interval whose gradients were seen (a deployed scheduler may get
        # a first interval without an optimiser step); until then the norm feature reads as 0.
        ref = np.full(slots.shape, np.nan) if first else self._grad_ref[slots]
        ref = np.where(np.isnan(ref) & np.isfinite(log_norm), log_norm, ref)
        self._grad_ref[slots] = ref
        # Unknown (no step seen, or a NaN gradient of a diverging run) reads as 0.
        cos = np.nan_to_num(cos, nan=0.0)
        rel = np.nan_to_num(log_norm - ref, nan=0.0, posinf=OBS_BOUND, neginf=-OBS_BOUND)
        return np.stack([cos, rel], axis=-1)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _log_rel(loss: ArrayLike, ref: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.log(np.asarray(loss, np.float64)) - np.log(ref)
        # A non-finite loss (divergence) reads as "as bad as it gets".
        return np.clip(np.nan_to_num(x, nan=OBS_BOUND, posinf=OBS_BOUND, neginf=-OBS_BOUND), -OBS_BOUND, OBS_BOUND)

    def reset(
        self,
        slots: np.ndarray | list[int],
        val_loss: ArrayLike,
        train_loss: ArrayLike | None,
        hparams: np.ndarray,
        progress: ArrayLike,
        *,
        adaptive: np.ndarray | bool,
        gradients: tuple[ArrayLike, ArrayLike] | None = None,
        epochs: np.ndarray | float | None = None,
        initial: np.ndarray | None = None,
        prev_action: np.ndarray | None = None,
    ) -> np.ndarray:
        """Start runs in ``slots`` from the first interval's losses; returns their observations.

        Args:
            slots: rows to start.
            val_loss: validation loss after the first interval, per slot.
            train_loss: mean training loss of the first interval, or None if unknown.
            hparams: ``(len(slots), k)`` controlled hyperparameters used in the first interval.
            progress: ``1 / T`` per slot.
            adaptive: whether each run's optimiser is Adam-type (AdamW, Adam, ...) rather than SGD.
            gradients: with ``gradient_features``, the first interval's ``(mean cosine, mean log
                norm)`` per slot (:meth:`GradientStats.result`).
            epochs: with ``epochs_feature``, how many passes over its training set each run makes in
                all (> 0).
            initial: ``(len(slots), k)`` hyperparameters each run started from, if they differ from
                ``hparams`` (a deployed run whose first interval diverged and was cut); the log
                changes are observed from these. None: ``hparams``.
            prev_action: ``(len(slots), k)`` the action that led to ``hparams``, if any (the cut);
                None: zeros.
        """
        slots = self._check(slots, hparams)
        k = self.decoder.num_actions
        for name, given in (("initial", initial), ("prev_action", prev_action)):
            if given is not None and np.shape(given) != (len(slots), k):
                raise ValueError(f"{name} must have shape ({len(slots)}, {k}), got {np.shape(given)}")
        if self.epochs_feature:
            if epochs is None:
                raise ValueError(
                    "this ObservationBuilder observes the epochs feature: pass epochs=, each run's planned number "
                    "of passes over its training set"
                )
            self._epochs[slots] = np.broadcast_to(log_epochs_feature(epochs), slots.shape)
        elif epochs is not None:
            raise ValueError("epochs were given, but this ObservationBuilder has epochs_feature=False")
        val = np.asarray(val_loss, np.float64)
        ref = np.where(np.isfinite(val) & (val > 0), val, 1.0)
        self._ref[slots] = ref
        x_val = self._log_rel(val, ref)
        x_tr = x_val if train_loss is None else self._log_rel(train_loss, ref)
        self._last_val[slots], self._last_train[slots] = x_val, x_tr
        self._ema[slots] = np.stack([x_val, x_val, x_tr, x_tr], axis=-1)
        self._best[slots] = x_val
        self._h0[slots] = self.decoder.clip(hparams if initial is None else initial)
        self._prev_action[slots] = 0.0 if prev_action is None else np.clip(prev_action, -1.0, 1.0)
        self._adaptive[slots] = np.broadcast_to(np.asarray(adaptive, dtype=np.float64), slots.shape)
        self._started[slots] = True
        grad = self._gradient_columns(slots, gradients, first=True)
        return self._features(
            slots,
            x_val,
            x_tr,
            np.zeros_like(x_val),
            np.zeros_like(x_tr),
            train_loss is not None,
            hparams,
            progress,
            grad,
        )

    def update(
        self,
        slots: np.ndarray | list[int],
        val_loss: ArrayLike,
        train_loss: ArrayLike | None,
        hparams: np.ndarray,
        action: np.ndarray,
        progress: ArrayLike,
        *,
        gradients: tuple[ArrayLike, ArrayLike] | None = None,
    ) -> np.ndarray:
        """Advance runs in ``slots`` by one interval; ``action`` is what set ``hparams``."""
        slots = self._check(slots, hparams)
        if not self._started[slots].all():
            raise ValueError(
                f"slots {slots[~self._started[slots]].tolist()} were never reset(): start a run with reset()"
            )
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
        grad = self._gradient_columns(slots, gradients, first=False)
        return self._features(slots, x_val, x_tr, d_val, d_tr, train_loss is not None, hparams, progress, grad)

    def _check(self, slots: np.ndarray | list[int], hparams: np.ndarray) -> np.ndarray:
        """The slots as an index array, after checking them and the hyperparameters' shape."""
        slots = np.atleast_1d(np.asarray(slots))
        if slots.size == 0:
            return np.zeros(0, np.intp)
        if slots.dtype.kind not in "iu" or slots.ndim != 1 or ((slots < 0) | (slots >= self.n)).any():
            raise ValueError(f"slots must be integers in [0, {self.n}), got {slots.tolist()}")
        expected = (len(slots), self.decoder.num_actions)
        if np.shape(hparams) != expected:
            raise ValueError(
                f"hparams must have shape {expected} (one row per slot: {', '.join(self.decoder.names)}), got "
                f"{np.shape(hparams)}"
            )
        return slots.astype(np.intp)

    def _features(self, slots, x_val, x_tr, d_val, d_tr, has_train, hparams, progress, grad=None) -> np.ndarray:
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
                *([] if grad is None else [grad]),
                *([self._epochs[slots, None]] if self.epochs_feature else []),
            ],
            axis=-1,
        )
        return np.clip(obs, -OBS_BOUND, OBS_BOUND).astype(np.float32)

    # -- state (the scheduler checkpoints it) --------------------------------------------------
    def state_dict(self) -> dict:
        return {
            k: getattr(self, k).copy()
            for k in (
                "_ref",
                "_last_val",
                "_last_train",
                "_ema",
                "_best",
                "_h0",
                "_prev_action",
                "_adaptive",
                "_grad_ref",
                "_epochs",
            )
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; checked whole before anything changes (entries added in later
        versions, ``_grad_ref`` and ``_epochs``, may be missing from an older state)."""
        known = self.state_dict()
        unknown = sorted(set(state) - set(known))
        missing = sorted(set(known) - set(state) - {"_grad_ref", "_epochs"})
        if unknown or missing:
            raise ValueError(
                f"malformed observation state: unknown entries {unknown}, missing entries {missing} "
                f"(expected {sorted(known)})"
            )
        values = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
        for k, v in values.items():
            if v.shape != known[k].shape:
                raise ValueError(f"observation state {k!r} has shape {v.shape}, expected {known[k].shape}")
        for k, v in values.items():
            setattr(self, k, v.copy())
        self._started[:] = True  # a saved state is one of running runs
