from __future__ import annotations

import numpy as np
import pytest

from hpo_env import TaskSpec


@pytest.fixture
def small_mlp_spec() -> TaskSpec:
    """A small classification task that trains in milliseconds."""
    return TaskSpec(
        family="teacher_classification",
        dataset="teacher",
        arch="mlp",
        hidden=(16,),
        n_samples=200,
        n_features=6,
        n_classes=3,
        optimizer="sgd",
        lr=0.05,
        weight_decay=1e-4,
        momentum=0.9,
        batch_size=16,
        total_steps=40,
        steps_per_action=5,
        seed=1,
        data_seed=2,
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
