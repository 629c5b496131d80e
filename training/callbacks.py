"""Meta-training callbacks: TensorBoard logging, held-out evaluation, atomic checkpoints.

Three SB3 callbacks drive a run of :mod:`training.train`, each usable on its own:

* :class:`HPOEpisodeLogger` logs what happened inside the inner training runs;
* :class:`HeldOutEvalCallback` periodically runs the policy on a fixed set of held-out tasks with
  :func:`training.rollout.run_episodes`, next to the constant schedule and the random policy, and
  keeps the best policy bundle;
* :class:`CheckpointCallback` writes atomic checkpoints that ``hpo-train --resume RUN_DIR`` continues;
  :class:`StopAtCheckpoint` ends training on request (a first Ctrl-C) at the next one it writes.

TensorBoard tags (one run folder per run; the x axis is meta-training timesteps, i.e. decisions):

==========================================  ==========================================================
``rollout/ep_rew_mean``, ``ep_len_mean``    SB3: mean return / length of the last 100 episodes
``train/*``                                  SB3: ``policy_gradient_loss``, ``value_loss``,
                                             ``entropy_loss``, ``approx_kl``, ``clip_fraction``,
                                             ``explained_variance``, ``std``, ``learning_rate`` ...
``time/fps``                                 SB3: meta-training timesteps per second
``hpo/<family>/episode_return``              mean return of the episodes (inner runs) that finished
                                             during the rollout, ``log(L_1 / L_T)`` less penalties
``hpo/<family>/final_val_loss``              mean final validation loss ``L_T`` (finite runs only)
``hpo/<family>/final_loss_ratio``            mean ``L_T / L_0``: final validation loss over the loss
                                             of the untrained model (below 1: it learned)
``hpo/<family>/divergence_rate``             fraction of those episodes that diverged
``hpo/<family>/episodes``                    number of those episodes
``hpo/all/*``                                the same over every family
``hpo/episodes_total``                       episodes finished since the run started
``hparams/<name>``                           geometric mean of each controlled hyperparameter
                                             (``lr``, ``weight_decay``...) over the rollout's steps
``hparams/<name>_log10_change``              mean ``log10(h_t / h_0)``: how far the agent has moved
                                             it from the task's initial value, in decades
``hparams/<name>_final_log10_change``        the same at the end of the finished episodes
``eval/mean_return``                         held-out evaluation: mean return of the deterministic
                                             policy over the fixed held-out tasks
``eval/<family>/mean_return``                the same per held-out family
``eval/constant_mean_return``,               the constant schedule and the random policy on the same
``eval/random_mean_return``                  tasks (computed once; drawn as reference lines)
``eval/return_minus_constant``               policy minus constant mean return (above 0: better)
``eval/win_rate_vs_constant``,               fraction of tasks whose final validation loss beats the
``eval/win_rate_vs_random``                  baseline's
``eval/median_loss_ratio_vs_constant``       median of policy / constant final validation loss
``eval/divergence_rate``                     fraction of held-out runs that diverged
``eval/best_mean_return``                    best ``eval/mean_return`` so far (its bundle is kept)
``eval/schedules`` (image)                   learned vs constant vs random: hyperparameter schedules
                                             and validation curves on some held-out tasks
``settings/markdown`` (text)                 the run's settings as a table (also as TensorBoard hparams)
==========================================  ==========================================================

Checkpoints live in ``RUN_DIR/checkpoints/step_<timesteps>/`` (``model.zip``, ``vecnormalize.pkl``,
``rng_state.pt``, and ``state.json`` written last). Each is built in a temporary sibling directory and
renamed into place, then ``RUN_DIR/checkpoints/latest.json`` is replaced atomically (``os.replace``),
so a ``kill -9`` at any moment leaves the previous complete checkpoint usable.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Figure, HParam, KVWriter, TensorBoardOutputFormat
from stable_baselines3.common.vec_env import VecEnv

from agents.baselines import ConstantSchedule, RandomPolicy
from agents.bundle import PolicyBundle, save_bundle
from agents.factory import get_vec_normalize
from hpo_env import OPTIONAL_FEATURES, ActionDecoder, TaskDistribution, TaskSpec, make_distribution
from training.rollout import EpisodeRecord, run_episodes
from training.stats import median_ratio

__all__ = [
    "CheckpointCallback",
    "EvalSummary",
    "HPOEpisodeLogger",
    "HeldOutEvalCallback",
    "PurgingTensorBoardFormat",
    "StopAtCheckpoint",
    "bundle_from_model",
    "find_latest_checkpoint",
    "make_eval_tasks",
    "prune_checkpoints",
    "read_checkpoint_state",
    "restore_rng_state",
    "schedule_figure",
    "record_settings",
    "save_checkpoint",
    "summarize_episodes",
]

_NOT_TEXT = ("stdout", "log", "json", "csv")  # formats that cannot take images, text or hparams

CHECKPOINT_MODEL = "model.zip"
CHECKPOINT_VECNORM = "vecnormalize.pkl"
CHECKPOINT_RNG = "rng_state.pt"
CHECKPOINT_STATE = "state.json"
LATEST = "latest.json"


# --------------------------------------------------------------------------------------------------
# logging helpers


class PurgingTensorBoardFormat(TensorBoardOutputFormat):
    """SB3's TensorBoard writer, but a resumed run hides the events a killed run wrote after ``purge_step``.

    Args:
        folder: the run folder.
        purge_step: the timestep a resumed run restarts from (None for a fresh run).
    """

    def __init__(self, folder: str, purge_step: int | None = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder, purge_step=purge_step)
        if purge_step is not None:
            # The writer marks the restart with a SessionLog.START at purge_step. The TensorBoard app's reader
            # takes a run folder's first START for the run's own start and purges only at later ones, and a
            # fresh run's writer writes none: marked once, the first resume would purge nothing. A second
            # mark purges the same steps again wherever the first one did.
            restart = Event(step=purge_step, session_log=SessionLog(status=SessionLog.START))
            assert self.writer.file_writer is not None  # (opened by the constructor)
            self.writer.file_writer.add_event(restart)
        self._is_closed = False


def record_settings(
    logger: Any,
    settings: Mapping[str, Any],
    step: int = 0,
    metrics: Sequence[str] = (),
    hparams: Mapping[str, Any] | None = None,
) -> None:
    """Log a run's settings as a markdown table (``settings/markdown``) and ``hparams`` (default: the
    settings) as TensorBoard hparams. TensorBoard keeps the first hparams a run folder gets, so a
    resumed run's hparams should be those that cannot change on resuming."""
    rows = "\n".join(f"|{k}|{_md(v)}|" for k, v in settings.items())
    logger.record("settings/markdown", f"|setting|value|\n|-|-|\n{rows}", exclude=_NOT_TEXT)
    hparams = {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in (settings if hparams is None else hparams).items()
    }
    logger.record("hparams", HParam(hparams, {m: 0.0 for m in metrics}), exclude=_NOT_TEXT)
    logger.dump(step)


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _writers(logger: Any) -> list[KVWriter]:
    return list(getattr(logger, "output_formats", []))


# --------------------------------------------------------------------------------------------------
# per-episode logging


class HPOEpisodeLogger(BaseCallback):
    """Logs the inner training runs that finish during meta-training (``hpo/``, ``hparams/`` tags).

    Values are averaged over the episodes (or steps) of each rollout and written when SB3 writes its
    own rollout statistics, so every tag shares the timestep axis.

    Args:
        hyperparameters: names of the controlled hyperparameters to track (default: the environment
            decoder's, else every hyperparameter in the infos).
    """

    def __init__(self, hyperparameters: Sequence[str] | None = None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.hyperparameters = None if hyperparameters is None else tuple(hyperparameters)
        self.episodes_total = 0
        self._h0: np.ndarray | None = None
        self._reset_accumulators()

    def _reset_accumulators(self) -> None:
        self._episodes: dict[str, list[dict[str, float]]] = defaultdict(list)
        self._log_values: dict[str, list[float]] = defaultdict(list)
        self._log_changes: dict[str, list[float]] = defaultdict(list)
        self._final_changes: dict[str, list[float]] = defaultdict(list)

    def _on_training_start(self) -> None:
        if self.hyperparameters is None:
            decoder = getattr(self.training_env.unwrapped, "decoder", None)
            self.hyperparameters = tuple(decoder.names) if decoder is not None else None
        self._h0 = np.full((self.training_env.num_envs, len(self.hyperparameters or ())), np.nan)
        self._refresh_h0(range(self.training_env.num_envs))

    def _refresh_h0(self, slots: Sequence[int]) -> None:
        reset_infos = getattr(self.training_env.unwrapped, "reset_infos", None)
        if not reset_infos or self._h0 is None or not self.hyperparameters:
            return
        for i in slots:
            hp = reset_infos[i].get("hparams") if i < len(reset_infos) else None
            if hp:
                self._h0[i] = [hp.get(name, np.nan) for name in self.hyperparameters]

    def _on_step(self) -> bool:
        infos: list[dict] = self.locals.get("infos", [])
        dones = np.asarray(self.locals.get("dones", np.zeros(len(infos), bool)), bool)
        if self.hyperparameters is None and infos and "hparams" in infos[0]:
            self.hyperparameters = tuple(infos[0]["hparams"])
            self._h0 = np.full((len(infos), len(self.hyperparameters)), np.nan)
        names = self.hyperparameters or ()
        for i, info in enumerate(infos):
            hp = info.get("hparams")
            if hp:
                for j, name in enumerate(names):
                    value = float(hp.get(name, np.nan))
                    if value > 0 and math.isfinite(value):
                        self._log_values[name].append(math.log10(value))
                        h0 = self._h0[i, j] if self._h0 is not None else np.nan
                        if h0 > 0:
                            change = math.log10(value / h0)
                            self._log_changes[name].append(change)
                            if dones[i]:
                                self._final_changes[name].append(change)
            if dones[i]:
                self._episodes[info.get("task_family", "unknown")].append(_episode_stats(info))
                self.episodes_total += 1
        if dones.any():
            # the slot has already been reset: its reset info describes the next episode
            self._refresh_h0(np.flatnonzero(dones).tolist())
        return True

    def _on_rollout_end(self) -> None:
        everything: list[dict[str, float]] = []
        for family, stats in sorted(self._episodes.items()):
            everything += stats
            self._record_family(family, stats)
        if everything:
            self._record_family("all", everything)
        self.logger.record("hpo/episodes_total", self.episodes_total)
        for name in self.hyperparameters or ():
            if self._log_values[name]:
                self.logger.record(f"hparams/{name}", float(10 ** np.mean(self._log_values[name])))
            if self._log_changes[name]:
                self.logger.record(f"hparams/{name}_log10_change", float(np.mean(self._log_changes[name])))
            if self._final_changes[name]:
                self.logger.record(f"hparams/{name}_final_log10_change", float(np.mean(self._final_changes[name])))
        self._reset_accumulators()

    def _record_family(self, family: str, stats: list[dict[str, float]]) -> None:
        prefix = f"hpo/{family}"
        self.logger.record(f"{prefix}/episodes", len(stats))
        self.logger.record(f"{prefix}/episode_return", float(np.mean([s["return"] for s in stats])))
        self.logger.record(f"{prefix}/divergence_rate", float(np.mean([s["diverged"] for s in stats])))
        finite = [s for s in stats if math.isfinite(s["final_val_loss"])]
        if finite:
            self.logger.record(f"{prefix}/final_val_loss", float(np.mean([s["final_val_loss"] for s in finite])))
            ratios = [s["final_loss_ratio"] for s in finite if math.isfinite(s["final_loss_ratio"])]
            if ratios:
                self.logger.record(f"{prefix}/final_loss_ratio", float(np.mean(ratios)))


def _episode_stats(info: Mapping[str, Any]) -> dict[str, float]:
    final = float(info.get("final_val_loss", np.nan))
    initial = float(info.get("initial_val_loss", np.nan))
    episode = info.get("episode") or {}
    ratio = final / initial if initial > 0 and math.isfinite(initial) else float("nan")
    return {
        "return": float(episode.get("r", np.nan)),
        "final_val_loss": final,
        "final_loss_ratio": ratio,
        "diverged": float(bool(info.get("diverged", False))),
    }


# --------------------------------------------------------------------------------------------------
# held-out evaluation


def make_eval_tasks(
    n_tasks: int,
    *,
    n_seeds: int = 1,
    split: str | TaskDistribution = "validation",
    seed: int = 20240,
) -> list[TaskSpec]:
    """A fixed set of held-out tasks: ``n_tasks`` tasks, cycling through the split's families, each
    repeated with ``n_seeds`` initialisation/minibatch seeds (same data).

    Args:
        n_tasks: distinct tasks (family and data).
        n_seeds: runs per task with different ``TaskSpec.seed``.
        split: a split name (``"validation"``: the families held out for choices made while
            meta-training; ``"test"``: those of the benchmark; ``"train"``, ``"all"``), ``"toy"``, or a
            distribution.
        seed: seed of the generator the tasks are drawn from; the same seed gives the same tasks.
    """
    if int(n_tasks) < 1 or int(n_seeds) < 1:
        raise ValueError(f"n_tasks and n_seeds must be >= 1, got {n_tasks} and {n_seeds}")
    dist = make_distribution(split)
    # Distributions with their own sampler (the toy one) are sampled as they are; the default ones
    # cycle through their families so that every family is evaluated.
    own_sampler = type(dist).sample is not TaskDistribution.sample
    rng = np.random.default_rng(seed)
    tasks = []
    for i in range(int(n_tasks)):
        family = dist.families[i % len(dist.families)]
        base = dist.sample(rng) if own_sampler else dist.sample_family(family, rng)
        tasks.append(base)
        tasks += [base.replace(seed=int(rng.integers(2**31 - 1))) for _ in range(int(n_seeds) - 1)]
    return tasks


def bundle_from_model(model: Any, env: VecEnv | None, decoder: ActionDecoder, frame_stack: int = 1) -> PolicyBundle:
    """An in-memory :class:`PolicyBundle` of a model and the current ``VecNormalize`` statistics of ``env``.

    It sees raw observations exactly as a saved and reloaded bundle would (with the optional
    features that ``env`` observes).
    """
    vecnorm = get_vec_normalize(env) if env is not None else None
    options: dict[str, Any] = env_feature_options(env)
    if vecnorm is None or not vecnorm.norm_obs:
        return PolicyBundle(model, decoder, frame_stack=frame_stack, **options)
    obs_rms: Any = vecnorm.obs_rms  # one RunningMeanStd (the meta-environment's observations are a Box)
    return PolicyBundle(
        model,
        decoder,
        obs_mean=np.array(obs_rms.mean, dtype=np.float64),
        obs_var=np.array(obs_rms.var, dtype=np.float64),
        clip_obs=float(vecnorm.clip_obs),
        epsilon=float(vecnorm.epsilon),
        frame_stack=frame_stack,
        **options,
    )


def env_feature_options(env: VecEnv | None) -> dict[str, bool]:
    """Which optional features the (possibly wrapped) meta-training environment observes, as the
    keyword arguments of :class:`PolicyBundle` and :func:`~agents.save_bundle`."""
    return {name: bool(env is not None and getattr(env.unwrapped, name, False)) for name in OPTIONAL_FEATURES}


class EvalSummary(dict):
    """Summary statistics of a policy's episodes against reference episodes on the same tasks (a dict)."""


def summarize_episodes(
    records: Sequence[EpisodeRecord], references: Mapping[str, Sequence[EpisodeRecord]] | None = None
) -> EvalSummary:
    """Mean return (overall and per family), divergence rate, and comparisons with each reference.

    ``references[name][i]`` must be the run of the same task as ``records[i]``.
    """
    out = EvalSummary()
    returns = np.array([r.episode_return for r in records])
    out["mean_return"] = float(returns.mean()) if len(returns) else float("nan")
    out["divergence_rate"] = float(np.mean([r.diverged for r in records])) if records else float("nan")
    by_family: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_family[r.task.family].append(r.episode_return)
    out["family_mean_return"] = {f: float(np.mean(v)) for f, v in sorted(by_family.items())}
    final = np.array([_final_loss(r) for r in records])
    for name, refs in (references or {}).items():
        if len(refs) != len(records):
            raise ValueError(f"reference {name!r} has {len(refs)} episodes, expected {len(records)}")
        ref_final = np.array([_final_loss(r) for r in refs])
        out[f"{name}_mean_return"] = float(np.mean([r.episode_return for r in refs]))
        out[f"return_minus_{name}"] = out["mean_return"] - out[f"{name}_mean_return"]
        out[f"win_rate_vs_{name}"] = float(np.mean(final < ref_final))
        out[f"median_loss_ratio_vs_{name}"] = median_ratio(final, ref_final)  # both diverged: 1
    return out


def _final_loss(record: EpisodeRecord) -> float:
    # A diverged run counts as infinitely bad, so it loses to any finite run.
    value = record.final_val_loss
    return float(value) if math.isfinite(value) and not record.diverged else float("inf")


class HeldOutEvalCallback(BaseCallback):
    """Every ``eval_freq`` timesteps, run the policy on fixed held-out tasks next to two baselines.

    The policy runs deterministically through an in-memory :class:`~agents.PolicyBundle` (the model
    plus the current ``VecNormalize`` statistics), i.e. exactly as it would after saving. The constant
    schedule and the random policy run once on the same tasks, at the start. Evaluations happen at
    rollout boundaries (after a policy update) and once at the end of training; the best bundle by
    ``eval/mean_return`` is saved to ``best_bundle_path``.

    Args:
        tasks: the held-out tasks (see :func:`make_eval_tasks`).
        decoder: the environment's action decoder.
        eval_freq: timesteps between evaluations (0: only at the end).
        frame_stack: frames stacked by the policy (1 for recurrent policies).
        best_bundle_path: where the best bundle goes (None: not saved).
        bundle_config: extra bundle config (environment, training command...).
        device: torch device of the inner models.
        n_figure_tasks: tasks drawn in the ``eval/schedules`` figure (0: no figure).
        best_mean_return: best value of an earlier run segment (when resuming).
        verbose: 1 prints a line per evaluation.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        decoder: ActionDecoder,
        *,
        eval_freq: int,
        frame_stack: int = 1,
        best_bundle_path: str | os.PathLike | None = None,
        bundle_config: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        device: str = "cpu",
        n_figure_tasks: int = 4,
        best_mean_return: float = -math.inf,
        verbose: int = 1,
    ) -> None:
        super().__init__(verbose)
        if not tasks:
            raise ValueError("HeldOutEvalCallback needs at least one held-out task")
        if int(eval_freq) < 0:
            raise ValueError(f"eval_freq must be >= 0 timesteps, got {eval_freq}")
        self.tasks = list(tasks)
        self.decoder = decoder
        self.eval_freq = int(eval_freq)
        self.frame_stack = int(frame_stack)
        self.best_bundle_path = None if best_bundle_path is None else Path(best_bundle_path)
        self.bundle_config = bundle_config
        self.device = device
        self.n_figure_tasks = int(n_figure_tasks)
        self.best_mean_return = float(best_mean_return)
        self.references: dict[str, list[EpisodeRecord]] = {}
        self.last_summary: EvalSummary | None = None
        self.last_eval_timestep = -1
        self.eval_seconds = 0.0

    def _on_training_start(self) -> None:
        t0 = time.perf_counter()
        if not self.references:
            self.references = {
                "constant": run_episodes(ConstantSchedule(self.decoder), self.tasks, self.decoder, device=self.device),
                "random": run_episodes(
                    RandomPolicy(self.decoder, seed=0), self.tasks, self.decoder, device=self.device
                ),
            }
        self.eval_seconds += time.perf_counter() - t0
        # A resumed run counts eval_freq from its last evaluation, not from the resume: a run stopped
        # more often than eval_freq still evaluates.
        last = self.last_summary.get("timesteps") if self.last_summary else None
        self.last_eval_timestep = int(last) if last is not None else 0

    def _on_rollout_start(self) -> None:
        step = self.model.num_timesteps
        if self.eval_freq > 0 and step - self.last_eval_timestep >= self.eval_freq:
            self.evaluate()

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if self.model.num_timesteps != self.last_eval_timestep or self.last_summary is None:
            self.evaluate()

    def evaluate(self) -> EvalSummary:
        """Run the held-out evaluation now, log it, keep the best bundle; returns the summary."""
        t0 = time.perf_counter()
        step = self.model.num_timesteps
        bundle = bundle_from_model(self.model, self.training_env, self.decoder, self.frame_stack)
        records = run_episodes(bundle, self.tasks, self.decoder, deterministic=True, device=self.device)
        summary = summarize_episodes(records, self.references)
        summary["timesteps"] = step
        improved = summary["mean_return"] > self.best_mean_return
        if improved:
            self.best_mean_return = summary["mean_return"]
            if self.best_bundle_path is not None:
                self._save_best(summary)
        summary["best_mean_return"] = self.best_mean_return
        self.last_summary = summary
        self.last_eval_timestep = step
        log = self.logger
        # SB3 writes an update's train/ statistics with the next rollout's dump: hold them back, so that
        # this dump (at the evaluation's step) writes only the evaluation, and each update keeps one point.
        held = {
            key: (log.name_to_value.pop(key), log.name_to_count.pop(key, None), log.name_to_excluded.pop(key, None))
            for key in list(log.name_to_value)
        }
        # progress.csv's x-axis on the evaluation's row too (TensorBoard has the step; SB3's dump writes it there)
        log.record("time/total_timesteps", step, exclude=("tensorboard",))
        for key in ("mean_return", "divergence_rate", "best_mean_return"):
            log.record(f"eval/{key}", summary[key])
        for name in self.references:
            for key in (f"{name}_mean_return", f"win_rate_vs_{name}"):
                log.record(f"eval/{key}", summary[key])
        log.record("eval/return_minus_constant", summary["return_minus_constant"])
        log.record("eval/median_loss_ratio_vs_constant", summary["median_loss_ratio_vs_constant"])
        for family, value in summary["family_mean_return"].items():
            log.record(f"eval/{family}/mean_return", value)
        if self.n_figure_tasks > 0:
            fig = schedule_figure(records, self.references, self.decoder, self.n_figure_tasks, step)
            log.record("eval/schedules", Figure(fig, close=True), exclude=_NOT_TEXT)
        log.dump(step)
        for key, (value, count, excluded) in held.items():
            log.name_to_value[key] = value
            if count is not None:
                log.name_to_count[key] = count
            if excluded is not None:
                log.name_to_excluded[key] = excluded
        self.eval_seconds += time.perf_counter() - t0
        if self.verbose:
            print(
                f"[eval @ {step} timesteps] held-out mean return {summary['mean_return']:+.3f} "
                f"(constant {summary['constant_mean_return']:+.3f}, random {summary['random_mean_return']:+.3f}; "
                f"wins vs constant {summary['win_rate_vs_constant']:.0%})" + (" new best" if improved else ""),
                flush=True,
            )
        return summary

    def _save_best(self, summary: EvalSummary) -> None:
        if self.best_bundle_path is None:
            return
        vecnorm = get_vec_normalize(self.training_env)
        config = dict(self.bundle_config() if callable(self.bundle_config) else self.bundle_config or {})
        config["evaluation"] = _jsonable(summary)
        config.setdefault("training", {})
        config["training"] = {**config["training"], "timesteps": int(self.model.num_timesteps)}
        save_bundle(
            self.best_bundle_path,
            self.model,
            self.decoder,
            obs_rms=None if vecnorm is None or not vecnorm.norm_obs else vecnorm.obs_rms,
            clip_obs=vecnorm.clip_obs if vecnorm is not None else 10.0,
            epsilon=vecnorm.epsilon if vecnorm is not None else 1e-8,
            frame_stack=self.frame_stack,
            config=config,
            **env_feature_options(self.training_env),
        )


_READABLE = {"lr": "learning rate", "weight_decay": "weight decay", "momentum": "momentum", "val_loss": "val loss"}


def schedule_figure(
    records: Sequence[EpisodeRecord],
    references: Mapping[str, Sequence[EpisodeRecord]],
    decoder: ActionDecoder,
    n_tasks: int = 4,
    step: int | None = None,
) -> Any:
    """A matplotlib figure: per task (columns), each controlled hyperparameter and the validation loss
    (rows) over the run, for the policy and each reference schedule."""
    from matplotlib.figure import Figure as MplFigure

    # one task per family first, then fill up in order
    chosen: list[int] = []
    seen: set[str] = set()
    for i, r in enumerate(records):
        if r.task.family not in seen:
            chosen.append(i)
            seen.add(r.task.family)
    chosen += [i for i in range(len(records)) if i not in chosen]
    chosen = chosen[: max(1, n_tasks)]
    rows = [*decoder.names, "val_loss"]
    # (at least 5 inches: one task's column alone is narrower than the title)
    fig = MplFigure(figsize=(max(3.2 * len(chosen), 5.0), 2.2 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(chosen), squeeze=False)
    series = {"policy": records, **references}
    styles: dict[str, dict[str, Any]] = {
        "policy": dict(color="C0", lw=2),
        "constant": dict(color="C7", ls="--"),
        "random": dict(color="C3", lw=0.8),
    }
    for col, i in enumerate(chosen):
        task = records[i].task
        for row, name in enumerate(rows):
            ax = axes[row][col]
            for label, recs in series.items():
                rec = recs[i]
                values = rec.val_loss if name == "val_loss" else rec.hparams.get(name, [])
                if not len(values):
                    continue
                if name == "val_loss":  # measured after each interval
                    ax.plot(np.arange(1, len(values) + 1), values, label=label, **styles.get(label, {}))
                else:  # held over each interval
                    x = np.arange(len(values) + 1)
                    ax.step(x, [*values, values[-1]], where="post", label=label, **styles.get(label, {}))
            ax.set_yscale("log")
            if col == 0:
                ax.set_ylabel(_READABLE.get(name, name), fontsize=9)
            if row == 0:
                ax.set_title(
                    f"{task.family}/{task.dataset} ({task.task_id[-6:]})\n{task.optimizer} {task.arch}"
                    f"{list(task.hidden)}, start lr {task.lr:.2g}",
                    fontsize=8,
                )
            if row == len(rows) - 1:
                ax.set_xlabel("decision interval", fontsize=9)
            ax.tick_params(labelsize=8)
    axes[0][0].legend(fontsize=7)
    if step is not None:
        fig.suptitle(f"held-out tasks after {step} meta-training timesteps", fontsize=9)
    return fig


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else str(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


# --------------------------------------------------------------------------------------------------
# checkpoints


def _checkpoint_path(root: Path, step: int) -> Path:
    """The folder of the checkpoint at timestep ``step`` under ``root``."""
    return root / f"step_{step:012d}"


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    model: Any,
    *,
    state: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and point ``latest.json`` at it; returns its directory.

    The checkpoint holds the model (with its timestep counter), the ``VecNormalize`` statistics of
    the model's environment, the global RNG states (torch, numpy, random: SB3 samples actions from
    torch's) and ``state.json`` (``num_timesteps`` plus ``state``). Older checkpoints beyond the
    ``keep`` most recent are removed after the pointer moves (``keep=0`` keeps them all).
    """
    if int(keep) < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), got {keep}")
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    step = int(model.num_timesteps)
    final = _checkpoint_path(root, step)
    tmp = root / f".tmp_step_{step:012d}_{os.getpid()}"
    for stale in root.glob(".tmp_step_*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        model.save(tmp / CHECKPOINT_MODEL)
        vecnorm = model.get_vec_normalize_env()
        if vecnorm is not None:
            vecnorm.save(str(tmp / CHECKPOINT_VECNORM))
        torch.save(
            {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),  # noqa: NPY002 (SB3 seeds the legacy global RNG)
                "random": random.getstate(),
                # A meta-agent on the GPU samples its actions from the CUDA generators.
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / CHECKPOINT_RNG,
        )
        payload = {"num_timesteps": step, "saved_at": time.time(), **dict(state or {})}
        _write_synced(tmp / CHECKPOINT_STATE, json.dumps(_jsonable(payload), indent=2))
        if final.exists():  # the same timestep saved twice (e.g. at the end): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / LATEST
    _write_synced(pointer.with_name(f".{LATEST}.tmp"), json.dumps({"checkpoint": final.name, "num_timesteps": step}))
    os.replace(pointer.with_name(f".{LATEST}.tmp"), pointer)
    _fsync_dir(root)
    prune_checkpoints(root, keep, protect=final)
    return final


def prune_checkpoints(checkpoint_dir: str | os.PathLike, keep: int, *, protect: Path | None = None) -> None:
    """Remove the complete checkpoints older than the ``keep`` most recent (``keep=0`` keeps them all),
    never ``protect`` (the one just written)."""
    complete = sorted(p for p in Path(checkpoint_dir).glob("step_*") if (p / CHECKPOINT_STATE).is_file())
    for old in complete[: max(0, len(complete) - keep)] if keep > 0 else ():
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints under ``checkpoint_dir``, oldest first (their names order by timesteps).

    Leftover temporary directories of a killed run are ignored.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.glob("step_*") if (p / CHECKPOINT_STATE).is_file() and (p / CHECKPOINT_MODEL).is_file()
    )


def find_latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``checkpoint_dir`` (None if there is none).

    A ``step_*`` directory only ever appears complete (it is renamed into place after its last
    file is written), so this is the one with the most timesteps; ``latest.json`` names the same
    directory except in the instant between that rename and the pointer's own replacement.
    """
    complete = list_checkpoints(checkpoint_dir)
    return complete[-1] if complete else None


def read_checkpoint_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint directory."""
    path = Path(checkpoint) / CHECKPOINT_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"checkpoint {str(checkpoint)!r} is unreadable ({err}); resume from an older one") from err
    if not isinstance(state, dict) or "num_timesteps" not in state:
        raise ValueError(f"{path} does not hold a checkpoint state (no 'num_timesteps')")
    return state


def restore_rng_state(checkpoint: str | os.PathLike) -> bool:
    """Restore the global RNG states saved with a checkpoint (True if there were any)."""
    path = Path(checkpoint) / CHECKPOINT_RNG
    if not path.is_file():
        return False
    # Our own file, written by save_checkpoint: it holds numpy/random state tuples, not only tensors.
    states = torch.load(path, weights_only=False)
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])  # noqa: NPY002 (SB3 seeds the legacy global RNG)
    random.setstate(states["random"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return True


class CheckpointCallback(BaseCallback):
    """Writes an atomic checkpoint (see :func:`save_checkpoint`) every ``save_freq`` timesteps.

    Checkpoints are taken at rollout boundaries, after a policy update, so the saved timestep counter
    counts exactly the experience the saved weights have learned from; the effective interval is
    ``save_freq`` rounded up to whole rollouts. A last checkpoint is written when training ends.

    Args:
        checkpoint_dir: e.g. ``RUN_DIR/checkpoints``.
        save_freq: timesteps between checkpoints (0: only at the end).
        state_fn: returns extra JSON state to store (best evaluation so far, seeds...).
        keep: how many recent checkpoints to keep (0: all).
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        save_freq: int,
        *,
        state_fn: Callable[[], Mapping[str, Any]] | None = None,
        keep: int = 2,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if int(save_freq) < 0:
            raise ValueError(f"save_freq must be >= 0 timesteps, got {save_freq}")
        if int(keep) < 0:
            raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), got {keep}")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.save_freq = int(save_freq)
        self.state_fn = state_fn
        self.keep = int(keep)
        self.last_saved = -1
        self.last_path: Path | None = None

    def _on_training_start(self) -> None:
        self.last_saved = self.model.num_timesteps
        resumed = _checkpoint_path(self.checkpoint_dir, self.last_saved)  # (the one a resumed run loaded)
        self.last_path = resumed if (resumed / CHECKPOINT_STATE).is_file() else None

    def _on_rollout_start(self) -> None:
        if self.save_freq > 0 and self.model.num_timesteps - self.last_saved >= self.save_freq:
            self.save()

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if self.model.num_timesteps != self.last_saved or self.last_path is None:
            self.save()

    def save(self) -> Path:
        state = dict(self.state_fn() if self.state_fn is not None else {})
        self.last_path = save_checkpoint(self.checkpoint_dir, self.model, state=state, keep=self.keep)
        self.last_saved = self.model.num_timesteps
        if self.verbose:
            print(f"checkpoint: {self.last_path}", flush=True)
        return self.last_path


class StopAtCheckpoint(BaseCallback):
    """Ends training at the first rollout boundary (after a policy update, where checkpoints are consistent)
    at which ``requested()`` returns an exception: writes a checkpoint there with ``checkpointer`` (unless it
    has one at this step already, e.g. the one a resumed run started from), then raises the exception.

    Put it before the callbacks that work at rollout boundaries (the held-out evaluation): a stopped run
    leaves that work to the run that resumes from the checkpoint, at the same step. Put it after them too
    (the same callback twice in the list): a stop asked for during that work stops at its end, with the
    checkpoint of that step, rather than after one more rollout.

    Args:
        checkpointer: the run's :class:`CheckpointCallback` (also in the callback list, after this one).
        requested: None to go on, or the exception (class) to stop with, e.g. a
            :class:`training.cli.StopRequest`'s ``requested``.
    """

    def __init__(
        self,
        checkpointer: CheckpointCallback,
        requested: Callable[[], BaseException | type[BaseException] | None],
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.checkpointer = checkpointer
        self.requested = requested
        self.stopped_at: Path | None = None  # the checkpoint the run stopped at

    def _on_rollout_start(self) -> None:
        stop = self.requested()
        if stop is None:
            return
        saved = self.checkpointer
        if saved.last_path is None or saved.last_saved != self.model.num_timesteps:
            saved.save()
        self.stopped_at = saved.last_path
        raise stop

    def _on_step(self) -> bool:
        return True
