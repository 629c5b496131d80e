from __future__ import annotations

import os

# The tests train tiny models, which run fastest on one thread; with torch's default (one per core),
# OpenMP threads spin-wait against anything else running on the machine and the suite gets ~8x
# slower on a busy 2-core box. Set before torch is imported, so subprocesses (hpo-train) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tempfile  # noqa: E402

# SB3's model.learn() without a logger makes an empty /tmp/SB3-<date> folder per call; keep the ones
# the tests make in a single folder that goes away with the session.
_SB3_LOGDIR = tempfile.TemporaryDirectory(prefix="hpo-meta-tests-sb3-")
os.environ.setdefault("SB3_LOGDIR", _SB3_LOGDIR.name)

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hpo_env import BatchedTrainer, TaskSpec  # noqa: E402


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


@pytest.fixture
def assert_trains_like_alone():
    """Check that slot i of a batched trainer trained exactly like ``specs[i]`` trained alone."""

    def check(together: BatchedTrainer, specs: list[TaskSpec], results: list) -> None:
        for i, s in enumerate(specs):
            alone = BatchedTrainer(1)
            alone.load(0, s)
            for r in results:
                a = alone.train_chunk([0])
                np.testing.assert_allclose(a.val_loss[0], r.val_loss[i], rtol=1e-5)
                np.testing.assert_allclose(a.train_loss[0], r.train_loss[i], rtol=1e-5)
            for p, q in zip(alone.parameters(0), together.parameters(i)):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    return check


@pytest.fixture
def load_script(monkeypatch):
    """Import a script of the repository (``benchmarks/*.py``, ``examples/*.py``) as a module."""

    def load(relative: str):
        path = Path(__file__).resolve().parents[1] / relative
        spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def torch_replica():
    """``replica(spec)``: spec's MLP (tanh) as a ``torch.nn`` model with the trainer's initial weights and
    a ``torch.optim`` optimiser with the task's hyperparameters, plus its data and the slot's generator
    advanced past the initialisation (so its next draws are the trainer's minibatch indices)."""
    from hpo_env import build_splits
    from hpo_env.models import ModelLayout, init_params

    def replica(spec: TaskSpec):
        trainer = BatchedTrainer(1)
        trainer.load(0, spec)
        params = trainer.parameters(0)
        data = build_splits(spec)
        gen = torch.Generator().manual_seed(spec.seed)
        init_params(ModelLayout.build(spec, data), gen)
        layers = []
        for i in range(0, len(params), 2):
            lin = torch.nn.Linear(*params[i].shape)
            with torch.no_grad():
                lin.weight.copy_(params[i].T)
                lin.bias.copy_(params[i + 1])
            layers += [lin, torch.nn.Tanh()]
        model = torch.nn.Sequential(*layers[:-1])
        if spec.optimizer == "sgd":
            opt = torch.optim.SGD(
                model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
            )
        else:
            opt = torch.optim.AdamW(
                model.parameters(), lr=spec.lr, betas=(spec.momentum, 0.999), weight_decay=spec.weight_decay
            )
        return model, opt, data, gen

    return replica


@pytest.fixture
def tiny_meta_training(tmp_path):
    """``hpo-train`` in process on toy tasks (32 timesteps, quick preset) with extra options; returns
    its :class:`~training.train.TrainResult`."""
    from training.train import parse_settings, train

    def run(*options: str, run_name: str = "tiny"):
        return train(
            parse_settings(
                [
                    "--preset",
                    "quick",
                    "--task-distribution",
                    "toy",
                    "--eval-distribution",
                    "toy",
                    "--total-timesteps",
                    "32",
                    "--n-envs",
                    "2",
                    "--n-steps",
                    "16",
                    "--batch-size",
                    "16",
                    "--eval-tasks",
                    "2",
                    "--eval-seeds",
                    "1",
                    *options,
                    "--logdir",
                    str(tmp_path),
                    "--run-name",
                    run_name,
                    "--no-progress-bar",
                    "--verbose",
                    "0",
                ]
            )  # fmt: skip
        )

    return run
