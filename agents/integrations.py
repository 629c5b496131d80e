"""Use a :class:`~agents.PolicyScheduler` from PyTorch Lightning or the Hugging Face ``Trainer``.

Neither library is a dependency of hpo-meta: nothing here imports them at module level, so
``import agents`` never needs them. What each helper relies on:

**PyTorch Lightning** (``lightning`` 2.x or ``pytorch_lightning``). Lightning steps a custom
scheduler through ``LightningModule.lr_scheduler_step(scheduler, metric)`` and passes the monitored
metric when the scheduler config says ``"reduce_on_plateau": True``. :class:`PolicySchedulerMixin`
provides that hook and :func:`lightning_scheduler_config` builds the config dict::

    class Model(PolicySchedulerMixin, L.LightningModule):
        def validation_step(self, batch, i):
            self.log("val_loss", loss)
        def training_step(self, batch, i):
            return loss  # the mixin shows the policy the interval's mean of these too
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
            epochs = self.trainer.max_epochs
            sched = PolicyScheduler.from_pretrained("default", opt, total_steps=epochs, epochs=epochs)
            return {"optimizer": opt, "lr_scheduler": lightning_scheduler_config(sched, monitor="val_loss")}

Lightning saves and restores the scheduler's ``state_dict`` in its checkpoints, but on resuming it
skips the monitored scheduler's step of the epoch it resumes in, and a resumed run starts with no
logged metrics. The mixin records the latest validation in each checkpoint and makes up for both
(tested with lightning 2.6.6, see :class:`PolicySchedulerMixin`):

- from a checkpoint saved at validation end or at a training epoch's end (``ModelCheckpoint``'s
  default, which saves at the epoch's end when validation runs every epoch), ``interval="epoch"`` or
  ``"step"``, a resumed run keeps the uninterrupted run's schedule exactly (the checkpoint holds the
  interval's training losses as well);
- from a mid-epoch checkpoint (``every_n_train_steps``) no decision is lost, but Lightning replays the
  epoch's data (unless the dataloader is resumable), so the schedule can differ a little from then on;
- from a checkpoint saved at an epoch's last training batch, before its validation, Lightning skips
  that validation when it resumes: the decision it would have fed is lost, with a warning, and the
  schedule goes on one ``step()`` call behind.

For a run of many more epochs than the 10-60 decisions the policy schedules well with, pass ``decisions=`` to the scheduler
(``PolicyScheduler(..., total_steps=epochs, decisions=25)``): Lightning still steps it every epoch, and
the policy decides at 25 of them. With ``interval="step"`` and gradient accumulation, Lightning counts ``frequency`` in batches, not
optimiser steps, and steps the scheduler only on batches that end an accumulation: ``frequency`` must
be a multiple of ``accumulate_grad_batches`` (refused otherwise), and ``total_steps`` is
``max_steps * accumulate_grad_batches // frequency``. Prefer ``interval="epoch"`` with validation
every epoch: Lightning passes the *last logged* value of ``monitor``, so with ``interval="step"`` the
``frequency`` must equal the validation interval in batches (``val_check_interval``) and divide the
batches of an epoch (Lightning counts ``frequency`` within each epoch). The mixin checks before
training that the validation interval divides the ``frequency`` (``check_val_every_n_epoch``, an
integer ``val_check_interval``, ``limit_val_batches=0``): with ``strict=True`` (the default) it
refuses a mismatch, with ``strict=False`` it warns and the policy is stepped on the last logged value.
At the end of a run that reached ``max_epochs``/``max_steps`` with fewer ``step()`` calls than
``total_steps``, it warns that ``total_steps`` miscounts Lightning's calls.

**Hugging Face ``transformers.Trainer``.** :func:`hf_trainer_callback` returns a
``transformers.TrainerCallback`` that builds the scheduler around the Trainer's optimiser when
training begins, calls ``step(eval_loss, train_loss)`` after every evaluation (the decision
interval is the evaluation interval), and re-writes its hyperparameters at the start of every
optimiser step, because the Trainer's own learning-rate scheduler (``lr_scheduler_type``, use
``"constant"``) overwrites ``param_groups[*]["lr"]`` after each step. The Trainer's logged
``learning_rate`` is therefore its own scheduler's value, not the policy's. The callback adds
``policy_lr`` to the metrics dict that ``evaluate()`` returns, but the Trainer logs its metrics
before its callbacks see them, so ``policy_lr`` is not in ``log_history`` or the Trainer's loggers:
pass ``writer=SummaryWriter(...)`` to see the policy's schedule in TensorBoard (``scheduler/`` tags, at the
Trainer's global step).
Evaluations before the first optimiser step (``eval_on_start``, also in a resumed run) and after training ends are not
decisions and are ignored. The callback writes the scheduler's state into every checkpoint the
Trainer saves (``checkpoint-<step>/policy_scheduler.pt``), and ``trainer.train(resume_from_checkpoint=...)``
continues the policy where it was (its memory, its progress, its hyperparameters) when the checkpoint
is ``output_dir/checkpoint-<step>``; a checkpoint without that file (or elsewhere) starts the policy
afresh over the evaluations left, with a warning. The mean training loss of the interval comes from
the Trainer's ``loss`` logs: keep ``logging_steps`` at most ``eval_steps``. With many evaluations,
``hf_trainer_callback(decisions=25)`` has the policy decide at 25 of them, evenly spaced.

The policy starts from the rates the optimiser was created with (``learning_rate``), also when the
Trainer's own scheduler has a warm-up that has already set them to 0. After a resume, the first
decision sees the mean of every training loss logged since the last evaluation, those before the
checkpoint included.

The test suite runs both libraries end to end (``scripts/bootstrap.sh`` installs them with the ``dev``
extra; ``tests/test_scheduler.py`` skips those tests where they are absent).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from agents.scheduler import (
    HORIZON_WARNING,
    HORIZON_WITHOUT_WARNING,
    SUGGESTED_DECISIONS,
    PolicyScheduler,
    _warn_about_the_horizon,
)
from hpo_env.checks import is_flag, is_integer

__all__ = ["PolicySchedulerMixin", "hf_trainer_callback", "lightning_scheduler_config"]

#: Lightning checkpoint key of the latest validation's values, for a resumed run (see PolicySchedulerMixin).
POLICY_RESUME_KEY = "hpo_meta_policy_resume"

#: Words of metric names that are scores (higher is better), never a loss (after trailing digits are
#: dropped: ``rouge1``, ``map50``, ``acc1``).
_SCORE_WORDS = frozenset(
    "accuracy acc f auc auroc auprc roc precision recall bleu rouge map ap iou miou dice r mcc matthews top".split()
)
#: Words that make a name a loss whatever else it holds (``val_top1_error``, ``val_r2_loss``).
_LOSS_WORDS = frozenset("loss err error nll perplexity ppl mse mae rmse mape".split())


def _check_scheduler_kwargs(policy: Any, total_steps: int | None, kwargs: dict[str, Any]) -> None:
    """Refuse what :class:`PolicyScheduler` would refuse, now rather than inside ``trainer.train()``.

    Builds a throwaway scheduler on a one-parameter AdamW with the given settings (warnings muted: the
    run's own scheduler gives them, with the run's numbers).
    """
    allowed = [name for name in inspect.signature(PolicyScheduler.__init__).parameters if name not in _NOT_KWARGS]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        close = {name: difflib.get_close_matches(name, allowed, n=1) for name in unknown}
        hints = "".join(f" ({name}: did you mean {match[0]}?)" for name, match in close.items() if match)
        raise TypeError(f"hf_trainer_callback got unknown scheduler argument(s) {unknown}{hints}; it takes {allowed}")
    decisions = kwargs.get("decisions")
    if decisions is not None and (not is_integer(decisions) or decisions < 1):
        raise ValueError(
            f"decisions must be an integer >= 1 (at how many of the run's evaluations the policy decides, about "
            f"{SUGGESTED_DECISIONS}) or None (every evaluation), got {decisions!r}"
        )
    total = total_steps if total_steps is not None else decisions or 1
    trial = dict(kwargs)
    if getattr(policy, "epochs_feature", False):
        trial.setdefault("epochs", 1.0)  # derived from the Trainer at the start when not given
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, weight_decay=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PolicyScheduler(optimizer, policy, total, **trial)


#: PolicyScheduler's arguments that the HF callback sets itself.
_NOT_KWARGS = frozenset({"self", "optimizer", "bundle", "total_steps"})


def _check_loss_metric(name: Any, argument: str) -> str:
    """The metric name the policy reads as its validation loss; a score's name (``"eval_accuracy"``) is
    refused: the policy would read an improving model as a diverging one.

    >>> _check_loss_metric("val_loss", "monitor")
    'val_loss'
    >>> _check_loss_metric("val_acc", "monitor")
    Traceback (most recent call last):
    ...
    ValueError: monitor='val_acc' names a score (higher is better), but the policy reads it as the validation loss (lower is better) and would take an improving model for a diverging one: pass the name of the logged validation loss (e.g. 'val_loss'), or of another lower-is-better metric (perplexity, error rate)
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"{argument} must be the name of a logged validation loss, got {name!r}")
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()  # valAcc -> val_acc
    words = {w.rstrip("0123456789") for w in re.split(r"[^a-z0-9]+", spaced)}
    if "exact_match" in spaced:
        words.add("acc")
    if not words & _LOSS_WORDS and words & _SCORE_WORDS:
        example = "eval_loss" if argument == "metric" else "val_loss"
        raise ValueError(
            f"{argument}={name!r} names a score (higher is better), but the policy reads it as the validation loss "
            f"(lower is better) and would take an improving model for a diverging one: pass the name of the logged "
            f"validation loss (e.g. {example!r}), or of another lower-is-better metric (perplexity, error rate)"
        )
    return name


# -- PyTorch Lightning -----------------------------------------------------------------------------
def lightning_scheduler_config(
    scheduler: PolicyScheduler,
    monitor: str = "val_loss",
    *,
    interval: str = "epoch",
    frequency: int = 1,
    strict: bool = True,
    name: str | None = "policy",
) -> dict[str, Any]:
    """Lightning's ``lr_scheduler`` config dict for a :class:`PolicyScheduler`.

    Args:
        scheduler: the scheduler (its ``total_steps`` must count Lightning's scheduler calls:
            ``max_epochs // frequency`` with ``interval="epoch"``, the run's training batches over
            ``frequency`` with ``"step"``: ``max_steps * accumulate_grad_batches // frequency``).
        monitor: the logged validation metric passed to ``scheduler.step``.
        interval, frequency: when Lightning steps the scheduler.
        strict: fail if ``monitor`` was not logged (Lightning's option).
        name: label for Lightning's ``LearningRateMonitor``.

    Raises:
        TypeError: ``scheduler`` is not a :class:`PolicyScheduler`, ``monitor`` is not a non-empty string, or
            ``strict`` is not a bool.
        ValueError: ``interval`` is not ``"epoch"`` or ``"step"``, ``frequency`` is not an integer >= 1, or
            ``monitor`` names a score (``"val_acc"``: higher is better) instead of a loss.
    """
    if not isinstance(scheduler, PolicyScheduler):
        raise TypeError(f"scheduler must be a PolicyScheduler, got {type(scheduler).__name__}")
    if interval not in ("epoch", "step"):
        raise ValueError(f"interval must be 'epoch' or 'step', got {interval!r}")
    if not is_integer(frequency) or frequency < 1:
        raise ValueError(
            f"frequency must be an integer >= 1 (Lightning steps the scheduler every `frequency` {interval}s), "
            f"got {frequency!r}"
        )
    if not is_flag(strict):
        raise TypeError(f"strict must be True or False (Lightning's option), got {strict!r}")
    _check_loss_metric(monitor, "monitor")
    return {
        "scheduler": scheduler,
        "interval": interval,
        "frequency": int(frequency),
        "monitor": monitor,
        "strict": bool(strict),
        # Makes Lightning pass the monitored value to lr_scheduler_step.
        "reduce_on_plateau": True,
        "name": name,
    }


def _batch_size(batch: Any) -> int:
    """How many samples a training batch holds, as Lightning counts them for its epoch means (1 where it
    cannot tell)."""
    try:
        from lightning.pytorch.utilities.data import extract_batch_size
    except ImportError:
        try:
            from pytorch_lightning.utilities.data import extract_batch_size
        except ImportError:
            return 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (its guess among several tensors: a warning per batch)
            return max(int(extract_batch_size(batch)), 1)
    except Exception:  # (Lightning raises a MisconfigurationException for a batch without tensors)
        return 1


class PolicySchedulerMixin:
    """Mix into a ``LightningModule`` (before it) to step :class:`PolicyScheduler` s with the metric.

    Other schedulers are stepped as Lightning would. The policy is also shown the mean training loss
    of the interval, as in meta-training: the mean of the losses ``training_step`` returned since the
    policy's last step (:attr:`policy_train_loss`; nothing needs to be logged for it).

    It checks at the start of training that Lightning will step the policy when a validation has
    just run (a validation interval that the scheduler's ``frequency`` is a multiple of), and warns at
    the end of a run that made fewer ``step()`` calls than ``total_steps``. It keeps a resumed run on
    the uninterrupted run's schedule (see the module docstring) through ``on_save_checkpoint``,
    ``on_load_checkpoint``, ``on_validation_epoch_end``, ``on_train_start``, ``on_train_batch_start``,
    ``on_train_batch_end`` and ``on_train_end``: a module that overrides them must call ``super()``.
    With manual optimisation (``automatic_optimization = False``, as for several optimisers)
    Lightning steps no scheduler: call ``scheduler.step(val_loss, train_loss=...)`` yourself.
    """

    #: Show the policy the mean of the losses ``training_step`` returned over the interval (False: none).
    policy_train_loss: bool = True
    # Annotations only, for type checkers: the LightningModule provides ``trainer``, and the mixin's state
    # is created on first use (see _policy_state).
    trainer: Any
    _policy_resume_state: dict[str, Any] | None

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if isinstance(scheduler, PolicyScheduler):
            if metric is None:
                raise ValueError(
                    "PolicyScheduler needs the validation loss: configure it with "
                    "agents.integrations.lightning_scheduler_config(scheduler, monitor='val_loss')"
                )
            trainer = getattr(self, "trainer", None)
            state = self._policy_state()
            total, count = state["train"]
            train_loss = total / count if count and self.policy_train_loss else None
            scheduler.step(metric, train_loss=train_loss, global_step=getattr(trainer, "global_step", None))
            state["train"] = [0.0, 0]  # the next interval's losses
            state["fed_epoch"] = state["val_epoch"]  # this validation has made its decision
        else:
            super().lr_scheduler_step(scheduler, metric)  # type: ignore[misc]

    # Resuming. Lightning steps "reduce_on_plateau" schedulers (which get the monitored metric) after the
    # epoch-end checkpoint callbacks, and skips that step for the epoch a run resumes in
    # (Lightning-AI/pytorch-lightning#14699); resumed at an epoch's last batch it also skips that epoch's
    # validation; and a resumed run starts with no logged metrics, so a "step"-interval scheduler due at
    # the resumed batch found no monitored value (Lightning raised). So the checkpoint also records the
    # latest validation (its epoch, its monitored value and the training loss then), which a resumed run
    # puts back among the trainer's metrics; when training starts, before every training batch and when it
    # ends the mixin makes any epoch-interval decision that is due but was not made, once per validation: a
    # validation's result feeds at most one decision, and a decision whose validation Lightning skipped is
    # lost, with a warning.
    def _policy_configs(self, interval: str | None = None) -> list[Any]:
        """Lightning's scheduler configs of the PolicySchedulers stepped per ``interval`` (None: all)."""
        configs = getattr(getattr(self, "trainer", None), "lr_scheduler_configs", None) or []
        return [c for c in configs if isinstance(c.scheduler, PolicyScheduler) and interval in (None, c.interval)]

    def _policy_state(self) -> dict[str, Any]:
        state = getattr(self, "_policy_resume_state", None)
        if state is None:
            state = self._policy_resume_state = {
                "val_epoch": -1,
                "fed_epoch": -1,
                "values": {},
                "warned": False,
                "train": [0.0, 0],  # the interval's training losses: sum (a tensor on the loss's device), count
            }
        return state

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        parent = getattr(super(), "on_train_batch_end", None)
        if parent is not None:
            parent(outputs, batch, batch_idx)
        if not self.policy_train_loss or not getattr(self, "automatic_optimization", True):
            return  # under manual optimisation the loop calls step() with its own training loss
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # Lightning hands over the loss divided by accumulate_grad_batches (the closure's). Each batch
            # weighs as many as it holds, as in Lightning's own epoch mean of a logged loss (a short last
            # batch counts less). The sum stays on the loss's device: a GPU run does not wait at every batch.
            scale = max(int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1), 1)
            size = _batch_size(batch)
            state = self._policy_state()
            total, count = state["train"]
            state["train"] = [total + loss.detach().reshape(()).double() * (scale * size), count + size]

    def on_validation_epoch_end(self) -> None:
        parent = getattr(super(), "on_validation_epoch_end", None)
        if parent is not None:
            parent()
        trainer = getattr(self, "trainer", None)
        if trainer is not None and not getattr(trainer, "sanity_checking", False):
            self._policy_state()["val_epoch"] = int(trainer.current_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        trainer: Any = getattr(self, "trainer", None)
        state, values = self._policy_state(), {}
        for config in self._policy_configs():
            key = config.monitor
            value = trainer.callback_metrics.get(key) if key else None
            if value is None:
                value = state["values"].get(key)  # restored from the checkpoint resumed from, not logged since
            if value is not None:
                values[key] = float(value)
        total, count = state["train"]
        checkpoint[POLICY_RESUME_KEY] = {
            "val_epoch": state["val_epoch"],
            "fed_epoch": state["fed_epoch"],
            "values": values,
            # The training losses since the last decision: saved at validation end, a checkpoint holds the
            # whole interval's, which Lightning averages only later (at the epoch's end).
            "train": [float(total), int(count)],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        saved = checkpoint.get(POLICY_RESUME_KEY)
        self._policy_resume_state = None  # nothing of an earlier fit() of this module carries over
        if saved:
            self._policy_resume_state = {
                **saved,
                "values": dict(saved["values"]),
                "warned": False,
                "resumed": True,
                "train": list(saved.get("train", [0.0, 0])),  # (none in checkpoints of earlier versions)
            }

    def on_train_start(self) -> None:
        parent = getattr(super(), "on_train_start", None)
        if parent is not None:
            parent()
        if hasattr(self, "policy_train_loss_key"):  # the attribute of earlier versions
            warnings.warn(
                "PolicySchedulerMixin.policy_train_loss_key is gone: the mixin now shows the policy the mean of the "
                "losses training_step returns, whatever is logged; set policy_train_loss = False to show none",
                stacklevel=2,
            )
        self._check_validation_lines_up()
        # A resumed run has logged nothing yet: the latest validation's values are those of the checkpoint.
        metrics = self.trainer.callback_metrics
        for key, value in self._policy_state()["values"].items():
            if key not in metrics:
                metrics[key] = torch.tensor(value)
        # Before the first batch, so that callbacks reading the rates there (LearningRateMonitor) see the
        # made-up decision's, which the batch trains with.
        self._make_due_decisions()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        parent = getattr(super(), "on_train_batch_start", None)
        out = parent(batch, batch_idx) if parent is not None else None
        self._make_due_decisions()
        return out

    def on_train_end(self) -> None:
        parent = getattr(super(), "on_train_end", None)
        if parent is not None:
            parent()
        self._make_due_decisions()  # the last epoch's, when it was the one the run resumed in
        self._warn_if_steps_were_missed()

    def _check_validation_lines_up(self) -> None:
        """Before training: refuse (``strict``) or warn of a scheduler config under which Lightning would step
        the policy without a fresh validation, or count its steps otherwise than ``total_steps`` says."""
        trainer = self.trainer
        if not getattr(self, "automatic_optimization", True):
            return
        for config in self._policy_configs():
            f, problems = int(config.frequency), []
            if getattr(trainer, "limit_val_batches", 1) == 0:
                problems.append("limit_val_batches=0 runs no validation, whose loss the policy needs")
            every: Any = getattr(trainer, "check_val_every_n_epoch", None)
            if config.interval == "epoch" and is_integer(every) and f % every:
                problems.append(
                    f"validation runs every {every} epochs (check_val_every_n_epoch) but the policy steps every {f}: "
                    f"pass lightning_scheduler_config(..., frequency={every}) with total_steps=max_epochs // {every}"
                )
            accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
            if config.interval == "step" and f % accumulate:  # a miscount whatever strict says
                raise ValueError(
                    f"PolicySchedulerMixin: with accumulate_grad_batches={accumulate} Lightning steps a 'step' scheduler "
                    f"only on batches that end an accumulation, so frequency={f} must be a multiple of {accumulate} "
                    "(total_steps is then max_steps * accumulate_grad_batches // frequency)"
                )
            interval: Any = getattr(trainer, "val_check_interval", None)
            if config.interval == "step" and is_integer(interval) and f % int(interval):
                problems.append(
                    f"validation runs every {interval} batches (val_check_interval) but the policy steps every {f}: "
                    "set frequency to a multiple of val_check_interval (equal, for one decision per validation)"
                )
            if not problems:
                continue
            message = "PolicySchedulerMixin: " + "; ".join(problems)
            if config.strict:
                raise ValueError(message + " (or strict=False, to step it on the last logged value)")
            warnings.warn(message + " (strict=False: the policy is stepped on the last logged value)", stacklevel=2)

    def _warn_if_steps_were_missed(self) -> None:
        """At the planned end of a run: say so if it made fewer step() calls than the scheduler's total_steps."""
        trainer = self.trainer
        max_epochs: Any = getattr(trainer, "max_epochs", None)
        max_steps: Any = getattr(trainer, "max_steps", -1)
        finished = (is_integer(max_epochs) and max_epochs > 0 and trainer.current_epoch >= max_epochs) or (
            is_integer(max_steps) and max_steps > 0 and trainer.global_step >= max_steps
        )
        if not finished or getattr(trainer, "interrupted", False) or self._policy_state()["warned"]:
            return  # stopped early (EarlyStopping, Ctrl-C): fewer calls are expected; or a lost one was said
        for config in self._policy_configs():
            sched = config.scheduler
            if sched.last_step < sched.total_steps:
                count = (
                    "max_epochs // frequency"
                    if config.interval == "epoch"
                    else "the run's batches over frequency (max_steps * accumulate_grad_batches // frequency, with "
                    "frequency a multiple of accumulate_grad_batches and dividing the batches of an epoch)"
                )
                warnings.warn(
                    f"PolicySchedulerMixin: the run ended after {sched.last_step} of the scheduler's "
                    f"total_steps={sched.total_steps} step() calls, so the policy saw a run cut short (its progress "
                    f"feature ended at {sched.last_step / sched.total_steps:.0%}): total_steps must count Lightning's "
                    f"calls, {count}",
                    stacklevel=2,
                )

    def _make_due_decisions(self) -> None:
        """Make the epoch-interval decisions Lightning skipped on resuming (see the comment above)."""
        trainer, state = self.trainer, self._policy_state()
        if not state.get("resumed") or not getattr(self, "automatic_optimization", True):
            return  # a fresh run's steps are Lightning's own; under manual optimisation Lightning steps nothing
        for config in self._policy_configs("epoch"):
            sched = config.scheduler
            due = min(int(trainer.current_epoch) // max(int(config.frequency), 1), sched.total_steps)
            if sched.last_step >= due:
                continue
            metric = trainer.callback_metrics.get(config.monitor) if config.monitor else None
            if state["val_epoch"] > state["fed_epoch"] and metric is not None:
                self.lr_scheduler_step(sched, metric)  # as Lightning would have
            elif not state["warned"]:
                state["warned"] = True
                warnings.warn(
                    f"PolicySchedulerMixin: the scheduler has had {sched.last_step} of the {due} step() calls due before "
                    f"epoch {trainer.current_epoch}, and no validation is left to make the missing one with: Lightning "
                    "skipped the validation of the epoch the run resumed in (a checkpoint saved at an epoch's last "
                    "batch, before its validation). The schedule goes on one call behind; checkpoints saved at "
                    "validation end (ModelCheckpoint's default) or mid-epoch keep every decision",
                    stacklevel=2,
                )


# -- Hugging Face transformers ---------------------------------------------------------------------
def _eval_strategy(args: Any) -> str:
    """``TrainingArguments``' evaluation strategy as a string (``"steps"``, ``"epoch"``, ``"no"``)."""
    return _strategy(getattr(args, "eval_strategy", None) or getattr(args, "evaluation_strategy", None))


def _strategy(value: Any) -> str:
    """A ``TrainingArguments`` strategy (an enum, or its string) as a string."""
    return str(getattr(value, "value", value))


def _decisions_from_args(args: Any, state: Any, *, upto: float | None = None, final_eval: bool = False) -> int:
    """Evaluations in a Trainer run: the scheduler's ``total_steps``.

    With ``upto``, only those at or before that many optimiser steps (``eval_strategy="steps"``) or
    epochs (``"epoch"``), e.g. the ones a resumed run already made. ``final_eval``: the Trainer also
    evaluates after its last step when ``max_steps`` is not a multiple of the interval (transformers 5).
    Evaluations before ``eval_delay`` do not happen, as in the Trainer.
    """
    strategy = _eval_strategy(args)
    delay = float(getattr(args, "eval_delay", 0) or 0)
    if strategy == "steps":
        every = args.eval_steps if args.eval_steps is not None else args.logging_steps
        if every < 1:  # a fraction of the run (transformers' convention)
            every = math.ceil(state.max_steps * every)
        every = int(every)
        last = state.max_steps if upto is None else min(int(upto), state.max_steps)
        first = max(1, math.ceil(delay / every))  # the first evaluation's multiple of the interval
        count = max(0, last // every - first + 1)
        if final_eval and last == state.max_steps and last % every and last >= delay:
            count += 1
        return count if upto is not None else max(1, count)
    if strategy == "epoch":
        # The Trainer sets state.num_train_epochs before on_train_begin, from max_steps when given.
        epochs = math.ceil(getattr(state, "num_train_epochs", 0) or args.num_train_epochs)
        last = epochs if upto is None else min(math.floor(upto + 1e-9), epochs)
        count = max(0, last - max(1, math.ceil(delay)) + 1)
        return count if upto is not None else max(1, count)
    raise ValueError(
        f"the policy decides after every evaluation, but eval_strategy is {strategy!r}: set "
        "eval_strategy='steps' (with eval_steps) or 'epoch' in TrainingArguments, or pass total_steps"
    )


def _epochs_from_args(args: Any, state: Any, train_dataloader: Any) -> float | None:
    """Passes over the training set in a Trainer run (None where the dataloader has no length).

    An epoch of ``B`` batches under gradient accumulation ``G`` takes ``ceil(B / G)`` optimiser steps, the
    last over the batches left; ``max_steps`` ending within an epoch counts the batches it got to, as the
    Trainer's ``state.epoch`` does.
    """
    try:
        batches = len(train_dataloader)
    except TypeError:  # None, or an iterable dataset without a length
        return None
    steps = getattr(state, "max_steps", 0) or 0
    if batches < 1 or steps < 1:
        return None
    accumulation = max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
    per_epoch = math.ceil(batches / accumulation)
    full, left = divmod(int(steps), per_epoch)
    return full + min(left * accumulation, batches) / batches


#: The file, in each Trainer checkpoint folder, that holds the policy scheduler's state.
HF_SCHEDULER_FILE = "policy_scheduler.pt"


def _scheduler_file(args: Any, global_step: int) -> Path:
    """Where the scheduler's state of the checkpoint at ``global_step`` lives (transformers' folder naming)."""
    return Path(args.output_dir) / f"checkpoint-{global_step}" / HF_SCHEDULER_FILE


@functools.cache
def _hf_callback_class() -> type:
    import torch
    import transformers
    from transformers import TrainerCallback

    # transformers 5 also evaluates after the last step when max_steps is not a multiple of eval_steps.
    final_eval = int(transformers.__version__.split(".")[0]) >= 5

    class PolicySchedulerCallback(TrainerCallback):
        """A ``transformers.TrainerCallback`` running a :class:`PolicyScheduler` (see :func:`hf_trainer_callback`)."""

        def __init__(
            self,
            policy: str | os.PathLike | Any = "default",
            *,
            total_steps: int | None = None,
            metric: str = "eval_loss",
            **scheduler_kwargs: Any,
        ) -> None:
            _check_loss_metric(metric, "metric")
            if isinstance(policy, (str, os.PathLike)):
                from agents.bundle import load_bundle
                from agents.scheduler import resolve_policy

                policy = load_bundle(resolve_policy(policy), device=scheduler_kwargs.pop("device", "cpu"))
            elif "device" in scheduler_kwargs:
                raise ValueError(
                    "device= places a policy loaded by name or path; this policy is already loaded (on its own "
                    "device): drop device=, or pass the bundle's path"
                )
            if total_steps is not None and (not is_integer(total_steps) or total_steps < 1):
                raise ValueError(
                    f"total_steps must be an integer >= 1 (the run's evaluations) or None, got {total_steps!r}"
                )
            _check_scheduler_kwargs(policy, total_steps, scheduler_kwargs)
            self.policy = policy
            self.total_steps = total_steps
            self.metric = metric
            self.scheduler_kwargs = scheduler_kwargs
            self.scheduler: PolicyScheduler | None = None
            self._log_index = 0
            self._training = False
            self._metric_settled = False  # the metric was seen, or its absence said: nothing left to warn of
            self._missing_at: tuple[int, list[str]] | None = None
            self._start_step = 0

        def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
            if optimizer is None:
                raise ValueError("the Trainer passed no optimizer to on_train_begin; cannot build the PolicyScheduler")
            total = self.total_steps
            if total is None:
                total = _decisions_from_args(args, state, final_eval=final_eval)
            # The run's length in epochs, for a policy that observes it; given epochs= win.
            kwargs = {"epochs": _epochs_from_args(args, state, train_dataloader), **self.scheduler_kwargs}
            saved = _scheduler_file(args, state.global_step) if state.global_step > 0 else None
            resumed_without_state = saved is not None and not saved.is_file()
            d = kwargs.get("decisions")
            if resumed_without_state:  # the policy starts afresh over the evaluations left
                done = _decisions_from_args(
                    args, state, upto=state.global_step if _eval_strategy(args) == "steps" else state.epoch
                )
                left = max(1, total - done)
                if is_integer(d) and 1 <= d <= total:  # grouped evaluations: as many per decision as before
                    # (an invalid decisions= goes through unchanged, for PolicyScheduler to refuse)
                    d = kwargs["decisions"] = max(1, min(left, round(d * left / total)))
                total = left
            if saved is None and "lr" in self.policy.decoder.names:
                # The Trainer built its own lr scheduler before this hook: with a warm-up it has already set every
                # group's lr to 0 (or a fraction of it), from which the policy would start (and a group at 0
                # would never train). The run starts from the rates the optimizer was created with, the
                # TrainingArguments' learning_rate; the callback overrides that scheduler from here on anyway.
                for group in optimizer.param_groups:
                    if "initial_lr" in group:
                        group["lr"] = group["initial_lr"]
            if is_integer(d) and d > total:  # said in the Trainer's terms, before PolicyScheduler refuses it
                raise ValueError(
                    f"decisions={d} is more than the run's {total} evaluations, the policy's chances to decide: leave "
                    "decisions unset (every evaluation decides), or evaluate more often (eval_steps)"
                )
            if saved is None and d is None:  # a resumed run was judged when it started
                _warn_about_the_horizon(
                    total,
                    what="evaluations (the callback's decisions)",
                    fix="Set eval_strategy/eval_steps so that the run has {low}-{high} evaluations"
                    + (
                        f", or pass decisions={SUGGESTED_DECISIONS} to the callback (the policy then decides at that "
                        "many evenly spaced evaluations)"
                        if total > HORIZON_WITHOUT_WARNING[1]
                        else ""
                    ),
                    stacklevel=2,
                )
            elif saved is None and is_integer(d) and 1 <= d <= total:  # (a wrong one is PolicyScheduler's to refuse)
                _warn_about_the_horizon(
                    d,
                    what=f"decisions (decisions={d}, over {total} evaluations)",
                    fix="Pass decisions= between {low} and {high}, and set eval_strategy/eval_steps so that the run "
                    "has at least {low} evaluations",
                    stacklevel=2,
                )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=HORIZON_WARNING)  # said above, in the Trainer's terms
                if saved is not None:
                    # The resumed optimizer holds the policy's own rates (with its state, loaded below, they are
                    # set again; without it, the warning below says the policy restarts from them), not those of
                    # another scheduler: no warning about them.
                    warnings.filterwarnings("ignore", message="a torch LR scheduler")
                self.scheduler = PolicyScheduler(optimizer, self.policy, total, **kwargs)
            if saved is not None and not resumed_without_state:
                self.scheduler.load_state_dict(torch.load(saved, weights_only=True))
            elif resumed_without_state:
                warnings.warn(
                    f"resuming at step {state.global_step} without the policy's state (looked for {saved}, which "
                    "this callback writes into every checkpoint it sees saved): the policy restarts its memory and "
                    f"its progress, over the {total} evaluations left"
                    + (
                        f" ({self.scheduler.decisions} of them decisions)"
                        if self.scheduler.decisions != self.scheduler.total_steps
                        else ""
                    )
                    + ", from the resumed optimizer's rates",
                    stacklevel=2,
                )
            # The interval's training losses are those logged since the last evaluation: a run resumed from a
            # checkpoint saved between two evaluations keeps the ones logged before it.
            self._log_index = next(
                (i + 1 for i in range(len(state.log_history) - 1, -1, -1) if self.metric in state.log_history[i]), 0
            )
            self._start_step = state.global_step  # an evaluation before any new optimiser step is no decision
            self._metric_settled, self._missing_at = False, None  # (per train() call)
            self._training = True

        def on_save(self, args, state, control, **kwargs):
            # The Trainer has just written checkpoint-<global_step>; the scheduler's state goes with it.
            path = _scheduler_file(args, state.global_step)
            if self.scheduler is not None and state.is_world_process_zero and path.parent.is_dir():
                torch.save(self.scheduler.state_dict(), path)

        def on_train_end(self, args, state, control, **kwargs):
            self._training = False  # a trainer.evaluate() afterwards is not a decision
            if not self._metric_settled and self._missing_at is not None:
                self._warn_missing()

        def _warn_missing(self) -> None:
            assert self._missing_at is not None
            warnings.warn(
                f"PolicySchedulerCallback: the evaluation metrics have no {self.metric!r} (they have "
                f"{self._missing_at[1]}), so the policy does not act; pass metric= the name of a validation loss "
                "among them (lower is better, as the policy was meta-trained on; with a dict of eval datasets the "
                "Trainer names them 'eval_<name>_loss')",
                stacklevel=3,
            )
            self._metric_settled = True

        def on_step_begin(self, args, state, control, **kwargs):
            if self.scheduler is not None:
                self.scheduler._write()  # undo the Trainer's own lr scheduler

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.scheduler is None or not self._training or state.global_step == self._start_step:
                # Before the run's (or the resumed run's) first optimiser step (eval_on_start: a resumed run's
                # checkpoint already holds the decision of that step's evaluation), or after training.
                return
            if not metrics or self.metric not in metrics:
                # With a dict of eval datasets each is evaluated on its own, and only one holds the metric: the
                # others are no decision. Missing from every evaluation of a step, the metric is wrong: said at
                # the next step's evaluations (or when training ends), once.
                if not self._metric_settled:
                    if self._missing_at is None:
                        self._missing_at = (state.global_step, sorted(metrics or {}))
                    elif state.global_step != self._missing_at[0]:
                        self._warn_missing()
                return
            self._metric_settled = True
            losses = [e["loss"] for e in state.log_history[self._log_index :] if "loss" in e]
            self._log_index = len(state.log_history)
            train_loss = sum(losses) / len(losses) if losses else None
            # The last decision only observes (no interval follows): a loss missing there changes nothing, as at
            # the extra evaluation transformers 5 makes after a last step that is not a multiple of eval_steps.
            sched = self.scheduler
            last = sched.last_step + 1 >= sched.total_steps
            # With decisions= grouping the evaluations, a decision sees the losses logged since the previous one.
            sees_none = sched.next_step_decides and sched._group_train[1] == 0
            if train_loss is None and sees_none and not last and not sched._warned_no_train_loss:
                advice = (
                    "logging_strategy='epoch' with eval_strategy='epoch'"
                    if _eval_strategy(args) == "epoch"
                    else (
                        "logging_strategy='steps' and "
                        if _strategy(getattr(args, "logging_strategy", "steps")) != "steps"
                        else ""
                    )
                    + (
                        "logging_steps to at most eval_steps"
                        if sched.decisions == sched.total_steps
                        else "logging_steps to at most the steps between two decisions"
                    )
                )
                warnings.warn(
                    f"PolicySchedulerCallback: no training loss was logged before the evaluation at step "
                    f"{state.global_step}, so the policy does not see one (it was meta-trained with it): set "
                    f"{advice} in TrainingArguments",
                    stacklevel=2,
                )
                self.scheduler._warned_no_train_loss = True  # said here, more precisely than step() would
            # The Trainer's own scheduler wrote its rate after the last optimiser step (on_step_begin undid
            # it before every step, so the policy's values ran): put them back before the policy looks.
            self.scheduler._write()
            self.scheduler.step(metrics[self.metric], train_loss=train_loss, global_step=state.global_step)
            metrics["policy_lr"] = self.scheduler.get_last_lr()[0]

    return PolicySchedulerCallback


def hf_trainer_callback(
    policy: str | os.PathLike | Any = "default",
    *,
    total_steps: int | None = None,
    metric: str = "eval_loss",
    **scheduler_kwargs: Any,
) -> Any:
    """A ``transformers.TrainerCallback`` that tunes the Trainer's optimiser with a policy.

    Args:
        policy: a bundle directory or a shipped policy name (``"default"``), loaded now, or a loaded
            :class:`~agents.PolicyBundle`.
        total_steps: number of evaluations in the run; default: derived from ``TrainingArguments``
            (``max_steps // eval_steps``, or the number of epochs with ``eval_strategy="epoch"``).
        metric: the evaluation metric shown to the policy as the validation loss: a loss, lower is
            better (an accuracy or F1 would be read as a loss that grows as the model improves).
        **scheduler_kwargs: ``deterministic``, ``seed``, ``writer``, ``adaptive``, ``epochs``, ``lr_max_rise``,
            ``decisions`` (at how many of the evaluations the policy decides) for :class:`PolicyScheduler`
            (``epochs`` defaults to the Trainer's optimiser steps times its gradient accumulation over
            the batches per epoch of its training dataloader; pass it for a dataset without a length).

    Raises:
        ImportError: ``transformers`` is not installed.
        ValueError: ``metric`` names a score (``"eval_accuracy"``: higher is better) instead of a loss.
        TypeError: ``metric`` is not a non-empty string.
    """
    try:
        cls = _hf_callback_class()
    except ImportError as err:
        raise ImportError(
            "hf_trainer_callback needs the `transformers` package (and `accelerate`, which its Trainer needs): "
            "pip install 'hpo-meta[hf]' or pip install transformers accelerate"
        ) from err
    return cls(policy, total_steps=total_steps, metric=metric, **scheduler_kwargs)
