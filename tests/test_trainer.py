"""The batched trainer against plain PyTorch, alone against batched, and divergence handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpo_env import BatchedTrainer, TaskDistribution


def _torch_reference(replica, spec, steps: int) -> torch.Tensor:
    """Train spec's MLP with torch.nn and torch.optim on the trainer's init and minibatches."""
    model, opt, data, gen = replica(spec)
    idx = torch.randint(len(data.x_train), (steps, spec.batch_size), generator=gen)
    for k in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data.x_train[idx[k]]), data.y_train[idx[k]])
        loss.backward()
        opt.step()
    return torch.cat(
        [torch.cat([lin.weight.T.reshape(-1), lin.bias]) for lin in model if isinstance(lin, torch.nn.Linear)]
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("hidden", [(16, 8), (128, 64)], ids=["small", "large"])  # large: fused SGD kernel
def test_matches_torch_optim(small_mlp_spec, optimizer, hidden, torch_replica):
    spec = small_mlp_spec.replace(
        optimizer=optimizer, activation="tanh", hidden=hidden, lr=0.05 if optimizer == "sgd" else 3e-3
    )
    trainer = BatchedTrainer(1)
    trainer.load(0, spec)
    trainer.train_chunk([0], steps=spec.steps_per_action)
    ours = torch.cat([p.reshape(-1) for p in trainer.parameters(0)])
    reference = _torch_reference(torch_replica, spec, spec.steps_per_action)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hidden", [(16, 8), (128, 64)], ids=["small", "large"])  # large: fused SGD kernel
def test_sgd_momentum_down_to_zero_and_back_matches_torch_optim(small_mlp_spec, hidden, torch_replica):
    """Without momentum torch.optim.SGD leaves its buffer alone; when momentum returns, so does the old buffer."""
    spec = small_mlp_spec.replace(optimizer="sgd", activation="tanh", hidden=hidden, lr=0.05, momentum=0.9)
    trainer = BatchedTrainer(2)  # slot 1 keeps momentum: a stack with rows of both kinds
    trainer.load(0, spec)
    trainer.load(1, spec.replace(seed=7))
    model, opt, data, gen = torch_replica(spec)
    for momentum in (0.9, 0.0, 0.0, 0.5):
        trainer.set_hparams(0, np.array([spec.lr, spec.weight_decay, momentum]))
        trainer.train_chunk([0, 1], steps=spec.steps_per_action)
        opt.param_groups[0]["momentum"] = momentum
        idx = torch.randint(len(data.x_train), (spec.steps_per_action, spec.batch_size), generator=gen)
        for k in range(spec.steps_per_action):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(data.x_train[idx[k]]), data.y_train[idx[k]]).backward()
            opt.step()
    ours = torch.cat([p.reshape(-1) for p in trainer.parameters(0)])
    reference = torch.cat(
        [torch.cat([lin.weight.T.reshape(-1), lin.bias]) for lin in model if isinstance(lin, torch.nn.Linear)]
    )
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def _padded_group(small_mlp_spec):
    """Tasks of one stack key that differ in width, input features and classes (so padding is used)."""
    return [
        small_mlp_spec.replace(hidden=(16,), n_features=6, n_classes=3, seed=1, data_seed=1),
        small_mlp_spec.replace(hidden=(32,), n_features=9, n_classes=5, seed=2, data_seed=2, lr=0.02),
        small_mlp_spec.replace(hidden=(8,), n_features=4, n_classes=2, seed=3, data_seed=3, optimizer="sgd"),
    ]


def test_batched_equals_alone(small_mlp_spec, assert_trains_like_alone):
    specs = _padded_group(small_mlp_spec)
    together = BatchedTrainer(len(specs))
    for i, s in enumerate(specs):
        together.load(i, s)
    results = [together.train_chunk([0, 1, 2]) for _ in range(3)]
    assert_trains_like_alone(together, specs, results)


@pytest.mark.parametrize("family", ["digits_cnn", "charlm", "tabular"])
def test_batched_equals_alone_other_architectures(family):
    dist = TaskDistribution.default("all")
    base = dist.sample_family(family, np.random.default_rng(0), optimizer="adamw")
    widths = [(8, 16), (4, 8)] if family == "digits_cnn" else [(64,), (32,)]
    specs = [
        base.replace(hidden=widths[0], total_steps=40, steps_per_action=10),
        base.replace(
            hidden=widths[1], seed=base.seed + 1, data_seed=base.data_seed + 1, total_steps=40, steps_per_action=10
        ),
    ]
    together = BatchedTrainer(2)
    for i, s in enumerate(specs):
        together.load(i, s)
    r = together.train_chunk([0, 1])
    for i, s in enumerate(specs):
        alone = BatchedTrainer(1)
        alone.load(0, s)
        np.testing.assert_allclose(alone.train_chunk([0]).val_loss[0], r.val_loss[i], rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_hidden_lr_gain_trains_as_the_scaled_rate_and_reports_the_nominal_one(small_mlp_spec, optimizer):
    spec = small_mlp_spec.replace(optimizer=optimizer, lr=0.003, weight_decay=1e-3)
    trainer = BatchedTrainer(2)
    trainer.load(0, spec.replace(lr_gain=4.0))
    trainer.load(1, spec.replace(lr=0.012))
    res = trainer.train_chunk([0, 1])
    assert res.val_loss[0] == pytest.approx(res.val_loss[1], rel=1e-6)
    for a, b in zip(trainer.parameters(0), trainer.parameters(1)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert trainer.hparams(0)[0] == pytest.approx(0.003)  # what the agent sees and sets
    trainer.set_hparams(0, np.array([0.001, 1e-3, spec.momentum]))
    trainer.set_hparams(1, np.array([0.004, 1e-3, spec.momentum]))
    res = trainer.train_chunk([0, 1])
    assert res.val_loss[0] == pytest.approx(res.val_loss[1], rel=1e-6)


def test_divergence_is_reported_per_model_and_contained(small_mlp_spec):
    specs = _padded_group(small_mlp_spec)
    trainer = BatchedTrainer(3)
    for i, s in enumerate(specs):
        trainer.load(i, s)
    trainer.set_hparams(1, np.array([1e6, 0.0, 0.9]))  # explodes
    reference = BatchedTrainer(1)
    reference.load(0, specs[0])
    for _ in range(3):
        r = trainer.train_chunk([0, 1, 2])
        ref = reference.train_chunk([0])
    assert r.diverged.tolist() == [False, True, False]
    np.testing.assert_allclose(r.val_loss[0], ref.val_loss[0], rtol=1e-5)


def test_a_finite_validation_loss_above_divergence_factor_times_the_untrained_one_is_a_divergence(small_mlp_spec):
    """The threshold is ``divergence_factor`` times the untrained model's validation loss: a run whose
    finite loss rose 1.49x diverges at factor 1.4, not at 1.6, and one that rose ~8,600x at the default 1e3."""

    def first_chunk(lr: float, **kwargs) -> tuple[float, bool]:
        trainer = BatchedTrainer(1, **kwargs)
        trainer.load(0, small_mlp_spec)
        untrained = trainer.evaluate([0], split="val")[0][0]
        trainer.set_hparams(0, np.array([lr, 0.0, 0.9]))
        res = trainer.train_chunk([0])
        return float(res.val_loss[0] / untrained), bool(res.diverged[0])

    ratio, _ = first_chunk(3.0, divergence_factor=1e30)
    assert 1.45 < ratio < 1.55 and np.isfinite(ratio)
    assert first_chunk(3.0, divergence_factor=1.4)[1] and not first_chunk(3.0, divergence_factor=1.6)[1]
    ratio, diverged = first_chunk(10.0)
    assert 2e3 < ratio < 5e4 and diverged  # finite, above the default 1e3
    assert not first_chunk(10.0, divergence_factor=1e5)[1]


def test_bad_slots_hyperparameters_and_settings_are_refused_clearly(small_mlp_spec):
    with pytest.raises(ValueError, match="n_slots must be an integer >= 1"):
        BatchedTrainer(2.5)
    with pytest.raises(ValueError, match="divergence_factor must be a finite number > 1"):
        BatchedTrainer(1, divergence_factor=-1)
    trainer = BatchedTrainer(2)
    with pytest.raises(IndexError, match=r"slot must be an integer in \[0, 2\), got 5"):
        trainer.load(5, small_mlp_spec)
    with pytest.raises(IndexError, match="got -1"):  # not silently the last slot
        trainer.load(-1, small_mlp_spec)
    with pytest.raises(TypeError, match="spec must be a TaskSpec, got dict"):
        trainer.load(0, small_mlp_spec.to_dict())
    trainer.load(0, small_mlp_spec)
    for bad in ([0.1, 1e-4], [-0.1, 1e-4, 0.9], [0.1, 1e-4, 1.0], [np.nan, 0.0, 0.0]):
        with pytest.raises(ValueError, match="must be finite and >= 0, momentum below 1"):
            trainer.set_hparams(0, np.array(bad))
