"""The meta-agent factory: RecurrentPPO (and a frame-stacked MLP PPO control) over :class:`~hpo_env.HPOVecEnv`.

Two functions build everything meta-training needs, from one frozen :class:`MetaAgentConfig`::

    from agents import get_preset, make_meta_env, make_meta_agent

    config = get_preset("quick")                       # or get_preset("full", n_envs=8, ...)
    env = make_meta_env(config, seed=0)                 # HPOVecEnv -> VecMonitor -> VecNormalize
    model = make_meta_agent(env, config, seed=0)        # RecurrentPPO("MlpLstmPolicy", ...)
    model.learn(10_000)

The environment stack is ``HPOVecEnv -> VecMonitor -> VecNormalize(norm_obs=True)`` and, for the
``"framestack"`` control, ``-> VecFrameStack(n_stack)``: frames are stacked *after* normalisation, the
order :class:`~agents.PolicyBundle` reproduces at deployment. Rewards are left unnormalised: they
telescope to ``log(L_1 / L_T)``, already a task-independent scale.

Why these defaults (see :data:`PRESETS`):

* ``n_steps`` is at least the longest episode (29 decisions on the default distribution), so every
  rollout holds whole inner training runs and the LSTM learns from complete sequences.
* ``gamma = 0.995`` and ``gae_lambda = 0.95``: the reward telescopes, so a discount close to 1 makes
  the return track the *final* validation loss (short horizons bias towards tiny learning rates).
* A 64-unit LSTM and few large minibatches keep the PPO update cheap next to the inner training (a
  256-unit LSTM was 6-15x slower per timestep on this project's 2-core reference machine). Twice the
  slots and twice the minibatch of ``full`` (64 and 2,048) were level over four seeds (levers.md,
  twenty-sixth round), so ``full`` keeps 32 and 1,024.
* ``lr_step = 0.5``: the learning rate may move half a decade per decision. Tuned learning rates are
  often 10-30x the optimiser's default and runs are only 10-30 decisions long; 0.5 beat the old 0.25
  on the held-out benchmark, and 1.0 learned zig-zag schedules that failed a deployment example
  (benchmarks/reports/levers.md).
* ``action_change_penalty = 0`` (off): a training-only cost on how much the action moves between
  decisions, a lever against zig-zag schedules; 0.01 hurt on the held-out benchmark, most on small
  overfitting datasets (benchmarks/reports/levers.md).
* ``init_lr_spread = 1.0`` and ``init_lr_center = 0.5`` in the ``full`` preset (the dataclass and
  the ``quick`` preset keep 0.5 and 0, the benchmark's draws): meta-training tasks start at the default
  learning rate times 10**U(-0.5, 1.5), centred on the meta-training families' best rate (about 4.4x
  the default), so about half of them start too high and must be cut. Over four seeds, against two
  of the previous settings on the same machine: beating both untuned defaults on 57.4% of the
  held-out pairs on average (53.3%), geometric mean ratio to the tuned cosine oracle 1.033 (1.040),
  median level (1.018 and 1.019); not reliably cooler (learning-rate levels 1.04x-1.72x). But 2 of
  the 15 deployment CNN runs of five such seeds died with SGD pushed to the bound of 1.0 (levers.md,
  seventeenth and eighteenth rounds), hence the cap below. Widening the spread symmetrically, 10**±1, had given mixed results (third round).
  Widening the centred spread to 1.5 (10**U(-1, 2)) failed its rule over four seeds: mean share and
  median better (60.6%, 1.014), geometric mean worse (1.034), hotter, and two seeds killed
  deployment CNNs despite the cap (levers.md, twenty-seventh round).
* ``lr_max_rise = 1.5`` in the ``full`` preset (None, no cap, in the dataclass and ``quick``): the
  learning rate never rises above 31.6x the run's starting one, in meta-training and in deployment.
  It rarely binds on the benchmark's tasks (the largest rise of any earlier policy run there was 1.3-1.9
  decades), and it removes the deaths: two centred seeds retrained with it killed none of 20
  deployment CNN runs (test loss 0.119 and 0.258 over 10 seeds each) and were level with the centred
  seeds on the held-out benchmark (levers.md, nineteenth round).
* ``task_group_size = 2`` and ``gae_lambda = 1.0`` in the ``full`` preset (1 and 0.95 in the
  dataclass and ``quick``): each meta-training task runs in two slots from the same initialisation
  and minibatches, each rewarded with its gain over the pair's mean, and PPO's advantages use whole
  observed returns (the critic cannot see the sibling, so its estimates of a relative return are
  poor). Groups alone trained hotter and lost; with whole returns both seeds beat their ungrouped
  pairs on the held-out benchmark (levers.md, twenty-first round), and pairs make meta-training
  about 1.4x faster (they share dataset builds and stacks). Groups of 4, 1.5x faster again, were
  worse over four seeds a side (54.1% against 58.75% beating both defaults; twenty-fifth round).
* ``lr_gain_spread = 0`` (off; an option): hidden learning-rate gains in meta-training, 10**U(-0.5, 0.5)
  on the rate each task's optimiser steps with, were meant to stop the policy regressing to one
  learned rate per family on held-out tasks whose best rate is far from the default. Both seeds
  trained hotter (learning-rate level 1.52x and 1.51x the tuned oracle's) and were worse on the
  held-out benchmark, in every headroom bin (levers.md, twenty-third round).
* ``learning_rate = 1e-3`` in the ``full`` preset (it was 3e-4): PPO's updates at 3e-4 were small
  (approximate KL ~0.005, 1.5-6% of samples clipped); at 1e-3 (KL ~0.01) the policy's schedules
  depend more on the run (its learning rate three decisions in ranges 0.3x-12x the initial one
  across held-out tasks instead of a fixed 5.6x). Over two seeds it was better or level on three
  held-out task sets; one seed is the shipped policy (benchmarks/reports/levers.md).
* ``lr_step_up = None``: increases as large as cuts; capping them at 0.25 decades (a cautious
  warm-up) was worse on the held-out benchmark (benchmarks/reports/levers.md).
* ``log_std_init = -0.5``: exploration noise of about 0.6 in a ``[-1, 1]`` action, instead of SB3's
  default std of 1 that mostly hits the clip.
* ``epochs_feature = True`` in both presets (the dataclass default stays False): the policy observes
  how many passes over its training set the run makes. Without it, its first decision could not tell
  a small dataset trained for hundreds of epochs (which overfits, and whose best learning rate is often
  below the default) from a run that needs a larger rate. Over three seeds it improved every pooled
  held-out number (median ratio to the tuned cosine oracle 1.012-1.019 against 1.020-1.031, geometric
  mean 1.026-1.042 against 1.051-1.091); a deployed policy then needs ``epochs=`` (levers.md,
  eleventh round).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from stable_baselines3.common.vec_env import (
    VecEnv,
    VecEnvWrapper,
    VecFrameStack,
    VecMonitor,
    VecNormalize,
    unwrap_vec_normalize,
)

from hpo_env import ActionDecoder, HPOVecEnv, TaskDistribution, make_distribution
from hpo_env.checks import check_ordered, is_integer, is_number
from hpo_env.features import OBS_BOUND
from hpo_env.tasks import DEFAULT_LR_SPREAD, SPLITS, check_families

if TYPE_CHECKING:
    from gymnasium import spaces
    from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs

__all__ = [
    "ALGORITHMS",
    "ActionChangePenalty",
    "GroupRelativeReward",
    "ReferenceBaseline",
    "PRESETS",
    "MetaAgentConfig",
    "get_preset",
    "frame_stack_of",
    "get_vec_normalize",
    "make_meta_agent",
    "make_meta_env",
]

#: Meta-agent kinds: ``"recurrent"`` (RecurrentPPO with an LSTM) and ``"framestack"`` (MLP PPO control).
ALGORITHMS = ("recurrent", "framestack")


@dataclass(frozen=True)
class MetaAgentConfig:
    """Everything that defines a meta-agent and the vectorised environment it trains on.

    Attributes:
        algorithm: ``"recurrent"`` (``sb3_contrib.RecurrentPPO``, ``"MlpLstmPolicy"``) or
            ``"framestack"`` (``stable_baselines3.PPO``, ``"MlpPolicy"`` over stacked observations).
        n_envs: parallel inner training runs (slots of the batched :class:`~hpo_env.HPOVecEnv`).
        n_steps: decisions per slot per rollout; a rollout holds ``n_envs * n_steps`` timesteps.
        batch_size: timesteps per PPO minibatch (RecurrentPPO cuts them into whole sequences).
        n_epochs: passes over each rollout.
        learning_rate: Adam learning rate of the meta-agent (at the start, if ``learning_rate_end`` is set).
        learning_rate_end: if set, the learning rate decays linearly from ``learning_rate`` to this value
            over the run (SB3's ``LinearSchedule`` of the remaining progress); None keeps it constant.
            SB3 measures progress against the total of the current ``learn()`` call, so extending a
            finished run (``hpo-train --resume RUN --total-timesteps 2T``) resumes it at the rate that
            point of the *new* schedule has (halfway: the mean of the two), not at the end rate.
        gamma: discount factor.
        gae_lambda: GAE smoothing.
        clip_range: PPO's ratio clip.
        ent_coef: entropy bonus.
        vf_coef: value-loss weight.
        max_grad_norm: gradient clipping of the meta-agent.
        target_kl: stop an update's epochs early beyond this KL (None: never).
        lstm_hidden_size: LSTM units (recurrent only).
        net_arch: hidden layers of the actor and critic heads (after the LSTM, or of the MLP).
        log_std_init: initial log standard deviation of the Gaussian actions.
        frame_stack: observations stacked for the ``"framestack"`` control (ignored for recurrent).
        norm_obs: normalise observations with running statistics (``VecNormalize``).
        norm_reward: normalise rewards too (off: the telescoping reward is already well scaled).
        clip_obs: clip normalised observations to ``[-clip_obs, clip_obs]``.
        task_distribution: meta-training tasks: ``"train"``, ``"all"``, ``"toy"`` or ``"test"``.
        task_families: meta-training task families replacing those of ``task_distribution``'s split
            (None: the split's own), e.g. the train split plus ``"glyphs_cnn"``.
        hyperparameters: the controlled hyperparameters, in action order.
        divergence_penalty: return of a diverged inner run.
        lr_step: largest learning-rate change per decision, in decades (None: the environment's
            default of 0.25, :data:`hpo_env.DEFAULT_HYPERPARAMETERS`); ignored when ``"lr"`` is not
            controlled.
        lr_step_up: largest learning-rate *increase* per decision, in decades, if it differs from
            ``lr_step`` (None: the same). A smaller one makes a cautious controller: it raises the
            rate gradually but can still cut it by ``lr_step`` when a run goes wrong.
        lr_max_rise: the learning rate never rises more than this many decades above the run's
            initial one (None: only the absolute bound of 1.0 caps it). 1.5 keeps it below 31.6x the
            starting rate, in meta-training and wherever the policy is deployed. Ignored when
            ``"lr"`` is not controlled.
        init_lr_spread: meta-training tasks start from the optimiser's default learning rate times
            ``10 ** U(-init_lr_spread, init_lr_spread)`` (decades). The default, 0.5, is the spread of
            every built-in split and so of the benchmark's held-out tasks; a wider one shows the agent
            more runs that start too high (and must be cut) or too low.
        init_lr_center: shifts that range by this many decades: ``10 ** (init_lr_center +
            U(-init_lr_spread, init_lr_spread))`` (default 0). The meta-training families' best rates
            lie about 0.6 decades above the default; with ``init_lr_center = 0.5`` and
            ``init_lr_spread = 1.0`` about half the tasks start above their best rate (levers.md,
            seventeenth to nineteenth rounds; the ``full`` preset's setting).
        lr_gain_spread: every meta-training task also draws a hidden factor ``10 ** U(-s, s)`` on the
            learning rate its optimiser steps with (:attr:`hpo_env.TaskSpec.lr_gain`; default 0: none):
            the agent observes and sets the nominal rate, so a family's best *observed* rate varies by
            that factor and the agent must read the run rather than a rate it has learned by heart.
            Deployment and the benchmark never have a gain.
        action_change_penalty: training-time reward shaping: each decision after an episode's first
            costs ``action_change_penalty * sum(|a_t - a_{t-1}|)`` (clipped actions), which discourages
            zig-zag schedules. 0 turns it off. Only the agent's reward is shaped: the environment's
            reward, the monitored returns and every evaluation stay the validation gain.
        reference_reward: train on the validation gain *over a reference run*: every meta-training
            task is also trained at the optimiser's default learning rate, from the same
            initialisation and minibatch order, and the agent's reward is its own log-loss gain
            minus the reference's (:class:`ReferenceBaseline`). A control variate for the policy
            gradient; doubles the inner training work of meta-training. As for the penalty, the
            monitored returns and every evaluation stay the validation gain.
        task_group_size: train each meta-training task in this many slots side by side, from the
            same initialisation and minibatch order, and reward each slot with its gain minus the
            group's mean (:class:`GroupRelativeReward`, the baseline of RLOO and GRPO): only what the
            actions changed is left in the returns. Costs no extra inner training, but a rollout
            sees ``n_envs / task_group_size`` tasks. 1 turns it off; it must divide ``n_envs``.
        gradient_features: also observe the gradient features (``grad_cosine``, ``grad_norm``; see
            :mod:`hpo_env.features`). The policy's bundle records it, and the deployed scheduler then
            reads the optimiser's gradients at every step.
        epochs_feature: also observe how many passes over its training set each run makes
            (``log_epochs``; see :mod:`hpo_env.features`). The policy's bundle records it, and the
            deployed scheduler then needs ``epochs=``.
    """

    algorithm: str = "recurrent"
    n_envs: int = 16
    n_steps: int = 32
    batch_size: int = 256
    n_epochs: int = 4
    learning_rate: float = 3e-4
    learning_rate_end: float | None = None
    gamma: float = 0.995
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = None
    lstm_hidden_size: int = 64
    net_arch: tuple[int, ...] = (64,)
    log_std_init: float = -0.5
    frame_stack: int = 4
    norm_obs: bool = True
    norm_reward: bool = False
    clip_obs: float = OBS_BOUND
    task_distribution: str = "train"
    task_families: tuple[str, ...] | None = None
    hyperparameters: tuple[str, ...] = ("lr", "weight_decay")
    divergence_penalty: float = 1.0
    lr_step: float | None = 0.5
    lr_step_up: float | None = None
    lr_max_rise: float | None = None
    action_change_penalty: float = 0.0
    reference_reward: bool = False
    task_group_size: int = 1
    init_lr_spread: float = DEFAULT_LR_SPREAD
    init_lr_center: float = 0.0
    lr_gain_spread: float = 0.0
    gradient_features: bool = False
    epochs_feature: bool = False

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        for name in ("n_envs", "n_steps", "batch_size", "n_epochs", "lstm_hidden_size", "frame_stack"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"MetaAgentConfig.{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name, low, high, low_open in (
            ("learning_rate", 0.0, math.inf, True),
            ("clip_range", 0.0, math.inf, True),
            ("clip_obs", 0.0, math.inf, True),
            ("ent_coef", 0.0, math.inf, False),
            ("vf_coef", 0.0, math.inf, True),
            ("max_grad_norm", 0.0, math.inf, True),
            ("divergence_penalty", 0.0, math.inf, False),
            ("gamma", 0.0, 1.0, True),
            ("gae_lambda", 0.0, 1.0, True),
        ):
            value = getattr(self, name)
            ok = is_number(value) and math.isfinite(value)
            if not ok or value < low or (low_open and value == low) or value > high:
                if math.isfinite(high):
                    bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
                else:
                    bound = f"{'>' if low_open else '>='} {low:g}"
                raise ValueError(f"MetaAgentConfig.{name} must be a finite number {bound}, got {value!r}")
        if self.target_kl is not None and not (
            is_number(self.target_kl) and math.isfinite(self.target_kl) and self.target_kl > 0
        ):
            raise ValueError(f"MetaAgentConfig.target_kl must be a finite number > 0 or None, got {self.target_kl!r}")
        if isinstance(self.hyperparameters, str):  # one name, not its letters
            object.__setattr__(self, "hyperparameters", (self.hyperparameters,))
        if isinstance(self.task_families, str):
            object.__setattr__(self, "task_families", (self.task_families,))
        if not all(is_integer(w) and w >= 1 for w in self.net_arch):
            raise ValueError(f"MetaAgentConfig.net_arch must hold positive layer widths, got {self.net_arch!r}")
        if isinstance(self.task_distribution, str) and self.task_distribution not in (*SPLITS, "toy"):
            raise ValueError(
                f"MetaAgentConfig.task_distribution must be one of {[*SPLITS, 'toy']}, got {self.task_distribution!r}"
            )
        if self.n_steps < 2:
            raise ValueError(f"MetaAgentConfig.n_steps must be >= 2 (GAE needs a next step), got {self.n_steps}")
        rollout = self.n_steps * self.n_envs
        # (RecurrentPPO normalises every minibatch's advantages; SB3's PPO skips a minibatch of one)
        if self.batch_size < 2 or (self.algorithm == "recurrent" and rollout % self.batch_size == 1):
            raise ValueError(
                f"MetaAgentConfig.batch_size={self.batch_size} leaves a PPO minibatch of one timestep (a rollout of "
                f"n_steps x n_envs = {rollout} cut into minibatches of {self.batch_size}), whose advantages cannot be "
                "normalised (the standard deviation of one value): choose a batch size >= 2 that divides the rollout, "
                f"e.g. {min((d for d in range(2, rollout + 1) if rollout % d == 0), key=lambda d: abs(d - self.batch_size))}"
            )
        if self.learning_rate_end is not None and not 0 <= self.learning_rate_end <= self.learning_rate:
            raise ValueError(
                f"MetaAgentConfig.learning_rate_end must lie in [0, learning_rate = {self.learning_rate}] (a decay), "
                f"got {self.learning_rate_end!r}; use None for a constant learning rate"
            )
        if not -5 <= self.log_std_init <= 1:
            raise ValueError(
                f"MetaAgentConfig.log_std_init must lie in [-5, 1] (an exploration noise of exp(value), 0.007-2.7 in a "
                f"[-1, 1] action), got {self.log_std_init!r}"
            )
        object.__setattr__(self, "net_arch", tuple(int(w) for w in self.net_arch))
        check_ordered(self.hyperparameters, "MetaAgentConfig.hyperparameters")  # in action order
        object.__setattr__(self, "hyperparameters", tuple(self.hyperparameters))
        for name in ("lr_step", "lr_step_up"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= 3):
                raise ValueError(f"MetaAgentConfig.{name} must lie in (0, 3] decades per decision, got {value!r}")
        if self.lr_max_rise is not None and not (0 < self.lr_max_rise <= 5):
            raise ValueError(
                "MetaAgentConfig.lr_max_rise must lie in (0, 5] decades above the run's initial learning rate"
                f" (1.5 caps it at 31.6x the start), got {self.lr_max_rise!r}; use None for no relative cap"
            )
        if self.lr_step_up is not None and "lr" not in self.hyperparameters:
            raise ValueError(
                f"MetaAgentConfig.lr_step_up is set but 'lr' is not controlled ({list(self.hyperparameters)})"
            )
        if not 0 <= self.action_change_penalty < 1:
            raise ValueError(
                "MetaAgentConfig.action_change_penalty must lie in [0, 1) (reward units per unit of action"
                f" change; 0.01 is a mild setting), got {self.action_change_penalty!r}"
            )
        if not isinstance(self.task_group_size, int) or self.task_group_size < 1 or self.n_envs % self.task_group_size:
            raise ValueError(
                f"MetaAgentConfig.task_group_size must be a positive integer dividing n_envs = {self.n_envs},"
                f" got {self.task_group_size!r}"
            )
        if self.task_group_size > 1 and self.reference_reward:
            raise ValueError(
                "MetaAgentConfig: reference_reward and task_group_size > 1 are two baselines for the same reward;"
                " the group's mean would cancel the reference run. Choose one"
            )
        if isinstance(self.task_distribution, TaskDistribution):
            raise TypeError("MetaAgentConfig.task_distribution is a name; pass a TaskDistribution to make_meta_env")
        if self.task_families is not None:
            object.__setattr__(
                self, "task_families", check_families(self.task_families, "MetaAgentConfig.task_families")
            )
            if self.task_distribution == "toy":
                raise ValueError(
                    "MetaAgentConfig.task_families replaces a split's families; the 'toy' distribution has none"
                )
        if not 0 <= self.init_lr_spread <= 3:
            raise ValueError(
                "MetaAgentConfig.init_lr_spread must lie in [0, 3] decades around the optimiser's default"
                f" learning rate (0.5 is the benchmark's), got {self.init_lr_spread!r}"
            )
        if not -3 <= self.init_lr_center <= 3:
            raise ValueError(
                "MetaAgentConfig.init_lr_center must lie in [-3, 3] decades from the optimiser's default"
                f" learning rate (0 is the benchmark's), got {self.init_lr_center!r}"
            )
        if not 0 <= self.lr_gain_spread <= 2:
            raise ValueError(
                "MetaAgentConfig.lr_gain_spread must lie in [0, 2] decades (a hidden factor 10**U(-s, s) on each"
                f" meta-training task's learning rate; 0: none), got {self.lr_gain_spread!r}"
            )
        lr_draws = (self.init_lr_spread != DEFAULT_LR_SPREAD, self.init_lr_center != 0, self.lr_gain_spread != 0)
        if any(lr_draws) and self.task_distribution == "toy":
            raise ValueError(
                "the 'toy' task distribution has its own fixed learning rates; init_lr_spread, init_lr_center and"
                " lr_gain_spread apply to the built-in splits ('train', 'all', 'test') only"
            )
        # Unknown hyperparameter names fail here, not when the environment is built.
        ActionDecoder(
            self.hyperparameters,
            max_log10_change=self.max_log10_change,
            max_log10_increase=self.max_log10_increase,
            max_log10_above_initial=self.max_log10_above_initial,
        )

    def meta_task_distribution(self, override: TaskDistribution | str | None = None) -> TaskDistribution:
        """The meta-training :class:`TaskDistribution`: ``override`` (an instance is used as is) or
        ``task_distribution``, a split name (or ``task_families``), with this config's ``init_lr_spread``,
        ``init_lr_center`` and ``lr_gain_spread``."""
        spread: dict[str, Any] = {
            "lr_spread": self.init_lr_spread,
            "lr_center": self.init_lr_center,
            "lr_gain_spread": self.lr_gain_spread,
        }
        if override is None and self.task_families is not None:
            return TaskDistribution(self.task_families, name="custom", **spread)
        name = self.task_distribution if override is None else override
        return make_distribution(name, **spread)

    @property
    def max_log10_change(self) -> dict[str, float] | None:
        """The ``max_log10_change`` argument of the environment (only what differs from its default)."""
        if self.lr_step is None or "lr" not in self.hyperparameters:
            return None
        return {"lr": float(self.lr_step)}

    @property
    def max_log10_increase(self) -> dict[str, float] | None:
        """The ``max_log10_increase`` argument of the environment (None: increases as large as decreases)."""
        return None if self.lr_step_up is None else {"lr": float(self.lr_step_up)}

    @property
    def max_log10_above_initial(self) -> dict[str, float] | None:
        """The ``max_log10_above_initial`` argument of the environment (None: no cap relative to the start)."""
        if self.lr_max_rise is None or "lr" not in self.hyperparameters:
            return None
        return {"lr": float(self.lr_max_rise)}

    @property
    def rollout_size(self) -> int:
        """Timesteps collected per rollout (``n_envs * n_steps``)."""
        return self.n_envs * self.n_steps

    def replace(self, **changes: Any) -> MetaAgentConfig:
        """A copy with some fields changed (validated again); ``None`` values are ignored."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown MetaAgentConfig fields {sorted(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Named configurations. ``quick``: about 2 minutes of meta-training on 2 CPU cores (with the
#: training script's budget); ``full``: about 25-65 minutes. Both train on the ``"train"`` families.
PRESETS: dict[str, MetaAgentConfig] = {
    "quick": MetaAgentConfig(
        n_envs=16, n_steps=32, batch_size=256, n_epochs=4, learning_rate=5e-4, epochs_feature=True
    ),
    "full": MetaAgentConfig(
        n_envs=32,
        n_steps=64,
        batch_size=1024,
        n_epochs=5,
        learning_rate=1e-3,
        epochs_feature=True,
        init_lr_spread=1.0,
        init_lr_center=0.5,
        lr_max_rise=1.5,
        task_group_size=2,
        gae_lambda=1.0,
    ),
}


def get_preset(name: str, **overrides: Any) -> MetaAgentConfig:
    """A preset's :class:`MetaAgentConfig`, with ``overrides`` applied (``None`` values are ignored, as
    for options not given on the command line: to turn off a preset's setting, e.g. its learning-rate
    cap, use ``get_preset("full").replace(lr_max_rise=None)``).

    Raises:
        ValueError: an unknown preset or field.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    if overrides.get("task_distribution") == "toy":
        # The toy tasks have fixed learning rates: the preset's starting-rate draws do not apply to them.
        for field, default in (("init_lr_spread", DEFAULT_LR_SPREAD), ("init_lr_center", 0.0), ("lr_gain_spread", 0.0)):
            if overrides.get(field) is None:
                overrides[field] = default
    return PRESETS[name].replace(**overrides)


def make_meta_env(
    config: MetaAgentConfig,
    *,
    seed: int | None = None,
    task_distribution: TaskDistribution | str | None = None,
    device: str = "cpu",
    vec_normalize_path: str | os.PathLike | None = None,
    workers: int = 1,
) -> VecEnv:
    """The vectorised meta-training environment for ``config``.

    Args:
        config: the agent configuration (number of slots, hyperparameters, normalisation...).
        seed: slot ``i`` samples its tasks from a generator seeded with ``seed + i``.
        task_distribution: overrides ``config.task_distribution`` (a name, given ``config.init_lr_spread``,
            or a :class:`TaskDistribution`, used as is).
        device: torch device of the inner models.
        vec_normalize_path: a ``VecNormalize`` saved with ``.save()`` (a checkpoint's): its running
            statistics and settings replace fresh ones, to resume training.
        workers: processes that step the slots (:class:`~hpo_env.subproc.HPOSubprocVecEnv`; they share the
            caller's torch thread count, at least one thread each); 1 steps them here, in one
            :class:`~hpo_env.HPOVecEnv`. The slots draw the same tasks either way; their numbers agree up
            to float rounding.

    Returns:
        ``HPOVecEnv -> VecMonitor [-> ReferenceBaseline | GroupRelativeReward] [-> ActionChangePenalty]
        -> VecNormalize`` (``-> VecFrameStack`` for the framestack control); a baseline wrapper only with
        ``config.reference_reward`` or ``config.task_group_size > 1``, the penalty wrapper only when
        ``config.action_change_penalty > 0``.
    """
    if not isinstance(config, MetaAgentConfig):
        raise TypeError(f"config must be a MetaAgentConfig, got {type(config).__name__}")
    venv_kwargs: dict[str, Any] = dict(
        hyperparameters=config.hyperparameters,
        divergence_penalty=config.divergence_penalty,
        gradient_features=config.gradient_features,
        epochs_feature=config.epochs_feature,
        max_log10_change=config.max_log10_change,
        max_log10_increase=config.max_log10_increase,
        max_log10_above_initial=config.max_log10_above_initial,
        device=device,
        seed=seed,
        reference_runs=config.reference_reward,
        task_group_size=config.task_group_size,
    )
    distribution = config.meta_task_distribution(task_distribution)
    venv: VecEnv
    if workers == 1:
        venv = HPOVecEnv(config.n_envs, distribution, **venv_kwargs)
    else:
        import torch

        from hpo_env.subproc import HPOSubprocVecEnv

        venv = HPOSubprocVecEnv(
            config.n_envs,
            distribution,
            workers=workers,
            threads=max(1, torch.get_num_threads() // workers),
            **venv_kwargs,
        )
    try:
        return _wrap_meta_env(venv, config, vec_normalize_path)
    except BaseException:
        venv.close()  # (an environment's worker processes too)
        raise


def _wrap_meta_env(venv: VecEnv, config: MetaAgentConfig, vec_normalize_path: str | os.PathLike | None) -> VecEnv:
    venv = VecMonitor(venv)
    if config.reference_reward:
        venv = ReferenceBaseline(venv)
    if config.task_group_size > 1:
        venv = GroupRelativeReward(venv)
    if config.action_change_penalty > 0:
        venv = ActionChangePenalty(venv, config.action_change_penalty)
    if vec_normalize_path is not None:
        venv = VecNormalize.load(str(vec_normalize_path), venv)
        venv.training = True
    else:
        venv = VecNormalize(
            venv,
            norm_obs=config.norm_obs,
            norm_reward=config.norm_reward,
            clip_obs=config.clip_obs,
            gamma=config.gamma,
        )
    if config.algorithm == "framestack" and config.frame_stack > 1:
        venv = VecFrameStack(venv, config.frame_stack)
    return venv


def make_meta_agent(
    env: VecEnv,
    config: MetaAgentConfig,
    *,
    seed: int | None = None,
    device: str = "auto",
    verbose: int = 0,
    policy_kwargs: dict[str, Any] | None = None,
) -> Any:
    """A fresh ``RecurrentPPO`` (or ``PPO`` for the framestack control) over ``env``.

    Args:
        env: the environment from :func:`make_meta_env` (any SB3 ``VecEnv`` with a Box action space).
        config: the agent configuration.
        seed: seeds SB3's random generators (policy initialisation and action sampling). SB3 draws
            its actions from torch's *global* generator and seeds it (with Python's and NumPy's) through
            ``set_random_seed``, so a seed here re-seeds the process's global generators, as any SB3
            model does. None does not seed them, but the policy's initialisation (and ``learn``'s
            actions) still draw from torch's: the caller's state decides the model, and the draws
            shift the caller's own. Loading a saved policy (:func:`agents.load_bundle`) does not
            touch them.
        device: torch device of the policy: ``"auto"``, ``"cpu"``, ``"cuda"``...
        verbose: SB3's verbosity.
        policy_kwargs: extra arguments of the policy, merged over the config's.
    """
    if not isinstance(config, MetaAgentConfig):
        raise TypeError(f"config must be a MetaAgentConfig, got {type(config).__name__}")
    net_arch = list(config.net_arch)
    kwargs: dict[str, Any] = {"net_arch": {"pi": net_arch, "vf": net_arch}, "log_std_init": config.log_std_init}
    learning_rate: Any = config.learning_rate
    if config.learning_rate_end is not None:
        from stable_baselines3.common.utils import LinearSchedule

        learning_rate = LinearSchedule(config.learning_rate, config.learning_rate_end, end_fraction=1.0)
    common = dict(
        learning_rate=learning_rate,
        n_steps=config.n_steps,
        batch_size=config.batch_size,
        n_epochs=config.n_epochs,
        gamma=config.gamma,
        gae_lambda=config.gae_lambda,
        clip_range=config.clip_range,
        ent_coef=config.ent_coef,
        vf_coef=config.vf_coef,
        max_grad_norm=config.max_grad_norm,
        target_kl=config.target_kl,
        seed=seed,
        device=device,
        verbose=verbose,
    )
    if config.algorithm == "recurrent":
        from sb3_contrib import RecurrentPPO

        kwargs.update(lstm_hidden_size=config.lstm_hidden_size, n_lstm_layers=1, enable_critic_lstm=True)
        kwargs.update(policy_kwargs or {})
        return RecurrentPPO("MlpLstmPolicy", env, policy_kwargs=kwargs, **common)
    from stable_baselines3 import PPO

    kwargs.update(policy_kwargs or {})
    return PPO("MlpPolicy", env, policy_kwargs=kwargs, **common)


class ReferenceBaseline(VecEnvWrapper):
    """Training reward relative to a reference run: ``r_t - info["reference_gain"]``.

    Over the environment built with ``reference_runs=True``, whose hidden twins train each task at
    the optimiser's default learning rate from the same initialisation and minibatch order. An
    episode's training return becomes ``log(L_1 / L_T) - log(R_1 / R_T)``: what the policy gained
    over that constant default, with how much the task improves by itself taken out. The twin's
    run does not depend on the agent's actions, so this is a control variate: it leaves what the
    best policy is unchanged and removes variance from the returns. Sits above ``VecMonitor``, so
    monitored episode returns stay the validation gain.
    """

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        try:
            gains = np.array([info["reference_gain"] for info in infos], dtype=rewards.dtype)
        except KeyError:
            raise RuntimeError(
                "ReferenceBaseline needs infos[i]['reference_gain']: build HPOVecEnv with reference_runs=True"
            ) from None
        return obs, rewards - gains, dones, infos

    def reset(self) -> VecEnvObs:
        return self.venv.reset()


class GroupRelativeReward(VecEnvWrapper):
    """Training reward relative to the slot's group: ``r_t - mean(r_t over the group)``.

    Over an ``HPOVecEnv`` built with ``task_group_size = G > 1``, whose groups of G slots train
    the same task from the same initialisation and minibatch order, in step. An episode's
    training return becomes ``log(L_1 / L_T)`` minus the group's mean of it: what this run's
    actions gained over its siblings', with everything the task decides (how far it can improve,
    how noisy it is) taken out, as in RLOO or GRPO. Up to the factor ``(G - 1) / G`` it is the
    leave-one-out baseline, which does not depend on this slot's actions, so the policy gradient
    stays unbiased. Sits above ``VecMonitor``, so monitored episode returns stay the validation gain.
    """

    def __init__(self, venv: VecEnv) -> None:
        super().__init__(venv)
        size = getattr(venv.unwrapped, "task_group_size", 1)
        if size < 2:
            raise ValueError(
                "GroupRelativeReward needs slots that share tasks: build HPOVecEnv with task_group_size >= 2"
                f" (got {size})"
            )
        self.group_size = int(size)

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        grouped = rewards.reshape(-1, self.group_size)
        relative = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(rewards.shape)
        return obs, relative.astype(rewards.dtype), dones, infos

    def reset(self) -> VecEnvObs:
        return self.venv.reset()


class ActionChangePenalty(VecEnvWrapper):
    """Reward shaping for training: ``r_t - penalty * sum(|a_t - a_{t-1}|)`` after an episode's first decision.

    Sits above ``VecMonitor``, so monitored episode returns stay the unshaped validation gain.
    Actions are clipped to the action space first (what the environment applies).
    """

    def __init__(self, venv: VecEnv, penalty: float) -> None:
        super().__init__(venv)
        if not penalty >= 0:
            raise ValueError(f"penalty must be >= 0, got {penalty!r}")
        self.penalty = float(penalty)
        space = cast("spaces.Box", venv.action_space)  # a continuous action space, as HPOVecEnv's
        self._low, self._high = space.low, space.high
        self._prev: np.ndarray | None = None
        self._has_prev = np.zeros(venv.num_envs, dtype=bool)
        self._actions: np.ndarray | None = None

    def reset(self) -> VecEnvObs:
        self._has_prev[:] = False
        return self.venv.reset()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.clip(np.asarray(actions, dtype=np.float64).reshape(self.num_envs, -1), self._low, self._high)
        self.venv.step_async(actions)

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        a = self._actions
        if self._prev is not None:
            change = np.abs(a - self._prev).sum(axis=1)
            rewards = rewards - self.penalty * np.where(self._has_prev, change, 0.0).astype(rewards.dtype)
        self._prev = a
        self._has_prev = ~np.asarray(dones, dtype=bool)
        return obs, rewards, dones, infos


def get_vec_normalize(env: VecEnv) -> VecNormalize | None:
    """The ``VecNormalize`` inside a wrapper stack (None if there is none)."""
    return unwrap_vec_normalize(env)


def frame_stack_of(config: MetaAgentConfig) -> int:
    """Frames the policy sees per decision: ``config.frame_stack`` for the control, 1 for recurrent."""
    return config.frame_stack if config.algorithm == "framestack" else 1
