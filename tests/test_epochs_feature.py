"""The optional epochs feature: the environment's value, the scheduler's (one source of truth), bundles,
the benchmark's column selection and the training option."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from agents import EnsembleBundle, PolicyScheduler, get_preset, load_bundle, make_meta_agent, make_meta_env
from agents.bundle import BundleError
from hpo_env import (
    EPOCHS_FEATURE,
    GRADIENT_FEATURES,
    ActionDecoder,
    HPOEnv,
    HPOVecEnv,
    ObservationBuilder,
    build_splits,
    log_epochs_feature,
)
from training.benchmark import _RowPolicies
from training.callbacks import bundle_from_model
from training.rollout import run_episodes
from training.train import parse_settings


class _Replay:
    """Replays zero actions and records what it is shown (SB3 ``predict`` protocol)."""

    def __init__(self, decoder, epochs_feature=True, gradient_features=False):
        self.decoder, self.epochs_feature, self.gradient_features = decoder, epochs_feature, gradient_features
        self.seen: list[np.ndarray] = []

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        self.seen.append(np.array(obs, copy=True))
        return np.zeros((len(obs), self.decoder.num_actions), np.float32), state


def test_the_feature_is_log10_epochs_minus_one_and_a_half():
    np.testing.assert_allclose(log_epochs_feature([10**0.5, 10**1.5, 10**2.5]), [-1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="epochs must be finite and > 0"):
        log_epochs_feature(0.0)


def test_env_observes_the_planned_epochs_constant_over_the_episode(small_mlp_spec):
    env = HPOEnv(epochs_feature=True)
    assert env.epochs_feature and env.feature_names[-1] == EPOCHS_FEATURE
    assert env.observation_space.shape == (HPOEnv().observation_space.shape[0] + 1,)
    n_train = build_splits(small_mlp_spec).x_train.shape[0]
    expected = log_epochs_feature(small_mlp_spec.total_steps * small_mlp_spec.batch_size / n_train)
    obs, _ = env.reset(seed=0, options={"task": small_mlp_spec})
    plain, _ = HPOEnv().reset(seed=0, options={"task": small_mlp_spec})
    np.testing.assert_array_equal(obs[:-1], plain)  # the other features are untouched
    seen = [obs[-1]]
    env.action_space.seed(0)
    terminated = False
    while not terminated:
        obs, _, terminated, _, _ = env.step(env.action_space.sample())
        seen.append(obs[-1])
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    check_env(HPOEnv("toy", epochs_feature=True), skip_render_check=True)
    assert gym.make("hpo_env/HPOToy-v0", epochs_feature=True).observation_space.shape == env.observation_space.shape


def test_vec_env_slots_observe_their_own_tasks_epochs():
    vec = HPOVecEnv(4, "all", seed=0, epochs_feature=True)
    obs = vec.reset()
    want = [log_epochs_feature(t.total_steps * t.batch_size / build_splits(t).x_train.shape[0]) for t in vec.tasks()]
    np.testing.assert_allclose(obs[:, -1], want, rtol=1e-6)


def test_builder_demands_epochs_exactly_when_it_observes_them():
    decoder = ActionDecoder()
    args = ([0], [1.0], [1.0], np.array([[1e-3, 1e-4]]), [0.1])
    with pytest.raises(ValueError, match="pass epochs="):
        ObservationBuilder(decoder, epochs_feature=True).reset(*args, adaptive=True)
    with pytest.raises(ValueError, match="epochs_feature=False"):
        ObservationBuilder(decoder).reset(*args, adaptive=True, epochs=10.0)


def test_scheduler_sees_what_the_environment_sees(small_mlp_spec):
    """The same losses and hyperparameters, the same observations, epochs column included: the
    scheduler is told the run's epochs; the environment computes them from the task."""
    spec = small_mlp_spec
    env = HPOEnv(epochs_feature=True)
    obs, info = env.reset(seed=0, options={"task": spec})
    env_obs, losses = [obs], [(info["val_loss"], info["train_loss"])]
    for _ in range(spec.num_decisions - 1):
        obs, _, _, _, info = env.step(np.zeros(2, np.float32))
        env_obs.append(obs)
        losses.append((info["val_loss"], info["train_loss"]))
    net = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(net.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    policy = _Replay(ActionDecoder())
    epochs = spec.total_steps * spec.batch_size / build_splits(spec).x_train.shape[0]
    sched = PolicyScheduler(opt, policy, total_steps=spec.num_decisions, epochs=epochs)
    for val, tr in losses:
        sched.step(val, train_loss=tr)
    np.testing.assert_allclose(np.concatenate(policy.seen), np.stack(env_obs[:-1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sched.last_observation, env_obs[-1], rtol=1e-5, atol=1e-6)


def test_scheduler_needs_a_positive_epochs_for_such_a_policy():
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="pass epochs="):
        PolicyScheduler(opt, _Replay(ActionDecoder()), total_steps=5)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="epochs must be a finite number > 0"):
            PolicyScheduler(opt, _Replay(ActionDecoder()), total_steps=5, epochs=bad)
    # a policy without the feature takes (and ignores) it, so integrations may always pass it
    plain = PolicyScheduler(opt, _Replay(ActionDecoder(), epochs_feature=False), total_steps=5, epochs=12)
    plain.step(1.0)
    assert plain.last_observation.shape == (ObservationBuilder(ActionDecoder()).dim,)


def test_state_dict_carries_the_epochs():
    decoder = ActionDecoder()
    make = lambda: torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)  # noqa: E731
    sched = PolicyScheduler(make(), _Replay(decoder), total_steps=5, epochs=100.0)
    sched.step(1.0)
    resumed = PolicyScheduler(make(), _Replay(decoder), total_steps=5, epochs=1.0)
    with pytest.warns(UserWarning, match="saved by a run of epochs=100; it replaces this scheduler's epochs=1"):
        resumed.load_state_dict(sched.state_dict())
    sched.step(0.9)
    resumed.step(0.9)
    np.testing.assert_array_equal(resumed.last_observation, sched.last_observation)
    assert sched.last_observation[-1] == pytest.approx(log_epochs_feature(100.0))


def test_benchmark_rows_see_their_own_columns():
    decoder = ActionDecoder()
    base = ObservationBuilder(decoder).dim
    both = _Replay(decoder, epochs_feature=True, gradient_features=True)
    epochs_only, grads_only, plain = (
        _Replay(decoder, True, False),
        _Replay(decoder, False, True),
        _Replay(decoder, False, False),
    )
    rows = _RowPolicies([both, epochs_only, grads_only, plain])
    assert rows.gradient_features and rows.epochs_feature
    width = base + len(GRADIENT_FEATURES) + 1
    obs = np.tile(np.arange(width, dtype=np.float32), (4, 1))
    rows.predict(obs)
    np.testing.assert_array_equal(both.seen[0][0], np.arange(width))
    np.testing.assert_array_equal(epochs_only.seen[0][0], [*range(base), width - 1])
    np.testing.assert_array_equal(grads_only.seen[0][0], np.arange(width - 1))
    np.testing.assert_array_equal(plain.seen[0][0], np.arange(base))


def test_run_episodes_follows_the_policys_feature_set(small_mlp_spec):
    decoder = ActionDecoder()
    policy = _Replay(decoder)
    (record,) = run_episodes(policy, [small_mlp_spec], decoder)
    assert policy.seen[0].shape == (1, ObservationBuilder(decoder, epochs_feature=True).dim)
    assert not record.diverged


def test_epochs_feature_from_training_to_bundle_to_scheduler(tiny_meta_training):
    config = get_preset("quick", task_distribution="toy", n_envs=2, n_steps=8, batch_size=16, n_epochs=1)
    env = make_meta_env(config.replace(epochs_feature=True), seed=0)
    assert env.unwrapped.epochs_feature
    model = make_meta_agent(env, config, seed=0, device="cpu")
    assert bundle_from_model(model, env, env.unwrapped.decoder).epochs_feature

    result = tiny_meta_training("--epochs-feature")
    config_json = json.loads((result.bundle_path / "config.json").read_text())
    assert config_json["epochs_feature"] is True and config_json["feature_names"][-1] == EPOCHS_FEATURE
    assert config_json["env"]["epochs_feature"] is True
    loaded = load_bundle(result.bundle_path)
    assert loaded.epochs_feature and loaded.obs_dim == env.observation_space.shape[0]

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = PolicyScheduler(opt, loaded, total_steps=3, epochs=40)
    for _ in range(3):
        sched.step(1.0)
    assert sched.last_observation[-1] == pytest.approx(log_epochs_feature(40.0))

    plain = bundle_from_model(model, None, env.unwrapped.decoder)
    with pytest.raises(BundleError, match="epochs_feature"):
        EnsembleBundle([loaded, plain])
    cfg = json.loads((result.bundle_path / "config.json").read_text())
    cfg["epochs_feature"] = "yes"
    (result.bundle_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="epochs_feature='yes'"):
        load_bundle(result.bundle_path)


def test_save_bundle_reads_the_feature_set_from_the_model(tmp_path):
    from agents import BundleError, save_bundle

    config = get_preset("quick", task_distribution="toy", n_envs=2, n_steps=8, batch_size=16, n_epochs=1)
    assert config.epochs_feature  # the presets observe the epochs
    env = make_meta_env(config, seed=0)
    model = make_meta_agent(env, config, seed=0, device="cpu")
    decoder = env.unwrapped.decoder
    assert load_bundle(save_bundle(tmp_path / "a", model, decoder)).epochs_feature
    with pytest.raises(BundleError, match="no feature set|gives"):
        save_bundle(tmp_path / "b", model, decoder, epochs_feature=False)
    plain = make_meta_agent(make_meta_env(config.replace(epochs_feature=False), seed=0), config, seed=0, device="cpu")
    assert not load_bundle(save_bundle(tmp_path / "c", plain, decoder)).epochs_feature


def test_a_state_from_before_the_feature_resumes_with_the_epochs_given_now():
    decoder = ActionDecoder()
    make = lambda: torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)  # noqa: E731
    sched = PolicyScheduler(make(), _Replay(decoder), total_steps=5, epochs=500.0)
    sched.step(1.0)
    old = sched.state_dict()
    del old["epochs"], old["epochs_feature"], old["features"]["_epochs"]  # as an older hpo-meta saved it
    resumed = PolicyScheduler(make(), _Replay(decoder), total_steps=5, epochs=500.0)
    resumed.load_state_dict(old)
    resumed.step(0.9)
    assert resumed.last_observation[-1] == pytest.approx(log_epochs_feature(500.0))
    plain = PolicyScheduler(make(), _Replay(decoder, epochs_feature=False), total_steps=5)
    with pytest.raises(ValueError, match="observes the run's epochs"):
        plain.load_state_dict(sched.state_dict())


def test_resuming_a_run_made_before_the_option_keeps_it_off(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    settings = parse_settings(["--task-distribution", "toy", "--run-name", "old"]).to_dict()
    del settings["epochs_feature"]  # a settings.json written before the option existed
    (run / "settings.json").write_text(json.dumps(settings))
    assert parse_settings(["--resume", str(run)]).agent_config().epochs_feature is False
    assert parse_settings(["--resume", str(run), "--no-epochs-feature"]).agent_config().epochs_feature is False
