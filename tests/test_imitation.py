"""The imitation warm start: grid search, the teacher's demonstrations, and cloning into the LSTM policy."""

from __future__ import annotations

import numpy as np
import pytest

from agents import get_preset, make_meta_agent, make_meta_env
from agents.baselines import lr_grid
from agents.factory import get_vec_normalize
from hpo_env import ActionDecoder, TaskDistribution
from training.imitation import OracleCosine, clone, demonstrations, grid_search, warm_start
from training.rollout import run_episodes
from training.train import parse_settings


@pytest.fixture(scope="module")
def toy_tasks():
    rng = np.random.default_rng(0)
    dist = TaskDistribution(("teacher_regression",), optimizers=("sgd",), name="toy")
    return [dist.sample(rng).replace(total_steps=50, steps_per_action=10) for _ in range(3)]


def test_grid_search_keeps_each_tasks_best_rate(toy_tasks):
    decoder = ActionDecoder()
    best = grid_search(toy_tasks, decoder, grid_size=3, decades=1.0)
    from agents.baselines import CosineSchedule, schedule_decoder

    for task, lr in zip(toy_tasks, best):
        grid = lr_grid(task.optimizer, 3, 1.0)
        assert lr in grid
        runs = run_episodes(
            CosineSchedule(schedule_decoder(decoder)), [task.replace(lr=float(x)) for x in grid], decoder
        )
        losses = [np.inf if r.diverged else r.final_val_loss for r in runs]
        assert lr == grid[int(np.argmin(losses))]


def test_teacher_moves_towards_the_best_rate_within_the_policys_steps(toy_tasks):
    decoder = ActionDecoder()  # 0.25 decades per decision at most
    best = np.array([t.lr * 100 for t in toy_tasks])  # two decades up: needs eight full steps
    demos = demonstrations(toy_tasks, best, decoder, gamma=0.99)
    lr_col = decoder.names.index("lr")
    assert demos.mask.sum() == sum(t.num_decisions - 1 for t in toy_tasks)
    np.testing.assert_array_equal(demos.actions[:, 0, lr_col], 1.0)  # first moves: as far up as allowed
    assert np.all(demos.actions[:, :, 1:][demos.mask] == 0.0)  # weight decay held
    for rec, task in zip(demos.records, toy_tasks):
        lrs = np.array(rec.hparams["lr"])
        assert np.all(np.abs(np.diff(np.log10(lrs))) <= 0.25 + 1e-9)
        assert lrs.max() > task.lr * 10**0.9  # four steps up, then the cosine target comes down to meet it
        returns = demos.returns[demos.records.index(rec)]
        assert returns[0] == pytest.approx(sum(0.99**i * r for i, r in enumerate(rec.rewards)), rel=1e-5)
    teacher = OracleCosine(decoder, [1e-2], [1e-1])
    assert teacher.offset[0] == pytest.approx(1.0)


def test_cloning_fits_the_policy_to_the_teacher(toy_tasks):
    config = get_preset("quick", task_distribution="toy", n_envs=2)
    env = make_meta_env(config, seed=0)
    model = make_meta_agent(env, config, seed=0, device="cpu")
    decoder = env.unwrapped.decoder
    demos = demonstrations(
        toy_tasks,
        np.array([t.lr * 10 for t in toy_tasks]),
        decoder,
        gamma=config.gamma,
        epochs_feature=config.epochs_feature,
    )
    before = clone(model, demos, get_vec_normalize(env), epochs=1)
    after = clone(model, demos, get_vec_normalize(env), epochs=150)
    assert after["bc_loss"] < 0.5 * before["bc_loss"] and after["value_loss"] < before["value_loss"]
    # The cloned policy, deployed through its normal predict path, now acts like the teacher.
    obs = get_vec_normalize(env).normalize_obs(demos.obs[:, 0])
    actions, _ = model.predict(obs, episode_start=np.ones(len(obs), bool), deterministic=True)
    np.testing.assert_allclose(actions, demos.actions[:, 0], atol=0.3)


def test_warm_start_summary_and_cli_checks(capsys):
    config = get_preset("quick", task_distribution="toy", n_envs=2)
    env = make_meta_env(config, seed=0)
    model = make_meta_agent(env, config, seed=0, device="cpu")
    summary = warm_start(
        model, get_vec_normalize(env), env.unwrapped.decoder, n_tasks=2, seed=0, gamma=0.99, distribution="toy",
        grid_size=2, epochs=2, log=lambda *a: None,
    )  # fmt: skip
    assert summary["tasks"] == 2 and summary["inner_runs"] == 6 and np.isfinite(summary["bc_loss"])
    assert parse_settings(["--imitation-tasks", "64"]).imitation_tasks == 64
    with pytest.raises(SystemExit):
        parse_settings(["--imitation-tasks", "-1"])
    assert "--imitation-tasks must be >= 0 (0 turns the warm start off), got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--imitation-tasks", "8", "--algorithm", "framestack"])
    assert "--imitation-tasks clones into the recurrent policy; use it with --algorithm recurrent" in (
        capsys.readouterr().err
    )


def test_warm_start_refuses_a_policy_without_an_lstm():
    config = get_preset("quick", task_distribution="toy", n_envs=2, algorithm="framestack", batch_size=64)
    env = make_meta_env(config, seed=0)
    model = make_meta_agent(env, config, seed=0, device="cpu")
    with pytest.raises(ValueError, match="clones into an LSTM policy"):
        warm_start(model, None, env.unwrapped.decoder, n_tasks=1, seed=0, gamma=0.99, distribution="toy")
