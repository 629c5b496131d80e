"""hpo_env: a Gymnasium environment for learning to schedule hyperparameters during training.

Importing the package registers ``hpo_env/HPO-v0`` (the default meta-training distribution) and
``hpo_env/HPOToy-v0`` (a fast synthetic task for tests and demos).
"""

from __future__ import annotations

import gymnasium as gym

from hpo_env.actions import CONTROLLABLE, DEFAULT_HYPERPARAMETERS, ActionDecoder, HyperparameterSpec
from hpo_env.checks import check_device
from hpo_env.core import EpisodeBatch
from hpo_env.data import DataSplits, build_splits
from hpo_env.envs import HPOEnv, make_distribution
from hpo_env.features import (
    EPOCHS_FEATURE,
    FEATURE_SET_VERSION,
    GRADIENT_FEATURES,
    OBS_BOUND,
    OPTIONAL_FEATURES,
    GradientStats,
    ObservationBuilder,
    log_epochs_feature,
)
from hpo_env.subproc import HPOSubprocVecEnv
from hpo_env.tasks import FAMILIES, SPLITS, TaskDistribution, TaskSpec, ToyTaskDistribution, check_families
from hpo_env.trainer import DIVERGENCE_FACTOR, HPARAM_NAMES, BatchedTrainer, ChunkResult
from hpo_env.vec_env import HPOVecEnv

__all__ = [
    "CONTROLLABLE",
    "DEFAULT_HYPERPARAMETERS",
    "DIVERGENCE_FACTOR",
    "EPOCHS_FEATURE",
    "FAMILIES",
    "FEATURE_SET_VERSION",
    "GRADIENT_FEATURES",
    "HPARAM_NAMES",
    "OBS_BOUND",
    "OPTIONAL_FEATURES",
    "SPLITS",
    "ActionDecoder",
    "BatchedTrainer",
    "ChunkResult",
    "DataSplits",
    "EpisodeBatch",
    "GradientStats",
    "HPOEnv",
    "HPOSubprocVecEnv",
    "HPOVecEnv",
    "HyperparameterSpec",
    "ObservationBuilder",
    "TaskDistribution",
    "TaskSpec",
    "check_families",
    "ToyTaskDistribution",
    "build_splits",
    "check_device",
    "log_epochs_feature",
    "make_distribution",
]

__version__ = "0.1.0"


def _register() -> None:
    if "hpo_env/HPO-v0" not in gym.registry:
        gym.register("hpo_env/HPO-v0", entry_point="hpo_env.envs:HPOEnv", kwargs={"task_distribution": "train"})
    if "hpo_env/HPOToy-v0" not in gym.registry:
        gym.register("hpo_env/HPOToy-v0", entry_point="hpo_env.envs:HPOEnv", kwargs={"task_distribution": "toy"})


_register()
