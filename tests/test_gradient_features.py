"""The optional gradient features: their statistics, the trainer's, the environment's and the scheduler's
(one source of truth, checked against a plain PyTorch loop), bundles and the training option."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from agents import EnsembleBundle, PolicyScheduler, get_preset, load_bundle, make_meta_agent, make_meta_env
from agents.bundle import BundleError
from hpo_env import (
    GRADIENT_FEATURES,
    ActionDecoder,
    BatchedTrainer,
    GradientStats,
    HPOEnv,
    HPOVecEnv,
    ObservationBuilder,
)
from training.callbacks import bundle_from_model
from training.rollout import run_episodes


def _reference_stats(grads: list[np.ndarray]) -> tuple[float, float]:
    """Mean cosine of consecutive gradients and mean log norm, the slow obvious way."""
    g = [np.asarray(x, np.float64) for x in grads]
    cos = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(g[1:], g[:-1])]
    return (float(np.mean(cos)) if cos else 0.0), float(np.mean([np.log(np.linalg.norm(x)) for x in g]))


def test_gradient_stats_match_the_definition_per_row_with_tails():
    rng = np.random.default_rng(0)
    steps = [2, 3, 5]  # row i takes steps[i] steps; later steps only touch the rows still running
    grads = rng.normal(size=(5, 3, 7)).astype(np.float32)
    grads[:, 2] = grads[0, 2] + 0.1 * grads[:, 2]  # a row whose gradients agree (cosine near 1)
    stats = GradientStats(3)
    for k in range(5):
        first = sum(s <= k for s in steps)
        stats.observe(torch.from_numpy(grads[k, first:]), first)
    cos, log_norm = stats.result()
    np.testing.assert_array_equal(stats.steps_observed(), steps)
    for i, k in enumerate(steps):
        ref_cos, ref_log = _reference_stats(list(grads[:k, i]))
        assert cos[i] == pytest.approx(ref_cos, abs=1e-6)
        assert log_norm[i] == pytest.approx(ref_log, abs=1e-6)
    assert cos[2] > 0.9
    stats.reset()
    assert stats.steps_observed().tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=r"as \(2, P\)"):
        stats.observe(torch.ones(3, 7), 1)
    stats.observe(torch.ones(2, 7), 1)
    with pytest.raises(ValueError, match="observed after rows"):
        stats.observe(torch.ones(3, 7), 0)


def test_gradient_stats_grow_past_their_hint():
    stats = GradientStats(1, steps_hint=2)
    g = torch.randn(40, 5)
    for k in range(40):
        stats.observe(g[k : k + 1])
    cos, log_norm = stats.result()
    ref_cos, ref_log = _reference_stats(list(g.numpy()))
    assert cos[0] == pytest.approx(ref_cos, abs=1e-6) and log_norm[0] == pytest.approx(ref_log, abs=1e-6)


def test_observation_builder_appends_the_gradient_features_and_checks_their_input():
    decoder = ActionDecoder()
    plain, grad = ObservationBuilder(decoder), ObservationBuilder(decoder, gradient_features=True)
    assert grad.dim == plain.dim + 2
    assert grad.feature_names() == plain.feature_names() + list(GRADIENT_FEATURES)
    hp = np.array([[0.01, 1e-4]])
    obs = grad.reset([0], [2.0], [2.1], hp, [0.1], adaptive=False, gradients=([0.4], [np.log(3.0)]))
    np.testing.assert_allclose(obs[0, -2:], [0.4, 0.0])
    obs = grad.update([0], [1.5], [1.6], hp, np.zeros((1, 2)), [0.2], gradients=([-0.2], [np.log(6.0)]))
    np.testing.assert_allclose(obs[0, -2:], [-0.2, np.log(2.0)], rtol=1e-6)  # log norm relative to the first
    obs = grad.update([0], [1.4], [1.5], hp, np.zeros((1, 2)), [0.3], gradients=([np.nan], [np.nan]))
    np.testing.assert_array_equal(obs[0, -2:], [0.0, 0.0])  # unknown reads as 0
    np.testing.assert_array_equal(obs[0, :-2], plain_like(plain, hp)[0])  # the other features unchanged
    with pytest.raises(ValueError, match="pass gradients="):
        grad.update([0], [1.4], [1.5], hp, np.zeros((1, 2)), [0.4])
    with pytest.raises(ValueError, match="gradient_features=False"):
        plain.reset([0], [2.0], [2.1], hp, [0.1], adaptive=False, gradients=([0.4], [0.0]))


def plain_like(plain: ObservationBuilder, hp: np.ndarray) -> np.ndarray:
    """The same three intervals through a builder without gradient features."""
    plain.reset([0], [2.0], [2.1], hp, [0.1], adaptive=False)
    plain.update([0], [1.5], [1.6], hp, np.zeros((1, 2)), [0.2])
    return plain.update([0], [1.4], [1.5], hp, np.zeros((1, 2)), [0.3])


def test_trainer_statistics_leave_training_unchanged_and_do_not_depend_on_the_batch(small_mlp_spec):
    specs = [
        small_mlp_spec.replace(hidden=(16,), n_features=6, n_classes=3, seed=1, data_seed=1),
        small_mlp_spec.replace(
            hidden=(32,), n_features=9, n_classes=5, seed=2, data_seed=2, optimizer="adamw", lr=0.01
        ),
        small_mlp_spec.replace(hidden=(8,), n_features=4, n_classes=2, seed=3, data_seed=3, steps_per_action=4),
    ]
    with_stats, without = BatchedTrainer(3, gradient_stats=True), BatchedTrainer(3)
    for i, s in enumerate(specs):
        with_stats.load(i, s)
        without.load(i, s)
    for _ in range(2):
        a, b = with_stats.train_chunk([0, 1, 2]), without.train_chunk([0, 1, 2])
        np.testing.assert_array_equal(a.val_loss, b.val_loss)
        assert np.isnan(b.grad_cosine).all() and np.isnan(b.grad_log_norm).all()
        assert np.isfinite(a.grad_cosine).all() and np.isfinite(a.grad_log_norm).all()
    for i, s in enumerate(specs):
        alone = BatchedTrainer(1, gradient_stats=True)
        alone.load(0, s)
        alone.train_chunk([0])
        r = alone.train_chunk([0])
        np.testing.assert_allclose(r.grad_cosine[0], a.grad_cosine[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.grad_log_norm[0], a.grad_log_norm[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["digits_cnn", "charlm"])
def test_trainer_statistics_on_autograd_and_embedding_architectures(family):
    from hpo_env import TaskDistribution

    spec = TaskDistribution.default("all").sample_family(family, np.random.default_rng(0))
    spec = spec.replace(total_steps=8, steps_per_action=4)
    specs = [spec, spec.replace(seed=spec.seed + 1)]
    together = BatchedTrainer(2, gradient_stats=True)
    for i, s in enumerate(specs):
        together.load(i, s)
    r = together.train_chunk([0, 1])
    assert (-1.0 <= r.grad_cosine).all() and (r.grad_cosine <= 1.0).all() and np.isfinite(r.grad_log_norm).all()
    for i, s in enumerate(specs):  # stacked, each model's statistics are those it has trained alone
        alone = BatchedTrainer(1, gradient_stats=True)
        alone.load(0, s)
        a = alone.train_chunk([0])
        np.testing.assert_allclose(a.grad_cosine[0], r.grad_cosine[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.grad_log_norm[0], r.grad_log_norm[i], rtol=1e-4, atol=1e-5)


class _Replay:
    """Fixed actions; records the observations (SB3 ``predict`` protocol), observing the gradients."""

    gradient_features = True

    def __init__(self, decoder: ActionDecoder, actions: np.ndarray) -> None:
        self.decoder, self.actions, self.seen = decoder, actions, []

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        self.seen.append(np.array(observation, copy=True))
        return self.actions[min(len(self.seen) - 1, len(self.actions) - 1)][None], state


@pytest.mark.parametrize("optimizer, closure", [("sgd", False), ("adamw", False), ("sgd", True)])
def test_environment_and_scheduler_in_a_plain_pytorch_loop_see_the_same_gradient_features(
    small_mlp_spec, optimizer, closure, torch_replica
):
    """The environment's batched trainer and a torch.nn model trained by torch.optim under the
    scheduler, on the same initial weights and minibatches, give the same observations; also when
    the loop computes its gradients in an ``optimizer.step(closure)`` (as Lightning does)."""
    spec = small_mlp_spec.replace(
        optimizer=optimizer, activation="tanh", hidden=(16, 8), lr=0.05 if optimizer == "sgd" else 3e-3
    )
    env = HPOEnv(gradient_features=True)
    actions = np.random.default_rng(1).uniform(-1, 1, size=(spec.num_decisions - 1, 2)).astype(np.float32)
    obs, _ = env.reset(seed=0, options={"task": spec})
    env_obs = [obs]
    for a in actions:
        obs, *_ = env.step(a)
        env_obs.append(obs)

    model, opt, data, gen = torch_replica(spec)
    policy = _Replay(env.decoder, actions)
    sched = PolicyScheduler(opt, policy, total_steps=spec.num_decisions)
    assert sched.features.dim == env.observation_space.shape[0]
    for t in range(spec.num_decisions):
        idx = torch.randint(len(data.x_train), (spec.steps_per_action, spec.batch_size), generator=gen)
        losses = []
        for k in range(spec.steps_per_action):

            def compute_loss(batch=idx[k]):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
                loss.backward()
                return loss

            if closure:
                loss = opt.step(compute_loss)
            else:
                loss = compute_loss()
                opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            val = torch.nn.functional.cross_entropy(model(data.x_val), data.y_val)
        sched.step(val, train_loss=float(np.mean(losses)))
        np.testing.assert_allclose(sched.last_observation, env_obs[t], rtol=1e-4, atol=1e-4)
    grads = np.array([o[-2:] for o in env_obs])
    assert np.abs(grads).max() > 0.05  # the features really moved


def test_scheduler_warns_when_no_optimizer_step_ran(small_mlp_spec):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = PolicyScheduler(opt, _Replay(ActionDecoder(), np.zeros((3, 2), np.float32)), total_steps=3)
    with pytest.warns(UserWarning, match="no optimizer.step"):
        sched.step(1.0)
    np.testing.assert_array_equal(sched.last_observation[-2:], [0.0, 0.0])
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step(0.9)
    # The first interval with gradients is the norm's reference (not the unknown first one).
    assert sched.last_observation[-1] == 0.0
    model(2 * torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step(0.8)
    assert 0.0 < abs(sched.last_observation[-1]) < 5.0
    del sched  # the hook goes with the scheduler
    opt.step()
    assert not opt._optimizer_step_post_hooks


def test_run_episodes_follows_the_policys_feature_set(small_mlp_spec):
    decoder = ActionDecoder()
    policy = _Replay(decoder, np.zeros((10, 2), np.float32))
    (record,) = run_episodes(policy, [small_mlp_spec], decoder)
    assert policy.seen[0].shape == (1, ObservationBuilder(decoder, gradient_features=True).dim)
    assert not record.diverged


def test_gradient_features_from_training_to_bundle_to_scheduler(tiny_meta_training):
    """--gradient-features: the meta-environment observes them, the bundle records them, and the
    loaded bundle drives a scheduler and an ensemble."""
    config = get_preset("quick", task_distribution="toy", n_envs=2, n_steps=8, batch_size=16, n_epochs=1)
    env = make_meta_env(config.replace(gradient_features=True), seed=0)
    assert env.unwrapped.gradient_features and env.observation_space.shape == (
        HPOVecEnv(1, epochs_feature=config.epochs_feature).observation_space.shape[0] + 2,
    )
    model = make_meta_agent(env, config, seed=0, device="cpu")
    bundle = bundle_from_model(model, env, env.unwrapped.decoder)
    assert bundle.gradient_features and bundle.obs_dim == env.observation_space.shape[0]

    result = tiny_meta_training("--gradient-features")
    config_json = json.loads((result.bundle_path / "config.json").read_text())
    assert config_json["gradient_features"] is True and config_json["feature_names"][-3:-1] == list(GRADIENT_FEATURES)
    loaded = load_bundle(result.bundle_path)
    assert loaded.gradient_features

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = PolicyScheduler(opt, loaded, total_steps=4, epochs=4)
    for _ in range(4):
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(8, 3)).pow(2).mean().backward()
            opt.step()
        sched.step(1.0)
    assert sched.last_observation.shape == (loaded.obs_dim,)

    plain = bundle_from_model(model, None, env.unwrapped.decoder)
    with pytest.raises(BundleError, match="gradient_features"):
        EnsembleBundle([loaded, plain])


def test_bundle_with_a_malformed_gradient_flag_is_refused(tmp_path):
    from agents import BundleError, save_bundle

    config = get_preset("quick", task_distribution="toy", n_envs=2, n_steps=8, batch_size=16, n_epochs=1)
    env = make_meta_env(config.replace(gradient_features=True), seed=0)
    model = make_meta_agent(env, config, seed=0, device="cpu")
    path = save_bundle(tmp_path / "b", model, env.unwrapped.decoder, gradient_features=True)
    assert load_bundle(path).gradient_features
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "gradient_features": "yes"}))
    with pytest.raises(BundleError, match="gradient_features='yes'"):
        load_bundle(path)
    (path / "config.json").write_text(json.dumps({**cfg, "gradient_features": False}))
    with pytest.raises(BundleError, match="obs_dim"):
        load_bundle(path)


def test_throughput_benchmark_measures_the_cost_of_the_gradient_features(load_script):
    """``benchmarks/throughput.py --gradient-cost``: both settings really run."""
    throughput = load_script("benchmarks/throughput.py")
    seen = []
    measure = throughput.measure_env

    def spy(*args, gradient_features=False, **kwargs):
        seen.append(gradient_features)
        return measure(*args, gradient_features=gradient_features, **kwargs)

    throughput.measure_env = spy
    dist = throughput.TaskDistribution(["teacher_regression"], name="teacher_regression")
    (row,) = throughput.measure_gradient_cost([("teacher_regression", dist)], [1], seconds=0.0, seed=0, repeats=1)
    assert sorted(seen) == [False, True]
    assert row["plain_steps_per_s"] > 0 and row["gradient_features_steps_per_s"] > 0


def test_a_loaded_state_forgets_the_gradients_of_optimizer_steps_before_the_load():
    """Steps taken by the optimizer before load_state_dict belong to another run: the next decision sees only
    the steps after the load, as a scheduler built fresh and loaded does."""
    import copy
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    decoder = ActionDecoder(("lr", "weight_decay"))

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def train_steps(m, opt, n, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n):
            opt.zero_grad()
            m(torch.randn(8, 3, generator=gen)).pow(2).mean().backward()
            opt.step()

    opt = sgd(model)
    sched = PolicyScheduler(opt, _Replay(decoder, np.zeros((20, 2), np.float32)), total_steps=12)
    train_steps(model, opt, 3, seed=1)
    sched.step(1.0, train_loss=1.0)
    state, weights, moments = sched.state_dict(), copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the unsaved statistics of steps after the save: none here)
        train_steps(model, opt, 5, seed=2)  # steps that the load below discards
        sched.load_state_dict(state)
    model.load_state_dict(weights)
    opt.load_state_dict(copy.deepcopy(moments))  # (load_state_dict keeps the given tensors: one copy each)
    fresh_model = copy.deepcopy(model)
    fresh_opt = sgd(fresh_model)
    fresh_opt.load_state_dict(copy.deepcopy(moments))
    fresh = PolicyScheduler(fresh_opt, _Replay(decoder, np.zeros((20, 2), np.float32)), total_steps=12)
    fresh.load_state_dict(state)
    for m, o, s in ((model, opt, sched), (fresh_model, fresh_opt, fresh)):
        train_steps(m, o, 2, seed=3)
        s.step(0.9, train_loss=0.9)
    np.testing.assert_array_equal(sched.last_observation, fresh.last_observation)
