"""Meta-train a hyperparameter-scheduling agent: ``hpo-train`` / ``python -m training.train``.

A whole run, top to bottom (:func:`train`):

1. settings: a preset (``quick``: 2-3 minutes on 2 CPU cores; ``full``: about 25-65 minutes) plus any
   option given on the command line (:class:`TrainSettings`, one documented field per option);
2. the environment: ``HPOVecEnv`` slots training inner models on tasks sampled from the meta-training
   families, wrapped in ``VecMonitor`` and ``VecNormalize`` (:func:`agents.make_meta_env`);
3. the agent: ``RecurrentPPO("MlpLstmPolicy")``, or a frame-stacked MLP ``PPO`` control
   (:func:`agents.make_meta_agent`); with ``--imitation-tasks N``, first cloned from a grid-tuned
   cosine schedule on N meta-training tasks (:mod:`training.imitation`, summary in ``imitation.json``);
4. ``model.learn`` with a progress bar and three callbacks (:mod:`training.callbacks`): per-episode
   TensorBoard scalars, periodic evaluation on the validation families (held out of meta-training and
   of the benchmark) against the constant schedule and the random policy (the best policy bundle is
   kept), and atomic checkpoints;
5. the final policy bundle and a summary saying where everything is.

Everything of a run lives in one folder, ``<logdir>/<run_name>/``::

    settings.json        the options as given, null where the preset's value applies (``--resume``
                         reads them back), and under ``agent_config`` the values they resolve to
    events.out.tfevents.*  TensorBoard logs (tags documented in training/callbacks.py)
    progress*.csv        the same scalars as CSV
    checkpoints/         step_<timesteps>/ (model, VecNormalize statistics, RNG state), latest.json
    best_bundle/         the policy bundle with the best evaluation on the validation families
                         (held out of meta-training and of the benchmark, so either bundle can be
                         benchmarked; in runs that evaluated on the test families, benchmark bundle/)
    bundle/              the policy bundle at the end of training

Examples::

    hpo-train                                   # the quick preset
    hpo-train --preset full --seed 1 --run-name full-s1
    hpo-train --algorithm framestack            # the MLP control
    hpo-train --preset full --imitation-tasks 256   # warm start by imitation of a tuned schedule
    hpo-train --resume runs/full-s1             # continue a stopped run from its last checkpoint
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import re
import shlex
import sys
import textwrap
import time
import types
import typing
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from training.cli import (
    NameList,
    StopRequest,
    cannot_write,
    interrupted_status,
    readable_warnings,
    replace_file,
    sigterm_as_interrupt,
)

__all__ = [
    "BUDGETS",
    "RunBudget",
    "RunFolderError",
    "TrainResult",
    "TrainSettings",
    "build_parser",
    "main",
    "parse_settings",
    "train",
]

#: Seed of the held-out evaluation tasks: fixed, so every run is evaluated on the same tasks.
EVAL_TASK_SEED = 20240


#: Seeds are kept below 2**31, so that seed + slot stays a valid seed for NumPy and SB3 with any --n-envs.
MAX_SEED = 2**31


class RunFolderError(ValueError):
    """A run folder cannot be used: it already exists, or its checkpoint cannot be resumed."""


class SettingsError(ValueError):
    """The settings do not make a valid meta-agent configuration (raised before any folder is made)."""


@dataclass(frozen=True)
class RunBudget:
    """How long a preset trains and how often it evaluates and checkpoints (in timesteps = decisions)."""

    total_timesteps: int
    eval_freq: int
    checkpoint_freq: int
    eval_tasks: int
    eval_seeds: int


#: Budgets of the presets (the agent settings are :data:`agents.PRESETS`).
BUDGETS: dict[str, RunBudget] = {
    "quick": RunBudget(total_timesteps=16_384, eval_freq=8_192, checkpoint_freq=4_096, eval_tasks=4, eval_seeds=1),
    "full": RunBudget(total_timesteps=262_144, eval_freq=32_768, checkpoint_freq=16_384, eval_tasks=8, eval_seeds=2),
}


@dataclass
class TrainSettings:
    """Meta-train a RecurrentPPO agent that schedules hyperparameters while networks train."""

    preset: Literal["quick", "full"] = "quick"
    """Named defaults: quick (2-3 minutes on 2 CPU cores) or full (about 25-65 minutes)."""
    algorithm: Literal["recurrent", "framestack"] = "recurrent"
    """recurrent: RecurrentPPO with an LSTM policy; framestack: MLP PPO over stacked observations (the control)."""
    total_timesteps: int | None = None
    """Meta-training timesteps, i.e. decisions, summed over all slots (default: the preset's)."""
    n_envs: int | None = None
    """Inner training runs stepped in parallel, batched (default: the preset's)."""
    seed: int = 0
    """Seed of the agent and of the task stream (slot i draws tasks from seed + i)."""
    logdir: str = "runs"
    """Folder holding one subfolder per run; point TensorBoard at it."""
    run_name: str | None = None
    """Name of the run folder (default: <algorithm>__<preset>__<seed>__<unix time>)."""
    device: str = "auto"
    """Torch device of the meta-agent: auto, cpu, cuda, cuda:1..."""
    env_device: str = "cpu"
    """Torch device of the inner models being trained."""
    env_workers: int = 1
    """Processes that step the inner models; they share --threads, one thread each at least (2 on 2 cores: one run trains 1.1-1.3x faster; its numbers agree with 1 worker's up to float rounding)."""
    resume: str | None = None
    """Continue the run in this folder from its last checkpoint (its settings are reused)."""
    task_distribution: Literal["train", "all", "toy"] | None = None
    """Meta-training tasks: train (the meta-training families), all, or toy (tests) (default: train)."""
    families: tuple[str, ...] | None = None
    """Meta-training task families instead of the split's, e.g. the train split's plus glyphs_cnn, space- or comma-separated (default: the split's)."""
    hyperparameters: tuple[str, ...] | None = None
    """Controlled hyperparameters, in action order, space- or comma-separated (default: lr weight_decay)."""
    lr_step: float | None = None
    """Largest learning-rate change per decision, in decades (default: the preset's, 0.5)."""
    lr_step_up: float | None = None
    """Largest learning-rate *increase* per decision, in decades, if smaller or larger than --lr-step (default: the same)."""
    lr_max_rise: float | None = None
    """Cap the learning rate at 10**d times the run's initial one, in meta-training and deployment; 0 turns the cap off (default: the preset's: full 1.5, quick none)."""
    action_change_penalty: float | None = None
    """Training-only reward cost per unit of action change between decisions; 0 is off (default: the preset's)."""
    reference_reward: bool | None = None
    """Train on the gain over a reference run of each task at the optimiser's default LR (same initialisation and minibatches): a control variate; doubles the inner training work (default: the preset's, off)."""
    task_group_size: int | None = None
    """Train each meta-training task in this many slots at once (same initialisation and minibatches), rewarding each with its gain over the group's mean; must divide --n-envs; 1: off (default: the preset's: full 2, quick 1)."""
    init_lr_spread: float | None = None
    """Meta-training tasks start from the optimiser's default LR times 10**U(-s, s); s in decades (default: the preset's: full 1.0, quick 0.5 as the benchmark's tasks)."""
    init_lr_center: float | None = None
    """Shift the meta-training tasks' starting LRs by c decades: default LR times 10**(c + U(-s, s)) (default: the preset's: full 0.5, around the families' best LR; quick 0)."""
    lr_gain_spread: float | None = None
    """Give each meta-training task a hidden factor 10**U(-s, s) on the learning rate its optimiser steps with, so a family's best observed LR varies; s in decades (default: the preset's, 0: none)."""
    gradient_features: bool | None = None
    """Also observe the gradients: the mean cosine of consecutive minibatch gradients and their log norm, per interval (default: the preset's, off)."""
    epochs_feature: bool | None = None
    """Also observe how many passes over its training set each run makes; a PolicyScheduler then needs epochs= (default: the preset's, on)."""
    imitation_tasks: int = 0
    """Warm start: before PPO, clone a grid-tuned cosine schedule on this many meta-training tasks (9 inner runs each; 0: off)."""
    eval_freq: int | None = None
    """Timesteps between held-out evaluations; 0 evaluates only at the end (default: the preset's)."""
    eval_distribution: Literal["validation", "test", "train", "all", "toy"] = "validation"
    """Where evaluation tasks (and so best_bundle/) come from: validation (families held out of meta-training and of the benchmark), test (the benchmark's), train, all, or toy (tests)."""
    eval_tasks: int | None = None
    """Held-out tasks in each evaluation, cycling through the evaluation families (default: the preset's)."""
    eval_seeds: int | None = None
    """Runs per held-out task, with different initialisation seeds (default: the preset's)."""
    checkpoint_freq: int | None = None
    """Timesteps between checkpoints, rounded up to whole rollouts; 0: only at the end (default: the preset's). A first Ctrl-C or SIGTERM also writes one, at the end of the current rollout."""
    keep_checkpoints: int = 2
    """How many of the most recent checkpoints to keep; 0 keeps them all (to average late policies with hpo-average). On resume, a smaller number prunes the older ones."""
    learning_rate: float | None = None
    """Adam learning rate of the meta-agent (default: the preset's)."""
    learning_rate_end: float | None = None
    """Decay the meta-agent's learning rate linearly from --learning-rate to this over the run (default: the preset's, constant)."""
    gamma: float | None = None
    """Discount of the meta-agent's returns; 1 makes an episode's return log(L_1 / L_T), less its task group's mean with --task-group-size > 1 (default: the preset's, 0.995)."""
    gae_lambda: float | None = None
    """GAE's lambda: 1 uses whole observed returns (the critic only as a baseline), lower values lean on the critic's estimates (default: the preset's: full 1.0, quick 0.95)."""
    n_steps: int | None = None
    """Decisions per slot per rollout, best at least one whole episode of 10-30 (default: the preset's)."""
    batch_size: int | None = None
    """PPO minibatch size in timesteps (default: the preset's)."""
    n_epochs: int | None = None
    """PPO epochs per rollout (default: the preset's)."""
    lstm_hidden_size: int | None = None
    """LSTM units of the recurrent policy (default: the preset's)."""
    frame_stack: int | None = None
    """Observations stacked for the framestack control (default: the preset's)."""
    log_std_init: float | None = None
    """Initial log standard deviation of the agent's Gaussian actions, its exploration noise in meta-training (default: the preset's, -0.5: about 0.6 in a [-1, 1] action; deployment uses the mean action)."""
    ent_coef: float | None = None
    """PPO's entropy bonus, which keeps the agent's exploration noise from shrinking early (default: the preset's)."""
    threads: int = 1
    """torch CPU threads. One is fastest here: the agent's and the inner models' tensors are small."""
    progress_bar: bool = True
    """Show a progress bar (tqdm + rich)."""
    verbose: int = 1
    """0: quiet; 1: a line per evaluation and the final summary."""

    def __post_init__(self) -> None:
        self._check_types()
        for name in (
            "total_timesteps",
            "n_envs",
            "eval_tasks",
            "eval_seeds",
            "n_steps",
            "batch_size",
            "n_epochs",
            "task_group_size",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {value}")
        if self.imitation_tasks < 0:
            raise ValueError(f"--imitation-tasks must be >= 0 (0 turns the warm start off), got {self.imitation_tasks}")
        if self.imitation_tasks and self.algorithm != "recurrent":
            raise ValueError("--imitation-tasks clones into the recurrent policy; use it with --algorithm recurrent")
        for name in ("eval_freq", "checkpoint_freq"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0 timesteps, got {value}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"--keep-checkpoints must be >= 0 (0 keeps every checkpoint), got {self.keep_checkpoints}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.env_workers < 1:
            raise ValueError(f"--env-workers must be >= 1 (1 steps every slot in this process), got {self.env_workers}")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(
                f"--seed must be an integer in [0, 2**31) (slot i of the run draws its tasks from seed + i), got {self.seed}"
            )
        if self.run_name is not None and (not self.run_name or os.sep in self.run_name or self.run_name in (".", "..")):
            raise ValueError(f"--run-name must be a plain folder name, got {self.run_name!r}")
        if self.resume is None and Path(self.logdir).exists() and not Path(self.logdir).is_dir():
            raise ValueError(f"--logdir {self.logdir!r} is a file, not a folder; pass a folder for the runs")
        from hpo_env import check_device  # (imported here: hpo-train --help stays fast)

        for name in ("device", "env_device"):
            if getattr(self, name) != "auto":  # (the agent's default: SB3 picks)
                check_device(getattr(self, name), label=f"--{_flag(name)} ")
        for name in ("hyperparameters", "families"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        if self.families is not None:
            from hpo_env import check_families

            self.families = check_families(self.families, "--families")
        # a run made before this check (where such options were ignored) can still be resumed
        if self.resume is None and self.hyperparameters is not None and "lr" not in self.hyperparameters:
            given = [f"--{_flag(n)}" for n in ("lr_step", "lr_step_up", "lr_max_rise") if getattr(self, n)]
            if given:
                them, apply = ("them", "apply") if len(given) > 1 else ("it", "applies")
                raise ValueError(
                    f"{', '.join(given)} only {apply} to the learning rate, which --hyperparameters "
                    f"{' '.join(self.hyperparameters)} does not control; drop {them} or add lr to --hyperparameters"
                )

        if self.resume is None:  # (name, what it sets, the algorithm it needs) of the other algorithm's option
            other = {
                "framestack": ("lstm_hidden_size", "the recurrent agent's LSTM", "recurrent"),
                "recurrent": ("frame_stack", "the frames the framestack control stacks", "framestack"),
            }.get(self.algorithm)
            if other is not None and getattr(self, other[0]) is not None:
                name, what, needs = other
                raise ValueError(
                    f"--{_flag(name)} does not apply to --algorithm {self.algorithm} (it sets {what}): drop it, "
                    f"or choose --algorithm {needs}"
                )

    def _check_types(self) -> None:
        """Each field of the kind its annotation says, as the command line parses it: settings built in Python
        (or read back from settings.json) would otherwise fail late (a preset's budget, torch's thread count) or
        run with nonsense (a seed of 1.5)."""
        from hpo_env.checks import is_flag, is_integer, is_number

        hints = typing.get_type_hints(TrainSettings)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, optional = _unwrap_optional(hints[f.name])
            if value is None and optional:
                continue
            if typing.get_origin(kind) is tuple:
                if isinstance(value, str):  # one name (not its letters), as on the command line
                    setattr(self, f.name, (value,))
                continue
            if typing.get_origin(kind) is Literal:
                ok, expected = value in typing.get_args(kind), f"one of {list(typing.get_args(kind))}"
            elif kind is bool:
                ok, expected = is_flag(value), "True or False"
            elif kind is int:
                ok, expected = is_integer(value), "an integer"
            elif kind is float:
                ok, expected = is_number(value), "a number"
            else:
                continue
            if not ok:
                raise ValueError(f"--{_flag(f.name)} must be {expected}, got {value!r}")

    @property
    def budget(self) -> RunBudget:
        """The preset's budget with this run's overrides."""
        base = BUDGETS[self.preset]
        changes = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(RunBudget) if getattr(self, f.name) is not None
        }
        return dataclasses.replace(base, **changes)

    def agent_config(self) -> Any:
        """The :class:`agents.MetaAgentConfig` of this run: the preset plus overrides."""
        from agents.factory import get_preset

        config = get_preset(
            self.preset,
            algorithm=self.algorithm,
            n_envs=self.n_envs,
            task_distribution=self.task_distribution,
            task_families=self.families,
            hyperparameters=self.hyperparameters,
            lr_step=self.lr_step,
            lr_step_up=self.lr_step_up,
            lr_max_rise=None if self.lr_max_rise == 0 else self.lr_max_rise,
            action_change_penalty=self.action_change_penalty,
            reference_reward=self.reference_reward,
            task_group_size=self.task_group_size,
            init_lr_spread=self.init_lr_spread,
            init_lr_center=self.init_lr_center,
            lr_gain_spread=self.lr_gain_spread,
            gradient_features=self.gradient_features,
            epochs_feature=self.epochs_feature,
            learning_rate=self.learning_rate,
            learning_rate_end=self.learning_rate_end,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_steps=self.n_steps,
            batch_size=self.batch_size,
            n_epochs=self.n_epochs,
            lstm_hidden_size=self.lstm_hidden_size,
            frame_stack=self.frame_stack,
            log_std_init=self.log_std_init,
            ent_coef=self.ent_coef,
        )
        # 0 turns a preset's cap off (None means "the preset's", so it cannot)
        return dataclasses.replace(config, lr_max_rise=None) if self.lr_max_rise == 0 else config

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


#: Options that may change when resuming (the others are the run's identity and come from settings.json).
RESUMABLE_OVERRIDES = frozenset(
    {
        "total_timesteps",
        "device",
        "env_device",
        "env_workers",
        "threads",
        "progress_bar",
        "verbose",
        "eval_freq",
        "checkpoint_freq",
        "keep_checkpoints",
    }
)


# --------------------------------------------------------------------------------------------------
# the command line, generated from TrainSettings


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (attribute docstrings, as CleanRL/tyro read them)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # pragma: no cover - source unavailable (frozen apps)
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


class _Parser(argparse.ArgumentParser):
    """Fills the presets' values into the help of options that default to "the preset's" when the help is
    shown (the presets' agent settings live in :mod:`agents.factory`, which imports SB3: parsing stays fast)."""

    def format_help(self) -> str:
        from agents.factory import PRESETS

        for action in self._actions:
            name = action.dest
            if not (action.help and "(default: the preset's)" in action.help):
                continue
            source = BUDGETS if name in RunBudget.__dataclass_fields__ else PRESETS
            values = {preset: getattr(config, name, None) for preset, config in source.items()}
            if None in values.values():
                continue
            shown = {
                p: f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else _show(v) for p, v in values.items()
            }
            text = shown["quick"] if len(set(shown.values())) == 1 else ", ".join(f"{p} {v}" for p, v in shown.items())
            action.help = action.help.replace("(default: the preset's)", f"(default: the preset's: {text})")
        return super().format_help()


def build_parser(prog: str = "hpo-train") -> argparse.ArgumentParser:
    """An ``argparse`` parser with one option per :class:`TrainSettings` field (help from its docstring).

    Options not given on the command line are absent from the parsed namespace, so a resumed run can
    tell what the user asked to change.
    """
    parser = _Parser(
        prog=prog,
        description=(TrainSettings.__doc__ or "").strip(),
        epilog="Example: hpo-train --preset quick --seed 0, then: tensorboard --logdir runs",
        argument_default=argparse.SUPPRESS,
    )
    hints = typing.get_type_hints(TrainSettings)
    docs = _field_docs(TrainSettings)
    for f in dataclasses.fields(TrainSettings):
        kind, optional = _unwrap_optional(hints[f.name])
        text = docs.get(f.name, "") + ("" if f.default is None else f" (default: {_show(f.default)})")
        kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            kwargs.update(choices=choices, type=type(choices[0]), metavar="{" + ",".join(map(str, choices)) + "}")
        elif typing.get_origin(kind) is tuple:
            kwargs.update(nargs="+", action=NameList, metavar="NAME")  # space- or comma-separated
        else:
            kwargs.update(type=kind, metavar=f.name.upper() if kind is not str else _metavar(f.name))
        parser.add_argument(f"--{_flag(f.name)}", **kwargs)
    return parser


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _metavar(name: str) -> str:
    return {"logdir": "DIR", "resume": "RUN_DIR", "run_name": "NAME", "device": "DEVICE", "env_device": "DEVICE"}.get(
        name, name.upper()
    )


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def parse_settings(argv: list[str] | None = None, prog: str = "hpo-train") -> TrainSettings:
    """Parse a command line into :class:`TrainSettings` (exits with a usage message on bad input).

    With ``--resume RUN_DIR`` the run's saved settings are loaded and only the options in
    :data:`RESUMABLE_OVERRIDES` may be changed.
    """
    parser = build_parser(prog)
    given = vars(parser.parse_args(argv))
    try:
        if "resume" in given and given["resume"] is not None:
            return _resumed_settings(Path(given["resume"]), given)
        return TrainSettings(**given)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
        raise  # pragma: no cover - parser.error exits


#: What a run made before a setting existed did, where that is not the setting's default today.
_BEFORE_IT_EXISTED = {"epochs_feature": False, "task_group_size": 1, "gae_lambda": 0.95}


def _resumed_settings(run_dir: Path, given: dict[str, Any]) -> TrainSettings:
    file = run_dir / "settings.json"
    if not file.is_file():
        raise ValueError(f"--resume {str(run_dir)!r}: no settings.json there; is it a run folder made by hpo-train?")
    try:
        saved = json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"--resume {str(run_dir)!r}: settings.json is unreadable ({err})") from err
    # A setting added after the run was made reads as its default, or as what the run did before it
    # existed where the default has changed meaning since (the presets observe the epochs now).
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)} | _BEFORE_IT_EXISTED
    saved = {k: saved.get(k, v) for k, v in _BEFORE_IT_EXISTED.items()} | saved
    resolved = saved.get("agent_config") or {}  # (runs made since settings.json records it)
    fixed = sorted(
        k
        for k in given
        if k not in RESUMABLE_OVERRIDES | {"resume"}
        and given[k] != saved.get(k, defaults.get(k))
        and not (k in resolved and given[k] == resolved[k])  # restating the value the run resolved to
    )
    if fixed:
        raise ValueError(
            f"--resume continues a run with its own settings; these cannot change: "
            f"{', '.join('--' + _flag(k) for k in fixed)}. Changeable: "
            f"{', '.join('--' + _flag(k) for k in sorted(RESUMABLE_OVERRIDES))}"
        )
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    values = {k: v for k, v in saved.items() if k in known}
    values.update({k: v for k, v in given.items() if k in RESUMABLE_OVERRIDES})
    values["resume"] = str(run_dir)
    return TrainSettings(**values)


# --------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult:
    """What a run produced."""

    run_dir: Path
    bundle_path: Path
    best_bundle_path: Path | None
    num_timesteps: int
    wall_time_s: float
    evaluation: dict[str, Any]
    resumed_from: int | None = None


def train(settings: TrainSettings, command: str | None = None) -> TrainResult:
    """Run (or resume) meta-training as described by ``settings``; see the module docstring.

    Torch runs on ``settings.threads`` threads meanwhile; the caller's thread count is restored after.
    SB3 seeds Python's, NumPy's and torch's global generators with ``settings.seed`` (a resume restores
    the checkpoint's states), so the run does not depend on the caller's: they are given back as they
    were, so that a script's own draws after the call (data order, initialisation) stay its own.
    """
    from agents.bundle import global_state_untouched
    from training.threads import torch_threads

    # Small tensors everywhere (a 64-unit LSTM, inner models of a few thousand weights): extra
    # threads cost more in synchronisation than they save.
    held: list[int] = []  # the run folder's lock (see _lock_run_folder), released when training ends
    try:
        with torch_threads(settings.threads), global_state_untouched():
            return _train(settings, command, held)
    finally:
        for fd in held:
            os.close(fd)


def _lock_run_folder(run_dir: Path, held: list[int]) -> None:
    """Lock the run folder for this training (the lock goes with the process, however it ends).

    A second ``hpo-train`` on the same folder (a ``--resume`` while the run still trains) would race the
    first for its checkpoints and mix two trajectories in its logs and bundles: it is refused. The lock is
    an advisory ``flock`` on the folder itself (no file is added to it); where there is none (Windows),
    nothing is locked.
    """
    try:
        import fcntl
    except ImportError:
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderError(
            f"another hpo-train process is training {run_dir} (it holds the run folder's lock): wait for it to "
            "finish or stop it before --resume, or pick another --run-name"
        ) from None
    except OSError as err:  # a file system without locks (some NFS or FUSE mounts): go on without one
        os.close(fd)
        warnings.warn(
            f"the run folder {run_dir} cannot be locked ({err.strerror or err}): nothing stops a second hpo-train "
            "on it while this one trains",
            stacklevel=3,
        )
        return
    held.append(fd)


def _train(settings: TrainSettings, command: str | None, held: list[int]) -> TrainResult:
    import torch
    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.logger import CSVOutputFormat, Logger

    from agents.bundle import save_bundle
    from agents.factory import frame_stack_of, get_vec_normalize, make_meta_agent, make_meta_env
    from hpo_env import __version__ as hpo_version
    from hpo_env.subproc import WorkerStoppedError
    from training.callbacks import (
        CheckpointCallback,
        HeldOutEvalCallback,
        HPOEpisodeLogger,
        PurgingTensorBoardFormat,
        StopAtCheckpoint,
        find_latest_checkpoint,
        make_eval_tasks,
        prune_checkpoints,
        read_checkpoint_state,
        record_settings,
    )

    t_start = time.perf_counter()
    command = command or shlex.join(["hpo-train", *sys.argv[1:]])
    try:
        config = settings.agent_config()
    except (TypeError, ValueError) as err:
        raise SettingsError(_as_flags(str(err))) from err
    _check_env_workers(settings.env_workers, config)
    _warn_if_held_out_families_are_trained(config, settings.eval_distribution)
    budget = settings.budget
    checkpoint = None
    if settings.resume:
        run_dir = Path(settings.resume)
        _lock_run_folder(run_dir, held)  # before anything of it is read or pruned
        checkpoint = find_latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            done_before = _saved_policies(run_dir)
            if done_before:
                # A run that got far enough to save a policy, whose checkpoints are gone: starting again
                # would overwrite its policy.
                raise RunFolderError(
                    f"--resume {str(run_dir)!r}: no complete checkpoint under {run_dir / 'checkpoints'}, but the "
                    f"run saved {' and '.join(d + '/' for d in done_before)}; it cannot be continued without a "
                    "checkpoint, and starting it again would overwrite them: start a new run (another --run-name)"
                )
            # Stopped before its first checkpoint: nothing to continue, so the run starts again in its
            # folder, with its settings (its TensorBoard events are purged from step 0).
            print(
                f"hpo-train: {run_dir} has no complete checkpoint yet (the run stopped before its first one); "
                "starting it again from the beginning with its settings",
                flush=True,
            )
        # Keep what this session changed (e.g. a longer --total-timesteps) for the next --resume; a
        # --total-timesteps below what the run has done trains nothing and is not recorded.
        saved = json.loads((run_dir / "settings.json").read_text())
        changed = settings.to_dict()
        if checkpoint is not None:
            try:
                state = read_checkpoint_state(checkpoint)
            except ValueError as err:
                raise _damaged_checkpoint(checkpoint, err) from err
        done = int(state["num_timesteps"]) if checkpoint is not None else 0
        if settings.total_timesteps is not None and settings.total_timesteps < done:
            changed["total_timesteps"] = saved.get("total_timesteps")
        resumed_settings = {**saved, **changed, "resume": None}  # written once the checkpoint is known good
        if checkpoint is None:
            _write_settings(run_dir, resumed_settings)
        if checkpoint is not None and done >= budget.total_timesteps and _bundle_timesteps(run_dir / "bundle") == done:
            # A finished run with nothing left to train: no environment, agent or logger (which would add an
            # empty events file and CSV), and its bundle stays byte for byte. A --keep-checkpoints given
            # smaller on resume applies now, not only at the next checkpoint.
            _write_settings(run_dir, resumed_settings)
            prune_checkpoints(run_dir / "checkpoints", settings.keep_checkpoints, protect=checkpoint)
            if settings.verbose:
                print(
                    f"hpo-train: {run_dir} already has {done:,} of {budget.total_timesteps:,} timesteps; nothing to "
                    f"train (its policy: {run_dir / 'bundle'}; train it longer with --resume {run_dir} "
                    "--total-timesteps N)",
                    flush=True,
                )
            best = run_dir / "best_bundle"
            return TrainResult(
                run_dir=run_dir,
                bundle_path=run_dir / "bundle",
                best_bundle_path=best if best.is_dir() else None,
                num_timesteps=done,
                wall_time_s=time.perf_counter() - t_start,
                evaluation=dict(state.get("last_eval") or {}),
                resumed_from=done,
            )
    else:
        name = settings.run_name or f"{settings.algorithm}__{settings.preset}__{settings.seed}__{int(time.time())}"
        run_dir = Path(settings.logdir) / name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunFolderError(
                f"run folder {str(run_dir)!r} already exists: continue it with --resume {run_dir} (which starts it "
                "again if it stopped before its first checkpoint), or pick another --run-name"
            )
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(
                f"the run folder {str(run_dir)!r} cannot be created ({err.strerror or err}): pass a writable --logdir"
            ) from err
        _lock_run_folder(run_dir, held)
        # The options as given (None: the preset's value), and for the reader the values they resolve to.
        _write_settings(
            run_dir, {**settings.to_dict(), "run_name": name, "resume": None, "agent_config": config.to_dict()}
        )

    # -- environment and agent ------------------------------------------------------------------
    if checkpoint is not None:  # its state was read above
        try:
            config = _run_config(state, config)
        except (ValueError, KeyError) as err:
            raise _damaged_checkpoint(checkpoint, err) from err
        _check_env_workers(settings.env_workers, config)  # (the checkpoint's own slots and groups)
        try:
            env_seed = segment_env_seed(settings.seed, int(state["num_timesteps"]))
            env, model = load_checkpoint_agent(checkpoint, config, env_seed, settings)
        except (ValueError, KeyError, EOFError, OSError, zipfile.BadZipFile) as err:
            raise _damaged_checkpoint(checkpoint, err) from err
        # Only now that the checkpoint has loaded: a --keep-checkpoints given smaller on resume must not
        # delete the older ones that a damaged latest checkpoint's error sends the user back to, and a
        # resume that failed must not have changed the run's settings.
        try:
            _write_settings(run_dir, resumed_settings)
            prune_checkpoints(run_dir / "checkpoints", settings.keep_checkpoints, protect=checkpoint)
        except BaseException:
            env.close()  # (its workers, with --env-workers)
            raise
    else:
        state = {}
        env_seed = settings.seed
        env = make_meta_env(config, seed=env_seed, device=settings.env_device, workers=settings.env_workers)
    try:  # (the environment is closed by the run's own try below from then on)
        if checkpoint is None:
            model = make_meta_agent(env, config, seed=settings.seed, device=settings.device)
        start_timesteps = int(model.num_timesteps)
        suffix = "" if checkpoint is None else f".from_{start_timesteps}"
        logger = Logger(
            str(run_dir),
            [
                # A resumed run hides what the stopped one logged after its checkpoint, but not the events *at*
                # the checkpoint's step (the rollout and evaluation of the state it saved), which it never
                # logs again.
                PurgingTensorBoardFormat(
                    str(run_dir),
                    purge_step=start_timesteps + 1 if checkpoint is not None else (0 if settings.resume else None),
                ),
                CSVOutputFormat(str(run_dir / f"progress{suffix}.csv")),
            ],
        )
    except BaseException:
        env.close()
        raise
    segments = [*state.get("segments", []), {"start": start_timesteps, "env_seed": env_seed, "command": command}]
    model.set_logger(logger)
    try:
        recorded = {
            **settings.to_dict(),
            "run_dir": str(run_dir),
            **{f"agent.{k}": v for k, v in config.to_dict().items()},
        }
        record_settings(
            logger,
            recorded,
            step=start_timesteps,
            metrics=("eval/mean_return", "rollout/ep_rew_mean"),
            # The run's identity, as resolved (an option left to the preset shows its agent.* value, not None):
            # TensorBoard keeps a run folder's first hparams, which a resume must not leave stale.
            hparams={
                k: v
                for k, v in recorded.items()
                if v is not None and k not in RESUMABLE_OVERRIDES | {"resume", "run_dir"}
            },
        )

        decoder = env.unwrapped.decoder
        frame_stack = frame_stack_of(config)

        def bundle_config() -> dict[str, Any]:
            return {
                "env": {
                    "task_distribution": config.task_distribution,
                    "task_families": None if config.task_families is None else list(config.task_families),
                    "init_lr_spread": config.init_lr_spread,
                    "init_lr_center": config.init_lr_center,
                    "lr_gain_spread": config.lr_gain_spread,
                    "lr_max_rise": config.lr_max_rise,
                    "hyperparameters": list(config.hyperparameters),
                    "divergence_penalty": config.divergence_penalty,
                    "gradient_features": config.gradient_features,
                    "epochs_feature": config.epochs_feature,
                },
                "training": {
                    "command": command,
                    "seed": settings.seed,
                    "timesteps": int(model.num_timesteps),
                    "preset": settings.preset,
                    "algorithm": settings.algorithm,
                    "run_dir": str(run_dir),
                    "agent_config": config.to_dict(),
                    "hpo_meta_version": hpo_version,
                    "torch_version": torch.__version__,
                },
            }

        eval_tasks = make_eval_tasks(
            budget.eval_tasks, n_seeds=budget.eval_seeds, split=settings.eval_distribution, seed=EVAL_TASK_SEED
        )
        evaluator = HeldOutEvalCallback(
            eval_tasks,
            decoder,
            eval_freq=budget.eval_freq,
            frame_stack=frame_stack,
            best_bundle_path=run_dir / "best_bundle",
            bundle_config=bundle_config,
            device=settings.env_device,
            best_mean_return=_best_eval_return(state, run_dir / "best_bundle"),
            verbose=settings.verbose,
        )
        evaluator.last_summary = state.get("last_eval") or None
        episode_logger = HPOEpisodeLogger(config.hyperparameters)
        episode_logger.episodes_total = int(state.get("episodes_total", 0))
        checkpointer = CheckpointCallback(
            run_dir / "checkpoints",
            budget.checkpoint_freq,
            state_fn=lambda: {
                "best_eval_mean_return": evaluator.best_mean_return,
                "last_eval": evaluator.last_summary or {},
                "seed": settings.seed,
                "segments": segments,
                "agent_config": config.to_dict(),  # the run's identity, whatever the presets become
                "episodes_total": episode_logger.episodes_total,
            },
            keep=settings.keep_checkpoints,
        )
        # A first Ctrl-C or SIGTERM in training stops the run at the next rollout boundary (after the update,
        # where checkpoints are consistent) with a checkpoint there; a second one at once.
        stop = StopRequest(
            "hpo-train: stopping after the current rollout to save a checkpoint; press Ctrl-C again to stop now"
        )
        stopper = StopAtCheckpoint(checkpointer, lambda: stop.requested)
        # (the stopper first: a stop leaves the evaluation due to the resumed run; and last: a stop asked
        # for during that evaluation stops after it, not after one more rollout)
        callbacks = CallbackList([episode_logger, stopper, evaluator, checkpointer, stopper])

        remaining = budget.total_timesteps - start_timesteps
        if settings.verbose:
            what = (
                f"resuming {run_dir} at {start_timesteps:,} timesteps" if checkpoint is not None else f"run {run_dir}"
            )
            slots = f"{config.n_envs} slots"
            if config.task_group_size > 1:
                slots += (
                    f" ({config.n_envs // config.task_group_size} tasks x {config.task_group_size}, group baseline)"
                )
            elif config.reference_reward:
                slots += " (+ default-LR reference runs)"
            if settings.env_workers > 1:
                slots += f" stepped by {settings.env_workers} processes"
            rollout = config.rollout_size
            trained = start_timesteps + -(-max(remaining, 0) // rollout) * rollout  # whole rollouts
            total = f"{budget.total_timesteps:,} timesteps"
            if remaining < 0:
                total += f" (it already has {start_timesteps:,})"
            elif trained != budget.total_timesteps:
                total += f" (rounded up to whole rollouts of {rollout:,}: {trained:,})"
            print(
                f"hpo-train: {what}; {config.algorithm} agent, {slots} x {config.n_steps} steps per rollout, "
                f"{total}; held-out evaluation on {len(eval_tasks)} "
                f"task{'s' if len(eval_tasks) != 1 else ''} "
                + (
                    f"every {budget.eval_freq:,} and at the end"
                    if 0 < budget.eval_freq < budget.total_timesteps
                    else "at the end"
                ),
                flush=True,
            )
        try:  # (the warm start and training: a stop says what is left to resume)
            if checkpoint is None and settings.imitation_tasks > 0:
                from training.imitation import warm_start

                summary = warm_start(
                    model,
                    get_vec_normalize(env),
                    decoder,
                    n_tasks=settings.imitation_tasks,
                    seed=settings.seed,
                    gamma=config.gamma,
                    distribution=config.meta_task_distribution(),
                    log=print if settings.verbose else (lambda *a, **k: None),
                )
                (run_dir / "imitation.json").write_text(json.dumps(summary, indent=2))
                for key, value in summary.items():
                    logger.record(f"imitation/{key}", value)
                logger.dump(0)
            if remaining > 0:
                with stop.listening():  # (not in the warm start: no checkpoint is consistent within it)
                    model.learn(
                        total_timesteps=remaining,
                        callback=callbacks,
                        progress_bar=settings.progress_bar,
                        reset_num_timesteps=checkpoint is None,
                    )
            elif settings.verbose:
                print(
                    f"hpo-train: {run_dir} already has {start_timesteps:,} of {budget.total_timesteps:,} timesteps; "
                    "nothing to train"
                )
        except WorkerStoppedError as err:
            if stop.requested is None:
                raise
            # The signal was sent to every process of the run (Slurm, systemd), and stopped the workers too.
            print(
                f"\ninterrupted: the signal stopped the environment workers too ({_resume_hint(run_dir)})",
                file=sys.stderr,
            )
            raise stop.requested from err
        except KeyboardInterrupt:
            # stopped at a checkpoint it saved on request, or interrupted at once (since its last checkpoint: lost)
            what = "stopped" if stopper.stopped_at is not None else "interrupted"
            print(f"\n{what} ({_resume_hint(run_dir)})", file=sys.stderr)
            raise
        except OSError as err:
            if not cannot_write(err):  # (e.g. a broken pipe to a worker: as it is)
                raise
            raise _unwritable(run_dir, err) from err

        vecnorm = get_vec_normalize(env)
        final_config = bundle_config()
        final_config["evaluation"] = _jsonable(evaluator.last_summary or {})
        # (A finished run whose bundle is up to date returned before building anything: its bundle stays
        # byte for byte, as a rewrite would change its fingerprint. One that is missing or stale is rewritten.)
        try:
            bundle_path = save_bundle(
                run_dir / "bundle",
                model,
                decoder,
                obs_rms=vecnorm.obs_rms if vecnorm is not None and vecnorm.norm_obs else None,
                clip_obs=vecnorm.clip_obs if vecnorm is not None else config.clip_obs,
                epsilon=vecnorm.epsilon if vecnorm is not None else 1e-8,
                frame_stack=frame_stack,
                config=final_config,
                gradient_features=config.gradient_features,
                epochs_feature=config.epochs_feature,
            )
        except OSError as err:
            if not cannot_write(err):
                raise
            raise _unwritable(run_dir, err) from err
    finally:  # a failed run too: no writer thread or open event file left behind
        logger.close()
        env.close()
    wall = time.perf_counter() - t_start
    best = run_dir / "best_bundle"
    result = TrainResult(
        run_dir=run_dir,
        bundle_path=bundle_path,
        best_bundle_path=best if best.is_dir() else None,
        num_timesteps=int(model.num_timesteps),
        wall_time_s=wall,
        evaluation=dict(evaluator.last_summary or {}),
        resumed_from=start_timesteps if checkpoint is not None else None,
    )
    if settings.verbose:
        print(_summary(result, settings, evaluator, start_timesteps))
    return result


def _resume_hint(run_dir: Path) -> str:
    """What a run stopped now leaves to resume from, and how."""
    from training.callbacks import find_latest_checkpoint

    last = find_latest_checkpoint(run_dir / "checkpoints")
    policies = _saved_policies(run_dir)
    if last:
        return f"last checkpoint {last}; continue with: hpo-train --resume {run_dir}"
    if not policies:
        return f"no checkpoint yet; hpo-train --resume {run_dir} starts it again"
    # (--resume will not overwrite a saved policy: see the refusal in _train)
    return (
        f"no checkpoint yet, but an evaluation saved {policies[0]}/, which --resume would not overwrite: "
        f"start a new run (another --run-name), or delete {run_dir} to start this one again"
    )


def _unwritable(run_dir: Path, err: OSError) -> RunFolderError:
    """A write that failed in the middle of a run (:func:`training.cli.cannot_write`): the error, with what is
    left to resume and how."""
    return RunFolderError(
        f"the run stopped: it cannot write its files ({err}); make room (or make {run_dir} writable) and resume: "
        f"{_resume_hint(run_dir)}"
    )


def _saved_policies(run_dir: Path) -> list[str]:
    """The policy bundles a run folder holds (``bundle``, ``best_bundle``), which a restart would overwrite."""
    from agents.bundle import CONFIG_FILE

    return [d for d in ("bundle", "best_bundle") if (run_dir / d / CONFIG_FILE).is_file()]


def _bundle_timesteps(bundle: Path) -> int | None:
    """The meta-training timesteps of the policy in ``bundle`` (None where it does not load)."""
    from agents import BundleError, load_bundle

    try:
        return int(load_bundle(bundle).config["training"]["timesteps"])
    except (BundleError, KeyError, TypeError, ValueError):
        return None


def _write_settings(run_dir: Path, values: dict[str, Any]) -> None:
    try:
        replace_file(run_dir / "settings.json", lambda tmp: tmp.write_text(json.dumps(values, indent=2)))
    except OSError as err:  # (before any training: the first write of a run or of a resume)
        if not cannot_write(err):
            raise
        raise RunFolderError(
            f"cannot write the settings of the run in {run_dir} ({err.strerror or err}): the run folder must be "
            "writable to train (a full disk, or a read-only folder or file system: copy it somewhere writable)"
        ) from err


def _summary(result: TrainResult, settings: TrainSettings, evaluator: Any, start: int) -> str:
    ev = result.evaluation
    trained = result.num_timesteps - start
    lines = [
        "",
        f"Meta-training done: {result.num_timesteps:,} timesteps"
        + (f" ({trained:,} in this session, resumed at {start:,})" if result.resumed_from is not None else "")
        + f" in {_duration(result.wall_time_s)} ({trained / max(result.wall_time_s, 1e-9):.0f} timesteps/s incl. "
        f"{_duration(evaluator.eval_seconds)} of evaluation).",
    ]
    if ev:
        n = len(evaluator.tasks)
        lines.append(
            f"  held-out evaluation ({n} run{'s' if n != 1 else ''}, families {', '.join(ev['family_mean_return'])}): mean return "
            f"policy {ev['mean_return']:+.3f} | constant {ev['constant_mean_return']:+.3f} | random "
            f"{ev['random_mean_return']:+.3f}; wins vs constant {ev['win_rate_vs_constant']:.0%}, "
            f"vs random {ev['win_rate_vs_random']:.0%}"
        )
    lines.append(f"  policy bundle:  {result.bundle_path}")
    if result.best_bundle_path is not None:
        lines.append(
            f"  best bundle:    {result.best_bundle_path}  (best held-out mean return {evaluator.best_mean_return:+.3f})"
        )
    lines.append(
        f"  checkpoints:    {result.run_dir / 'checkpoints'}  (continue or extend: hpo-train --resume {result.run_dir})"
    )
    lines.append(f"  settings:       {result.run_dir / 'settings.json'}")
    lines.append(f"  TensorBoard:    tensorboard --logdir {shlex.quote(str(result.run_dir.parent))}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _run_config(state: dict[str, Any], resolved: Any) -> Any:
    """The agent configuration a checkpoint was trained with (recorded since it was), else ``resolved``.

    A run made before a preset changed keeps the preset it was made with: settings.json records only
    the options given, and resolving them against today's presets could silently change the run."""
    from agents.factory import MetaAgentConfig

    saved = state.get("agent_config")
    if not saved:
        return resolved
    config = MetaAgentConfig(**saved)
    if config != resolved:
        changed = sorted(k for k, v in config.to_dict().items() if resolved.to_dict().get(k) != v)
        print(
            f"hpo-train: the presets have changed since this run was made ({', '.join(changed)}); "
            "continuing with the run's own configuration",
            flush=True,
        )
    return config


def segment_env_seed(seed: int, timesteps: int) -> int:
    """The task stream of a run segment resumed at ``timesteps``: derived from (seed, timesteps), so it is
    reproducible and not a replay of the tasks the run has already seen."""
    return int(np.random.SeedSequence([seed, timesteps]).generate_state(1)[0] % (2**31 - 1))


def load_checkpoint_agent(checkpoint: Path, config: Any, env_seed: int, settings: TrainSettings) -> tuple[Any, Any]:
    """The environment (its tasks seeded with ``env_seed``) and the agent of a checkpoint, to resume."""
    from sb3_contrib import RecurrentPPO
    from stable_baselines3 import PPO

    from agents.factory import make_meta_env
    from training.callbacks import CHECKPOINT_MODEL, CHECKPOINT_VECNORM, read_checkpoint_state, restore_rng_state

    done = int(read_checkpoint_state(checkpoint)["num_timesteps"])
    vecnorm_file = checkpoint / CHECKPOINT_VECNORM
    env = make_meta_env(
        config,
        seed=env_seed,
        device=settings.env_device,
        vec_normalize_path=vecnorm_file if vecnorm_file.is_file() else None,
        workers=settings.env_workers,
    )
    try:
        algo = RecurrentPPO if config.algorithm == "recurrent" else PPO
        model = algo.load(checkpoint / CHECKPOINT_MODEL, env=env, device=settings.device)
        # load() reseeds the global RNGs and the environment with the run's original seed: restore the
        # checkpoint's RNG state, and this segment's own task stream (else it replays the run's first).
        restore_rng_state(checkpoint)
        env.seed(env_seed)
        if model.num_timesteps != done:
            raise RunFolderError(
                f"checkpoint {checkpoint} is inconsistent: model at {model.num_timesteps} timesteps, state at {done}"
            )
    except BaseException:
        env.close()  # (its worker processes with --env-workers)
        raise
    return env, model


def _check_env_workers(workers: int, config: Any) -> None:
    """--env-workers must split the slots into whole task groups (:func:`hpo_env.subproc.shard_sizes`), checked
    before any process starts."""
    from hpo_env.subproc import shard_sizes

    try:
        shard_sizes(config.n_envs, workers, config.task_group_size)
    except ValueError:
        groups = config.n_envs // config.task_group_size
        raise SettingsError(
            f"--env-workers {workers} is more than the run's {groups} task groups ({config.n_envs} slots in groups "
            f"of {config.task_group_size}): each worker steps whole groups; pass --env-workers {groups} or fewer"
        ) from None


def _damaged_checkpoint(checkpoint: Path, err: BaseException) -> RunFolderError:
    return RunFolderError(
        f"cannot resume from {str(checkpoint)!r}: {err}. Checkpoints are written atomically, so this one "
        "was damaged afterwards (disk, copy); move that folder out of checkpoints/ to resume from the "
        "one before it"
    )


def _as_flags(message: str) -> str:
    """An agent-config error in the command line's words: ``MetaAgentConfig.n_envs`` reads ``--n-envs``."""
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    return re.sub(r"MetaAgentConfig\.(\w+)", lambda m: f"--{_flag(m[1])}" if m[1] in fields else m[0], message).replace(
        "MetaAgentConfig: ", ""
    )


def _warn_if_held_out_families_are_trained(config: Any, eval_distribution: str) -> None:
    """Warn where meta-training shares families with a held-out split (``--families`` with ``glyphs_cnn``
    or ``tabular``, or ``--task-distribution all``): the evaluations on it (and the ``best_bundle/``
    they choose), or the benchmark's default test split, would then measure tasks the agent trains on."""
    from hpo_env import SPLITS

    trained = set(config.meta_task_distribution().families)  # the split's, or --families
    for split in ("validation", "test"):
        shared = [f for f in SPLITS[split] if f in trained]
        if not shared:
            continue
        if split == eval_distribution:
            what, fix = "the evaluations and the best_bundle/ they choose", "benchmark bundle/ (the final policy), or "
        else:
            what, fix = f"hpo-bench --split {split}", ""
        if split == "test" and eval_distribution != "test":
            what = f"{what} (the benchmark's held-out families)"
        warnings.warn(
            f"the {split} families {shared} are also meta-trained on, so {what} would measure trained-on "
            "tasks: "
            f"{fix}drop them from --families/--task-distribution",
            stacklevel=2,
        )


def _best_eval_return(state: dict[str, Any], best_bundle: Path) -> float:
    """The best held-out return so far: the checkpoint's, or that of ``best_bundle/`` if an evaluation
    after the last checkpoint saved a better one (so that a resumed run never overwrites it with worse)."""
    from agents.bundle import CONFIG_FILE

    best = float(state.get("best_eval_mean_return", -np.inf))
    if state:  # resuming; a fresh run (also one restarted before its first checkpoint) starts over
        try:
            saved = json.loads((best_bundle / CONFIG_FILE).read_text())["evaluation"]["mean_return"]
            best = max(best, float(saved))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no best bundle yet, or one without a recorded return
    return best


def _jsonable(value: Any) -> Any:
    from training.callbacks import _jsonable as convert

    return convert(value)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hpo-train`` and ``python -m training.train``."""
    settings = parse_settings(argv)
    command = shlex.join(["hpo-train", *(sys.argv[1:] if argv is None else argv)])
    try:
        # SIGTERM (kill, a cluster scheduler) stops a run as Ctrl-C does: the hint to resume, logs flushed
        with readable_warnings("hpo-train"), sigterm_as_interrupt():
            train(settings, command=command)
    except (RunFolderError, SettingsError) as err:
        print(f"hpo-train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        return interrupted_status(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
