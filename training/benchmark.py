"""The benchmark: a learned policy against tuned and hand-designed baselines on held-out tasks.

Runs the protocol of the design notes (section 4) at equal inner step budgets::

    hpo-bench --policy runs/my_run/bundle                      # held-out families, 5 seeds, K = 8
    python -m training.benchmark --policy BUNDLE --split train --seeds 3 --out bench_train

For every task of the chosen families (``--tasks-per-family`` sampled with ``--task-seed``) and every
seed (seed ``s`` replaces the task's ``seed`` by ``seed + s``: a different initialisation and
minibatch order, the same data), it trains the task's model once per *arm*:

* ``policy``: the learned policy (one run);
* untuned defaults: constant and cosine at the optimiser's default learning rate
  (:data:`hpo_env.tasks.DEFAULT_HPARAMS`), and the fixed rule "cosine decay from 3x the default";
* tuned oracles: constant and cosine at each of ``K`` log-spaced learning rates around the default
  (``K`` runs); per task, the rate with the fewest divergences, then the lowest mean log final
  validation loss over the seeds, is chosen (with hindsight, on the very losses that are compared:
  an oracle, not a tuning procedure);
* step decay, linear decay, OneCycle and ReduceLROnPlateau from the task's own initial learning
  rate (as the policy starts), and hypergradient descent (:mod:`training.hypergradient`);
* controls: the random policy and the replay of the policy's average schedule (over all its runs
  of this benchmark, every controlled hyperparameter).

Learned and random policies act through the bundle's :class:`~hpo_env.ActionDecoder`; schedules
through :func:`agents.baselines.schedule_decoder` (same bounds, steps large enough to follow their
curves exactly). All episode-level runs go through :func:`training.rollout.run_episodes`, many at once.

Every inner run is stored in a SQLite :class:`~training.store.ResultStore` keyed by (task id,
schedule with its parameters, seed, code version): a rerun computes only what is missing, and an
interrupted benchmark resumes (at most one batch of runs is lost). The policy's key holds a hash of
the bundle's files, so a new policy reuses every baseline run.

Outputs in ``--out``: ``report.md`` (tables, target checks, costs), ``benchmark.json`` (everything,
including per-run values), ``plots/`` (schedules and validation curves per family, win rates).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shlex
import sqlite3
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.baselines import (
    ConstantSchedule,
    CosineSchedule,
    LinearDecay,
    OneCycle,
    RandomPolicy,
    ReduceLROnPlateau,
    ReplaySchedule,
    StepDecay,
    lr_grid,
    schedule_decoder,
)
from agents.bundle import CONFIG_FILE, ENSEMBLE_KIND, MODEL_FILE, NORM_FILE, load_bundle
from hpo_env import (
    FAMILIES,
    FEATURE_SET_VERSION,
    OPTIONAL_FEATURES,
    SPLITS,
    ActionDecoder,
    TaskDistribution,
    TaskSpec,
    check_device,
)
from hpo_env import __version__ as HPO_VERSION
from hpo_env.actions import DEFAULT_HYPERPARAMETERS
from hpo_env.checks import check_ordered, is_integer, is_number
from hpo_env.tasks import DEFAULT_HPARAMS
from training.cli import (
    HelpFormatter,
    NameList,
    cannot_write,
    interrupted_status,
    readable_warnings,
    replace_file,
    sigterm_as_interrupt,
)
from training.hypergradient import DEFAULT_HYPERGRADIENT_LR, run_hypergradient
from training.rollout import EpisodeRecord, run_episodes
from training.stats import beats_all_rate, divergence_rate, headroom, lr_level, paired_comparison
from training.store import ResultStore, RunKey, RunResult
from training.threads import torch_threads

__all__ = ["BENCHMARK_VERSION", "BenchmarkConfig", "main", "run_benchmark"]

#: Bumped whenever a stored run would mean something else (protocol, arms' definitions).
BENCHMARK_VERSION = "1"
_SEED_MODULUS = 2**31 - 1


@dataclass
class BenchmarkConfig:
    """Settings of one benchmark (the command-line flags mirror these fields)."""

    policy: str
    """Path of the policy bundle under test (see :func:`agents.load_bundle`)."""
    split: str = "test"
    """Task families: ``"test"`` (held out of meta-training for the benchmark), ``"validation"`` (held out
    for ``hpo-train``'s evaluation), ``"train"`` or ``"all"``."""
    families: tuple[str, ...] = ()
    """Explicit families (overrides ``split``)."""
    tasks_per_family: int = 4
    """Tasks sampled per family."""
    seeds: int = 5
    """Seeds per task (initialisation and minibatch order)."""
    grid_size: int = 8
    """K: learning rates in the tuned oracles' log grid (K runs per task and seed, per oracle)."""
    grid_decades: float = 1.5
    """The grid spans ``default_lr * 10 ** [-grid_decades, +grid_decades]``."""
    task_seed: int = 0
    """Seed of the generator that samples the tasks."""
    total_steps: int | None = None
    """Override every task's inner step budget (None: the sampled budgets)."""
    steps_per_action: int | None = None
    """Override every task's steps per decision (None: the sampled ones)."""
    out: str = "runs/benchmark"
    """Output folder (report.md, benchmark.json, plots/)."""
    store: str | None = None
    """SQLite results store (default: ``<out>/results.sqlite``)."""
    chunk_size: int = 32
    """Runs trained together in one batched call (and written to the store together)."""
    device: str = "cpu"
    """Torch device of the inner models."""
    threads: int | None = None
    """Torch CPU threads while it runs (None: the caller's count, torch's default in ``hpo-bench``, with
    which the README's tables were computed; with ``workers > 1``, one per worker); part of the stored
    runs' code version on CPU, where convolutions round differently with another count."""
    workers: int = 1
    """Processes computing runs side by side, each on ``threads`` torch threads. The batches are the ones a
    single process trains, so the stored runs are the same numbers; the policy is loaded from ``policy``.
    The workers are spawned: a script calling :func:`run_benchmark` with ``workers > 1`` needs the
    ``if __name__ == "__main__":`` guard."""
    hd_beta_sgd: float = DEFAULT_HYPERGRADIENT_LR["sgd"]
    """Hypergradient learning rate of SGD-HD."""
    hd_beta_adamw: float = DEFAULT_HYPERGRADIENT_LR["adamw"]
    """Hypergradient learning rate of Adam-HD."""
    bootstrap: int = 2000
    """Bootstrap resamples for the confidence intervals."""
    seed: int = 0
    """Seed of the random policy's and the bootstrap's generators."""
    code_version: str | None = None
    """Version label of stored runs (default: :func:`default_code_version`, which changes with any edit of
    the code that defines an inner run)."""
    progress: bool = True
    """Show a progress bar."""
    plots: bool = True
    """Write PNG plots."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        check_ordered(self.families, "families")  # the tasks are drawn family by family from one generator
        # One family by name, as TaskDistribution takes it (not its letters).
        self.families = (self.families,) if isinstance(self.families, str) else tuple(self.families)
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"families must not repeat (each is benchmarked once), got {list(self.families)}")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown task families {unknown}; choose from {list(FAMILIES)}")
        for name in ("tasks_per_family", "seeds", "grid_size", "chunk_size", "bootstrap", "workers"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("grid_decades", "hd_beta_sgd", "hd_beta_adamw"):
            if not is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not (self.grid_decades >= 0 and math.isfinite(self.grid_decades)):
            raise ValueError(f"grid_decades must be a finite number >= 0, got {self.grid_decades!r}")
        if self.grid_decades == 0 and self.grid_size > 1:
            raise ValueError(
                f"grid_decades=0 makes the K={self.grid_size} grid one learning rate {self.grid_size} times: give the "
                "grid a span (e.g. 1.5), or grid_size=1"
            )
        for name in ("hd_beta_sgd", "hd_beta_adamw"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("total_steps", "steps_per_action"):
            value = getattr(self, name)
            if value is not None and (not is_integer(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("task_seed", "seed"):
            value = getattr(self, name)
            if not is_integer(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.threads is not None and (not is_integer(self.threads) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"out={str(self.out)!r} is a file; the benchmark writes a folder (report, JSON, plots)")
        check_device(self.device)

    @property
    def store_path(self) -> Path:
        return Path(self.store) if self.store else Path(self.out) / "results.sqlite"


#: The modules whose code decides what an inner run computes: the environment and trainer, the baselines,
#: the policy's loading and inference, hypergradient descent and the episode runner.
_RUN_DEFINING_MODULES = ("hpo_env", "agents.baselines", "agents.bundle", "training.hypergradient", "training.rollout")


def run_code_hash() -> str:
    """A short hash of the sources of :data:`_RUN_DEFINING_MODULES` (every ``.py`` file of a package)."""
    import importlib

    digest = hashlib.sha256()
    for name in _RUN_DEFINING_MODULES:
        module = importlib.import_module(name)
        origin = Path(module.__file__ or name)  # (a package's __init__.py, a module's .py: never None here)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for file in files:
            digest.update(f"{name}:{file.relative_to(origin.parent).as_posix()}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def default_code_version(device: str = "cpu", threads: int | None = None) -> str:
    """The label stored runs carry, so that a run is reused only where it would be computed the same way.

    It names the package, feature-set and protocol versions, a hash of the code that defines an inner
    run (:func:`run_code_hash`: any edit to the trainer, the environment or a baseline makes every
    stored run stale), the torch version and the device type (their kernels round differently), and on
    CPU the torch thread count (``threads``; None: the current one), since a CNN's convolutions sum in
    another order with another count.
    """
    import torch

    kind = torch.device(device).type
    label = (
        f"hpo-meta {HPO_VERSION}, features {FEATURE_SET_VERSION}, benchmark {BENCHMARK_VERSION}, "
        f"code {run_code_hash()}, torch {torch.__version__}, {kind}"
    )
    if kind == "cpu":
        n = torch.get_num_threads() if threads is None else threads
        label += f", {n} thread{'s' if n != 1 else ''}"
    return label


#: Config entries that describe a bundle rather than define its behaviour (prose, and benchmark results
#: recorded after benchmarking it): editing them keeps the fingerprint, so stored runs still apply.
_DESCRIPTIVE_CONFIG_KEYS = ("description", "benchmark", "benchmarked")


def bundle_fingerprint(path: str | Path) -> str:
    """A short hash of a bundle's files: results of a retrained policy are never mixed up.

    Covers the model, the observation normalisation and the config, except its descriptive entries
    (``description`` and recorded benchmark results). An ensemble's hash covers how it combines, its
    decoder and its members' hashes (in order), not its description or where its members were
    copied from.
    """
    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_bytes())
    digest = hashlib.sha1()
    if config.get("kind") == ENSEMBLE_KIND:
        parts = {"combine": config.get("combine"), "action_decoder": config.get("action_decoder")}
        digest.update(b"ensemble" + json.dumps(parts, sort_keys=True).encode())
        for name in config["members"]:
            digest.update(bundle_fingerprint(path / name).encode())
        return digest.hexdigest()[:12]
    for name in (MODEL_FILE, NORM_FILE):
        digest.update(name.encode())
        digest.update((path / name).read_bytes())
    defining = {k: v for k, v in config.items() if k not in _DESCRIPTIVE_CONFIG_KEYS}
    digest.update(CONFIG_FILE.encode() + json.dumps(defining, sort_keys=True).encode())
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------
# tasks and arms


def trained_families(bundle: Any) -> set[str]:
    """The task families a bundle (each member of an ensemble) was meta-trained on, from its config
    (``env.task_families``, or the families of ``env.task_distribution``); empty where it does not say."""
    families: set[str] = set()
    for member in getattr(bundle, "members", None) or [bundle]:
        env = (getattr(member, "config", None) or {}).get("env") or {}
        if env.get("task_families"):
            families |= set(env["task_families"])
        elif env.get("task_distribution") in SPLITS:
            families |= set(SPLITS[env["task_distribution"]])
    return families


def _warn_if_trained_on(bundle: Any, families: Sequence[str]) -> None:
    shared = [f for f in families if f in trained_families(bundle)]
    if shared:
        warnings.warn(
            f"the policy was meta-trained on {shared}, which this benchmark runs as held-out tasks: its numbers "
            "there measure trained-on families, not generalisation (benchmark families it never saw, e.g. --split "
            "test for a policy trained on --task-distribution train)",
            stacklevel=4,  # the caller of run_benchmark
        )


def _warn_if_stale(other_versions: dict[str, int], todo: int, code_version: str, labelled: bool = False) -> None:
    """Say so when runs about to be computed are stored under another code version, what differs, and how
    to reuse them where that is sound (``labelled``: the version is the user's ``--code-version``)."""
    if not other_versions:
        return
    version, count = next(iter(other_versions.items()))
    if labelled:  # nothing was detected to differ: the label chosen is not the one the runs were stored under
        more = f"; runs under {len(other_versions) - 1} more version(s) too" if len(other_versions) > 1 else ""
        warnings.warn(
            f"{count} of the {todo} runs to compute (before any replay controls) are stored under another code "
            f"version, {version!r}{more}, not under --code-version {shlex.quote(code_version)}, and are computed "
            f"again. To reuse them, pass --code-version {shlex.quote(version)}",
            stacklevel=4,  # the caller of run_benchmark
        )
        return
    theirs, ours = version.split(", "), code_version.split(", ")
    changed = [part for part in theirs if part not in ours]
    now = [part for part in ours if part not in theirs]
    what = f"{', '.join(changed) or version!r} then, {', '.join(now) or code_version!r} now"
    more = f"; runs under {len(other_versions) - 1} more version(s) too" if len(other_versions) > 1 else ""
    thread_part = re.compile(r"(\d+) threads?")
    counts = [m.group(1) for m in map(thread_part.fullmatch, changed) if m]
    code_changed = [part for part in changed if not thread_part.fullmatch(part)] or not changed
    advice = []
    if counts:
        advice.append(f"They were computed on {counts[0]} torch thread(s): pass --threads {counts[0]} to reuse them")
    if code_changed:
        advice.append(
            "the code that defines a run (hpo_env, the baselines, the policy's loading, the episode runner), the "
            "torch version or the device changed: if that change cannot alter any run's numbers, reuse them with "
            f"--code-version {shlex.quote(version)}"
        )
    advice[0] = advice[0][0].upper() + advice[0][1:]
    warnings.warn(
        f"{count} of the {todo} runs to compute (before any replay controls) are stored under another code version "
        f"({what}{more}), and are "
        f"computed again. {'; and '.join(advice)}",
        stacklevel=4,  # the caller of run_benchmark
    )


def make_tasks(config: BenchmarkConfig) -> list[TaskSpec]:
    """The benchmark's tasks (seed index 0), family by family, from ``config.task_seed``."""
    families = config.families or SPLITS[config.split]
    dist = TaskDistribution(families, name="benchmark")
    rng = np.random.default_rng(config.task_seed)
    tasks = []
    for family in families:
        for _ in range(config.tasks_per_family):
            spec = dist.sample_family(family, rng)
            changes: dict[str, int] = {}
            if config.total_steps is not None:
                changes["total_steps"] = config.total_steps
            if config.steps_per_action is not None:
                changes["steps_per_action"] = config.steps_per_action
            elif config.total_steps is not None and config.total_steps % spec.steps_per_action:
                raise ValueError(
                    f"total_steps={config.total_steps} is not a multiple of the sampled steps_per_action="
                    f"{spec.steps_per_action}; pass steps_per_action as well"
                )
            tasks.append(spec.replace(**changes) if changes else spec)
    return tasks


def seeded(spec: TaskSpec, seed_index: int) -> TaskSpec:
    """The task run with seed index ``seed_index`` (0 is the task itself)."""
    return spec if seed_index == 0 else spec.replace(seed=(spec.seed + seed_index) % _SEED_MODULUS)


@dataclass(frozen=True)
class Arm:
    """One way of training a task: a schedule (with its parameters) and an initial learning rate."""

    key: str  # the schedule part of the store key
    row: str  # the report row it feeds
    kind: str  # "policy", "schedule", "random", "hypergradient" or "replay"
    lr: float | None = None  # initial learning rate; None: the task's own
    make: Callable[[], Any] | None = None  # builds the policy object (schedules)


@dataclass(frozen=True)
class Row:
    """A line of the report."""

    name: str
    label: str
    cost: int  # full training runs per (task, seed)


#: The rows the first target compares against (beating both of them is the floor a policy must clear).
UNTUNED_DEFAULTS = ("constant_default", "cosine_default")


def rows(grid_size: int) -> list[Row]:
    """The report's baselines, in order (the policy itself is not a row)."""
    return [
        Row("constant_default", "constant, default LR", 1),
        Row("cosine_default", "cosine, default LR", 1),
        Row("cosine_3x_default", "cosine from 3x default LR (fixed rule)", 1),
        Row("constant_tuned", f"constant, tuned oracle (K={grid_size})", grid_size),
        Row("cosine_tuned", f"cosine, tuned oracle (K={grid_size})", grid_size),
        Row("step_decay", "step decay (x0.1 at 50%, 75%)", 1),
        Row("linear_decay", "linear decay to 0", 1),
        Row("one_cycle", "OneCycle (task lr to 10x at 30%, to 1/100)", 1),
        Row("plateau", "ReduceLROnPlateau (x0.1, patience 2)", 1),
        Row("hypergradient", "hypergradient descent (SGD-HD / Adam-HD)", 1),
        Row("random", "random policy (control)", 1),
        Row("replay", "replay of the policy's average schedule (control)", 1),
        Row("replay_task", "replay of the policy's average schedule on each task (control)", 1),
    ]


def grid_lrs(spec: TaskSpec, config: BenchmarkConfig) -> list[float]:
    """The tuned oracles' K learning rates for a task's optimiser."""
    return lr_grid(spec.optimizer, config.grid_size, config.grid_decades)


def _fmt_lr(lr: float) -> str:
    return f"{lr:.4g}"


def task_arms(
    spec: TaskSpec, config: BenchmarkConfig, exact: ActionDecoder, policy_hash: str, decoder: ActionDecoder
) -> list[Arm]:
    """Every arm except the replay (which needs the policy's runs first); ``decoder`` is the policy's."""
    default = DEFAULT_HPARAMS[spec.optimizer]["lr"]
    b = _bounds_tag(decoder)  # baselines clip their starting values to the policy's bounds
    bounds = decoder.specs[decoder.names.index("lr")]
    outside = [lr for lr in (default, 3 * default, *grid_lrs(spec, config)) if not bounds.lower <= lr <= bounds.upper]
    if outside:
        raise ValueError(
            f"{spec.optimizer} learning rates {[float(f'{lr:.3g}') for lr in outside]} lie outside the policy's "
            f"learning-rate bounds [{bounds.lower:g}, {bounds.upper:g}], within which every schedule runs: they "
            f"would run at the bound under another rate's name. Narrow --grid-decades (now {config.grid_decades:g}) "
            f"so that the default {default:g} x 10^[-d, +d] stays inside"
        )
    arms = [
        Arm(f"policy@{policy_hash}", "policy", "policy"),
        Arm(
            f"constant@lr={_fmt_lr(default)}{b}",
            "constant_default",
            "schedule",
            default,
            lambda: ConstantSchedule(exact),
        ),
        Arm(f"cosine@lr={_fmt_lr(default)}{b}", "cosine_default", "schedule", default, lambda: CosineSchedule(exact)),
        Arm(
            f"cosine@lr={_fmt_lr(3 * default)}{b}",
            "cosine_3x_default",
            "schedule",
            3 * default,
            lambda: CosineSchedule(exact),
        ),
    ]
    for lr in grid_lrs(spec, config):
        arms.append(
            Arm(f"constant@lr={_fmt_lr(lr)}{b}", "constant_tuned", "schedule", lr, lambda: ConstantSchedule(exact))
        )
        arms.append(Arm(f"cosine@lr={_fmt_lr(lr)}{b}", "cosine_tuned", "schedule", lr, lambda: CosineSchedule(exact)))
    arms += [
        Arm(f"step_decay(0.5,0.75;x0.1)@lr=task{b}", "step_decay", "schedule", None, lambda: StepDecay(exact)),
        Arm(f"linear_decay(to 0)@lr=task{b}", "linear_decay", "schedule", None, lambda: LinearDecay(exact)),
        Arm(f"one_cycle(10x,30%,/100)@lr=task{b}", "one_cycle", "schedule", None, lambda: OneCycle(exact)),
        Arm(f"plateau(x0.1,p2)@lr=task{b}", "plateau", "schedule", None, lambda: ReduceLROnPlateau(exact)),
        Arm(_hd_key(spec, config) + b, "hypergradient", "hypergradient"),
        Arm(f"random@seed={config.seed}{_decoder_tag(decoder)}", "random", "random"),
    ]
    return arms


def _bounds_tag(decoder: ActionDecoder) -> str:
    """How the baselines' stored runs tell non-default bounds apart: empty when every controlled
    hyperparameter has its default bounds (so the stores of every default-bounded policy are shared)."""
    custom = {
        spec.name: (spec.lower, spec.upper)
        for spec in decoder.specs
        if (spec.lower, spec.upper)
        != (DEFAULT_HYPERPARAMETERS[spec.name].lower, DEFAULT_HYPERPARAMETERS[spec.name].upper)
    }
    return _hash_tag("bounds", custom) if custom else ""


def _decoder_tag(decoder: ActionDecoder) -> str:
    """How the random policy's stored runs tell action spaces apart: empty for the default one."""
    return "" if decoder == ActionDecoder() else _hash_tag("decoder", decoder.to_config())


def _hash_tag(name: str, payload: Any) -> str:
    """``@name=`` and a short hash of ``payload`` (JSON, key order ignored), for store keys."""
    return f"@{name}=" + hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def _hd_key(spec: TaskSpec, config: BenchmarkConfig) -> str:
    beta = config.hd_beta_sgd if spec.optimizer == "sgd" else config.hd_beta_adamw
    return f"hypergradient@beta={beta:.3g}@lr=task"


@dataclass
class Job:
    """One inner run to make: the (task, seed) pair, its arm, its store key and the spec it trains."""

    task_index: int
    seed_index: int
    arm: Arm
    key: RunKey
    spec: TaskSpec


class _RowPolicies:
    """One SB3-style policy per row of a batch: rows sharing an object are served by one call."""

    def __init__(self, policies: Sequence[Any]) -> None:
        rows: dict[int, tuple[Any, list[int]]] = {}
        for i, p in enumerate(policies):
            rows.setdefault(id(p), (p, []))[1].append(i)
        self.groups: dict[int, tuple[Any, np.ndarray]] = {k: (p, np.asarray(idx)) for k, (p, idx) in rows.items()}
        self.n = len(policies)
        # One batch observes each optional feature group if any policy needs it (none changes the
        # training); each policy sees the columns of its own groups (the optional ones come last).
        for option in OPTIONAL_FEATURES:  # gradient_features, epochs_feature: what run_episodes reads
            setattr(self, option, any(getattr(p, option, False) for p in policies))

    def _columns(self, width: int, policy: Any) -> np.ndarray | slice:
        """The columns of a ``width``-wide batch observation that ``policy`` was trained on."""
        groups = [
            (len(names), getattr(self, option), getattr(policy, option, False))
            for option, names in OPTIONAL_FEATURES.items()
        ]
        if all(mine == batch for _, batch, mine in groups):
            return slice(None)
        start = width - sum(n for n, batch, _ in groups if batch)
        cols = [np.arange(start)]
        for n, batch, mine in groups:
            if batch:
                if mine:
                    cols.append(np.arange(start, start + n))
                start += n
        return np.concatenate(cols)

    def initial_state(self, n: int) -> dict[int, Any]:
        return {k: getattr(p, "initial_state", lambda m: None)(len(idx)) for k, (p, idx) in self.groups.items()}

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        state = state if state is not None else self.initial_state(self.n)
        starts = np.ones(self.n, bool) if episode_start is None else np.asarray(episode_start, bool)
        actions = None
        new_state = {}
        for k, (policy, idx) in self.groups.items():
            a, new_state[k] = policy.predict(
                obs[idx][:, self._columns(obs.shape[1], policy)],
                state=state[k],
                episode_start=starts[idx],
                deterministic=deterministic,
            )
            a = np.asarray(a, dtype=np.float32).reshape(len(idx), -1)
            if actions is None:
                actions = np.zeros((self.n, a.shape[1]), dtype=np.float32)
            actions[idx] = a
        return actions, new_state


def _to_result(rec: EpisodeRecord, wall_s: float) -> RunResult:
    """What the results store keeps of an episode (``wall_s``: its share of the batched call's time)."""
    return RunResult(
        family=rec.task.family,
        final_val_loss=float(rec.final_val_loss),
        test_loss=float(rec.test_loss),
        test_accuracy=float(rec.test_accuracy),
        test_macro_f1=float(rec.test_macro_f1),
        initial_val_loss=float(rec.initial_val_loss),
        diverged=bool(rec.diverged),
        episode_return=float(rec.episode_return),
        num_decisions=rec.task.num_decisions,
        val_loss=[float(v) for v in rec.val_loss],
        val_accuracy=[float(v) for v in rec.val_accuracy],
        hparams={k: [float(x) for x in v] for k, v in rec.hparams.items()},
        wall_s=float(wall_s),
        spec=rec.task.to_dict(),
    )


def _random_seed(task_id: str, seed_index: int, seed: int) -> int:
    """A random policy's seed from the run's identity, so it never depends on how runs are batched."""
    return int(hashlib.sha1(f"{task_id}|{seed_index}|{seed}".encode()).hexdigest()[:8], 16)


# ------------------------------------------------------------------------------------------------
# running


@dataclass
class BenchmarkResult:
    """What :func:`run_benchmark` returns: the summary (also in benchmark.json) and output paths."""

    summary: dict
    report_path: Path
    json_path: Path
    plot_paths: list[Path] = field(default_factory=list)
    computed: int = 0
    reused: int = 0


def run_benchmark(config: BenchmarkConfig, policy: Any = None, policy_hash: str | None = None) -> BenchmarkResult:
    """Run (or resume) the benchmark and write its report, JSON and plots.

    Args:
        config: the benchmark settings; ``config.policy`` is loaded unless ``policy`` is given.
        policy: an in-memory policy to benchmark instead (anything with a ``decoder`` and SB3's
            ``predict``, e.g. a wrapper around a loaded bundle); ``config.policy`` still labels it.
        policy_hash: required with ``policy``: the key its runs are stored under, which must change
            whenever its behaviour does (a rerun reuses every run stored under it).

    Raises:
        agents.BundleError: the policy bundle is missing or invalid.
        ValueError: inconsistent settings, or an ``out`` or store that cannot be written (said before any run).
        TypeError: ``config`` is not a :class:`BenchmarkConfig`.
    """
    if not isinstance(config, BenchmarkConfig):
        raise TypeError(f"config must be a BenchmarkConfig, got {type(config).__name__}")
    if config.workers > 1:
        if policy is not None:
            raise ValueError(
                f"run_benchmark(policy=...) with workers={config.workers}: each worker process loads the policy from "
                "config.policy, so an in-memory policy cannot be used; save it as a bundle, or use workers=1"
            )
        threads = 1 if config.threads is None else config.threads
        config = dataclasses.replace(config, threads=threads)
        cores = available_cores()
        if cores is not None and config.workers * threads > cores:
            warnings.warn(
                f"{config.workers} workers x {threads} thread(s) on {cores} available CPU core(s): they share cores, "
                f"which is slower than one thread per core (e.g. --workers {cores} --threads 1)",
                stacklevel=2,
            )
    with torch_threads(config.threads):
        return _run_benchmark(config, policy, policy_hash)


def available_cores() -> int | None:
    """CPU cores this process may run on (None where the platform does not say)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count()


def _load_policy(config: BenchmarkConfig, policy: Any, policy_hash: str | None) -> tuple[Any, str]:
    """The policy under test and the hash its runs are stored under."""
    if policy is None:
        return load_bundle(config.policy, device=config.device), bundle_fingerprint(config.policy)
    if not policy_hash:
        raise ValueError("run_benchmark(policy=...) needs a policy_hash naming that policy's stored runs")
    return policy, policy_hash


def _plan(config: BenchmarkConfig, decoder: ActionDecoder, policy_hash: str, code_version: str):
    """The tasks, their arms and every run to make (before the replay controls), in the benchmark's order."""
    exact = schedule_decoder(decoder)
    tasks = make_tasks(config)
    jobs: list[Job] = []
    arms_by_task = [task_arms(spec, config, exact, policy_hash, decoder) for spec in tasks]
    for ti, (spec, arms) in enumerate(zip(tasks, arms_by_task)):
        for si in range(config.seeds):
            for arm in arms:
                run_spec = seeded(spec.replace(lr=arm.lr) if arm.lr is not None else spec, si)
                jobs.append(Job(ti, si, arm, RunKey(spec.task_id, arm.key, si, code_version), run_spec))
    return tasks, exact, arms_by_task, jobs


def _run_benchmark(config: BenchmarkConfig, policy: Any, policy_hash: str | None) -> BenchmarkResult:
    started = time.perf_counter()
    bundle, policy_hash = _load_policy(config, policy, policy_hash)
    _warn_if_trained_on(bundle, config.families or SPLITS[config.split])
    decoder = bundle.decoder
    if "lr" not in decoder.names:
        raise ValueError(
            f"the benchmark compares learning-rate schedules, so it needs a policy that controls lr; "
            f"{config.policy} controls {list(decoder.names)} (meta-train with --hyperparameters lr ...)"
        )
    code_version = config.code_version or default_code_version(config.device)
    tasks, exact, arms_by_task, jobs = _plan(config, decoder, policy_hash, code_version)
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"out={str(out)!r} cannot be created ({err.strerror or err}): pass a writable folder") from err
    store_path = Path(config.store_path)
    for path, flag in ((out, "--out"), (store_path.parent, "--store"), (store_path, "--store")):
        if path.exists() and not os.access(path, os.W_OK):  # said now, not after the first batch of runs
            raise ValueError(
                f"{flag} {str(path)!r} is not writable (a read-only folder or file system): runs and reports "
                f"could not be stored; pass a writable {flag}"
            )

    from tqdm.auto import tqdm

    computed = 0
    with ResultStore(config.store_path) as store:
        todo_keys = set(store.missing([j.key for j in jobs]))
        todo, queued = [], set()
        for j in jobs:  # one job per distinct key (with an odd K, a grid point is the default rate)
            if j.key in todo_keys and j.key not in queued:
                todo.append(j)
                queued.add(j.key)
        reused = len({j.key for j in jobs}) - len(todo)
        _warn_if_stale(
            store.other_versions(j.key for j in todo), len(todo), code_version, labelled=config.code_version is not None
        )
        # The replay controls' runs are known only once the policy's have run; new policy runs mean new replays
        # (two per pair), counted from the start so that the bar's total does not grow at the end.
        expected_replays = 2 * len(tasks) * config.seeds if any(j.arm.kind == "policy" for j in todo) else 0
        bar = tqdm(
            total=len(todo) + expected_replays,
            unit="run",
            desc="hpo-bench",
            disable=not config.progress,
            dynamic_ncols=True,
        )
        replay: ReplaySchedule | None = None

        def replay_units() -> list[tuple[str, list[Any]]]:
            """The replay controls' batches, planned from the policy's stored runs (all of them must be in)."""
            nonlocal replay, reused
            replay, replay_jobs = _plan_replays(store, jobs, tasks, arms_by_task, exact, policy_hash, code_version)
            jobs.extend(replay_jobs)
            missing = set(store.missing([j.key for j in replay_jobs]))
            replay_todo = [j for j in replay_jobs if j.key in missing]
            reused += len(replay_jobs) - len(replay_todo)
            bar.total += len(replay_todo) - expected_replays
            bar.refresh()
            return [("replay", chunk) for chunk in _chunked(replay_todo, config.chunk_size)]

        try:
            # The policy first: the replay controls are built from its runs.
            order = {"policy": 0, "random": 1, "schedule": 2, "hypergradient": 3}
            todo.sort(key=lambda j: (order[j.arm.kind], j.task_index, j.seed_index))
            if config.workers > 1:  # (the replays are queued as soon as the policy's runs are in)
                computed += _run_in_workers(todo, config, code_version, policy_hash, bar, replay_units)
            else:
                by_key = {j.key: j for j in todo}
                for kind, keys in _work_units(todo, config):
                    batch = [by_key[key] for key in keys]
                    computed += _run_unit(kind, batch, bundle, exact, config, store, bar)
                for kind, batch in replay_units():
                    computed += _run_unit(kind, batch, bundle, exact, config, store, bar)
        finally:
            bar.close()
        results = store.get_many([j.key for j in jobs])

    assert replay is not None  # (planned once the policy's runs were in)
    summary = summarise(config, tasks, arms_by_task, results, code_version, policy_hash, replay)
    summary["run"] = {
        "computed_runs": computed,
        "reused_runs": reused,
        "wall_s": time.perf_counter() - started,
        "store": str(config.store_path),
    }
    plot_paths = make_plots(summary, out / "plots") if config.plots else []
    # Both rendered before either is replaced, each replaced whole: a kill or a full disk while they are
    # written leaves the previous pair, never a truncated file or a report of another run than its json.
    json_path, report_path = out / "benchmark.json", out / "report.md"
    texts = json.dumps(jsonable(summary), indent=1, allow_nan=False), render_report(summary, plot_paths, out)
    for path, text in zip((json_path, report_path), texts):
        replace_file(path, functools.partial(Path.write_text, data=text))
    return BenchmarkResult(summary, report_path, json_path, plot_paths, computed, reused)


def _plan_replays(
    store: ResultStore,
    jobs: list[Job],
    tasks: list[TaskSpec],
    arms_by_task: list[list[Arm]],
    exact: ActionDecoder,
    policy_hash: str,
    code_version: str,
) -> tuple[ReplaySchedule, list[Job]]:
    """The replay controls of the policy's stored runs: the replay of its average schedule over all its runs
    of this benchmark, and, a harder control, the replay of its average schedule on each task (over that
    task's seeds, the scored one included), an open-loop schedule per task. The global replay can be
    beaten by adapting the schedule to the task alone; beating the per-task one takes reacting to the
    seed's own run. Adds their arms to ``arms_by_task``; returns the global replay and every replay run."""
    seeds = sorted({j.seed_index for j in jobs})
    policy_runs = store.get_many([j.key for j in jobs if j.arm.kind == "policy"])
    replay = _replay_from_results(exact, list(policy_runs.values()), tasks)
    replay_arm = _replay_arm("replay", replay, policy_hash)
    replay_jobs = []
    for ti, spec in enumerate(tasks):
        task_runs = [policy_runs[j.key] for j in jobs if j.arm.kind == "policy" and j.task_index == ti]
        task_arm = _replay_arm("replay_task", _replay_from_results(exact, task_runs, tasks), policy_hash)
        arms_by_task[ti] = [*arms_by_task[ti], replay_arm, task_arm]
        for si in seeds:
            for arm in (replay_arm, task_arm):
                key = RunKey(spec.task_id, arm.key, si, code_version)
                replay_jobs.append(Job(ti, si, arm, key, seeded(spec, si)))
    return replay, replay_jobs


def run_chunks(jobs: list[Job], decoder: ActionDecoder, bundle: Any, config: BenchmarkConfig, store, bar) -> int:
    """Train ``jobs`` (``config.chunk_size`` per batched call; ``bundle`` serves the policy arms) and store
    each chunk's results as soon as it ends; returns how many were run."""
    done = 0
    for chunk in _chunked(jobs, config.chunk_size):
        policies = []
        for j in chunk:
            if j.arm.kind == "policy":
                policies.append(bundle)
            elif j.arm.kind == "random":
                policies.append(RandomPolicy(decoder, seed=_random_seed(j.key.task_id, j.seed_index, config.seed)))
            else:
                assert j.arm.make is not None, f"the {j.arm.kind} arm {j.arm.key!r} has no make()"
                policies.append(j.arm.make())
        t0 = time.perf_counter()
        records = run_episodes(
            _RowPolicies(policies),
            [j.spec for j in chunk],
            decoder,
            device=config.device,
            seed_indices=[j.seed_index for j in chunk],
        )
        share = (time.perf_counter() - t0) / len(chunk)
        store.put_many([(j.key, _to_result(r, share)) for j, r in zip(chunk, records)])
        done += len(chunk)
        bar.update(len(chunk))
    return done


def _work_units(todo: list[Job], config: BenchmarkConfig) -> list[tuple[str, list[RunKey]]]:
    """The batches to train, in order: ``(kind, keys)`` per chunk (one per HD run). One process and the
    workers train these same batches (and the replay controls' chunks after them), so their runs round
    alike."""
    units = []
    for kind in ("policy", "random", "schedule"):
        units += [(kind, chunk) for chunk in _chunked([j.key for j in todo if j.arm.kind == kind], config.chunk_size)]
    return units + [("hypergradient", [j.key]) for j in todo if j.arm.kind == "hypergradient"]


def _chunked(items: list, size: int) -> list[list]:
    """``items`` cut into consecutive batches of ``size`` (the last one shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def _run_in_workers(
    todo: list[Job],
    config: BenchmarkConfig,
    code_version: str,
    policy_hash: str,
    bar,
    then: Callable[[], list[tuple[str, list[Any]]]],
) -> int:
    """Compute ``todo`` in ``config.workers`` processes, batch by batch as :func:`run_chunks` would, and
    then the batches ``then()`` returns (the replay controls), queued once every policy batch is in.

    At most one batch per worker is handed out at a time. Ctrl-C reaches the main process only (the
    workers ignore it), which then stops the workers: the batches in flight are lost, as one process
    loses its batch in flight, and every finished batch is stored.
    """
    import multiprocessing
    import multiprocessing.pool

    from hpo_env.subproc import sigint_blocked

    units: list[tuple[str, list[Any]]] = list(_work_units(todo, config))
    policy_left = sum(kind == "policy" for kind, _ in units)
    if not policy_left:  # every policy run was stored already
        units += then()
    if not units:
        return 0
    processes = min(config.workers, len(units))
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's thread pools
    with sigint_blocked():  # the workers ignore Ctrl-C from their first instruction (_worker_start)
        pool = context.Pool(processes, _worker_start, (config, code_version, policy_hash))
    computed = 0
    try:
        queue = list(reversed(units))
        running: list[multiprocessing.pool.AsyncResult] = []
        while queue or running:
            while queue and len(running) < processes:
                running.append(pool.apply_async(_worker_run, queue.pop()))
            finished = next((r for r in running if r.ready()), None)
            if finished is None:
                running[0].wait(0.05)
                continue
            running.remove(finished)
            kind, n = finished.get()  # a worker's error stops the benchmark here
            computed += n
            bar.update(n)
            if kind == "policy":
                policy_left -= 1
                if not policy_left:
                    queue[:0] = reversed(then())  # after the batches queued (the queue is popped from its end)
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()
    return computed


_WORKER: dict[str, Any] = {}


def _worker_start(config: BenchmarkConfig, code_version: str, policy_hash: str) -> None:
    """A worker process: its thread count, the policy and the benchmark's runs, keyed.

    An error is kept for the first batch to raise (a pool's initializer that raises would be restarted
    for ever).
    """
    import torch

    from hpo_env.subproc import ignore_sigint

    ignore_sigint()  # the main process handles Ctrl-C and stops the workers
    torch.set_num_threads(config.threads or 1)
    try:
        bundle, found_hash = _load_policy(config, None, None)
        if found_hash != policy_hash:
            raise ValueError(
                f"the policy bundle {config.policy} changed while the benchmark ran (hash {found_hash}, started with "
                f"{policy_hash}): rerun the command once it is written"
            )
        _, exact, _, jobs = _plan(config, bundle.decoder, policy_hash, code_version)
    except Exception as err:  # raised again by _worker_run, and so in the main process
        _WORKER["error"] = err
        return
    by_key: dict[RunKey, Job] = {}
    for j in jobs:  # the first job of a key, as the main process queues it
        by_key.setdefault(j.key, j)
    _WORKER.update(config=config, bundle=bundle, exact=exact, jobs=by_key)


def _worker_run(kind: str, items: list[Any]) -> tuple[str, int]:
    """Train one batch of the benchmark's runs in a worker and store it; returns its kind and how many runs.
    ``items`` are the batch's keys, or for the replay controls (planned after the workers started) its jobs."""
    if "error" in _WORKER:
        raise _WORKER["error"]
    config, bundle, exact, jobs = (_WORKER[k] for k in ("config", "bundle", "exact", "jobs"))
    batch = items if kind == "replay" else [jobs[key] for key in items]
    with ResultStore(config.store_path) as store:
        return kind, _run_unit(kind, batch, bundle, exact, config, store, _NoBar())


def _run_unit(
    kind: str, batch: list[Job], bundle: Any, exact: ActionDecoder, config: BenchmarkConfig, store, bar
) -> int:
    """Train one of :func:`_work_units`' batches and store it; returns how many runs."""
    if kind == "hypergradient":
        return _run_hypergradient_job(batch[0], bundle.decoder, config, store, bar)
    return run_chunks(batch, exact if kind in ("schedule", "replay") else bundle.decoder, bundle, config, store, bar)


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _run_hypergradient_job(job: Job, decoder: ActionDecoder, config: BenchmarkConfig, store, bar) -> int:
    beta = config.hd_beta_sgd if job.spec.optimizer == "sgd" else config.hd_beta_adamw
    t0 = time.perf_counter()
    rec = run_hypergradient(job.spec, decoder, beta=beta, seed_index=job.seed_index, device=config.device)
    store.put_many([(job.key, _to_result(rec, time.perf_counter() - t0))])
    bar.update(1)
    return 1


def _replay_arm(row: str, schedule: ReplaySchedule, policy_hash: str) -> Arm:
    """A replay control's arm, keyed by the policy and the replayed curve."""
    curve = hashlib.sha1(np.round(schedule.log10_change, 6).tobytes()).hexdigest()[:8]
    return Arm(f"{row}@{policy_hash}:{curve}", row, "replay", None, functools.partial(_same, schedule))


def _same(value: Any) -> Any:
    return value


def _replay_from_results(decoder: ActionDecoder, results: list[RunResult], tasks: list[TaskSpec]) -> ReplaySchedule:
    class _Task:  # what ReplaySchedule.from_records reads of a record
        def __init__(self, num_decisions: int) -> None:
            self.num_decisions = num_decisions

    class _Rec:
        def __init__(self, r: RunResult) -> None:
            self.hparams = r.hparams
            self.task = _Task(r.num_decisions)

    return ReplaySchedule.from_records(decoder, [_Rec(r) for r in results])


# ------------------------------------------------------------------------------------------------
# statistics


def _losses(results: list[RunResult]) -> np.ndarray:
    return np.array([r.final_val_loss if not r.diverged else np.inf for r in results], dtype=np.float64)


def _best_rate(losses: np.ndarray) -> int:
    """The grid row (one per learning rate, one column per seed) an oracle picks: the fewest divergences,
    then the lowest mean log final validation loss over the runs that finished (first row on a tie)."""
    finite = np.isfinite(losses)
    scores = [
        (int((~ok).sum()), float(np.mean(np.log(row[ok]))) if ok.any() else np.inf) for row, ok in zip(losses, finite)
    ]
    return min(range(len(scores)), key=scores.__getitem__)


def _mean_lr(result: RunResult) -> float:
    """The learning rate averaged over the intervals a run trained (NaN if it recorded none)."""
    lr = result.hparams.get("lr") or []
    return float(np.mean(lr)) if len(lr) else float("nan")


def summarise(
    config: BenchmarkConfig,
    tasks: list[TaskSpec],
    arms_by_task: list[list[Arm]],
    results: dict[RunKey, RunResult],
    code_version: str,
    policy_hash: str,
    replay: ReplaySchedule,
) -> dict:
    """Per-row results per (task, seed), the oracle choices, paired statistics and costs."""
    seeds = range(config.seeds)
    table: dict[str, list[RunResult]] = {}  # row -> results in (task, seed) order
    oracle_choice: dict[str, list[float]] = {"constant_tuned": [], "cosine_tuned": []}
    pairs = [(ti, si) for ti in range(len(tasks)) for si in seeds]
    crossfit: list[RunResult] = []  # the cosine oracle chosen per seed on the task's other seeds

    def result(ti: int, si: int, arm: Arm) -> RunResult:
        return results[RunKey(tasks[ti].task_id, arm.key, si, code_version)]

    chosen: list[dict[str, Arm]] = []  # per task: row -> the arm that represents it
    for ti, arms in enumerate(arms_by_task):
        chosen.append({})
        by_row: dict[str, list[Arm]] = {}
        for arm in arms:
            by_row.setdefault(arm.row, []).append(arm)
        for row, candidates in by_row.items():
            if row in oracle_choice:
                # The oracle: the grid rate with the lowest mean log final validation loss over seeds.
                grid = np.array([_losses([result(ti, si, arm) for si in seeds]) for arm in candidates])
                best = candidates[_best_rate(grid)]
                assert best.lr is not None, "a grid arm has its rate"
                oracle_choice[row].append(float(best.lr))
                if row == "cosine_tuned" and config.seeds >= 2:
                    # The same choice made on the task's other seeds: no hindsight on the seed it is scored on.
                    crossfit.extend(result(ti, si, candidates[_best_rate(np.delete(grid, si, axis=1))]) for si in seeds)
                candidates = [best]
            (arm,) = candidates
            chosen[ti][row] = arm
            table.setdefault(row, []).extend(result(ti, si, arm) for si in seeds)

    groups = [tasks[ti].task_id for ti, _ in pairs]
    families = [tasks[ti].family for ti, _ in pairs]
    rng = np.random.default_rng(config.seed)
    policy = table["policy"]
    untuned = [_losses(table[name]) for name in UNTUNED_DEFAULTS]

    def beats_both(results_: list[RunResult]) -> float:
        """Share of pairs where these runs beat both untuned defaults (the policy's first target)."""
        return beats_all_rate(_losses(results_), untuned)

    report_rows = []
    for spec in rows(config.grid_size):
        base = table[spec.name]
        entry = {
            "name": spec.name,
            "label": spec.label,
            "cost_runs_per_task_seed": spec.cost,
            "wall_s_per_run": float(np.nanmean([r.wall_s for r in base])),
            **_describe(base),
            "beats_both_untuned_defaults": None if spec.name in UNTUNED_DEFAULTS else beats_both(base),
            "all": paired_comparison(_losses(policy), _losses(base), rng=rng, groups=groups, n_boot=config.bootstrap),
            "by_family": {},
        }
        for fam in dict.fromkeys(families):
            idx = [i for i, f in enumerate(families) if f == fam]
            entry["by_family"][fam] = {
                **_describe([base[i] for i in idx]),
                **paired_comparison(
                    _losses([policy[i] for i in idx]),
                    _losses([base[i] for i in idx]),
                    rng=rng,
                    groups=[groups[i] for i in idx],
                    n_boot=config.bootstrap,
                ),
            }
        report_rows.append(entry)

    policy_entry = {
        "name": "policy",
        "label": "learned policy",
        "cost_runs_per_task_seed": 1,
        "wall_s_per_run": float(np.nanmean([r.wall_s for r in policy])),
        **_describe(policy),
        "by_family": {
            fam: _describe([policy[i] for i, f in enumerate(families) if f == fam]) for fam in dict.fromkeys(families)
        },
    }
    # How hot the policy runs against the tuned cosine oracle: per pair, the ratio of mean learning rates.
    policy_entry["lr_level_vs_cosine_tuned"] = lr_level(
        [_mean_lr(r) for r in policy], [_mean_lr(r) for r in table["cosine_tuned"]], families
    )
    by_name = {r["name"]: r for r in report_rows}
    targets = {
        "seeds_per_task": config.seeds,
        "beats_both_untuned_defaults": beats_both(policy),
        "beats_both_untuned_defaults_target": 0.8,
        "median_ratio_vs_cosine_tuned": by_name["cosine_tuned"]["all"]["median_ratio"],
        "median_ratio_vs_cosine_tuned_target": 1.0,
        "win_rate_vs_random": by_name["random"]["all"]["win_rate"],
        "win_rate_vs_replay": by_name["replay"]["all"]["win_rate"],
        "win_rate_vs_replay_task": by_name["replay_task"]["all"]["win_rate"],
        "policy_divergence_rate": policy_entry["divergence_rate"],
        "policy_divergence_rate_target": 0.01,
        # The in-sample oracle is scored on the seeds its rate was chosen on, which flatters it a little;
        # chosen on the task's other seeds instead (same runs, no extra cost), for information.
        "vs_cosine_tuned_crossfit": (
            paired_comparison(_losses(policy), _losses(crossfit), rng=rng, groups=groups, n_boot=config.bootstrap)
            if crossfit
            else None
        ),
    }
    targets["met"] = {
        "beats_both_untuned_defaults": targets["beats_both_untuned_defaults"] >= 0.8,
        "median_ratio_vs_cosine_tuned": targets["median_ratio_vs_cosine_tuned"] <= 1.0,
        "beats_random": targets["win_rate_vs_random"] > 0.5,
        "beats_replay": targets["win_rate_vs_replay"] > 0.5,
        "divergence": targets["policy_divergence_rate"] <= 0.01,
        "at_least_5_seeds": config.seeds >= 5,
    }
    curves = _example_curves(tasks, chosen, results, code_version)
    return {
        "config": dataclasses.asdict(config),
        "code_version": code_version,
        "policy_fingerprint": policy_hash,
        "tasks": [{"task_id": t.task_id, **t.to_dict()} for t in tasks],
        "policy": policy_entry,
        "rows": report_rows,
        "targets": targets,
        # Where the targets are won or lost: tasks binned by how far their untuned defaults are from the oracle.
        "headroom_vs_cosine_tuned": headroom(_losses(policy), _losses(table["cosine_tuned"]), untuned, groups),
        "oracle_lr": {row: dict(zip([t.task_id for t in tasks], lrs)) for row, lrs in oracle_choice.items()},
        "replay_schedule": {
            "progress": replay.progress.tolist(),
            "log10_change": replay.log10_change.tolist(),
            "hyperparameters": list(replay.decoder.names),
        },  # fmt: skip
        "per_run": {
            row: [
                {
                    "task_id": tasks[ti].task_id,
                    "family": tasks[ti].family,
                    "seed": si,
                    "final_val_loss": r.final_val_loss,
                    "test_loss": r.test_loss,
                    "test_accuracy": r.test_accuracy,
                    "test_macro_f1": r.test_macro_f1,
                    "diverged": r.diverged,
                    "mean_lr": _mean_lr(r),
                }  # fmt: skip
                for (ti, si), r in zip(pairs, res)
            ]
            for row, res in table.items()
        },
        "curves": curves,
    }


def _describe(results: list[RunResult]) -> dict:
    losses = _losses(results)
    finite = losses[np.isfinite(losses)]

    def mean(values: list[float]) -> float:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else float("nan")

    return {
        "runs": len(results),
        "median_final_val_loss": float(np.median(losses)) if losses.size else float("nan"),
        "mean_final_val_loss": float(finite.mean()) if finite.size else float("nan"),
        "mean_test_loss": mean([r.test_loss for r in results]),
        "mean_test_accuracy": mean([r.test_accuracy for r in results]),
        "mean_test_macro_f1": mean([r.test_macro_f1 for r in results]),
        "divergence_rate": divergence_rate([r.diverged for r in results]),
    }


_PLOTTED = ("policy", "constant_default", "cosine_default", "cosine_3x_default", "constant_tuned", "cosine_tuned",
            "step_decay", "linear_decay", "one_cycle", "plateau", "hypergradient", "random", "replay",
            "replay_task")  # fmt: skip
#: Drawn dashed in the curves: the controls, not schedules anyone would use.
_CONTROLS = ("random", "replay", "replay_task")


def _example_curves(tasks: list[TaskSpec], chosen: list[dict[str, Arm]], results, code_version: str) -> dict:
    """Learning rate and validation loss per interval, for the first task of each family (seed 0)."""
    curves: dict[str, dict] = {}
    for ti, spec in enumerate(tasks):
        if spec.family in curves:
            continue
        entry = {}
        for row in _PLOTTED:
            r = results[RunKey(spec.task_id, chosen[ti][row].key, 0, code_version)]
            entry[row] = {
                "lr": r.hparams.get("lr", []),
                "weight_decay": r.hparams.get("weight_decay", []),
                "val_loss": r.val_loss,
                "num_decisions": r.num_decisions,
            }
        curves[spec.family] = {"task_id": spec.task_id, "optimizer": spec.optimizer, "arms": entry}
    return curves


# ------------------------------------------------------------------------------------------------
# outputs


def jsonable(x: Any) -> Any:
    """JSON without NaN/inf (written as null), numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _plain_log_ticks(axis: Any, values: Sequence[float | None]) -> None:
    """Tick a log axis whose ``values`` span less than a decade at round numbers, labelled as plain numbers.

    Matplotlib's log ticks there are the decade's 1-9 multiples: a ratio axis from 0.8 to 1.3 is labelled
    only 0.9 and 1, and a loss axis from 1.6 to 3 only 2 and 3.
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0], dtype=float)
    if v.size and np.log10(v.max() / v.min()) < 1:
        axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.4g}"))
        axis.set_minor_locator(NullLocator())


def make_plots(summary: dict, folder: Path) -> list[Path]:
    """Schedules and validation curves per family, and the win-rate chart; returns the PNG paths.

    The figures are made without ``pyplot``: the caller's matplotlib backend and open figures are left alone
    (a notebook that runs the benchmark keeps showing its own plots).
    """
    import matplotlib
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    labels = {r["name"]: r["label"] for r in summary["rows"]} | {"policy": "learned policy"}
    colours = matplotlib.colormaps["tab10"].colors  # type: ignore[attr-defined]  # tab10 is a ListedColormap
    for family, info in summary["curves"].items():
        with_wd = bool(info["arms"].get("policy", {}).get("weight_decay"))
        panels = ["lr", "weight_decay", "val_loss"] if with_wd else ["lr", "val_loss"]
        fig = Figure(figsize=(5.4 * len(panels) + 2.5, 4.8))
        axes = fig.subplots(1, len(panels), squeeze=False)
        ax = dict(zip(panels, axes[0]))
        schedules = controls = 0
        for name, c in info["arms"].items():
            t = c["num_decisions"] or 1
            if name == "policy":
                style = dict(lw=2.5, color="black", zorder=5)
            elif name in _CONTROLS:
                style, controls = dict(lw=1.2, ls="--", color=colours[controls % 10]), controls + 1
            else:
                style, schedules = dict(lw=1.3, color=colours[schedules % 10]), schedules + 1
            label = labels.get(name, name)
            for hp in panels[:-1]:
                if c.get(hp):  # interval i runs from i/T to (i+1)/T
                    ax[hp].step(np.arange(len(c[hp]) + 1) / t, [*c[hp], c[hp][-1]], where="post", label=label, **style)
            if c["val_loss"]:
                ax["val_loss"].plot(np.arange(1, len(c["val_loss"]) + 1) / t, c["val_loss"], label=label, **style)
        budget = "fraction of the training budget"
        ax["lr"].set(yscale="log", xlabel=budget, ylabel="learning rate", title="learning rate")
        if with_wd:
            ax["weight_decay"].set(yscale="log", xlabel=budget, ylabel="weight decay", title="weight decay")
        ax["val_loss"].set(yscale="log", xlabel=budget, ylabel="validation loss", title="validation loss")
        _plain_log_ticks(ax["val_loss"].yaxis, [x for c in info["arms"].values() for x in c["val_loss"]])
        ax["val_loss"].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(
            f"{family}: every schedule on one task ({info['task_id']}, {info['optimizer']}), seed 0 "
            "(the tables pool all tasks and seeds)"
        )
        fig.tight_layout()
        path = folder / f"curves_{family}.png"
        replace_file(path, functools.partial(fig.savefig, dpi=110, format="png"))
        paths.append(path)

    rows_ = summary["rows"]
    fig = Figure(figsize=(13, 0.45 * len(rows_) + 2.0))
    ax_w, ax_r = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(rows_))[::-1]
    win = np.array([r["all"]["win_rate"] for r in rows_])
    low = np.array([r["all"]["win_rate_low"] for r in rows_])
    high = np.array([r["all"]["win_rate_high"] for r in rows_])
    # Coloured only where the interval clears 50%: a point estimate above it alone is not a win.
    colour = ["tab:green" if lo_ > 0.5 else "tab:red" if hi_ < 0.5 else "tab:gray" for lo_, hi_ in zip(low, high)]
    ax_w.barh(y, win, xerr=np.stack([win - low, high - win]), color=colour, capsize=3)
    ax_w.axvline(0.5, color="k", lw=1, ls="--")
    ax_w.set(
        xlim=(0, 1.02),
        xlabel="share of pairs where the policy ends lower (95% CI)\ngreen/red: the interval clears 50%",
        yticks=y,
        yticklabels=[r["label"] for r in rows_],
    )
    ratio = np.array([r["all"]["median_ratio"] for r in rows_], dtype=float)
    lo = np.array([r["all"]["median_ratio_low"] for r in rows_], dtype=float)
    hi = np.array([r["all"]["median_ratio_high"] for r in rows_], dtype=float)
    finite = np.isfinite(ratio) & np.isfinite(lo) & np.isfinite(hi) & (ratio > 0) & (lo > 0)
    ax_r.errorbar(ratio[finite], y[finite], xerr=np.stack([ratio - lo, hi - ratio])[:, finite], fmt="o", capsize=3)
    ax_r.axvline(1.0, color="k", lw=1, ls="--")
    ax_r.set(xscale="log", xlabel="median final validation loss, policy / baseline (95% CI)\nbelow 1: policy better")
    _plain_log_ticks(ax_r.xaxis, [*lo[finite], *hi[finite]])
    for yi in y[~finite]:  # a median ratio of inf or n/a (divergences): said, not silently dropped
        ax_r.text(1.0, yi, "  n/a (divergences)", va="center", fontsize=8, color="tab:gray")
    pairs = rows_[0]["all"]["pairs"] if rows_ else 0
    fig.suptitle(f"The learned policy against each baseline: {pairs} (task, seed) pairs, all families pooled")
    fig.tight_layout()
    path = folder / "win_rates.png"
    replace_file(path, functools.partial(fig.savefig, dpi=110, format="png"))
    paths.append(path)
    return paths


def _f(x: float | None, digits: int = 3) -> str:
    """A number for the report: n/a for missing or NaN, inf for a divergence."""
    if x is None or math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _ratio(x: float | None) -> str:
    """A loss ratio for the report: four decimals, so that 1.004 is not printed as 1 beside a <= 1.00 target."""
    return _f(x) if x is None or not math.isfinite(x) else f"{x:.4f}"


def _crossfit_cell(targets: dict) -> str:
    c = targets.get("vs_cosine_tuned_crossfit")
    if not c:
        return "n/a (needs 2 seeds)"
    return f"{_ratio(c['median_ratio'])} [{_ratio(c['median_ratio_low'])}, {_ratio(c['median_ratio_high'])}]"


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.0f}%"


def _control_row(summary: dict, name: str) -> dict:
    return next((r["all"] for r in summary["rows"] if r["name"] == name), {})


def _win_with_ci(summary: dict, name: str) -> str:
    a = _control_row(summary, name)
    if not a:
        return "n/a"
    return f"{_pct(a['win_rate'])} [{_pct(a['win_rate_low'])}, {_pct(a['win_rate_high'])}]"


#: Below this many tasks a percentile bootstrap over tasks covers clearly less than its nominal 95%.
_FEW_TASKS = 10


def _met_with_ci(summary: dict, name: str, met: bool) -> str:
    """'yes' on the point estimate, and whether the interval clears 50% too (a small set may not)."""
    low = _control_row(summary, name).get("win_rate_low", float("nan"))
    if not met:
        return "no"
    if len(summary["tasks"]) < _FEW_TASKS:
        return f"yes on the point estimate (only {len(summary['tasks'])} tasks: too few for the interval to decide)"
    return "yes (interval above 50%)" if low > 0.5 else "yes on the point estimate (interval reaches 50%)"


def _lr_level_line(policy: dict, family: str | None = None) -> str:
    """One sentence on how hot the policy runs against the tuned cosine oracle (all pairs or one family)."""
    level = policy["lr_level_vs_cosine_tuned"]
    if family is not None:
        level = level["by_family"][family]
    if not level["pairs"]:
        return "Learning-rate level: no pair recorded learning rates for both the policy and the tuned cosine oracle."
    return (
        f"Learning-rate level: over a run, the policy's mean learning rate is a median {level['median_ratio']:.2f}x "
        f"the tuned cosine oracle's (higher on {_pct(level['share_higher'])} of {level['pairs']} pairs; above 1 the "
        "policy trains hotter than the tuned schedule)."
    )


def _headroom_section(bins: list[dict], grid_size: int) -> list[str]:
    """The report's breakdown of the targets by how much tuning gains on each task."""
    if not bins:
        return []
    lines = [
        "",
        "## Where the targets are won or lost",
        "",
        "Tasks binned by their headroom: how far the better untuned default ends from the tuned cosine oracle "
        "(final validation loss, geometric mean over the task's seeds). Where the defaults are already near the "
        "oracle, beating both of them is decided mostly by the seed's noise, and the oracle's own share says how "
        "reachable the first target is; where they are far behind, the learning rate must move far from the default.",
        "",
        f"| tasks whose untuned defaults are | tasks | pairs | policy beats both defaults | K={grid_size} cosine oracle "
        "beats both defaults | median ratio policy/oracle | geometric mean |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in bins:
        lines.append(
            f"| {b['label'].removeprefix('defaults ')} | {b['tasks']} | {b['pairs']} | {_pct(b['policy_beats_all_defaults'])} | "
            f"{_pct(b['oracle_beats_all_defaults'])} | {_ratio(b['median_ratio'])} | {_ratio(b['geomean_ratio'])} |"
        )
    return lines


def render_report(summary: dict, plot_paths: Sequence[Path], out: Path) -> str:
    """The markdown report."""
    cfg, t, pol = summary["config"], summary["targets"], summary["policy"]
    n_tasks = len(summary["tasks"])
    families = sorted({task["family"] for task in summary["tasks"]})
    lines = [
        "# hpo-meta benchmark",
        "",
        f"- Policy: `{cfg['policy']}` (fingerprint `{summary['policy_fingerprint']}`)",
        f"- Families: {', '.join(families)} (split `{cfg['split']}`{'; explicit list' if cfg['families'] else ''}); "
        f"{_count(n_tasks, 'task')} x {_count(cfg['seeds'], 'seed')} = {n_tasks * cfg['seeds']} (task, seed) "
        f"pair{'s' if n_tasks * cfg['seeds'] != 1 else ''}; task seed {cfg['task_seed']}",
        f"- Tuned oracles: K = {cfg['grid_size']} learning rates, default x 10^[-{cfg['grid_decades']}, +{cfg['grid_decades']}], "
        "chosen per task on the fewest divergences, then the mean log final validation loss over its seeds "
        "(hindsight: an oracle)"
        + (
            f". **K = {cfg['grid_size']} is too coarse to stand for a tuned search** ("
            + (
                f"neighbouring rates lie {2 * cfg['grid_decades'] / (cfg['grid_size'] - 1):.2g} decades apart"
                if cfg["grid_size"] > 1
                else "one rate"
            )
            + "): read the oracle rows and their target as a smoke test"
            if cfg["grid_size"] < 5
            else ""
        ),
        "- Schedules without 'default'/'tuned' in their name start from the task's own initial learning rate, like the policy.",
        "- Every schedule runs within the policy's learning-rate bounds, as the policy does: a decay that would go "
        "below the lower bound holds it for the rest of the run.",
        f"- Code version: `{summary['code_version']}`; runs computed now: {summary['run']['computed_runs']}, "
        f"reused from the store: {summary['run']['reused_runs']}; wall time {summary['run']['wall_s']:.1f} s",
        "",
        "Win rate: fraction of (task, seed) pairs where the policy's final validation loss is lower (ties half; a "
        "divergence loses to a finished run, and two divergences tie). Ratio: median over pairs of policy / "
        "baseline final validation loss (below 1: the policy is better). Intervals: 95% percentile bootstrap "
        "resampling whole tasks (a family with one task gets a point interval); with few tasks they are too "
        "narrow (in a simulation with task and seed noise, a nominal 95% interval covered the true median ratio "
        "about 82% of the time with 4 tasks, 86% with 8 and 92% with 16), so read the per-family intervals as "
        "rough. Test accuracy and macro-F1 "
        "are means over the runs that finished (a diverged run has none; see the divergence column).",
        "",
        "## All families",
        "",
        "| baseline | cost (runs) | policy win rate [95% CI] | median ratio policy/baseline [95% CI] | beats both defaults | divergence | test acc | macro-F1 | s/run |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        a = r["all"]
        both = r.get("beats_both_untuned_defaults")
        lines.append(
            f"| {r['label']} | {r['cost_runs_per_task_seed']} | {_pct(a['win_rate'])} [{_pct(a['win_rate_low'])}, "
            f"{_pct(a['win_rate_high'])}] | {_ratio(a['median_ratio'])} [{_ratio(a['median_ratio_low'])}, "
            f"{_ratio(a['median_ratio_high'])}] | {'-' if both is None else _pct(both)} | {_pct(r['divergence_rate'])} | "
            f"{_f(r['mean_test_accuracy'])} | {_f(r['mean_test_macro_f1'])} | {_f(r['wall_s_per_run'], 2)} |"
        )
    lines.append(
        f"| **learned policy** | 1 | | | **{_pct(t['beats_both_untuned_defaults'])}** | {_pct(pol['divergence_rate'])} | "
        f"{_f(pol['mean_test_accuracy'])} | {_f(pol['mean_test_macro_f1'])} | {_f(pol['wall_s_per_run'], 2)} |"
    )
    lines += ["", _lr_level_line(pol)]
    lines += [
        "",
        "Cost: full inner training runs per (task, seed). Beats both defaults: share of pairs where that row's run "
        "has a lower final validation loss than both untuned defaults (constant and cosine at the default LR), the "
        "policy's first target; the same statistic for the baselines says how reachable it is on these tasks. "
        "s/run: wall seconds per run on this machine (episode-level runs are trained batched; their time is the "
        "batch's share).",
        "",
        "## Targets",
        "",
        "| target | value | met |",
        "|---|---|---|",
        f"| beats both untuned defaults on >= 80% of pairs | {_pct(t['beats_both_untuned_defaults'])} | "
        f"{'yes' if t['met']['beats_both_untuned_defaults'] else 'no'} |",
        f"| median ratio to the K={cfg['grid_size']} cosine oracle <= 1.00 | {_ratio(t['median_ratio_vs_cosine_tuned'])} | "
        f"{'yes' if t['met']['median_ratio_vs_cosine_tuned'] else 'no'} |",
        f"| (for information) median ratio to the cosine oracle chosen on each task's other seeds (no hindsight "
        f"on the scored seed) | {_crossfit_cell(t)} | - |",
        f"| beats the random policy (win rate > 50%) | {_win_with_ci(summary, 'random')} | "
        f"{_met_with_ci(summary, 'random', t['met']['beats_random'])} |",
        f"| beats the replay of its average schedule | {_win_with_ci(summary, 'replay')} | "
        f"{_met_with_ci(summary, 'replay', t['met']['beats_replay'])} |",
        f"| (harder, for information) beats the replay of its average schedule on each task | "
        f"{_win_with_ci(summary, 'replay_task')} | - |",
        f"| diverges in <= 1% of runs | {_pct(t['policy_divergence_rate'])} | {'yes' if t['met']['divergence'] else 'no'} |",
        f"| at least 5 seeds per task | {cfg['seeds']} | {'yes' if t['met']['at_least_5_seeds'] else 'no'} |",
    ]
    lines += _headroom_section(summary.get("headroom_vs_cosine_tuned") or [], cfg["grid_size"])
    for fam in families:
        p = pol["by_family"][fam]
        lines += [
            "",
            f"## {fam}",
            "",
            f"Learned policy: median final validation loss {_f(p['median_final_val_loss'], 4)}, mean test loss "
            f"{_f(p['mean_test_loss'], 4)}, test accuracy {_f(p['mean_test_accuracy'])}, macro-F1 "
            f"{_f(p['mean_test_macro_f1'])}, divergence {_pct(p['divergence_rate'])}.",
            "",
            _lr_level_line(pol, fam),
            "",
            "| baseline | median final val loss | mean test loss | test acc | macro-F1 | divergence | policy win rate | median ratio [95% CI] |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in summary["rows"]:
            b = r["by_family"][fam]
            lines.append(
                f"| {r['label']} | {_f(b['median_final_val_loss'], 4)} | {_f(b['mean_test_loss'], 4)} | "
                f"{_f(b['mean_test_accuracy'])} | {_f(b['mean_test_macro_f1'])} | {_pct(b['divergence_rate'])} | "
                f"{_pct(b['win_rate'])} | {_ratio(b['median_ratio'])} [{_ratio(b['median_ratio_low'])}, {_ratio(b['median_ratio_high'])}] |"
            )
    if plot_paths:
        lines += ["", "## Plots", ""]
        for path in plot_paths:
            rel = Path(path).relative_to(out) if Path(path).is_relative_to(out) else Path(path)
            lines.append(f"![{rel.stem}]({rel.as_posix()})")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    d = BenchmarkConfig(policy="")
    p = argparse.ArgumentParser(
        prog="hpo-bench",
        description="Benchmark a learned hyperparameter policy against tuned and hand-designed baselines "
        "on held-out task families. Resumable: rerun the same command after an interruption.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--policy",
        required=True,
        help="policy bundle directory (from hpo-train), or a shipped policy's name, e.g. default; it must "
        "control lr (the baselines are learning-rate schedules)",
    )
    p.add_argument(
        "--split", choices=list(SPLITS), default=d.split, help="task families ('test': held out for the benchmark)"
    )
    p.add_argument(
        "--families",
        nargs="+",
        action=NameList,
        default=[],
        help="families to benchmark, overriding --split (space- or comma-separated, as in hpo-train)",
    )
    p.add_argument("--tasks-per-family", type=int, default=d.tasks_per_family, help="tasks sampled per family")
    p.add_argument("--seeds", type=int, default=d.seeds, help="seeds per task")
    p.add_argument("--grid-size", "-K", type=int, default=d.grid_size, help="K, learning rates in the oracles' grid")
    p.add_argument("--grid-decades", type=float, default=d.grid_decades, help="grid spans default LR x 10^[-d, +d]")
    p.add_argument("--task-seed", type=int, default=d.task_seed, help="seed of the task sampler")
    p.add_argument("--total-steps", type=int, default=None, help="override every task's inner step budget")
    p.add_argument("--steps-per-action", type=int, default=None, help="override every task's steps per decision")
    p.add_argument("--out", default=d.out, help="output folder (report.md, benchmark.json, plots/)")
    p.add_argument("--store", default=None, help="SQLite results store (default: OUT/results.sqlite)")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="runs trained together in one batch")
    p.add_argument("--device", default=d.device, help="torch device of the inner models")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch CPU threads (default: torch's, one per core; with --workers, 1 per worker; stored runs are kept "
        "per count, since the CNNs round differently with another)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="processes computing runs side by side, each on --threads threads (default: 1). On CPU, one per core "
        "is the fastest for these small models; the stored runs are the numbers one process computes",
    )
    p.add_argument("--hd-beta-sgd", type=float, default=d.hd_beta_sgd, help="SGD-HD hypergradient learning rate")
    p.add_argument("--hd-beta-adamw", type=float, default=d.hd_beta_adamw, help="Adam-HD hypergradient learning rate")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random policy and the bootstrap")
    p.add_argument(
        "--code-version",
        default=None,
        help="label of stored runs (default: package, protocol and torch versions, a hash of the code that defines an inner run, the device type and, on CPU, the torch thread count; pass a fixed label to reuse runs across code edits knowingly)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hpo-bench`` and ``python -m training.benchmark``."""
    args = build_parser().parse_args(argv)
    try:
        # SIGTERM (kill, a cluster scheduler) stops it as Ctrl-C does: the workers stopped, the hint to resume
        with readable_warnings("hpo-bench"), sigterm_as_interrupt():
            result = run_benchmark(config_from_args(args))
    except KeyboardInterrupt as err:
        print("\ninterrupted: finished runs are in the store; rerun the same command to resume", file=sys.stderr)
        return interrupted_status(err)
    except ValueError as err:  # includes BundleError
        print(f"hpo-bench: error: {_as_flag(str(err))}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.OperationalError) as err:
        if not _cannot_write(err):  # (a broken pipe to a worker, ...: as it is)
            raise
        print(
            f"hpo-bench: error: the benchmark stopped: it cannot write its files ({err}); the finished runs are in "
            "the store: make room (or pass a writable --out or --store) and rerun the same command to resume",
            file=sys.stderr,
        )
        return 1
    t, k = result.summary["targets"], result.summary["config"]["grid_size"]
    print(
        f"benchmark done: {result.computed} runs computed, {result.reused} reused\n"
        f"  report: {result.report_path}\n  json:   {result.json_path}\n"
        f"  policy beats both untuned defaults on {_pct(t['beats_both_untuned_defaults'])} of pairs; "
        f"median ratio to the tuned cosine oracle {_ratio(t['median_ratio_vs_cosine_tuned'])}"
        f"{f' (K = {k}: too coarse for a tuned search, a smoke test)' if k < 5 else ''}; "
        f"win rate vs random {_pct(t['win_rate_vs_random'])}, vs replay {_pct(t['win_rate_vs_replay'])}"
    )
    return 0


def _cannot_write(err: BaseException) -> bool:
    """Whether ``err`` says that the output folder or the store can no longer be written: full, read-only,
    over quota, no permission."""
    if isinstance(err, sqlite3.OperationalError):
        return any(words in str(err) for words in ("disk is full", "readonly database", "disk I/O error"))
    return cannot_write(err)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _as_flag(message: str) -> str:
    """A config error in the command line's words: ``seeds must be...`` reads ``--seeds must be...``."""
    fields = {f.name for f in dataclasses.fields(BenchmarkConfig)}
    name = message.split(" ", 1)[0].split("=", 1)[0]
    if name not in fields:
        return message
    rest = message[len(name) :].replace(" or None", "")  # (None: the flag left out, which a command line cannot say)
    return f"--{name.replace('_', '-')}{' ' + rest[1:] if rest.startswith('=') else rest}"


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """The :class:`BenchmarkConfig` of parsed :func:`build_parser` arguments (ValueError if invalid)."""
    from agents import resolve_policy

    config = BenchmarkConfig(
        policy=args.policy,
        split=args.split,
        families=tuple(args.families),
        tasks_per_family=args.tasks_per_family,
        seeds=args.seeds,
        grid_size=args.grid_size,
        grid_decades=args.grid_decades,
        task_seed=args.task_seed,
        total_steps=args.total_steps,
        steps_per_action=args.steps_per_action,
        out=args.out,
        store=args.store,
        chunk_size=args.chunk_size,
        device=args.device,
        threads=args.threads,
        workers=args.workers,
        hd_beta_sgd=args.hd_beta_sgd,
        hd_beta_adamw=args.hd_beta_adamw,
        bootstrap=args.bootstrap,
        seed=args.seed,
        code_version=args.code_version,
        progress=not args.no_progress,
        plots=not args.no_plots,
    )
    config.policy = str(resolve_policy(config.policy))  # a shipped policy's name, after the other checks
    return config


if __name__ == "__main__":
    raise SystemExit(main())
