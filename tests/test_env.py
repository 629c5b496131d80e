from __future__ import annotations

import math
import re

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import hpo_env  # noqa: F401  (registers the ids)
from hpo_env import FAMILIES, HPOEnv, HPOVecEnv, TaskDistribution


@pytest.mark.parametrize("env_id", ["hpo_env/HPOToy-v0", "hpo_env/HPO-v0"])
def test_check_env(env_id):
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)
    check_env(gym.make(env_id, render_mode="ansi").unwrapped)


def _rollout(env, seed, actions):
    obs, info = env.reset(seed=seed)
    out = [(obs, 0.0, info["val_loss"])]
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append((obs, r, info["val_loss"]))
        if term:
            break
    return out


def test_same_seed_same_actions_same_trajectory():
    actions = np.random.default_rng(0).uniform(-1, 1, size=(12, 2)).astype(np.float32)
    a = _rollout(HPOEnv("toy"), 5, actions)
    b = _rollout(HPOEnv("toy"), 5, actions)
    assert len(a) == len(b) == 10
    for (oa, ra, la), (ob, rb, lb) in zip(a, b):
        np.testing.assert_array_equal(oa, ob)
        assert ra == rb and la == lb


def test_numpy_integer_seed_is_a_seed():
    # Gymnasium's seeding takes Python ints only ("Seed must be a python integer"); HPOVecEnv took NumPy ones already.
    env = HPOEnv("toy")
    for seed in np.arange(2):
        obs, info = env.reset(seed=seed)
        expected_obs, expected_info = HPOEnv("toy").reset(seed=int(seed))
        np.testing.assert_array_equal(obs, expected_obs)
        assert info["task_id"] == expected_info["task_id"]
    with pytest.raises(gym.error.Error, match="Seed must be a python integer.*float"):
        env.reset(seed=1.5)


def test_different_seeds_different_tasks():
    env = HPOEnv()
    ids = {env.reset(seed=s)[1]["task_id"] for s in range(8)}
    assert len(ids) == 8


def test_environments_leave_the_global_generators_alone():
    """All randomness comes from reset(seed=) and the tasks' own generators: building, resetting and
    stepping an environment neither shifts the caller's draws (data order, initialisation) nor depends on them."""
    import pickle
    import random

    import torch

    def state():
        return torch.get_rng_state(), pickle.dumps(np.random.get_state()), random.getstate()  # noqa: NPY002

    before = state()
    env = HPOEnv("toy")
    env.reset(seed=0)
    env.step(np.zeros(2, np.float32))
    env.reset()
    venv = HPOVecEnv(2, "toy", seed=0)
    venv.reset()
    venv.step(np.zeros((2, 2), np.float32))
    after = state()
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]


def test_reward_telescopes_to_log_loss_ratio():
    env = HPOEnv("toy")
    _, info = env.reset(seed=0)
    first, total, done = info["val_loss"], 0.0, False
    while not done:
        _, r, done, _, info = env.step(np.zeros(2, np.float32))
        total += r
    assert total == pytest.approx(np.log(first / info["final_val_loss"]), rel=1e-6)
    assert np.isfinite(info["test_loss"])


def test_huge_learning_rate_diverges_with_a_penalty_not_an_exception():
    env = HPOEnv("toy", bounds={"lr": (1e-5, 1e4)}, max_log10_change=2.0, divergence_penalty=1.5)
    env.reset(seed=0)
    total, steps = 0.0, 0
    while True:
        obs, r, term, trunc, info = env.step(np.array([1.0, 0.0], np.float32))
        total, steps = total + r, steps + 1
        assert np.isfinite(r) and np.all(np.isfinite(obs))
        assert env.observation_space.contains(obs)
        if term:
            break
    assert info["diverged"] and steps < 9
    assert total == pytest.approx(-1.5), "a diverged episode returns exactly -divergence_penalty"
    assert math.isnan(info["final_val_loss"]) and "test_loss" not in info  # no final loss of a diverged run
    with pytest.raises(RuntimeError, match=r"the episode has ended .*: call reset\(\) before step\(\)"):
        env.step(np.zeros(2, np.float32))


def test_a_running_env_pickles_and_its_copy_steps_identically():
    """An environment sent to a subprocess (or saved) after reset() goes on exactly where it was."""
    import pickle

    env = gym.make("hpo_env/HPO-v0").unwrapped
    env.reset(seed=3)
    twin = pickle.loads(pickle.dumps(env))
    action = np.array([0.5, -0.5], np.float32)
    a, b = env.step(action), twin.step(action)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_a_full_episode(family):
    env = HPOEnv("all", hyperparameters=("lr", "weight_decay", "momentum"))
    spec = TaskDistribution.default("all").sample_family(family, np.random.default_rng(1))
    obs, info = env.reset(seed=0, options={"task": spec})
    env.action_space.seed(0)  # reset(seed=) does not seed the space: the same actions every run
    assert info["task_family"] == family
    n, done = 0, False
    while not done:
        obs, r, done, trunc, info = env.step(env.action_space.sample())
        n += 1
        assert env.observation_space.contains(obs) and np.isfinite(r)
    assert info["diverged"] or n == spec.num_decisions - 1
    assert set(info["hparams"]) == {"lr", "weight_decay", "momentum"}
    assert ("val_accuracy" in info) == (spec.task_type == "classification")
    if not info["diverged"]:
        assert np.isfinite(info["test_loss"]) and info["final_val_loss"] == info["val_loss"]
        assert ("test_accuracy" in info) == (spec.task_type == "classification")


def test_ansi_render():
    env = HPOEnv("toy", render_mode="ansi")
    env.reset(seed=0)
    env.action_space.seed(0)
    env.step(env.action_space.sample())
    text = env.render()
    assert "decision 2/10" in text and "lr=" in text and "val=" in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hyperparameters": ("lr", "dropout")}, "unknown hyperparameters"),
        ({"hyperparameters": ("lr", "lr")}, "must not repeat"),
        ({"hyperparameters": ()}, "at least one"),
        ({"bounds": {"lr": (0.0, 1.0)}}, "positive and ordered"),
        ({"bounds": {"lr": (1.0, 0.1)}}, "positive and ordered"),
        ({"hyperparameters": ("lr", "momentum"), "bounds": {"momentum": (0.5, 1.0)}}, "momentum bounds"),
        ({"bounds": {"momentum": (0.5, 0.9)}}, "not controlled"),
        ({"max_log10_change": 0.0}, "max_log10_change"),
        ({"task_distribution": "imagenet"}, "task_distribution must be"),
        ({"divergence_penalty": -1.0}, "divergence_penalty"),
        ({"render_mode": "human"}, "render_mode"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HPOEnv(**kwargs)


def test_bad_reset_options():
    env = HPOEnv("toy")
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"tsk": 1})
    with pytest.raises(TypeError, match="TaskSpec"):
        env.reset(options={"task": "wine"})


def test_non_finite_action_is_rejected():
    env = HPOEnv("toy")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 0.0], np.float32))


@pytest.mark.parametrize("action", [np.array(["0.1", "0.2"]), [True, False], np.array([1j, 0]), {"lr": 1}, None])
def test_an_action_that_only_looks_numeric_is_refused(action):
    """NumPy would parse strings and read booleans as 0/1: a type error names what was given instead."""
    env = HPOEnv("toy")
    env.reset(seed=0)
    with pytest.raises(TypeError, match="the action must be real numbers"):
        env.step(action)
    assert env.step(np.array([1, 0]))[0] is not None  # integers are numbers


def test_divergence_in_the_first_interval_ends_the_first_step():
    """The first interval runs before any decision; if it diverges, reset still returns a valid
    observation and the first step terminates with the penalty, without training further."""
    env = HPOEnv("toy", bounds={"lr": (1e-5, 1e6)}, divergence_penalty=2.0)
    spec = env.task_distribution.sample(np.random.default_rng(0)).replace(lr=1e5)
    obs, info = env.reset(seed=0, options={"task": spec})
    assert env.observation_space.contains(obs)
    steps_before = info["inner_step"]
    obs, r, term, trunc, info = env.step(np.zeros(2, np.float32))
    assert term and info["diverged"] and r == -2.0
    assert info["inner_step"] == steps_before and env.observation_space.contains(obs)


def test_a_bad_action_changes_nothing_even_beside_a_diverged_slot():
    """Actions are checked before any slot changes: a NaN action is refused, whether the slot diverged
    in its first interval or not, and the batch can then be stepped with good actions."""
    vec = HPOVecEnv(2, "toy", bounds={"lr": (1e-5, 1e6)})
    spec = vec.task_distribution.sample(np.random.default_rng(0))
    vec.set_options([{"task": spec.replace(lr=1e5)}, {"task": spec}])
    vec.reset()
    for bad in ([[0.0, 0.0], [np.nan, 0.0]], [[np.nan, 0.0], [0.0, 0.0]]):
        with pytest.raises(ValueError, match=r"finite; slot\(s\) \[\d\]"):
            vec.step(np.array(bad, np.float32))
    with pytest.raises(ValueError, match=r"expected actions of shape \(2, 2\).*got an array of shape \(2, 3\)"):
        vec.step(np.zeros((2, 3), np.float32))
    _, rewards, dones, infos = vec.step(np.zeros((2, 2), np.float32))
    assert dones[0] and infos[0]["diverged"] and rewards[0] == -vec._batch.divergence_penalty
    assert not dones[1] and np.isfinite(rewards[1])
    # An episode that diverged in its first interval reports it from reset on and ends like any other
    # diverged episode, with a NaN final loss.
    assert math.isnan(infos[0]["final_val_loss"])


def test_actions_of_the_right_size_but_the_wrong_shape_are_refused():
    """A transposed (k, N) array has N * k values too, but would give each slot another slot's values."""
    vec = HPOVecEnv(4, "toy")
    vec.reset()
    for shape in ((2, 4), (8,), (4, 2, 1)):
        with pytest.raises(ValueError, match=r"expected actions of shape \(4, 2\).*shape " + re.escape(str(shape))):
            vec.step(np.zeros(shape, np.float32))
    env = HPOEnv("toy")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected an action of shape \(2,\).*got an array of shape \(1, 2\)"):
        env.step(np.zeros((1, 2), np.float32))
    one = HPOEnv("toy", hyperparameters=("lr",))
    one.reset(seed=0)
    for action in (0.5, np.array([0.5])):  # one hyperparameter: a scalar or a (1,) array
        assert np.isfinite(one.step(action)[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_envs": 2.5}, "num_envs must be an integer"),
        ({"num_envs": True}, "num_envs must be an integer"),
        ({"num_envs": 4, "task_group_size": 3}, "divides num_envs = 4"),
        ({"num_envs": 4, "divergence_penalty": math.inf}, "finite number >= 0"),
    ],
)
def test_vec_env_refuses_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HPOVecEnv(task_distribution="toy", **kwargs)


def test_vec_env_takes_numpy_integer_counts():
    vec = HPOVecEnv(np.int64(4), "toy", task_group_size=np.int64(2))
    assert vec.num_envs == 4 and vec.task_group_size == 2


def test_a_zero_validation_loss_gives_a_finite_reward(monkeypatch):
    """A float32 cross-entropy can round to exactly 0 on an easy validation set: the reward stays finite
    (the loss is floored before its log) and the episode goes on."""
    from hpo_env.core import LOSS_FLOOR

    env = HPOEnv("toy")
    env.reset(seed=0)
    trainer = env.unwrapped._batch.trainer
    real = trainer.train_chunk

    def perfect(slots):
        res = real(slots)
        res.val_loss[:] = 0.0
        return res

    monkeypatch.setattr(trainer, "train_chunk", perfect)
    before = env.unwrapped._batch.episodes[0].last_val
    _, reward, terminated, _, info = env.step(np.zeros(2, np.float32))
    assert np.isfinite(reward) and reward == pytest.approx(np.log(before) - np.log(LOSS_FLOOR))
    assert not info["diverged"] and info["val_loss"] == 0.0
    _, reward, *_ = env.step(np.zeros(2, np.float32))
    assert reward == 0.0  # from a floored 0 to a floored 0


def test_hpo_demo_runs_an_episode_and_refuses_bad_options(capsys):
    from hpo_env.__main__ import main as demo

    demo(["--distribution", "toy", "--seed", "0", "--lr-action", "-0.2"])
    out = capsys.readouterr().out
    assert out.count("decision") >= 2 and "= log(L_1 / L_T); final validation loss" in out
    demo(["--distribution", "toy", "--lr-action", "1"])  # the largest rises make the toy task diverge
    assert "the run diverged (the return of a diverged episode is -divergence_penalty)" in capsys.readouterr().out
    for argv, expected in (
        (["--distribution", "bogus"], "invalid choice: 'bogus'"),
        (["--lr-action", "nan"], "--lr-action: must be a number in [-1, 1]"),
        (["--lr-action", "5"], "--lr-action: must be a number in [-1, 1]"),
        (["--seed", "-1"], "--seed: must be an integer >= 0"),
        (["--seed", "x"], "--seed: must be an integer >= 0, got x"),  # not "invalid _seed value: 'x'"
        (["--lr-action", "x"], "--lr-action: must be a number in [-1, 1] (the action's range), got x"),
    ):
        with pytest.raises(SystemExit):
            demo(argv)
        assert expected in capsys.readouterr().err


def test_flags_and_penalty_of_the_wrong_type_are_refused_not_read_as_true():
    with pytest.raises(TypeError, match="gradient_features must be True or False, got 'no'"):
        HPOEnv("toy", gradient_features="no")
    with pytest.raises(ValueError, match="divergence_penalty must be a finite number >= 0, got '1'"):
        HPOEnv("toy", divergence_penalty="1")


def _episode_start(family: str) -> np.ndarray:
    env = HPOEnv(TaskDistribution([family]))
    obs, _ = env.reset(seed=3)
    rows = [obs]
    for _ in range(2):
        obs, reward, *_ = env.step(np.zeros(env.action_space.shape, np.float32))
        rows.append(np.append(obs, reward))
    return np.concatenate(rows)


@pytest.mark.parametrize("family", ["digits_cnn", "digits_mlp"])  # autograd's backward, and the hand-written one
def test_an_episode_is_the_same_whatever_the_callers_torch_modes(family):
    """Under torch.no_grad() or inference_mode() (an evaluation loop), the CNN's autograd used to fail; under a
    float64 default dtype, parameters were drawn in float64 and met float32 data. The same seed now gives
    the same episode in every mode, and the caller's modes are left as they were."""
    import torch

    reference = _episode_start(family)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            np.testing.assert_array_equal(_episode_start(family), reference)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        np.testing.assert_array_equal(_episode_start(family), reference)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(dtype)


def test_the_divergence_penalty_can_change_between_episodes_and_the_decoder_cannot():
    env = HPOEnv("toy", bounds={"lr": (1e-5, 1e4)}, max_log10_change=2.0)
    env.divergence_penalty = 3.0  # what a curriculum might do: the next divergence returns -3
    env.reset(seed=0)
    total, terminated = 0.0, False
    while not terminated:
        _, reward, terminated, _, info = env.step(np.ones(env.action_space.shape, np.float32))
        total += reward
    assert info["diverged"] and total == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="divergence_penalty must be a finite number >= 0"):
        env.divergence_penalty = -1.0
    with pytest.raises(AttributeError):
        env.decoder = env.decoder  # the spaces follow from it
    env.task_distribution = "validation"
    assert isinstance(env.task_distribution, TaskDistribution)
