from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hpo_env import HPOEnv, HPOVecEnv, TaskDistribution, make_distribution
from hpo_env.tasks import DEFAULT_HPARAMS


def _compare(vec: HPOVecEnv, envs: list[HPOEnv], seed: int, n_steps: int, rng) -> int:
    vec.seed(seed)
    obs_v = vec.reset()
    obs_s = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)])
    np.testing.assert_allclose(obs_v, obs_s, rtol=1e-4, atol=1e-5)
    resets = 0
    for _ in range(n_steps):
        actions = rng.uniform(-1, 1, size=(len(envs), vec.action_space.shape[0])).astype(np.float32)
        obs_v, rew_v, done_v, infos = vec.step(actions)
        for i, env in enumerate(envs):
            o, r, term, trunc, info = env.step(actions[i])
            assert done_v[i] == term
            np.testing.assert_allclose(rew_v[i], r, rtol=1e-3, atol=1e-5)
            if term:
                resets += 1
                np.testing.assert_allclose(infos[i]["terminal_observation"], o, rtol=1e-4, atol=1e-5)
                o, _ = env.reset()
            np.testing.assert_allclose(obs_v[i], o, rtol=1e-4, atol=1e-4)
    return resets


def test_vec_env_matches_separate_envs_with_auto_reset():
    rng = np.random.default_rng(0)
    n = 3
    vec = HPOVecEnv(n, "toy")
    envs = [HPOEnv("toy") for _ in range(n)]
    assert _compare(vec, envs, seed=10, n_steps=14, rng=rng) == n  # every slot auto-reset once


def test_vec_env_matches_separate_envs_on_mixed_families():
    """Different families, shapes and budgets: slots share stacks by padding and regroup on resets."""
    dist = TaskDistribution(["teacher_classification", "make_classification", "digits_mlp"], optimizers=["adamw"])
    rng = np.random.default_rng(1)
    n = 4
    vec = HPOVecEnv(n, dist, hyperparameters=("lr", "weight_decay", "momentum"))
    envs = [HPOEnv(dist, hyperparameters=("lr", "weight_decay", "momentum")) for _ in range(n)]
    assert _compare(vec, envs, seed=3, n_steps=12, rng=rng) >= 1  # at least one slot regrouped on a reset


@pytest.mark.parametrize("family", ["tabular", "small_tabular", "charlm", "digits_cnn", "glyphs_cnn"])
def test_vec_env_matches_separate_envs_on_the_other_families(family):
    """Autograd (CNN), embedding (char) and tabular stacks, on SGD and AdamW side by side."""
    dist = TaskDistribution([family], optimizers=["sgd", "adamw"])
    vec = HPOVecEnv(3, dist, epochs_feature=True)
    envs = [HPOEnv(dist, epochs_feature=True) for _ in range(3)]
    _compare(vec, envs, seed=5, n_steps=4, rng=np.random.default_rng(2))


def test_vec_env_slots_sample_their_own_tasks():
    vec = HPOVecEnv(4, "all", seed=0)
    vec.reset()
    assert len({t.task_id for t in vec.tasks()}) == 4


def test_vec_env_bad_input():
    with pytest.raises(ValueError, match="num_envs"):
        HPOVecEnv(0)
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        HPOVecEnv(2, hyperparameters=("lr", "beta2"))


def test_seeds_and_options_apply_to_the_next_reset_only():
    """As in SB3's DummyVecEnv: ``seed()`` or ``set_options()`` between resets (SB3's
    ``set_random_seed`` does that) must not pin every later automatic reset of a slot to one task."""
    vec = HPOVecEnv(1, "toy", seed=0)
    vec.reset()
    vec.seed(7)
    tasks = []
    for _ in range(40):
        _, _, done, _ = vec.step(np.zeros((1, 2), np.float32))
        if done[0]:
            tasks.append(vec.tasks()[0].task_id)
    assert len(tasks) >= 3 and len(set(tasks)) == len(tasks)
    assert vec.reset() is not None and vec._seeds == [None]  # the seed was used by this reset


def test_attribute_protocol_per_slot():
    vec = HPOVecEnv(2, "toy", seed=0)
    vec.reset()
    assert vec.get_attr("task") == vec.tasks() and vec.get_attr("task", indices=[1]) == vec.tasks()[1:]
    assert vec.get_attr("num_envs", indices=[0]) == [2]
    with pytest.raises(ValueError, match="apply to every slot"):
        vec.set_attr("divergence_penalty", 1.0, indices=[0])
    with pytest.raises(ValueError, match="apply to every slot"):
        vec.env_method("reset", indices=[1])
    assert len(vec.env_method("tasks")) == 2


def test_recurrent_ppo_learns_on_vec_env():
    from sb3_contrib import RecurrentPPO

    vec = HPOVecEnv(4, "toy", seed=0)
    model = RecurrentPPO(
        "MlpLstmPolicy",
        vec,
        n_steps=16,
        batch_size=32,
        n_epochs=1,
        seed=0,
        policy_kwargs={"lstm_hidden_size": 16, "net_arch": [16]},
    )
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(64)
    after = model.policy.state_dict()
    assert model.num_timesteps == 64
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy was updated ...
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())  # ... to finite weights
    assert model.rollout_buffer.observations.shape[-1] == vec.observation_space.shape[0]


def test_a_relative_cap_holds_in_every_slot_across_automatic_resets():
    env = HPOVecEnv(3, "toy", seed=0, max_log10_above_initial={"lr": 0.3})
    env.reset()
    capped = 0
    for _ in range(40):  # several episodes per slot: each reset re-anchors the cap on the new task's start
        starts = [env._batch.episodes[i].spec.lr for i in range(env.num_envs)]
        env.step_async(np.ones((env.num_envs, env.action_space.shape[0]), dtype=np.float32))
        _, _, _, infos = env.step_wait()
        for start, info in zip(starts, infos):
            lr = info["hparams"]["lr"]
            assert lr <= start * 10**0.3 * (1 + 1e-12)
            capped += lr == pytest.approx(start * 10**0.3)
    assert capped > 40  # most steps push against the cap


def _default_lr_task(dist: TaskDistribution, seed: int):
    spec = dist.sample(np.random.default_rng(seed))
    return dataclasses.replace(spec, lr=DEFAULT_HPARAMS[spec.optimizer]["lr"])


def test_reference_runs_report_the_default_lr_twins_gain_and_leave_the_reward_alone():
    dist = make_distribution("toy")
    specs = [_default_lr_task(dist, 0), dataclasses.replace(_default_lr_task(dist, 1), lr=0.3)]
    with_ref, plain = HPOVecEnv(2, dist, reference_runs=True), HPOVecEnv(2, dist)
    for vec in (with_ref, plain):
        vec.set_options([{"task": s} for s in specs])
        vec.reset()
    assert with_ref.trainer.n_slots == 4 and plain.trainer.n_slots == 2  # one hidden twin per slot
    down = np.array([[0.0, 0.0], [-0.5, 0.0]], np.float32)
    gains = []
    for _ in range(specs[0].num_decisions - 1):
        _, r_ref, done_ref, info_ref = with_ref.step(down)
        _, r_plain, done_plain, _ = plain.step(down)
        np.testing.assert_allclose(r_ref, r_plain, rtol=1e-5, atol=1e-6)  # the environment's reward is unchanged
        assert (done_ref == done_plain).all()
        gains.append([i["reference_gain"] for i in info_ref])
        if done_ref.any():
            break
    gains = np.array(gains)
    assert done_ref[0] and np.isfinite(gains).all()
    # Slot 0 starts at the default LR and keeps it: its twin is the same run, so the gains agree.
    # Slot 1 starts 0.3 and is cut: its twin still runs at the default, a different run.
    np.testing.assert_allclose(
        gains[:, 0].sum(), np.log(info_ref[0]["first_val_loss"] / info_ref[0]["val_loss"]), rtol=1e-4
    )
    assert not np.allclose(gains[:, 1], 0)
    # A twin diverges by the same rule as its slot: against the untrained validation loss.
    ref = with_ref.trainer._reference_loss
    np.testing.assert_array_equal(ref[2:], ref[:2])


def test_a_diverging_reference_run_stops_counting(monkeypatch):
    """A twin that diverges (here: a default LR far too high) reports no gain from then on."""
    import hpo_env.core

    dist = make_distribution("toy")
    spec = _default_lr_task(dist, 0)
    monkeypatch.setitem(hpo_env.core.DEFAULT_HPARAMS, spec.optimizer, {**DEFAULT_HPARAMS[spec.optimizer], "lr": 1e4})
    vec = HPOVecEnv(1, dist, reference_runs=True, bounds={"lr": (1e-6, 1e4)})
    vec.set_options({"task": spec})
    vec.reset()
    for _ in range(3):
        _, reward, done, infos = vec.step(np.zeros((1, 2), np.float32))
        assert infos[0]["reference_gain"] == 0.0 and not done[0] and np.isfinite(reward).all()
    assert np.isnan(vec._batch.episodes[0].reference_val)  # the twin diverged in its first interval


def test_task_groups_train_one_task_in_step_and_restart_together():
    dist = make_distribution("toy")
    vec = HPOVecEnv(4, dist, task_group_size=2, seed=0)
    vec.reset()
    tasks = vec.tasks()
    assert tasks[0] == tasks[1] and tasks[2] == tasks[3] and tasks[0] != tasks[2]
    same = np.array([[0.3, 0.0], [0.3, 0.0], [-0.4, 0.1], [0.2, 0.1]], np.float32)
    obs, rewards, dones, _ = vec.step(same)
    # Same task, same initialisation and minibatches: the same actions give the same run.
    np.testing.assert_allclose(obs[0], obs[1], rtol=1e-5, atol=1e-6)
    assert rewards[0] == pytest.approx(rewards[1], rel=1e-5, abs=1e-7) and rewards[2] != pytest.approx(rewards[3])
    finished = []
    for _ in range(60):
        obs, rewards, dones, infos = vec.step(same)
        if dones.any():
            assert dones.reshape(2, 2).all(axis=1).any() and (dones.reshape(2, 2).sum(axis=1) != 1).all()
            new = vec.tasks()
            assert new[0] == new[1] and new[2] == new[3]
            finished.append(dones.copy())
    assert len(finished) >= 3


def test_a_divergence_in_a_task_group_truncates_its_siblings():
    dist = make_distribution("toy")
    spec = dataclasses.replace(dist.sample(np.random.default_rng(0)), optimizer="sgd", lr=0.1)
    vec = HPOVecEnv(2, dist, task_group_size=2, seed=0)
    vec.set_options({"task": spec})
    vec.reset()
    up_and_down = np.array([[1.0, 0.0], [-0.5, 0.0]], np.float32)  # slot 0 raises SGD's LR until it diverges
    for _ in range(spec.num_decisions):
        obs, _, dones, infos = vec.step(up_and_down)
        if dones.any():
            break
    assert dones.all() and infos[0]["diverged"] and not infos[1]["diverged"]
    assert infos[0]["TimeLimit.truncated"] is False and infos[1]["TimeLimit.truncated"] is True  # SB3 bootstraps it
    assert np.isfinite(infos[1]["terminal_observation"]).all()
    new = vec.tasks()
    assert new[0] == new[1] != spec  # the group restarted on the leader's next task


def test_task_group_size_must_divide_the_slots_and_members_share_the_leaders_task():
    with pytest.raises(ValueError, match="task_group_size must be a positive integer that divides num_envs = 3"):
        HPOVecEnv(3, "toy", task_group_size=2)
    dist = make_distribution("toy")
    a, b = (dist.sample(np.random.default_rng(s)) for s in (0, 1))
    vec = HPOVecEnv(2, dist, task_group_size=2)
    vec.set_options([{"task": a}, {"task": b}])
    with pytest.raises(ValueError, match="slot 1 shares the task of slot 0"):
        vec.reset()
    vec.set_options([{"task": a}, {}])
    vec.reset()
    assert vec.tasks() == [a, a]


def test_a_bad_seed_is_refused_at_construction_not_at_reset():
    for seed in (-5, 1.5, "a"):
        with pytest.raises(ValueError, match="seed must be an integer >= 0"):
            HPOVecEnv(2, "toy", seed=seed)


def test_set_attr_changes_what_the_slots_use_and_refuses_what_is_fixed():
    vec = HPOVecEnv(2, "toy", seed=0)
    vec.set_attr("divergence_penalty", 50.0)
    assert vec._batch.divergence_penalty == 50.0 and vec.get_attr("divergence_penalty") == [50.0, 50.0]
    with pytest.raises(ValueError, match="divergence_penalty must be a finite number >= 0"):
        vec.set_attr("divergence_penalty", -1.0)
    for name in ("decoder", "num_envs", "action_space"):
        with pytest.raises(ValueError, match=f"{name} is fixed at construction"):
            vec.set_attr(name, None)
    vec.set_attr("task_distribution", "train")  # a split name becomes a distribution
    assert isinstance(vec.task_distribution, TaskDistribution)
    assert isinstance(vec.reset(), np.ndarray)


def test_reset_drops_a_step_in_flight_and_seed_none_leaves_numpy_alone():
    vec = HPOVecEnv(2, "toy", seed=0)
    vec.reset()
    vec.step_async(np.ones((2, 2), np.float32))
    vec.reset()
    with pytest.raises(RuntimeError, match=r"step_async\(\) must be called before step_wait\(\)"):
        vec.step_wait()  # (as HPOSubprocVecEnv: the new episodes do not take the old actions)
    state = np.random.get_state()[1].copy()  # noqa: NPY002 (the global state SB3's seed(None) drew from)
    vec.seed()
    assert np.array_equal(np.random.get_state()[1], state)  # noqa: NPY002
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        vec.seed(-1)
