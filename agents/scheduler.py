"""Deploy a trained meta-agent as a learning-rate scheduler inside any PyTorch training loop.

:class:`PolicyScheduler` feels like ``torch.optim.lr_scheduler.ReduceLROnPlateau``: the training
loop calls ``scheduler.step(val_loss, train_loss=...)`` once per *decision interval* (every K optimiser steps, or
every epoch), and the scheduler writes the policy's new hyperparameters into the optimiser's
``param_groups``. Observations are built by :class:`~hpo_env.ObservationBuilder` and actions applied
by :class:`~hpo_env.ActionDecoder`, the very objects the environment uses, following the decision
protocol written down in :mod:`hpo_env.features`; ``tests/test_scheduler.py`` replays one
trajectory through both and checks that they agree bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import types
import warnings
import weakref
from array import array
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, SupportsFloat

import numpy as np
import torch

from agents.bundle import policy_signature
from hpo_env import DIVERGENCE_FACTOR, ActionDecoder, GradientStats, ObservationBuilder, log_epochs_feature
from hpo_env.checks import is_flag, is_integer, is_number
from hpo_env.tasks import DECISIONS_PER_RUN, SGD_MOMENTUM_RANGE

__all__ = ["PolicyScheduler", "default_policy_path", "resolve_policy"]

#: Name of the policy bundle shipped inside the package (``agents/policies/default``).
DEFAULT_POLICY = "default"
_STATE_VERSION = 1


class _Missing:
    """The default of ``step(metrics)``, so that ``step()`` without a loss gets a message, not Python's."""

    def __repr__(self) -> str:
        return "<required>"


_MISSING = _Missing()
_NEEDS_A_LOSS = (
    "PolicyScheduler.step() needs the validation loss of the interval that just ended, as "
    "ReduceLROnPlateau.step(metrics) does: step(val_loss, train_loss=mean training loss). A torch scheduler "
    "combinator (ChainedScheduler, SequentialLR) cannot hold it: the policy schedules the run from its first "
    "step, warm-up included"
)
#: What a shallow copy of a scheduler shares with the original: nothing a step() changes in place.
_SHARED_BY_COPIES = frozenset({"optimizer", "bundle", "decoder", "writer"})


def default_policy_path(name: str = DEFAULT_POLICY) -> Path:
    """Directory of a policy bundle shipped with hpo-meta (``agents/policies/<name>``).

    Raises:
        ValueError: no shipped policy has that name.
    """
    root = resources.files("agents") / "policies"
    path = Path(str(root / name))
    if not (path / "config.json").is_file():
        shipped = sorted(p.name for p in Path(str(root)).iterdir() if (p / "config.json").is_file())
        raise ValueError(f"no policy named {name!r} ships with hpo-meta (shipped: {shipped})")
    return path


def resolve_policy(path_or_name: str | os.PathLike) -> Path:
    """The bundle directory of ``path_or_name``: an existing path as given, else the name of a policy
    shipped with hpo-meta (``"default"``), as ``from_pretrained``, ``hpo-bench --policy`` and the
    example and benchmark scripts accept them.

    A plain name that is both a shipped policy's and a folder in the working directory means the folder
    if it holds a bundle (with a warning: the shipped one is ``default_policy_path(name)``), else the
    shipped policy (with a warning naming the folder it passed over).

    Raises:
        ValueError: neither an existing path nor a shipped policy's name.
    """
    wrong_type = not isinstance(path_or_name, (str, os.PathLike))
    if wrong_type or str(path_or_name) == "":
        raise (TypeError if wrong_type else ValueError)(
            f"the policy must be a bundle directory (a str or os.PathLike) or a shipped policy's name such as "
            f"'default', got {path_or_name!r}"
        )
    path = Path(path_or_name)
    name = (
        path_or_name
        if isinstance(path_or_name, str) and "/" not in path_or_name and os.sep not in path_or_name
        else None
    )
    if name is not None and path.exists():
        try:
            shipped = default_policy_path(name)
        except ValueError:
            return path
        if (path / "config.json").is_file():
            warnings.warn(
                f"{path_or_name!r} is a bundle folder here ({path.resolve()}) and the name of a shipped policy: "
                f"loading the folder; for the shipped one pass agents.default_policy_path({path_or_name!r})",
                stacklevel=_user_stacklevel(),
            )
            return path
        warnings.warn(
            f"{path.resolve()} holds no policy bundle: loading the shipped policy {path_or_name!r} instead",
            stacklevel=_user_stacklevel(),
        )
        return shipped
    if path.exists() or name is None:
        return path  # (a missing path is load_bundle's to report, with what a bundle holds)
    try:
        return default_policy_path(name)
    except ValueError as err:
        raise ValueError(f"{path_or_name!r} is not a policy bundle directory, and {err}") from None


def _is_int(value: Any) -> bool:
    """An integer (:func:`hpo_env.checks.is_integer`), or a 0-dim integer tensor (state dicts hold either)."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return is_integer(value)


def _is_real(value: Any) -> bool:
    """A number (:func:`hpo_env.checks.is_number`), or a 0-dim non-bool tensor."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and value.dtype != torch.bool
    return is_number(value)


def _policy_device(bundle: Any) -> torch.device:
    """The device a bundle's network runs on (an ensemble's: its first member's); CPU if it does not say."""
    members = getattr(bundle, "members", None)
    if members:
        return _policy_device(members[0])
    device = getattr(getattr(bundle, "model", None), "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def _resolve_sync_ranks(sync_ranks: bool | None) -> bool:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if sync_ranks is None:
        return initialised and dist.get_world_size() > 1
    if not is_flag(sync_ranks):
        raise TypeError(f"sync_ranks must be True, False or None (automatic), got {sync_ranks!r}")
    sync_ranks = bool(sync_ranks)
    if sync_ranks and not initialised:
        raise ValueError(
            "sync_ranks=True needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group before creating the scheduler); use None to sync only then"
        )
    return sync_ranks


def _collective_device(optimizer: torch.optim.Optimizer) -> torch.device:
    """Where the collectives' tensors live: NCCL takes CUDA tensors (on this rank's GPU: the one its
    parameters are on, even where the script never called ``torch.cuda.set_device``), the others CPU ones."""
    if torch.distributed.get_backend() != "nccl":
        return torch.device("cpu")
    for group in getattr(optimizer, "param_groups", []):
        for p in group["params"]:
            if p.device.type == "cuda":
                return p.device
    return torch.device("cuda", torch.cuda.current_device())


def _mean_over_ranks(val: float | None, train: float | None, device: torch.device) -> tuple[float | None, float | None]:
    """Every rank's losses averaged, each over the ranks that gave one (None where none did); one ``all_reduce``."""
    x = torch.tensor(
        [0.0 if v is None else w for v in (val, train) for w in (v, 1.0)],
        dtype=torch.float64,
        device=device,
    )
    torch.distributed.all_reduce(x)
    total_val, with_val, total_train, with_train = x.tolist()
    return (
        total_val / with_val if with_val > 0 else None,
        total_train / with_train if with_train > 0 else None,
    )


def _inner_optimizer(optimizer: Any) -> Any:
    """The optimiser doing the update inside a wrapper: accelerate's ``AcceleratedOptimizer`` (and the
    like) hold it in ``.optimizer``, torch's ``ZeroRedundancyOptimizer`` in ``.optim``."""
    for attribute in ("optimizer", "optim"):
        inner = getattr(optimizer, attribute, None)
        if isinstance(inner, torch.optim.Optimizer):
            return _inner_optimizer(inner)
    return optimizer


def _from_rank_zero(device: torch.device, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rank 0's values of ``arrays`` (float64, one ``broadcast``), on every rank."""
    sizes = [a.size for a in arrays]
    x = torch.from_numpy(np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])).to(device)
    torch.distributed.broadcast(x, src=0)
    flat = x.cpu().numpy()
    out, start = [], 0
    for a, n in zip(arrays, sizes):
        out.append(flat[start : start + n].reshape(np.shape(a)).copy())
        start += n
    return tuple(out)


def _to_float(value: SupportsFloat, what: str, kind: str = "a loss") -> float:
    if isinstance(value, (str, bytes, bool, np.bool_)):  # float("0.5") and float(True) work, but are mistakes here
        raise TypeError(f"{what} must be a real number ({kind}), got {type(value).__name__} {value!r}")
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if (value.numel() if isinstance(value, torch.Tensor) else value.size) != 1:
            raise TypeError(
                f"{what} must be a number or a one-element tensor, got an array of shape {tuple(value.shape)}"
            )
        # A training loss still attached to its graph is the common case.
        value = value.detach().reshape(()) if isinstance(value, torch.Tensor) else value.reshape(())
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be a real number (anything float() accepts), got {value!r}") from err


def _as_numpy(value: Any, dtype: Any) -> np.ndarray:
    """An array from a state-dict entry: tensors on any device (``torch.load(map_location=...)``) included."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.array(value, dtype=dtype, copy=True)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this module.

    Construction warnings are issued from ``__init__`` and its helpers, reached directly or through
    :meth:`PolicyScheduler.from_pretrained`; either way the warning should name the user's line.
    """
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _copy_state(state: Any, to_torch: bool) -> Any:
    """Deep copy of a policy state (None, an array, or nested tuples/lists of arrays).

    With ``to_torch`` the arrays become tensors, so the state dict loads with
    ``torch.load(weights_only=True)``; otherwise tensors become numpy arrays again.
    """
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(_copy_state(s, to_torch) for s in state)
    if to_torch:
        return torch.from_numpy(np.array(state, copy=True))
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().numpy().copy()
    return np.array(state, copy=True)


#: ``total_steps`` outside this range warns: below the shortest meta-training run, or over twice the longest.
HORIZON_WITHOUT_WARNING = (min(DECISIONS_PER_RUN), 2 * max(DECISIONS_PER_RUN))
#: A ``warnings.filterwarnings`` message pattern of that warning.
HORIZON_WARNING = r".*the policy was meta-trained on runs of \d+-\d+ decisions"
#: The number of decisions the horizon warning suggests: among the best of ``benchmarks/horizon.py``.
SUGGESTED_DECISIONS = 25
_GROUP_CALLS = (
    f"Pass decisions={SUGGESTED_DECISIONS}: the policy then decides once per {{every}} step() calls on average, on the "
    "latest validation loss and the mean training loss since its last decision, and holds its values in between"
)
_FEWER_CALLS = (
    "Pass decisions= between {low} and {high} (the policy decides at that many evenly spaced step() calls), "
    "calling step() more often if total_steps is below {low}"
)


def _readable(x: float) -> str:
    """A count for a message: ``2.4``, ``8``, ``40,000``."""
    return f"{x:.1f}" if x < 10 and x != int(x) else f"{x:,.0f}"


def _warn_about_the_horizon(
    total_steps: int,
    what: str = "step() calls",
    fix: str = "Call step() every K optimiser steps or every few epochs so that the run has {low}-{high} decisions, "
    "with total_steps counting them",
    stacklevel: int | None = None,
) -> None:
    """Warn when a run of ``total_steps`` decisions is far from the meta-training runs' (see
    :data:`HORIZON_WITHOUT_WARNING`); ``what`` names the decisions and ``fix`` says how to change their
    number, in the caller's terms (the Hugging Face callback's are evaluations)."""
    low, high = HORIZON_WITHOUT_WARNING
    if low <= total_steps <= high:
        return
    warnings.warn(
        f"{total_steps} {what} in the run: the policy was meta-trained on runs of {min(DECISIONS_PER_RUN)}-"
        f"{max(DECISIONS_PER_RUN)} decisions, and it schedules worse far from that (examples/deploy_policy.py's "
        "digits CNN, the same 500 optimiser steps: test loss 0.15 with 25 decisions, 0.38 with 10, 0.34 with 250). "
        + fix.format(low=low, high=high),
        stacklevel=_user_stacklevel() if stacklevel is None else stacklevel,
    )


class PolicyScheduler:
    """Sets an optimiser's hyperparameters with a trained meta-agent, one decision per ``step()`` (or per
    group of calls, with ``decisions=``).

    Call ``step(val_loss)`` after every decision interval: every K optimiser steps or every epoch,
    whatever you choose, as long as ``total_steps`` counts those calls. The first call comes after
    the first interval, which runs with the optimiser's initial hyperparameters (a first call before any
    ``optimizer.step()`` warns, as torch's schedulers do); call ``t`` shows the
    policy its progress ``t / total_steps`` and sets the hyperparameters of interval ``t + 1`` (the
    last call, ``t = total_steps``, only observes: no interval follows). This is exactly the
    protocol of the environment the policy was trained in (see :mod:`hpo_env.features`). With
    ``decisions=d`` the same holds for the ``d`` deciding calls: decision ``j`` shows progress ``j / d``.

    The scheduler owns the controlled hyperparameters (those of ``bundle.decoder``, e.g. ``lr`` and
    ``weight_decay``) and writes them at every step; others are left alone. ``momentum`` is SGD's
    ``momentum`` (any optimiser's ``momentum`` key: RMSprop's must be created above 0) or, for Adam-type
    optimisers, ``betas[0]``. Wrappers are looked through (accelerate's ``AcceleratedOptimizer``, torch's
    ``ZeroRedundancyOptimizer``).

    **Several parameter groups.** For each controlled hyperparameter, the *base* group is the first
    group whose initial value is not zero (group 0, unless it was created with e.g.
    ``weight_decay=0``, as the no-decay group of biases and norms often is): the policy sees and
    moves the base value. Every other group keeps its initial ratio to the base in the space the
    action moves the value in: its learning rate and weight decay stay ``initial_g / initial_base``
    times the base value (a group created with ``weight_decay=0`` keeps 0; if *every* group has 0, group
    0 is the base, clipped up to the policy's lower bound, and the others keep 0, which is what the
    Hugging Face Trainer's groups want: its first group is the one with decay), and its ``1 - momentum`` stays proportional to the base's. No
    group is set outside the policy's bounds (a kept 0 aside). Param groups added after the scheduler
    was built are not controlled: ``step()`` raises.

    **Initial values.** Values outside the policy's bounds are clipped into them at construction
    (with a warning), as the environment does at the start of every episode; the ratios are taken to
    the clipped base, so a clipped base does not move the other groups. A policy trained with a cap
    relative to the start (``hpo-train --lr-max-rise D``) never sets the base learning rate above
    ``10**D`` times its initial value here either.

    **Losses** must be positive (cross-entropy, MSE, ...): the policy observes log losses, and a
    negative ``metrics`` or ``train_loss`` (a log-likelihood, a score) raises ``ValueError``. An exact 0
    (a float32 loss that rounds to zero) is taken as the environment takes it: the log feature saturates
    at its clip, and a zero first loss is no reference (1.0 is used).

    **Divergence.** A NaN or infinite ``metrics`` (or ``train_loss``), or a ``metrics`` above
    :data:`hpo_env.DIVERGENCE_FACTOR` (1000) times the run's first positive one, is treated as
    divergence (the environments measure from the untrained model's loss, which a scheduler does not
    see, so its threshold is the tighter one): a warning is issued, the policy is *not* shown the value (it never saw
    a diverged run continue in training), and the learning rate takes the largest decrease one
    decision allows (action -1 on ``lr``, other hyperparameters held; a policy that does not control
    ``lr`` holds them all). The next loss below that is shown to the policy as usual, with that
    decrease as the previous action (if no finite loss came before, it starts the observation
    history, as a first call does, with the rate's change since the run's start). The scheduler
    never raises on a diverged loss; whether to stop or restore a checkpoint is the training loop's
    decision.

    **Too many calls.** ``step()`` after the ``total_steps``-th call warns and holds the
    hyperparameters.

    **Fewer decisions than calls.** The policy was meta-trained on runs of 10-30 decisions and schedules
    worse far from that (``benchmarks/horizon.py``); construction warns outside 10-60. With
    ``decisions=d`` (fewer than ``total_steps``), ``step()`` can still be called every epoch: the policy
    decides at ``d`` evenly spaced calls (call ``t`` where ``t * d // total_steps`` grows; the last call
    is the last decision) and observes there the latest validation loss and the mean of the training
    losses passed since its previous decision; between decisions the hyperparameters are held, and a
    non-finite loss still takes the largest learning-rate decrease at once. The calls between decisions
    may pass ``metrics=None`` and skip the evaluation (:attr:`next_step_decides` says which call decides). The policy's progress
    feature counts decisions; :attr:`last_step` and the :attr:`history` count calls.

    **The only scheduler.** The policy must be the only writer of the hyperparameters it controls: a
    torch LR scheduler (a warm-up ``LambdaLR``...) that already moved ``lr`` warns at construction, and a
    controlled value changed by anything else between two ``step()`` calls warns once, at the next one.
    **Sparse gradients** (``nn.Embedding(sparse=True)``) cannot take weight decay: under a policy that sets
    ``weight_decay``, put them in a param group of their own created with ``weight_decay=0`` (kept at 0);
    otherwise the first ``optimizer.step()`` with their gradients raises a ``ValueError`` that says so.

    **Gradient features.** A policy trained with them (``bundle.gradient_features``) also sees how
    consecutive minibatch gradients of the interval agree and how large they are. The scheduler then
    reads the gradients at every ``optimizer.step()`` through a step post-hook (nothing to add to the
    training loop; with ``optimizer.step(closure)`` it reads the gradients the closure computed; a trainable parameter
    without a gradient at a step counts as a zero gradient, a frozen one is left out),
    keeping the last two gradients as float32 (twice the parameters' size in memory, plus a temporary
    flat copy during each step, on the device of the first parameter with a gradient). A state dict saved in the middle of an interval (or, with ``decisions=``, between two decisions)
    does not hold that interval's gradient statistics: save it right after ``step()`` (with ``decisions=``, right
    after a deciding one: :attr:`next_step_decides` was True before it), as usual.

    **Epochs.** A policy trained with the epochs feature (``bundle.epochs_feature``) also sees how
    many passes over its training set the whole run makes: pass ``epochs`` (as for
    ``torch.optim.lr_scheduler.OneCycleLR``; with one ``step()`` per epoch it is ``total_steps``).

    Args:
        optimizer: a ``torch.optim.Optimizer`` whose ``param_groups`` carry the controlled keys.
        bundle: a :class:`~agents.PolicyBundle` (from :func:`~agents.load_bundle`), or any object with
            the same ``decoder`` attribute and ``predict(obs, state, episode_start, deterministic)``
            method on raw observations.
        total_steps: number of ``step()`` calls (decision intervals) in the whole run, >= 1.
        deterministic: use the policy's mean action (True) or sample from it.
        seed: seed of the sampled actions (``deterministic=False``; None: fresh entropy). They come
            from the scheduler's own generator, saved in :meth:`state_dict`, never from torch's
            global one, so sampling neither shifts the training loop's random draws nor depends on them.
        writer: optional ``torch.utils.tensorboard.SummaryWriter``; logs ``scheduler/<hparam>``
            (the base group's value for the next interval, as torch schedulers' ``get_last_lr()``; the
            first interval's at step 0), ``scheduler/val_loss``, ``scheduler/train_loss``,
            ``scheduler/action_<hparam>`` and ``scheduler/diverged``, at global step ``t`` (the
            ``step()`` calls so far: a run restarted with :meth:`reset` counts from 1 again, so give it
            its own writer). A copy (``copy.deepcopy``, pickle) does not take the writer along: set
            ``scheduler.writer`` on the copy to log from it.
        adaptive: whether the optimiser is Adam-type (an observed feature). Default: True unless the
            optimiser is a ``torch.optim.SGD``.
        epochs: how many passes over the training set the whole run makes (> 0; fractions are fine).
            Required by a policy with the epochs feature, ignored by one without.
        lr_max_rise: cap the base learning rate at ``10 ** lr_max_rise`` times its initial value, in
            place of the policy's own cap (None: the policy's, ``hpo-train --lr-max-rise``, if any). A
            safety rail for a policy trained without one; where it binds, the policy sees its rate held
            where in meta-training it could rise further.
        sync_ranks: in distributed data-parallel training, make every rank set the same values: each
            ``step()`` averages the ranks' losses (an ``all_reduce``) and every rank then takes rank 0's
            decision (a ``broadcast``), so every rank must call ``step()`` at the same points. Default:
            on when a ``torch.distributed`` process group of several ranks is initialised.
        decisions: at how many of the ``total_steps`` calls the policy decides, evenly spaced (None: at
            every call). Give about 25 when you call ``step()`` far more often than 60 times in a run.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``, ``bundle`` has no ``decoder``
            and ``predict``, or ``total_steps`` or ``decisions`` is not an integer.
        ValueError: ``total_steps < 1``, ``decisions`` outside ``[1, total_steps]``, a parameter group lacks a hyperparameter the policy
            controls (e.g. a policy trained for momentum on an optimiser without one), or the policy
            observes the epochs and ``epochs`` is missing or not positive.

    Example:
        >>> import torch
        >>> from agents import PolicyScheduler
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 1)
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> scheduler = PolicyScheduler.from_pretrained("default", optimizer, total_steps=20, epochs=20)
        >>> for epoch in range(20):
        ...     train_loss = 0.0
        ...     for _ in range(10):
        ...         optimizer.zero_grad()
        ...         loss = torch.nn.functional.mse_loss(model(x), y)
        ...         loss.backward()
        ...         optimizer.step()
        ...         train_loss += loss.item() / 10
        ...     with torch.no_grad():
        ...         val_loss = torch.nn.functional.mse_loss(model(x), y)
        ...     scheduler.step(val_loss, train_loss=train_loss)
        >>> scheduler.last_step, optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] != 1e-3
        (20, True)
    """

    # column -> one value per row (reset() starts it; see history): 8 bytes a value, where a list of floats takes 32
    _history: dict[str, array[float]]

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        bundle: Any,
        total_steps: int,
        *,
        deterministic: bool = True,
        seed: int | None = None,
        writer: Any = None,
        adaptive: bool | None = None,
        epochs: float | None = None,
        lr_max_rise: float | None = None,
        sync_ranks: bool | None = None,
        decisions: int | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not optimizer.param_groups:
            raise ValueError(
                f"the {type(optimizer).__name__} has no param groups, so there is nothing to schedule: build the "
                "PolicyScheduler once the optimizer holds its parameters"
            )
        decoder = getattr(bundle, "decoder", None)
        if not isinstance(decoder, ActionDecoder) or not callable(getattr(bundle, "predict", None)):
            named = (
                f"; for a policy by name or folder use PolicyScheduler.from_pretrained({str(bundle)!r}, optimizer, ...)"
                if isinstance(bundle, (str, os.PathLike))
                else ""
            )
            raise TypeError(
                f"bundle must be a PolicyBundle (agents.load_bundle(path)) or have a `decoder` (ActionDecoder) "
                f"and a `predict` method, got {type(bundle).__name__}{named}"
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)):
            raise TypeError(f"total_steps must be an int (the number of step() calls), got {total_steps!r}")
        if total_steps < 1:
            hint = (
                " (-1 is what Lightning's trainer.max_epochs reads when the Trainer is given max_steps or max_time "
                "instead: "
                "count the step() calls from max_steps, e.g. max_steps // steps per decision)"
                if total_steps == -1
                else ""
            )
            raise ValueError(
                f"total_steps must be >= 1 (the number of step() calls in the run), got {total_steps}{hint}"
            )
        if lr_max_rise is not None:
            if "lr" not in decoder.names:
                raise ValueError(
                    f"lr_max_rise caps the learning rate, which this policy does not control ({list(decoder.names)})"
                )
            if not (is_number(lr_max_rise) and 0 < lr_max_rise and math.isfinite(lr_max_rise)):
                raise ValueError(
                    "lr_max_rise must be a positive number of decades above the initial learning rate (1.5: at most"
                    f" 31.6x), got {lr_max_rise!r}; use None to keep the policy's own cap, if any"
                )
            decoder = decoder.with_cap("lr", float(lr_max_rise))
        self.optimizer = optimizer
        self.bundle = bundle
        self.decoder: ActionDecoder = decoder
        self.total_steps = int(total_steps)
        self.decisions = self._check_decisions(decisions, self.total_steps)
        if decisions is not None:
            _warn_about_the_horizon(self.decisions, what=f"decisions (decisions={self.decisions})", fix=_FEWER_CALLS)
        elif self.total_steps > HORIZON_WITHOUT_WARNING[1]:
            _warn_about_the_horizon(
                self.total_steps,
                what=f"step() calls (total_steps={self.total_steps}), each a decision,",
                fix=_GROUP_CALLS.format(every=_readable(self.total_steps / SUGGESTED_DECISIONS)),
            )
        else:
            _warn_about_the_horizon(self.total_steps, what=f"step() calls (total_steps={self.total_steps})")
        for name, value in (("deterministic", deterministic), ("adaptive", adaptive)):
            if value is not None and not is_flag(value):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"writer must be a torch.utils.tensorboard.SummaryWriter (anything with add_scalar), got {writer!r}"
            )
        self.deterministic = bool(deterministic)
        if seed is not None and (not is_integer(seed) or seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
        self._sampler = np.random.default_rng(seed)
        self.sync_ranks = _resolve_sync_ranks(sync_ranks)
        self.writer = writer
        if adaptive is None:  # look through wrappers such as accelerate's AcceleratedOptimizer
            adaptive = not isinstance(_inner_optimizer(optimizer), torch.optim.SGD)
        self.adaptive = bool(adaptive)
        self._keys = self._resolve_keys(optimizer, decoder)
        self._check_weight_decay(optimizer, decoder)
        self._check_momentum(optimizer, decoder)
        self._warn_if_unfamiliar(optimizer, decoder, self.adaptive)
        self.gradient_features = bool(getattr(bundle, "gradient_features", False))
        self.epochs_feature = bool(getattr(bundle, "epochs_feature", False))
        self.epochs = self._check_epochs(epochs)
        self.features = self._observation_builder()
        self._grad_stats: GradientStats | None = None
        self._register_step_hook(optimizer)
        if "weight_decay" in decoder.names:
            self._register_sparse_check(optimizer)
        self._warned_outside_change = False
        self._warned_grad_save = False
        self._warn_if_lr_scheduled(optimizer, decoder)
        expected_dim = getattr(bundle, "obs_dim", self.features.dim)
        if expected_dim != self.features.dim:
            raise ValueError(
                f"the policy expects {expected_dim} observation features, this hpo-meta builds "
                f"{self.features.dim} for {list(decoder.names)}: retrain or re-save the bundle"
            )

        # Per hyperparameter, the first group with a non-zero value is the base; the other groups
        # keep their ratio to it (in the action's log space).
        values = self._read()  # (groups, k)
        dist = self._distance(values)
        nonzero = dist > 0
        self._base_groups = np.where(nonzero.any(0), nonzero.argmax(0), 0)
        cols = np.arange(decoder.num_actions)
        initial = values[self._base_groups, cols]
        base = decoder.clip(initial)
        for j, (name, old, new) in enumerate(zip(decoder.names, initial, base)):
            if old != new:
                spec = self.decoder.specs[j]
                warnings.warn(
                    f"initial {name}={old:g} of param group {self._base_groups[j]} is outside the policy's bounds "
                    f"[{spec.lower:g}, {spec.upper:g}]; clipped to {new:g}, as in meta-training (to choose the start "
                    f"yourself, and silence this, create the optimizer with a {name} inside the bounds"
                    + (
                        ", e.g. weight_decay=1e-4 or TrainingArguments(weight_decay=1e-4))"
                        if name == "weight_decay"
                        else ")"
                    ),
                    stacklevel=_user_stacklevel(),
                )
        # Ratios to the clipped base: every group starts from its own value (a clipped base does not drag
        # the others with it), and no group is ever set outside the policy's bounds, except a 0 kept at 0.
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = dist / self._distance(base)[None]
        # 0 / (a base clipped up from 0) is 0: when every group had 0, only the base follows the policy.
        self._ratios = np.nan_to_num(ratios, nan=1.0, posinf=1.0)
        self._ratios[self._base_groups, cols] = 1.0
        self._initial_base = base.copy()
        self.reset()
        outside = [
            f"{name}={values[g, j]:g} of param group {g}"
            for g in range(len(values))
            for j, name in enumerate(decoder.names)
            if g != self._base_groups[j] and not np.isclose(self._last_values[g, j], values[g, j], rtol=1e-9, atol=0)
        ]
        if outside:
            warnings.warn(
                f"initial {', '.join(outside)} outside the policy's bounds: clipped into them (no param group "
                "is set outside the bounds the policy was trained with)",
                stacklevel=_user_stacklevel(),
            )

    # -- construction helpers -------------------------------------------------------------------
    @staticmethod
    def _check_decisions(decisions: int | None, total_steps: int) -> int:
        """How many of the ``total_steps`` calls the policy decides at (None: every one)."""
        if decisions is None:
            return total_steps
        if not is_integer(decisions):
            raise TypeError(
                f"decisions must be an int (how many of the step() calls the policy decides at), got {decisions!r}"
            )
        if decisions < 1:
            raise ValueError(
                f"decisions must be at least 1, got {decisions}: pass how many of the total_steps={total_steps} step() "
                f"calls the policy decides at (about {SUGGESTED_DECISIONS}), or None for every call"
            )
        if decisions > total_steps:
            raise ValueError(
                f"decisions={decisions} is more than total_steps={total_steps}, the step() calls it groups: leave decisions "
                "unset (None: every call decides), or call step() more often (every K optimizer steps instead of every "
                "epoch) and count those calls in total_steps"
            )
        return int(decisions)

    def _check_epochs(self, epochs: float | None) -> float | None:
        if epochs is None and not self.epochs_feature:
            return None
        if epochs is None:
            raise ValueError(
                "this policy observes how many passes over the training set the run makes: pass epochs= "
                "(with one step() per epoch, epochs=total_steps; with one per K optimizer steps, "
                "epochs=total_steps * K / len(train_loader))"
            )
        value = _to_float(epochs, "epochs", "a number of passes over the training set")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"epochs must be a finite number > 0 (passes over the training set), got {epochs!r}")
        return value

    def _observation_builder(self) -> ObservationBuilder:
        return ObservationBuilder(
            self.decoder, 1, gradient_features=self.gradient_features, epochs_feature=self.epochs_feature
        )

    def __getstate__(self) -> dict[str, Any]:
        # A TensorBoard writer holds an open file and a thread: a copy or an unpickled scheduler logs
        # nowhere until given a writer of its own (``scheduler.writer = SummaryWriter(...)``).
        state = self.__dict__.copy()
        state["writer"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A shallow copy (copy.copy) is handed the original's objects. It shares the optimiser, as a copy
        # of a torch scheduler does, and the policy, which no step changes; everything a step() changes in
        # place (the observation builder's averages, the sampler, the history, the gradient statistics)
        # is copied, so that stepping the copy leaves what the original observes and draws unchanged.
        memo: dict[int, Any] = {}  # one memo: what two attributes share, their copies share too
        state = {key: value if key in _SHARED_BY_COPIES else copy.deepcopy(value, memo) for key, value in state.items()}
        self.__dict__.update(state)
        self.__dict__.setdefault("_optimizer_stepped", True)  # pickled before the scheduler noted optimizer steps
        # A copy or an unpickled scheduler comes with a copy of the optimiser (or shares it), and torch's
        # optimisers do not carry their hooks along: register this scheduler's on it again.
        self._register_step_hook(self.optimizer)
        if "weight_decay" in self.decoder.names:
            self._register_sparse_check(self.optimizer)

    def _register_step_hook(self, optimizer: torch.optim.Optimizer) -> None:
        """Note every optimiser step, and observe its gradients under a policy that sees them (on the innermost
        optimiser of a wrapper)."""
        inner = _inner_optimizer(optimizer)
        ref = weakref.ref(self)

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            scheduler = ref()
            if scheduler is not None:
                scheduler._optimizer_stepped = True
                if scheduler.gradient_features:
                    scheduler._observe_gradients()

        # After the step: with optimizer.step(closure) the gradients exist only once the closure ran.
        handle = inner.register_step_post_hook(hook)
        weakref.finalize(self, handle.remove)  # the hook goes when the scheduler does

    def _register_sparse_check(self, optimizer: torch.optim.Optimizer) -> None:
        """Before every ``optimizer.step()``, check that no group with weight decay has sparse gradients: each
        parameter at its first step with a gradient (not all get one at the first step: a branch the batch
        skipped, a frozen layer)."""
        inner = _inner_optimizer(optimizer)
        ref = weakref.ref(self)
        # (group, parameter) not yet seen with a gradient: a gradient's layout does not change during a run. The
        # hook stays registered when none is left (removing it here, while torch iterates the optimizer's hooks,
        # breaks any other hook registered after it).
        pending = [(g, p) for g, group in enumerate(inner.param_groups) for p in group["params"]]

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            scheduler = ref()
            # Frozen parameters stay pending for the whole run: at a step where none of them has a gradient,
            # one look at each is all (the full check cost about 0.5 us per parameter at every step).
            if scheduler is not None and any(p.grad is not None for _, p in pending):
                scheduler._check_sparse_gradients(pending)

        handle = inner.register_step_pre_hook(hook)
        weakref.finalize(self, handle.remove)

    def _check_sparse_gradients(self, pending: list[tuple[int, torch.Tensor]]) -> None:
        """Check the parameters of ``pending`` that have a gradient now, and leave only the others in it."""
        inner = _inner_optimizer(self.optimizer)
        for g, p in pending:
            decay = float(inner.param_groups[g].get("weight_decay", 0.0))
            if decay > 0 and p.grad is not None and p.grad.is_sparse:
                raise ValueError(
                    f"param group {g} has sparse gradients (e.g. nn.Embedding(sparse=True)), which "
                    f"{type(inner).__name__} cannot combine with weight decay, but the policy sets its "
                    f"weight_decay={decay:g} (it controls weight_decay; if every group was created with 0, group 0 "
                    "is clipped up to the policy's lower bound). Put the sparse parameters in a param group of "
                    "their own with weight_decay=0 (kept at 0) beside a group with a non-zero weight_decay, use "
                    "dense gradients, or use a policy that does not control weight_decay"
                )
        pending[:] = [(g, p) for g, p in pending if p.grad is None]

    def _warn_if_lr_scheduled(self, optimizer: torch.optim.Optimizer, decoder: ActionDecoder) -> None:
        """Warn when a torch LR scheduler has already moved the learning rate the policy starts from."""
        if "lr" not in decoder.names:
            return
        moved = [
            f"group {g}: lr={float(group['lr']):g}, created with {float(group['initial_lr']):g}"
            for g, group in enumerate(optimizer.param_groups)
            if "initial_lr" in group and not math.isclose(float(group["lr"]), float(group["initial_lr"]), rel_tol=1e-6)
        ]
        if moved:
            warnings.warn(
                f"a torch LR scheduler (a warm-up?) has changed the learning rate ({'; '.join(moved)}): the policy "
                "takes the current value as the run's starting rate (and its lr_max_rise cap as relative to it), "
                "and the other scheduler will keep overwriting the rates the policy sets. PolicyScheduler must be "
                "the only scheduler setting lr: build the optimizer at your starting rate without the other one",
                stacklevel=_user_stacklevel(),
            )

    def _warn_if_changed_outside(self) -> None:
        """Warn (once) when something else wrote a controlled hyperparameter since the last ``_write``."""
        if self._warned_outside_change or len(self.optimizer.param_groups) != len(self._keys):
            return
        now = self._read()
        changed = ~np.isclose(now, self._last_values, rtol=1e-6, atol=0.0)
        if changed.any():
            g, j = (int(i) for i in np.argwhere(changed)[0])
            warnings.warn(
                f"param group {g}'s {self.decoder.names[j]} is {now[g, j]:g}, but this PolicyScheduler set "
                f"{self._last_values[g, j]:g} at its last step(): something else (another LR scheduler such as a "
                "warm-up, or the training loop) writes the hyperparameters the policy controls "
                f"({list(self.decoder.names)}), so the optimizer has not been running the policy's schedule. "
                "PolicyScheduler must be the only one setting them: remove the other scheduler",
                stacklevel=_user_stacklevel(),
            )
            self._warned_outside_change = True

    def _observe_gradients(self) -> None:
        if self._t >= self.total_steps:  # the schedule is over: no interval will be observed
            return
        # A trainable parameter without a gradient at this step (a branch the batch did not take, zero_grad()'s
        # set_to_none) counts as a zero gradient, as zero_grad(set_to_none=False) leaves it: each parameter keeps
        # its place in the flat gradient, so that consecutive steps are compared coordinate by coordinate.
        # Frozen parameters (requires_grad False, no gradient) are left out.
        params = [
            p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None or p.requires_grad
        ]
        with_grad = [p.grad for p in params if p.grad is not None]
        if not with_grad:
            return
        device = with_grad[0].device  # model-parallel or offloaded parameters: gathered on the first one's device
        flat = torch.cat(
            [
                torch.zeros(p.numel(), device=device, dtype=torch.float32)
                if p.grad is None
                else (p.grad.to_dense() if p.grad.is_sparse else p.grad).detach().reshape(-1).to(device, torch.float32)
                for p in params
            ]
        )
        if self._grad_stats is None or self._grad_stats.device != flat.device:
            self._grad_stats = GradientStats(1, flat.device)
        self._grad_stats.observe(flat[None])

    def _interval_gradients(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The ending interval's gradient statistics, and a fresh start for the next interval."""
        if not self.gradient_features:
            return None
        if self._grad_stats is None or self._grad_stats.steps_observed()[0] == 0:
            warnings.warn(
                "the policy observes gradients, but no optimizer.step() with gradients ran since its last "
                "decision (or the last divergence): its gradient features read as unknown (0)",
                stacklevel=_user_stacklevel(),
            )
            return np.array([np.nan]), np.array([np.nan])
        stats = self._grad_stats.result()
        self._grad_stats.reset()
        return stats

    @staticmethod
    def _resolve_keys(optimizer: torch.optim.Optimizer, decoder: ActionDecoder) -> list[list[str]]:
        """Per group, the key holding each controlled hyperparameter (``"betas"`` for Adam's momentum)."""
        keys = []
        for g, group in enumerate(optimizer.param_groups):
            row = []
            for name in decoder.names:
                if name == "momentum" and "momentum" not in group and "betas" in group:
                    row.append("betas")
                elif name in group:
                    row.append(name)
                else:
                    wanted = "'momentum' or 'betas'" if name == "momentum" else repr(name)
                    raise ValueError(
                        f"the policy controls {list(decoder.names)}, but param group {g} of "
                        f"{type(optimizer).__name__} has no {wanted} (it has {sorted(k for k in group if k != 'params')}); "
                        "use an optimizer that has them, or a policy trained to control only what this optimizer has"
                    )
            keys.append(row)
        return keys

    @staticmethod
    def _check_momentum(optimizer: torch.optim.Optimizer, decoder: ActionDecoder) -> None:
        """Refuse a momentum policy on an RMSprop created without momentum, whose step() would then fail."""
        inner = _inner_optimizer(optimizer)
        if "momentum" not in decoder.names or not isinstance(inner, torch.optim.RMSprop):
            return
        zero = [g for g, group in enumerate(inner.param_groups) if group["momentum"] == 0]
        if zero:
            raise ValueError(
                f"RMSprop keeps a momentum buffer only when created with momentum > 0, and param group(s) {zero} "
                "have momentum=0 (torch's default): its step() would fail once the policy raises it. Create it "
                "with e.g. momentum=0.9, or use a policy that does not control momentum"
            )

    @staticmethod
    def _check_weight_decay(optimizer: torch.optim.Optimizer, decoder: ActionDecoder) -> None:
        """Refuse to set an adaptive optimiser's L2 penalty as if it were AdamW's decoupled decay.

        Meta-training's optimisers are SGD (decay added to the gradient) and AdamW (decay applied to the
        weights). Adam, RMSprop, Adagrad... add it to the gradient, where the per-coordinate scaling
        turns the decays the policy chooses for AdamW (up to 0.3) into a far stronger penalty.
        """
        if "weight_decay" not in decoder.names:
            return
        inner = _inner_optimizer(optimizer)  # accelerate's AcceleratedOptimizer and the like
        coupled_adaptive = (
            torch.optim.Adam,
            torch.optim.NAdam,
            torch.optim.RAdam,
            torch.optim.Adamax,
            torch.optim.RMSprop,
            torch.optim.Adagrad,
            torch.optim.Adadelta,
        )
        if not isinstance(inner, coupled_adaptive):
            return
        coupled = [g for g, group in enumerate(inner.param_groups) if not group.get("decoupled_weight_decay", False)]
        if coupled:
            raise ValueError(
                f"{type(inner).__name__} adds weight_decay to the gradient (an L2 penalty, param group(s) {coupled}), "
                "but the policy sets weight_decay as meta-trained on AdamW, which decays the weights directly: the "
                "values it chooses would act as a much stronger penalty here. Use torch.optim.AdamW (Adam with "
                "decoupled decay; same defaults otherwise), or decoupled_weight_decay=True where the optimizer has "
                f"it, or a policy that does not control weight_decay (this one controls {list(decoder.names)})"
            )

    @staticmethod
    def _warn_if_unfamiliar(optimizer: torch.optim.Optimizer, decoder: ActionDecoder, adaptive: bool) -> None:
        """Warn when the optimiser's update rule is neither of those the policy was meta-trained with.

        Known: SGD and AdamW (and their subclasses), Adam, NAdam and RAdam (AdamW with no or decoupled
        decay; coupled decay under a weight-decay policy is refused by :meth:`_check_weight_decay`),
        and third-party classes named like AdamW (bitsandbytes' ``AdamW8bit``, ``PagedAdamW``...).
        Anything else (Lion, Adafactor; Adagrad and RMSprop under a policy without weight decay,
        which :meth:`_check_weight_decay` otherwise refuses) may read its learning rate on another
        scale, or add its weight decay to the gradient, and the policy cannot know.
        """
        inner = _inner_optimizer(optimizer)
        known = (torch.optim.SGD, torch.optim.AdamW, torch.optim.Adam, torch.optim.NAdam, torch.optim.RAdam)
        name = type(inner).__name__
        if isinstance(inner, torch.optim.SGD) and "momentum" not in decoder.names:
            low, high = SGD_MOMENTUM_RANGE
            momentum = float(inner.param_groups[0].get("momentum", 0.0))
            if not low <= momentum <= high:
                warnings.warn(
                    f"the policy was meta-trained on SGD with momentum in [{low}, {high}] and sets the learning rate "
                    f"for it; this SGD has momentum={momentum:g}: over many steps a gradient moves the weights "
                    f"lr / (1 - momentum) = {1 / (1 - min(momentum, 0.999)):.3g} lr, against 10 lr at momentum 0.9, so the "
                    "policy's rates act on another scale than it learned. Create the optimizer with e.g. momentum=0.9 "
                    "(with transformers' Trainer, optim_args='momentum=0.9')",
                    stacklevel=_user_stacklevel(),
                )
        if isinstance(inner, known) or "AdamW" in name:
            return
        as_what = "AdamW (adaptive=True)" if adaptive else "SGD with momentum (adaptive=False)"
        decay = (
            " Check also that its weight_decay decays the weights directly, as AdamW's does: if it adds the decay"
            " to the gradient, the policy's values act as a much stronger penalty."
            if "weight_decay" in decoder.names
            else ""
        )
        warnings.warn(
            f"the policy was meta-trained on SGD with momentum and on AdamW; {name} is neither, and is treated "
            f"as {as_what}. If its learning rates live on another scale (Lion's are typically 3-10x smaller "
            f"than AdamW's), the policy's first decisions are made for a run it misreads.{decay} Compare "
            "against your usual schedule on a short run before relying on it.",
            stacklevel=_user_stacklevel(),
        )

    def _distance(self, values: np.ndarray) -> np.ndarray:
        """The quantity each hyperparameter scales: the value, or ``1 - momentum``."""
        values = np.asarray(values, dtype=np.float64)
        out = values.copy()
        for j, spec in enumerate(self.decoder.specs):
            if spec.is_momentum:
                out[..., j] = 1.0 - values[..., j]
        return out

    def _group_values(self, base: np.ndarray) -> np.ndarray:
        """Every group's values from the base values and the stored ratios, clipped into the bounds."""
        dist = self._distance(base)[None] * self._ratios
        values = dist.copy()
        for j, spec in enumerate(self.decoder.specs):
            if spec.is_momentum:
                values[:, j] = np.clip(1.0 - dist[:, j], 0.0, None)
            kept_zero = self._ratios[:, j] == 0  # a group created with 0 (e.g. no weight decay) keeps 0
            values[:, j] = np.where(kept_zero, values[:, j], spec.clip(values[:, j]))
        values[self._base_groups, np.arange(len(base))] = base  # exactly the decoder's value, no round trip
        return values

    def _read(self) -> np.ndarray:
        out = np.empty((len(self.optimizer.param_groups), self.decoder.num_actions))
        for g, (group, keys) in enumerate(zip(self.optimizer.param_groups, self._keys)):
            for j, key in enumerate(keys):
                value = group["betas"][0] if key == "betas" else group[key]
                if isinstance(value, torch.Tensor):
                    value = value.detach()
                try:
                    out[g, j] = float(value)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"param group {g} of {type(self.optimizer).__name__} has {key}={value!r}, but the policy sets "
                        f"{self.decoder.names[j]} as a number: create the optimizer with an explicit value (e.g. "
                        "transformers' Adafactor(lr=1e-3, relative_step=False, scale_parameter=False)), or use a "
                        f"policy that does not control {self.decoder.names[j]}"
                    ) from None
        return out

    def _check_groups(self) -> None:
        """Refuse an optimiser whose param groups changed since construction (before any state moves)."""
        if len(self.optimizer.param_groups) != len(self._keys):
            raise ValueError(
                f"the optimizer has {len(self.optimizer.param_groups)} param groups, but this PolicyScheduler was "
                f"built for {len(self._keys)}: groups added with add_param_group() afterwards are not controlled. "
                "Create the PolicyScheduler after adding every param group; to unfreeze layers later, put their "
                "parameters in the optimizer from the start with requires_grad_(False) (optimizer.step() skips "
                "parameters without a gradient) and turn requires_grad back on when they should train"
            )

    def _write(self) -> None:
        """Write the current hyperparameters into the optimiser (also undoes outside changes)."""
        self._check_groups()
        values = self._group_values(self._base)
        written = values.copy()  # what the optimiser holds: a bfloat16 tensor rounds the value
        with torch.no_grad():  # a tensor hyperparameter may require grad (torch's differentiable=True)
            for g, (group, keys, row) in enumerate(zip(self.optimizer.param_groups, self._keys, values)):
                for j, (key, v) in enumerate(zip(keys, row)):
                    v = float(v)
                    if key == "betas":
                        betas = group["betas"]
                        if isinstance(betas[0], torch.Tensor):  # torch wants both betas tensors or both floats
                            betas[0].fill_(v)
                            written[g, j] = float(betas[0])
                        else:
                            group["betas"] = (
                                type(betas)((v, *betas[1:])) if isinstance(betas, (tuple, list)) else (v, betas[1])
                            )
                    elif isinstance(group[key], torch.Tensor):
                        group[key].fill_(v)
                        written[g, j] = float(group[key])
                    else:
                        group[key] = v
        self._last_values = written

    # -- public API -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        *,
        device: str = "cpu",
        **kwargs: Any,
    ) -> PolicyScheduler:
        """Load a policy bundle and wrap ``optimizer``.

        Args:
            path_or_name: a bundle directory, or the name of a policy shipped with hpo-meta
                (``"default"``).
            optimizer, total_steps: as for :class:`PolicyScheduler`.
            device: torch device of the policy network.
            **kwargs: ``deterministic``, ``seed``, ``writer``, ``adaptive``, ``epochs``, ``lr_max_rise``,
                ``sync_ranks``, ``decisions``.

        Raises:
            agents.BundleError: the bundle is missing, corrupted or incompatible (a ``ValueError``).
        """
        from agents.bundle import load_bundle

        return cls(optimizer, load_bundle(resolve_policy(path_or_name), device=device), total_steps, **kwargs)

    @property
    def last_step(self) -> int:
        """Number of ``step()`` calls so far (``t``)."""
        return self._t

    @property
    def next_step_decides(self) -> bool:
        """Whether the next ``step()`` call is a decision (always, unless ``decisions=`` groups the calls; never
        past ``total_steps``)."""
        return self._t < self.total_steps and self._decides_at(self._t + 1)

    @property
    def decisions_made(self) -> int:
        """Number of the ``step()`` calls so far at which the policy decided (all of them unless ``decisions=``)."""
        return min(self._t, self.total_steps) * self.decisions // self.total_steps

    @property
    def last_observation(self) -> np.ndarray | None:
        """The raw observation shown to the policy at the last step (None before the first)."""
        return None if self._last_obs is None else self._last_obs.copy()

    def reset(self) -> None:
        """Start a new run: restore the initial hyperparameters (as clipped at construction) and forget the past.

        Sampled actions (``deterministic=False``) go on drawing from the same generator, as a Gymnasium
        environment's ``reset()`` without a seed does: the new run's draws are not the first run's.
        """
        self._t = 0
        self._reference_val: float | None = None  # the run's first finite validation loss
        self._group_train = (0.0, 0)  # the finite training losses passed since the last decision: sum, count
        self._warned_no_train_loss = False
        self._optimizer_stepped = False
        self._started = False
        self._base = self._initial_base.copy()
        self._last_action = np.zeros(self.decoder.num_actions)
        self.features = self._observation_builder()
        if self._grad_stats is not None:
            self._grad_stats.reset()
        init = getattr(self.bundle, "initial_state", None)
        self._policy_state = init(1) if callable(init) else None
        self._episode_start = True
        self._last_obs: np.ndarray | None = None
        self._history = {column: array("d") for column in self._history_columns()}
        self._record(0, None, math.nan, None, False, None)  # row 0: the values the first interval runs with
        self._write()

    def step(
        self,
        metrics: SupportsFloat | None | _Missing = _MISSING,
        train_loss: SupportsFloat | None = None,
        *,
        global_step: int | None = None,
    ) -> None:
        """Observe the interval that just ended and set the hyperparameters of the next one.

        Args:
            metrics: validation loss after the interval (a float, a 0-dim tensor, ...). With ``decisions=``,
                None at a call between two decisions (:attr:`next_step_decides` is False), whose validation
                loss the policy does not see: skip that evaluation.
            train_loss: mean training loss over the interval. Optional, but the policy was meta-trained
                with it at every decision: without it a warning is issued (once per run).
            global_step: where the ``writer``'s scalars of this decision go on TensorBoard's x-axis
                (default: the ``step()`` calls so far); pass the training loop's optimiser step to line
                them up with its own curves. The integrations pass the Trainer's.
        """
        if global_step is not None and (not _is_int(global_step) or global_step < 0):
            raise ValueError(f"global_step must be an integer >= 0 or None, got {global_step!r}")
        global_step = None if global_step is None else int(global_step)  # also a 0-dim integer tensor
        if isinstance(metrics, _Missing):
            raise TypeError(_NEEDS_A_LOSS)
        val = None if metrics is None else _to_float(metrics, "metrics")
        train = None if train_loss is None else _to_float(train_loss, "train_loss")
        device = _collective_device(self.optimizer) if self.sync_ranks else None
        if device is not None:
            val, train = _mean_over_ranks(val, train, device)  # every rank then agrees on a divergence
        # Before any warning: a call that fails warns of nothing.
        for name, value in (("metrics", val), ("train_loss", train)):
            if value is not None and math.isfinite(value) and value < 0:  # -inf is a divergence, below
                raise ValueError(
                    f"{name}={value:g} is negative, but the policy observes log losses: pass a positive loss "
                    "(cross-entropy, MSE, ...), not a log-likelihood, a score or an accuracy"
                )
        self._check_groups()  # before the step changes anything, so a caught error leaves the scheduler usable
        if val is None and self.next_step_decides:  # (with ranks: when none of them gave one, on every rank)
            raise ValueError(
                f"step() call {self._t + 1} of {self.total_steps} is one of the policy's decisions, so it needs the "
                "validation loss: metrics=None is only for the calls between two decisions (with decisions=, where "
                "scheduler.next_step_decides is False)"
            )
        self._warn_if_changed_outside()
        if self._t == 0 and not self._optimizer_stepped:
            warnings.warn(
                "PolicyScheduler.step() was called before any optimizer.step() of the run: as with torch's schedulers, "
                "call it after the interval it observes (train, evaluate, then step(val_loss, train_loss=...)). "
                "Called first, the policy decides on the untrained model and its schedule runs one interval behind "
                "(if a GradScaler skipped every optimizer step of the first interval, this warning is all it did)",
                stacklevel=_user_stacklevel(),
            )
        group_without_train = self._group_train[1] == 0 and train is None
        if group_without_train and self.next_step_decides and not self._warned_no_train_loss:
            warnings.warn(
                "step() got no train_loss: the policy was meta-trained with the interval's mean training loss at "
                "every decision, so without it the policy sees inputs it never saw in training and its schedule "
                "may be off. Pass step(val_loss, train_loss=mean training loss since the last step())",
                stacklevel=_user_stacklevel(),
            )
            self._warned_no_train_loss = True
        if self._t >= self.total_steps:
            if self._t == self.total_steps:  # once
                warnings.warn(
                    f"PolicyScheduler.step() called more than total_steps={self.total_steps} times; "
                    "the hyperparameters are held at their last values",
                    stacklevel=_user_stacklevel(),
                )
            self._t += 1
            self._write()
            nonfinite = any(v is not None and not math.isfinite(v) for v in (val, train))
            self._record(self._t, global_step, math.nan if val is None else val, train, nonfinite, None)
            return
        self._t += 1
        t, k = self._t, self.decoder.num_actions
        diverged = any(v is not None and not math.isfinite(v) for v in (val, train))
        # As in the environments, a finite validation loss far above the run's first one is a divergence too.
        ref = self._reference_val
        exploded = not diverged and val is not None and ref is not None and val > DIVERGENCE_FACTOR * ref
        if ref is None and val is not None and math.isfinite(val) and val > 0:  # (a zero is no reference)
            self._reference_val = val
        if train is not None and math.isfinite(train):
            total, count = self._group_train
            self._group_train = (total + train, count + 1)
        if self.writer is not None and t == 1:  # the values the first interval ran with: the plot starts with the run
            for name in self.decoder.names:
                self.writer.add_scalar(f"scheduler/{name}", self._history[name][0], 0)
        decides = self._decides_at(t)
        last = False  # the last decision only observes: no interval is left to act on
        if decides:
            decided = self.decisions_made
            last = decided == self.decisions
            progress = np.array([decided / self.decisions])
            total, count = self._group_train
            self._group_train = (0.0, 0)
            observed_train = None if count == 0 else total / count  # grouped calls: the mean since the last decision
            gradients = self._interval_gradients()
        action = None
        if diverged or exploded:
            if last:
                response = "nothing is left to set (it was the run's last decision)"
            elif "lr" in self.decoder.names:
                response = "the learning rate is decreased by the largest step the policy may take"
            else:
                response = "the hyperparameters are held (the policy does not control the learning rate)"
            what = (
                f"validation loss {val:g} at scheduler step {t}, above {DIVERGENCE_FACTOR:g}x the run's first one "
                f"({ref:g}),"
                if exploded
                else f"non-finite loss at scheduler step {t} (val={val}, train={train})"
            )
            warnings.warn(f"{what} is treated as divergence: {response}", stacklevel=_user_stacklevel())
            diverged = True
            if not last:  # at once, also between two decisions
                action = np.zeros(k)
                if "lr" in self.decoder.names:
                    action[self.decoder.names.index("lr")] = -1.0
            if not decides:  # the next decision observes what came after the cut, as an interval would
                self._group_train = (0.0, 0)
                if self._grad_stats is not None:
                    self._grad_stats.reset()
        elif decides:
            tr = None if observed_train is None else np.array([observed_train])
            hp = self._base[None]
            if not self._started:
                obs = self.features.reset(
                    [0],
                    np.array([val]),
                    tr,
                    hp,
                    progress,
                    adaptive=np.array([self.adaptive]),
                    gradients=gradients,
                    epochs=self.epochs if self.epochs_feature else None,
                    # The same as hp and zeros, unless a divergence before this first decision cut the rate.
                    initial=self._initial_base[None],
                    prev_action=self._last_action[None],
                )
                self._started = True
            else:
                obs = self.features.update(
                    [0], np.array([val]), tr, hp, self._last_action[None], progress, gradients=gradients
                )
            self._last_obs = obs[0]
            if not last:
                raw, self._policy_state = self._predict(obs)
                self._episode_start = False
                action = np.asarray(raw, dtype=np.float64).reshape(k)
        if action is not None:
            self._base = self.decoder.decode(action, self._base, self._initial_base)
            self._last_action = np.clip(action, -1.0, 1.0)  # a Gaussian head samples beyond; decode clips too
            if device is not None:  # rank 0's decision everywhere (sampled actions, float differences between devices)
                self._base, self._last_action = _from_rank_zero(device, self._base, self._last_action)
                action = self._last_action
        self._write()
        self._record(t, global_step, math.nan if val is None else val, train, diverged, action)
        if self.writer is not None:
            self._log(t if global_step is None else int(global_step))

    def _update_lr(self, epoch: int | None = None) -> None:
        """What torch's ``SequentialLR`` calls on the scheduler it hands over to: refused with the reason."""
        raise TypeError(_NEEDS_A_LOSS)

    def _initial_step(self) -> None:
        """What torch's ``SequentialLR`` calls on its first scheduler when it is built: refused with the reason."""
        raise TypeError(_NEEDS_A_LOSS)

    def _decides_at(self, t: int) -> bool:
        """Whether ``step()`` call ``t`` is a decision: ``decisions`` evenly spaced calls, the last one last."""
        return t * self.decisions // self.total_steps > (t - 1) * self.decisions // self.total_steps

    # -- what the run did: history, TensorBoard, plot -------------------------------------------
    def _history_columns(self) -> list[str]:
        names = self.decoder.names
        return ["step", "global_step", "val_loss", "train_loss", "diverged", *names, *(f"action_{n}" for n in names)]

    def _record(
        self, t: int, global_step: int | None, val: float, train: float | None, diverged: bool, action: Any
    ) -> None:
        """Append a row to the history: what ``step()`` number ``t`` observed, and the values it set."""
        row = {
            "step": t,
            "global_step": math.nan if global_step is None else global_step,
            "val_loss": val,
            "train_loss": math.nan if train is None else train,
            "diverged": float(diverged),
        }
        for j, name in enumerate(self.decoder.names):
            row[name] = float(self._base[j])
            row[f"action_{name}"] = math.nan if action is None else float(action[j])
        for column, values in self._history.items():
            values.append(float(row[column]))

    def _log(self, x: int) -> None:
        """Write the latest history row to the ``writer``, at ``x`` on TensorBoard's axis."""
        w, row = self.writer, {column: values[-1] for column, values in self._history.items()}
        for key in ("val_loss", "train_loss"):
            if math.isfinite(row[key]):
                w.add_scalar(f"scheduler/{key}", row[key], x)
        for name in self.decoder.names:
            w.add_scalar(f"scheduler/{name}", row[name], x)
            if math.isfinite(row[f"action_{name}"]):
                w.add_scalar(f"scheduler/action_{name}", row[f"action_{name}"], x)
        w.add_scalar("scheduler/diverged", row["diverged"], x)

    @property
    def history(self) -> dict[str, np.ndarray]:
        """The run so far, as columns of equal length (``pandas.DataFrame(scheduler.history)`` makes a table).

        Row 0 is the start (``step`` 0: the hyperparameters the first interval runs with); then one row
        per ``step()`` call: ``step`` (its number), ``global_step`` (as passed, else NaN), ``val_loss``
        and ``train_loss`` as observed (NaN: not given), ``diverged`` (1.0 where a loss was not finite),
        and per controlled hyperparameter (``lr``, ``weight_decay``, ...) the value set for the next
        interval (the first param group's, or the base group's; other groups keep their ratio to it)
        and ``action_<name>``, the action taken, as TensorBoard's ``scheduler/action_<name>`` (the
        policy's, or after a non-finite loss the largest learning-rate decrease; NaN where none was:
        the last step, and calls past ``total_steps``). It survives ``state_dict()``/``load_state_dict()``
        (a state saved by an older hpo-meta gives NaN rows for the steps before it); ``reset()`` clears
        it. A row takes 8 bytes a column, in memory as in the state dict: 72 for a policy setting ``lr`` and
        ``weight_decay`` (a million ``step()`` calls: 72 MB).
        """
        return {column: np.array(values, dtype=np.float64) for column, values in self._history.items()}

    def plot(self, path: str | os.PathLike | None = None, *, title: str | None = None) -> Any:
        """Draw the run so far: the losses the policy observed, and the schedule it set for each hyperparameter.

        The x-axis is the ``global_step`` passed to ``step()`` where every call passed one, else the
        ``step()`` count. Returns a ``matplotlib`` figure, made without ``pyplot`` (no window opens and
        nothing needs closing; a notebook shows it); with ``path``, also saves it there (PNG, SVG, PDF...
        by the suffix).

        >>> import torch
        >>> from agents import PolicyScheduler
        >>> opt = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1e-3, weight_decay=1e-4)
        >>> sched = PolicyScheduler.from_pretrained("default", opt, total_steps=20, epochs=20)
        >>> for val_loss in (1.0, 0.8, 0.7):
        ...     sched.step(val_loss, train_loss=val_loss * 1.1)
        >>> sched.history["step"].tolist(), sched.history["val_loss"][1:].tolist()
        ([0.0, 1.0, 2.0, 3.0], [1.0, 0.8, 0.7])
        >>> fig = sched.plot()  # or sched.plot("schedule.png")
        >>> [ax.get_ylabel() for ax in fig.axes]
        ['loss', 'lr', 'weight decay']
        """
        from matplotlib.figure import Figure

        h = self.history
        names = list(self.decoder.names)
        given = h["global_step"][1:]
        use_global = len(given) > 0 and bool(np.isfinite(given).all())
        x = np.concatenate([[0.0], given]) if use_global else h["step"]
        fig = Figure(figsize=(7.0, 2.2 * (1 + len(names))), layout="constrained")
        axes = fig.subplots(1 + len(names), 1, sharex=True, squeeze=False)[:, 0]
        losses = axes[0]
        for key, style in (("val_loss", {"marker": "o", "markersize": 3}), ("train_loss", {"linestyle": "--"})):
            # A line through the calls that passed a loss (metrics=None skips one), with gaps at divergences.
            shown = np.isfinite(h[key]) | (h["diverged"] > 0)
            if np.isfinite(h[key]).any():
                losses.plot(x[shown], h[key][shown], label=key.replace("_", " "), **style)
        bad = h["diverged"] > 0
        if bad.any():
            top = np.full(int(bad.sum()), losses.get_ylim()[1])
            losses.scatter(x[bad], top, marker="x", color="red", label="non-finite loss", clip_on=False)
        if losses.has_data():
            observed = np.concatenate([h["val_loss"], h["train_loss"]])
            if (observed[np.isfinite(observed)] > 0).any():  # all-zero losses (allowed) stay on a linear axis
                losses.set_yscale("log")
            losses.legend(fontsize=8)
        losses.set_ylabel("loss")
        # Row i's value holds from x[i] to x[i + 1]; the last one, set for the next interval, one interval more.
        x_end = np.append(x, x[-1] + (x[-1] - x[-2] if len(x) > 1 else 1.0))
        for ax, name in zip(axes[1:], names):
            ax.step(x_end, np.append(h[name], h[name][-1]), where="post")
            if name != "momentum":
                ax.set_yscale("log")
            ax.set_ylabel(name.replace("_", " "))
        axes[-1].set_xlabel("global step" if use_global else "scheduler step")
        calls = "" if self.decisions == self.total_steps else f" ({self._t} of {self.total_steps} step() calls)"
        fig.suptitle(title or f"PolicyScheduler: {self.decisions_made} of {self.decisions} decisions{calls}")
        if path is not None:
            fig.savefig(path)
        return fig

    def get_last_lr(self) -> list[float]:
        """The learning rate of every param group, as last set by the scheduler."""
        return self.get_last_hparams().get("lr", [float(g["lr"]) for g in self.optimizer.param_groups])

    def get_last_hparams(self) -> dict[str, list[float]]:
        """Every controlled hyperparameter as last set, one value per param group: ``{"lr": [...], ...}``."""
        return {name: [float(v) for v in self._last_values[:, j]] for j, name in enumerate(self.decoder.names)}

    def _predict(self, obs: np.ndarray) -> tuple[np.ndarray, Any]:
        """The policy's action; a sampled one draws from this scheduler's generator only."""
        starts = np.array([self._episode_start])
        if self.deterministic:
            return self.bundle.predict(obs, state=self._policy_state, episode_start=starts, deterministic=True)
        # The sampling draws from the generator of the policy's device only: fork it (and the CPU's), seed it
        # from this scheduler's generator, and give the caller's state back afterwards.
        device = _policy_device(self.bundle)
        seed = int(self._sampler.integers(2**63))
        accelerator = device.type not in ("cpu", "meta")
        index = device.index if device.index is not None else 0
        with torch.random.fork_rng(
            devices=[index] if accelerator else [], device_type=device.type if accelerator else "cuda"
        ):
            torch.random.default_generator.manual_seed(seed)
            if accelerator:
                module = torch.get_device_module(device.type)
                if device.type == "cuda":
                    with torch.cuda.device(index):
                        module.manual_seed(seed)
                else:
                    module.manual_seed(seed)
            return self.bundle.predict(obs, state=self._policy_state, episode_start=starts, deterministic=False)

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, except the optimiser and the policy (torch schedulers' convention).

        Arrays are stored as tensors, so ``torch.save``/``torch.load(weights_only=True)`` round-trip it.
        A resumed run repeats the uninterrupted one exactly, sampled actions (``deterministic=False``)
        included: their generator's state is saved here. For a policy that observes gradients, only
        when saved right after a decision: the gradient statistics of optimiser steps since then are
        not saved (they pair each gradient with the previous one, as large as the model), so the next
        decision sees only the steps after the resume; a warning says so.
        """
        if self._grad_stats is not None and self._grad_stats.steps_observed()[0] > 0 and not self._warned_grad_save:
            warnings.warn(
                f"state_dict() after {int(self._grad_stats.steps_observed()[0])} optimizer steps since the policy's "
                "last decision: their gradient statistics are not saved, so a run resumed from this state shows the "
                "policy those of the steps after the resume only. Save right after a deciding step() "
                "(when scheduler.decisions_made grows) to resume exactly",
                stacklevel=_user_stacklevel(),
            )
            self._warned_grad_save = True
        feats = {k: torch.from_numpy(v.copy()) for k, v in self.features.state_dict().items()}
        return {
            "version": _STATE_VERSION,
            "decoder": self.decoder.to_config(),
            "total_steps": self.total_steps,
            "decisions": self.decisions,
            "t": self._t,
            "group_train": torch.tensor(self._group_train, dtype=torch.float64),
            "started": self._started,
            "optimizer_stepped": self._optimizer_stepped,
            "episode_start": self._episode_start,
            "adaptive": self.adaptive,
            "deterministic": self.deterministic,
            "sampler": json.dumps(self._sampler.bit_generator.state),
            "base": torch.from_numpy(self._base.copy()),
            "initial_base": torch.from_numpy(self._initial_base.copy()),
            "ratios": torch.from_numpy(self._ratios.copy()),
            "base_groups": torch.from_numpy(self._base_groups.copy()),
            "last_action": torch.from_numpy(self._last_action.copy()),
            "last_obs": None if self._last_obs is None else torch.from_numpy(self._last_obs.copy()),
            "features": feats,
            "epochs_feature": self.epochs_feature,
            "gradient_features": self.gradient_features,
            "epochs": self.epochs,
            "reference_val": self._reference_val,
            "policy_state": _copy_state(self._policy_state, to_torch=True),
            "policy_kind": policy_signature(self.bundle),
            "history": {
                column: torch.from_numpy(np.array(values, dtype=np.float64)) for column, values in self._history.items()
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` and write its hyperparameters into the optimiser.

        Raises:
            ValueError: the state was saved for another policy (controlled hyperparameters or
                bounds), another number of param groups, or is malformed.
            TypeError: ``state_dict`` is not a mapping (a checkpoint's path, say).
        """
        if not isinstance(state_dict, Mapping):
            hint = (
                f" {str(state_dict)!r}: load the file first, scheduler.load_state_dict(torch.load({str(state_dict)!r}))"
                if isinstance(state_dict, (str, os.PathLike))
                else ""
            )
            raise TypeError(
                f"state_dict must be a dict, as PolicyScheduler.state_dict() returns, got {type(state_dict).__name__}"
                f"{hint}"
            )
        required = {"version", "decoder", "total_steps", "t", "base", "ratios", "features", "policy_state"}
        missing = required - set(state_dict)
        if missing:
            hint = ""
            nested = [key for key, value in state_dict.items() if isinstance(value, Mapping) and required <= set(value)]
            if nested:
                hint = f"; it holds one under {nested[0]!r}: pass state_dict[{nested[0]!r}]"
            raise ValueError(
                f"not a PolicyScheduler state dict: missing {sorted(missing)} (it has keys {sorted(map(str, state_dict))})"
                f"{hint}"
            )
        if state_dict["version"] != _STATE_VERSION:
            raise ValueError(f"scheduler state version {state_dict['version']!r}, expected {_STATE_VERSION}")
        saved = ActionDecoder.from_config(state_dict["decoder"])
        if (
            saved != self.decoder
            and "lr" in saved.names
            and "lr" in self.decoder.names
            and saved.with_cap("lr", None) == self.decoder.with_cap("lr", None)
        ):
            raise ValueError(
                f"the state was saved with lr_max_rise={saved.specs[saved.names.index('lr')].max_log10_above_initial}"
                f", this scheduler has lr_max_rise={self.decoder.specs[self.decoder.names.index('lr')].max_log10_above_initial}"
                ": build it with the same lr_max_rise as the run that saved the state"
            )
        if saved != self.decoder:
            raise ValueError(
                f"the state was saved for a policy controlling {state_dict['decoder']}, this scheduler's policy "
                f"controls {self.decoder.to_config()}: load it into a scheduler of the bundle that saved it"
            )
        saved_kind, kind = state_dict.get("policy_kind"), policy_signature(self.bundle)
        if saved_kind is not None and saved_kind != kind:
            raise ValueError(
                f"the state was saved with a {saved_kind} policy, this scheduler runs a {kind} policy, whose "
                "state it cannot continue: load it into a scheduler of the same bundle"
            )
        ratios = _as_numpy(state_dict["ratios"], np.float64)
        if ratios.shape != self._ratios.shape:
            raise ValueError(
                f"the state was saved for {ratios.shape[0]} param groups, the optimizer has {self._ratios.shape[0]}"
            )
        saved_feature = state_dict.get("epochs_feature")
        if saved_feature is not None and bool(saved_feature) != self.epochs_feature:
            raise ValueError(
                f"the state was saved with a policy that {'observes' if saved_feature else 'does not observe'} the "
                "run's epochs, this scheduler's policy does the opposite: load it into a scheduler of the same bundle"
            )
        saved_grad = state_dict.get("gradient_features")
        if saved_grad is not None and bool(saved_grad) != self.gradient_features:
            raise ValueError(
                f"the state was saved with a policy that {'observes' if saved_grad else 'does not observe'} "
                "gradients, this scheduler's policy does the opposite: load it into a scheduler of the same bundle"
            )
        # States saved before base groups existed used group 0 for every hyperparameter.
        base_groups = _as_numpy(state_dict.get("base_groups", np.zeros(self.decoder.num_actions)), np.int64)
        if (
            base_groups.shape != self._base_groups.shape
            or not (0 <= base_groups).all()
            or (base_groups >= len(ratios)).any()
        ):
            raise ValueError(f"malformed scheduler state: base_groups {base_groups.tolist()}")
        k = self.decoder.num_actions
        base = _as_numpy(state_dict["base"], np.float64)
        initial_base = _as_numpy(state_dict.get("initial_base", base), np.float64)
        last_action = _as_numpy(state_dict.get("last_action", np.zeros(k)), np.float64)
        for name, values in (("base", base), ("initial_base", initial_base), ("last_action", last_action)):
            if values.shape != (k,) or not np.isfinite(values).all():
                raise ValueError(
                    f"malformed scheduler state: {name} must hold {k} finite values ({', '.join(self.decoder.names)}), "
                    f"got {values.tolist()}"
                )
        for name, values in (("base", base), ("initial_base", initial_base)):
            if not np.allclose(self.decoder.clip(values), values, rtol=1e-9, atol=0.0):
                raise ValueError(
                    f"malformed scheduler state: {name} {values.tolist()} is outside the policy's bounds for "
                    f"{list(self.decoder.names)}"
                )
        if np.abs(last_action).max(initial=0.0) > 1.0:
            raise ValueError(f"malformed scheduler state: last_action {last_action.tolist()} is outside [-1, 1]")
        total_steps, t = state_dict["total_steps"], state_dict["t"]
        if not (_is_int(total_steps) and total_steps >= 1 and _is_int(t) and t >= 0):
            raise ValueError(
                f"malformed scheduler state: total_steps={total_steps!r} must be an integer >= 1 and t={t!r} one >= 0"
            )
        decisions = state_dict.get("decisions", total_steps)  # states saved before grouping decided at every call
        if not (_is_int(decisions) and 1 <= decisions <= total_steps):
            raise ValueError(
                f"malformed scheduler state: decisions={decisions!r} must be an integer in [1, total_steps={total_steps}]"
            )
        group_train = _as_numpy(state_dict.get("group_train", np.zeros(2)), np.float64)
        if (
            group_train.shape == (2,)
            and _is_int(decisions)
            and _is_int(total_steps)
            and _is_int(t)
            and total_steps >= 1
        ):
            n, d, calls = int(total_steps), int(decisions), min(int(t), int(total_steps))
            last_decision = -(-(calls * d // n) * n // d)  # the call of the last decision (0: none yet)
            in_group = calls - last_decision
        else:
            in_group = -1
        total, count = (group_train.reshape(-1).tolist() + [math.nan, math.nan])[:2]
        if not (
            group_train.shape == (2,)
            and math.isfinite(total)
            and total >= 0
            and float(count).is_integer()
            and 0 <= count <= in_group
            and (count > 0 or total == 0)
        ):
            raise ValueError(
                "malformed scheduler state: group_train must hold the sum (>= 0, 0 without losses) and the count of the "
                f"finite training losses of the {max(in_group, 0)} step() calls since the last decision, got "
                f"{group_train.tolist()}"
            )
        saved_epochs = state_dict.get("epochs")
        if saved_epochs is not None and not (_is_real(saved_epochs) and 0 < float(saved_epochs) < math.inf):
            raise ValueError(f"malformed scheduler state: epochs={saved_epochs!r} must be a positive number")
        sampler = None
        if "sampler" in state_dict:
            try:
                sampler = np.random.PCG64()
                sampler.state = json.loads(state_dict["sampler"])
            except (TypeError, ValueError, KeyError) as err:
                raise ValueError(f"malformed scheduler state: sampler ({type(err).__name__}: {err})") from err
        history = self._history_from_state(state_dict.get("history"), int(t), initial_base)
        reference_val = state_dict.get("reference_val")
        if reference_val is not None and not (_is_real(reference_val) and math.isfinite(float(reference_val))):
            raise ValueError(
                f"malformed scheduler state: reference_val={reference_val!r} must be a finite number or None"
            )
        features = {name: _as_numpy(v, None) for name, v in state_dict["features"].items()}
        epochs = self.epochs
        if self.epochs_feature:
            if saved_epochs is not None:
                epochs = float(saved_epochs)
            if "_epochs" not in features:  # a state saved before the feature existed: the epochs given now
                features["_epochs"] = np.atleast_1d(log_epochs_feature(epochs))
        loaded = self._observation_builder()
        loaded.load_state_dict(features)  # the last check: nothing below refuses, so a refused state changes nothing
        if self.epochs_feature and self.epochs is not None and epochs is not None:
            if not math.isclose(epochs, self.epochs, rel_tol=1e-9):
                warnings.warn(
                    f"the state was saved by a run of epochs={epochs:g}; it replaces this scheduler's "
                    f"epochs={self.epochs:g}",
                    stacklevel=_user_stacklevel(),
                )
        self.epochs = epochs
        self.features = loaded
        if self._grad_stats is not None:  # optimiser steps seen before the load belong to another run
            self._grad_stats.reset()
        if reference_val is None and bool(state_dict.get("started", int(t) > 0)):
            # A state saved before the reference was: the first decision's validation loss, as the features hold it.
            reference_val = float(loaded.state_dict()["_ref"][0])
        self._reference_val = None if reference_val is None else float(reference_val)
        if int(state_dict["total_steps"]) != self.total_steps or int(decisions) != self.decisions:
            saved_run = f"total_steps={int(state_dict['total_steps'])} step() calls"
            this_run = f"total_steps={self.total_steps}"
            if int(decisions) != int(state_dict["total_steps"]) or self.decisions != self.total_steps:  # grouped
                saved_run += f" and decisions={int(decisions)}"
                this_run += f" and decisions={self.decisions}"
            warnings.warn(
                f"the state was saved by a run of {saved_run}; it replaces this scheduler's {this_run} (the policy's "
                "progress feature follows the saved run)",
                stacklevel=_user_stacklevel(),
            )
        self.total_steps = int(state_dict["total_steps"])
        self.decisions = int(decisions)
        self._group_train = (float(group_train[0]), int(group_train[1]))
        self._t = int(state_dict["t"])
        self._started = bool(state_dict.get("started", self._t > 0))
        # (a state saved after the first interval's optimiser steps, before its step(): a Lightning checkpoint at
        # the first epoch's end; one saved before this was recorded is taken as stepped, as an unpickled one is)
        self._optimizer_stepped = bool(state_dict.get("optimizer_stepped", True))
        self._episode_start = bool(state_dict.get("episode_start", self._t == 0))
        if "adaptive" in state_dict and bool(state_dict["adaptive"]) != self.adaptive:
            kinds = {True: "an adaptive (AdamW-like) optimizer", False: "an SGD-like optimizer"}
            warnings.warn(
                f"the state was saved with {kinds[bool(state_dict['adaptive'])]} and this scheduler's is "
                f"{kinds[self.adaptive]} ({type(_inner_optimizer(self.optimizer)).__name__}): the saved rates are on "
                "the other's scale. Resume with the optimizer class of the run that saved the state",
                stacklevel=_user_stacklevel(),
            )
        self.adaptive = bool(state_dict.get("adaptive", self.adaptive))
        if "deterministic" in state_dict and bool(state_dict["deterministic"]) != self.deterministic:
            modes = {True: "deterministic actions", False: "sampled actions"}
            warnings.warn(
                f"the state was saved by a run of {modes[bool(state_dict['deterministic'])]}; it replaces this "
                f"scheduler's {modes[self.deterministic]}",
                stacklevel=_user_stacklevel(),
            )
        self.deterministic = bool(state_dict.get("deterministic", self.deterministic))
        if sampler is not None:
            self._sampler = np.random.Generator(sampler)
        self._base = base
        self._initial_base = initial_base
        self._ratios = ratios.copy()
        self._base_groups = base_groups.copy()
        self._last_action = last_action
        last_obs = state_dict.get("last_obs")
        self._last_obs = None if last_obs is None else _as_numpy(last_obs, np.float32)
        self._policy_state = _copy_state(state_dict["policy_state"], to_torch=False)
        self._history = history
        self._write()

    def _history_from_state(self, saved: Any, t: int, initial_base: np.ndarray) -> dict[str, array[float]]:
        """A saved history, checked (one row per step() call and one for the start); for a state saved
        before the history existed, the start's values and NaN rows for the steps before the save."""
        columns = self._history_columns()
        if saved is None:  # the rows of the steps before the save are unknown (NaN), but their count
            rows = [{"step": float(i)} for i in range(t + 1)]
            rows[0].update({name: float(v) for name, v in zip(self.decoder.names, initial_base)})
            return {column: array("d", [row.get(column, math.nan) for row in rows]) for column in columns}
        try:
            history = {
                column: array("d", _as_numpy(saved[column], np.float64).reshape(-1).tobytes()) for column in columns
            }
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed scheduler state: history ({type(err).__name__}: {err})") from err
        lengths = {column: len(values) for column, values in history.items()}
        if set(lengths.values()) != {t + 1}:
            raise ValueError(
                f"malformed scheduler state: the history must hold t + 1 = {t + 1} rows in every column, got {lengths}"
            )
        return history

    def __repr__(self) -> str:
        hp = ", ".join(f"{n}={v:.3g}" for n, v in zip(self.decoder.names, self._base))
        grouped = "" if self.decisions == self.total_steps else f", decision {self.decisions_made}/{self.decisions}"
        return f"PolicyScheduler(step {self._t}/{self.total_steps}{grouped}, {hp}, optimizer={type(self.optimizer).__name__})"
