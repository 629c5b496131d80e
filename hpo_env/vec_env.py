"""An SB3 ``VecEnv`` whose N slots are stepped together by the batched inner trainer."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices

from hpo_env.actions import ActionDecoder
from hpo_env.checks import is_integer
from hpo_env.core import EpisodeBatch
from hpo_env.envs import EpisodeSettings
from hpo_env.features import OBS_BOUND
from hpo_env.tasks import TaskDistribution, TaskSpec

__all__ = ["HPOVecEnv", "check_reset_options"]


#: What ``set_attr`` refuses: settings from which the spaces, the slots or the observations follow.
FIXED_SETTINGS = frozenset(
    {
        "decoder",
        "num_envs",
        "task_group_size",
        "observation_space",
        "action_space",
        "gradient_features",
        "epochs_feature",
    }
)


def checked_seed(seed: int | None) -> int:
    """``VecEnv.seed``'s argument: an integer >= 0, or None for one from the operating system's entropy
    (SB3 would draw it from NumPy's global generator, which the library never touches)."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    if not is_integer(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0 (slot i uses seed + i) or None, got {seed!r}")
    return int(seed)


class HPOVecEnv(EpisodeSettings, VecEnv):
    """N :class:`~hpo_env.HPOEnv` episodes trained as one batched program.

    Slot ``i`` behaves like an ``HPOEnv`` reset with seed ``seed + i`` (SB3's seeding convention):
    it samples its own tasks from its own generator, so the same seed gives the same tasks whether
    the slots run here or as N separate environments, and the same numbers up to float rounding
    (which slots share a batched kernel changes its summation order; runs at the edge of stability
    can amplify that). A rerun with the same slots is bitwise identical. Finished slots reset
    automatically (SB3 semantics): ``infos[i]["terminal_observation"]`` holds the last observation
    of the finished episode and the returned observation is the first of the next one.

    Args:
        num_envs: number of slots N.
        task_distribution, hyperparameters, bounds, max_log10_change, max_log10_increase,
            max_log10_above_initial, divergence_penalty, gradient_features, epochs_feature, device:
            as for :class:`~hpo_env.HPOEnv`.
        seed: seeds slot ``i`` with ``seed + i`` at the first reset (or use :meth:`seed`).
        task_group_size: slots ``[kG, (k + 1)G)`` form a group that always trains the same task
            from the same initialisation and minibatch order (the group leader ``kG`` draws it from
            its generator), started together; when one of them ends (a divergence), the others
            are truncated (``infos[i]["TimeLimit.truncated"]``) and the whole group starts its next
            task. Their actions alone differ, so comparing their returns (a group baseline, as
            :class:`agents.factory.GroupRelativeReward` does) measures what the actions did. 1: off.
        reference_runs: also train every slot's task at the optimiser's default learning rate in a
            hidden twin and report the twin's log-loss gain over each interval as
            ``infos[i]["reference_gain"]`` (for a baseline-relative training reward; the reward
            itself is unchanged up to float rounding, the twins sharing the batched kernels).
            Doubles the inner training work.
    """

    def __init__(
        self,
        num_envs: int,
        task_distribution: TaskDistribution | str | None = None,
        *,
        hyperparameters: Sequence[str] = ("lr", "weight_decay"),
        bounds: Mapping[str, tuple[float, float]] | None = None,
        max_log10_change: float | Mapping[str, float] | None = None,
        max_log10_increase: Mapping[str, float] | None = None,
        max_log10_above_initial: Mapping[str, float] | None = None,
        divergence_penalty: float = 1.0,
        gradient_features: bool = False,
        epochs_feature: bool = False,
        device: str = "cpu",
        seed: int | None = None,
        task_group_size: int = 1,
        reference_runs: bool = False,
    ) -> None:
        num_envs, task_group_size = _count("num_envs", num_envs), _count("task_group_size", task_group_size)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if task_group_size < 1 or num_envs % task_group_size:
            raise ValueError(
                f"task_group_size must be a positive integer that divides num_envs = {num_envs} (slots that share"
                f" a task), got {task_group_size!r}"
            )
        self.task_group_size = task_group_size
        self.task_distribution = task_distribution  # (through make_distribution: EpisodeSettings)
        decoder = ActionDecoder(hyperparameters, bounds, max_log10_change, max_log10_increase, max_log10_above_initial)
        self._batch = EpisodeBatch(
            num_envs,
            decoder,
            device=device,
            divergence_penalty=divergence_penalty,
            gradient_features=gradient_features,
            epochs_feature=epochs_feature,
            reference_runs=reference_runs,
        )
        k = self.decoder.num_actions
        observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (self._batch.obs_dim,), np.float32)
        action_space = gym.spaces.Box(-1.0, 1.0, (k,), np.float32)
        self.render_mode = None
        super().__init__(num_envs, observation_space, action_space)
        self._rngs = [seeding.np_random(None)[0] for _ in range(self.num_envs)]
        self._actions: np.ndarray | None = None
        if seed is not None:
            self.seed(seed)

    @property
    def trainer(self):
        """The :class:`~hpo_env.trainer.BatchedTrainer` behind the slots."""
        return self._batch.trainer

    def tasks(self) -> list[TaskSpec | None]:
        """The task currently running in each slot."""
        return [None if ep is None else ep.spec for ep in self._batch.episodes]

    # ------------------------------------------------------------------------------------------
    def _next_task(self, i: int, *, explicit_reset: bool = True) -> TaskSpec:
        """Slot ``i``'s next task. Seeds and options (``seed()``, ``set_options()``) apply to the next
        :meth:`reset` only, never to the automatic resets of finished slots (as in SB3's ``DummyVecEnv``)."""
        if not explicit_reset:
            return self.task_distribution.sample(self._rngs[i])
        seed = self._seeds[i]
        if seed is not None:
            self._rngs[i] = seeding.np_random(seed)[0]
        task = self._options[i].get("task") if self._options[i] else None
        return task if task is not None else self.task_distribution.sample(self._rngs[i])

    def _leader(self, i: int) -> int:
        return i - i % self.task_group_size

    def reset(self) -> np.ndarray:
        check_reset_options(self._options, self.task_group_size)  # before any slot changes
        slots = list(range(self.num_envs))
        specs = [self._next_task(i) for i in slots]
        specs = [specs[self._leader(i)] for i in slots]  # a group trains its first slot's task
        obs, infos = self._batch.start(slots, specs)
        self.reset_infos = infos
        self._actions = None  # a step in flight is dropped (as HPOSubprocVecEnv drops it)
        # Seeds and options apply to one reset only (SB3 convention).
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self):
        if self._actions is None:
            raise RuntimeError("step_async() must be called before step_wait()")
        slots = list(range(self.num_envs))
        actions, self._actions = self._actions, None
        obs, rewards, terminated, infos = self._batch.step(slots, actions)
        dones = terminated.copy()
        if self.task_group_size > 1:  # a group ends together: truncate the members still running
            g = self.task_group_size
            dones = np.repeat(terminated.reshape(-1, g).any(axis=1), g)
        done = np.flatnonzero(dones)
        if len(done):
            for j in done:
                infos[j]["terminal_observation"] = obs[j].copy()
                infos[j]["TimeLimit.truncated"] = not terminated[j]
            tasks = {}  # group leaders draw the next task; members take theirs
            specs = []
            for j in done.tolist():
                leader = self._leader(j)
                if leader not in tasks:
                    tasks[leader] = self._next_task(leader, explicit_reset=False)
                specs.append(tasks[leader])
            new_obs, reset_infos = self._batch.start(done.tolist(), specs)
            obs[done] = new_obs
            for j, info in zip(done, reset_infos):
                self.reset_infos[j] = info
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        pass

    # -- the VecEnv attribute protocol (one object stands for every slot) ----------------------
    # ``task`` is per slot (as ``HPOEnv.task``); everything else is shared by all slots, so setting or
    # calling it for some slots only cannot be honoured and is refused, and a method runs once.
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        if attr_name == "task":
            tasks = self.tasks()
            return [tasks[i] for i in self._get_indices(indices)]
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._all_slots(indices, f"set_attr({attr_name!r})")
        if attr_name in FIXED_SETTINGS:
            raise ValueError(
                f"set_attr({attr_name!r}): {attr_name} is fixed at construction (the spaces, the slots and the "
                "features follow from it): build a new environment"
            )
        setattr(self, attr_name, value)

    def seed(self, seed: int | None = None) -> Sequence[None | int]:
        return super().seed(checked_seed(seed))

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        self._all_slots(indices, f"env_method({method_name!r})")
        result = getattr(self, method_name)(*method_args, **method_kwargs)  # once: it acts on every slot
        return [result for _ in self._get_indices(indices)]

    def _all_slots(self, indices: VecEnvIndices, what: str) -> None:
        if sorted(set(self._get_indices(indices))) != list(range(self.num_envs)):
            raise ValueError(
                f"HPOVecEnv.{what} with indices={indices!r}: its slots are one batched program that shares "
                "its attributes and methods, so they apply to every slot; call it without indices"
            )

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]


def check_reset_options(options: Sequence[Mapping[str, Any] | None], task_group_size: int = 1) -> None:
    """Check every slot's reset options (``VecEnv.set_options``) before a reset changes anything: only
    ``task`` (a :class:`TaskSpec`) is known, and a member of a task group may only ask for its group's task."""
    for i, option in enumerate(options):
        unknown = set(option or {}) - {"task"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; supported: ['task']")
        task = option.get("task") if option else None
        if task is not None and not isinstance(task, TaskSpec):
            raise TypeError(f"options['task'] must be a TaskSpec, got {type(task).__name__}")
        leader = i - i % task_group_size
        leader_option = options[leader]
        if task is not None and task != (leader_option.get("task") if leader_option else None):
            raise ValueError(
                f"slot {i} shares the task of slot {leader} (task_group_size = {task_group_size}); set "
                "options['task'] for the group's first slot only, or for every slot of the group alike"
            )


def _count(name: str, value: object) -> int:
    """``value`` as an int if it is an integer (Python or NumPy, not bool); a ValueError naming ``name`` if not."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]  # probes any object: TypeError is caught
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
