"""The same code on a CUDA device: training, environments, deployment and meta-training.

Skipped where torch sees no CUDA device (CI runs on CPUs); run on a GPU machine with
``python -m pytest tests/test_cuda.py``. On CPU the tests compare against the CPU trainer, which the
rest of the suite checks against torch.optim.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from agents import PolicyScheduler
from hpo_env import BatchedTrainer, HPOVecEnv, TaskDistribution
from hpo_env.tasks import FAMILIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _specs(family: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [TaskDistribution([family], name=family).sample(rng) for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_on_cuda_trains_like_on_cpu(family):
    """Three chunks of four models of one family, stacked on each device: the same losses.

    cuDNN may run the CNN's convolutions in TF32 (torch's default for convolutions), so its
    tolerance is wider; the MLPs' matmuls run in full float32.
    """
    specs = _specs(family, 4)
    results = {}
    for device in ("cpu", "cuda"):
        trainer = BatchedTrainer(len(specs), device=device, gradient_stats=True)
        for i, spec in enumerate(specs):
            trainer.load(i, spec)
        results[device] = [trainer.train_chunk(list(range(len(specs)))) for _ in range(3)]
    rtol = 2e-2 if family == "digits_cnn" else 2e-3
    for cpu, gpu in zip(results["cpu"], results["cuda"]):
        np.testing.assert_allclose(gpu.val_loss, cpu.val_loss, rtol=rtol)
        np.testing.assert_allclose(gpu.train_loss, cpu.train_loss, rtol=rtol)
        np.testing.assert_allclose(gpu.grad_cosine, cpu.grad_cosine, atol=5 * rtol)
        np.testing.assert_array_equal(gpu.diverged, cpu.diverged)


def _syncs(trainer: BatchedTrainer, slots: list[int], steps: int) -> int:
    """Host synchronisations (as torch's sync debug mode reports them) during one chunk of ``steps``."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_chunk(slots, steps=steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("family", ["digits_mlp", "charlm", "digits_cnn"])
def test_no_host_synchronisation_per_inner_step(family):
    """The host waits for the device once per chunk (the losses the features need), not once per step."""
    specs = _specs(family, 3, seed=1)
    trainer = BatchedTrainer(len(specs), device="cuda", gradient_stats=True)
    for i, spec in enumerate(specs):
        trainer.load(i, spec)
    slots = list(range(len(specs)))
    trainer.train_chunk(slots, steps=2)  # build the stacks
    short, long = _syncs(trainer, slots, 4), _syncs(trainer, slots, 24)
    assert short == long, f"{short} host synchronisations in a 4-step chunk, {long} in a 24-step one"


def _agree(name: str, gpu: np.ndarray, cpu: np.ndarray, tight: float, loose: float) -> None:
    """Per slot (rows): all but one within ``tight``, every one within ``loose``."""
    diff = np.abs(gpu - cpu).reshape(len(cpu), -1).max(1)
    assert (diff > tight).sum() <= 1 and diff.max() <= loose, f"{name}: per-slot differences {diff}"


def test_vec_env_on_cuda_steps_like_on_cpu():
    """The default distribution, auto-resets included: the same observations, rewards and ends.

    Measured on an H200 (40 steps, six slots): five slots agree to 5e-5 throughout. The sixth, an
    AdamW MLP on digits, drifts: float32 rounding that differs between the devices grows over hundreds
    of AdamW steps to 0.5% of the validation loss, 6e-3 in a reward and 0.035 in an observation, and
    vanishes when the slot's episode ends. So one slot in six may drift within loose bounds; the rest
    must agree tightly, and the episode ends must be identical.
    """
    rng = np.random.default_rng(0)
    envs = {device: HPOVecEnv(6, "train", seed=3, device=device) for device in ("cpu", "cuda")}
    obs = {d: e.reset() for d, e in envs.items()}
    np.testing.assert_allclose(obs["cuda"], obs["cpu"], rtol=1e-3, atol=1e-3)
    ends = 0
    for _ in range(40):
        # Mild actions: extreme learning rates make training chaotic, and then the drift above grows
        # until the runs part (which says nothing about the code).
        actions = rng.uniform(-0.2, 0.2, (6, envs["cpu"].action_space.shape[0])).astype(np.float32)
        out = {d: e.step(actions) for d, e in envs.items()}
        (o_c, r_c, d_c, _), (o_g, r_g, d_g, _) = out["cpu"], out["cuda"]
        np.testing.assert_array_equal(d_g, d_c)
        val = {d: np.log([i["val_loss"] for i in o[3]]) for d, o in out.items()}
        _agree("log validation loss", val["cuda"], val["cpu"], tight=1e-3, loose=2e-2)
        _agree("reward", r_g, r_c, tight=1e-3, loose=2e-2)
        _agree("observation", o_g, o_c, tight=1e-3, loose=0.1)
        ends += int(d_c.sum())
    assert ends > 0  # the comparison crossed episode ends


def test_shipped_policy_schedules_a_model_on_cuda():
    """The documented deployment, with the model, the data and the policy on the GPU."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=gen)
    y = (x[:, :5].sum(1) > 0).long()
    x, y = x.cuda(), y.cuda()
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    total, interval = 200, 20
    scheduler = PolicyScheduler.from_pretrained(
        "default", optimizer, total_steps=total // interval, epochs=total * 32 / 400, device="cuda"
    )
    losses = []
    for step in range(1, total + 1):
        idx = torch.randint(0, 400, (32,), device="cuda")
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % interval == 0:
            with torch.no_grad():
                val = torch.nn.functional.cross_entropy(model(x[400:]), y[400:])
            losses.append(float(val))
            scheduler.step(val, train_loss=loss)
    lrs = scheduler.get_last_lr()
    assert all(np.isfinite(lr) and lr > 0 for lr in lrs)
    assert lrs != [1e-3]  # the policy acted
    assert losses[-1] < losses[0]


def test_meta_training_with_environments_and_agent_on_cuda(tmp_path):
    """hpo-train end to end with the inner models and the meta-agent on the GPU; the bundle loads on CPU."""
    from agents import load_bundle
    from training.train import main

    args = [
        "--task-distribution", "train", "--eval-distribution", "toy", "--n-envs", "8", "--n-steps", "16",
        "--batch-size", "64", "--n-epochs", "2", "--eval-tasks", "2", "--no-progress-bar",
        "--total-timesteps", "256", "--eval-freq", "128", "--device", "cuda", "--env-device", "cuda",
        "--logdir", str(tmp_path), "--run-name", "gpu",
    ]  # fmt: skip
    assert main(args) == 0
    bundle = load_bundle(tmp_path / "gpu" / "bundle", device="cpu")
    assert bundle.config["training"]["timesteps"] == 256
