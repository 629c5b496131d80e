from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import re
import shutil
import tracemalloc
import warnings

import numpy as np
import pytest
import torch

from agents import PolicyScheduler, default_policy_path, load_bundle
from hpo_env import ActionDecoder, HPOEnv, build_splits
from training.rollout import run_episodes


class ReplayPolicy:
    """Replays fixed actions and records the raw observations it is shown (SB3 ``predict`` protocol)."""

    def __init__(self, decoder: ActionDecoder, actions) -> None:
        self.decoder = decoder
        self.actions = np.asarray(actions, dtype=np.float32)
        self.seen: list[np.ndarray] = []

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        self.seen.append(np.array(observation, copy=True))
        action = self.actions[min(len(self.seen) - 1, len(self.actions) - 1)]
        return action[None], state


def _optimizer(kind: str, lr: float, weight_decay: float, momentum: float, groups: int = 1):
    model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(groups)])
    params = [{"params": m.parameters()} for m in model]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(momentum, 0.999))


@pytest.fixture(scope="module")
def default_bundle():
    return load_bundle(default_policy_path())


# -- one source of truth ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "optimizer, hyperparameters, caps",
    [
        ("sgd", ("lr", "weight_decay"), None),
        ("adamw", ("lr", "weight_decay", "momentum"), None),
        ("sgd", ("lr", "weight_decay"), {"lr": 0.3}),  # a learning rate capped relative to its start
    ],
)
def test_env_and_scheduler_agree_on_observations_and_hyperparameters(small_mlp_spec, optimizer, hyperparameters, caps):
    spec = small_mlp_spec.replace(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3)
    env = HPOEnv(hyperparameters=hyperparameters, max_log10_above_initial=caps)
    k = len(hyperparameters)
    actions = np.random.default_rng(3).uniform(-1.2, 1.2, size=(spec.num_decisions - 1, k)).astype(np.float32)
    actions[0] = 1.0  # push against the bounds too
    if caps:
        actions[:3, 0] = 1.0  # three full raises: 0.75 decades wanted, 0.3 allowed
    obs, info = env.reset(seed=0, options={"task": spec})
    env_obs, env_hparams, losses = [obs], [info["hparams"]], [(info["val_loss"], info["train_loss"])]
    for a in actions:
        obs, _, terminated, _, info = env.step(a)
        env_obs.append(obs)
        env_hparams.append(info["hparams"])
        losses.append((info["val_loss"], info["train_loss"]))
    assert terminated and len(losses) == spec.num_decisions

    opt = _optimizer(optimizer, spec.lr, spec.weight_decay, spec.momentum)
    policy = ReplayPolicy(env.decoder, actions)
    sched = PolicyScheduler(opt, policy, total_steps=spec.num_decisions)
    for t, (val, train) in enumerate(losses):
        sched.step(torch.tensor(val, dtype=torch.float64), train_loss=train)
        np.testing.assert_array_equal(sched.last_observation, env_obs[t])
        if t + 1 < len(env_hparams):  # hyperparameters of the next interval
            for name in hyperparameters:
                assert sched.get_last_hparams()[name] == [env_hparams[t + 1][name]], (t, name)
    # The policy saw exactly the environment's observations and was not asked after the last one.
    assert len(policy.seen) == spec.num_decisions - 1
    for seen, expected in zip(policy.seen, env_obs):
        np.testing.assert_array_equal(seen[0], expected)
    group = opt.param_groups[0]
    assert group["lr"] == env_hparams[-1]["lr"]
    if caps:
        lrs = np.array([h["lr"] for h in env_hparams])
        assert lrs.max() == pytest.approx(spec.lr * 10**0.3) and np.all(lrs <= spec.lr * 10**0.3 * (1 + 1e-12))
    if optimizer == "adamw":
        assert group["betas"] == (env_hparams[-1]["momentum"], 0.999)


def test_scheduler_reproduces_run_episodes_with_a_real_recurrent_policy(small_mlp_spec, default_bundle):
    """The shipped LSTM policy, driven through the project's evaluation loop and through the scheduler."""
    spec = small_mlp_spec
    (record,) = run_episodes(default_bundle, [spec], default_bundle.decoder, deterministic=True)
    opt = _optimizer("sgd", spec.lr, spec.weight_decay, spec.momentum)
    epochs = spec.total_steps * spec.batch_size / build_splits(spec).x_train.shape[0]  # what the env observes
    sched = PolicyScheduler(opt, default_bundle, total_steps=spec.num_decisions, epochs=epochs)
    for t, (val, train) in enumerate(zip(record.val_loss, record.train_loss)):
        sched.step(val, train_loss=train)
        if t + 1 < len(record.val_loss):
            np.testing.assert_allclose(sched._last_action, record.actions[t], rtol=0, atol=0)
            for name in default_bundle.decoder.names:
                assert sched.get_last_hparams()[name][0] == record.hparams[name][t + 1]


# -- checkpointing ---------------------------------------------------------------------------------
def _losses(n: int) -> list[tuple[float, float]]:
    rng = np.random.default_rng(0)
    return [(2.0 * 0.9**t + 0.05 * rng.random(), 2.1 * 0.88**t) for t in range(n)]


def test_state_dict_round_trip_mid_run_gives_identical_subsequent_hyperparameters(default_bundle):
    total, cut = 12, 5
    losses = _losses(total)
    opt = _optimizer("adamw", 1e-3, 1e-2, 0.9, groups=2)
    sched = PolicyScheduler(opt, default_bundle, total_steps=total, epochs=total)
    for val, train in losses[:cut]:
        sched.step(val, train)
    buffer = io.BytesIO()
    torch.save({"scheduler": sched.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    expected = []
    for val, train in losses[cut:]:
        sched.step(val, train)
        expected.append(sched.get_last_hparams())

    # A fresh process: new optimizer (at its initial values) and scheduler, then the checkpoint.
    opt2 = _optimizer("adamw", 1e-3, 1e-2, 0.9, groups=2)
    sched2 = PolicyScheduler(opt2, load_bundle(default_policy_path()), total_steps=total, epochs=total)
    sched2.load_state_dict(checkpoint["scheduler"])
    assert sched2.last_step == cut
    resumed = []
    for val, train in losses[cut:]:
        sched2.step(val, train)
        resumed.append(sched2.get_last_hparams())
    assert resumed == expected
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    # The recurrent state really matters: resuming without it gives another schedule.
    amnesic = dict(checkpoint["scheduler"], policy_state=None, episode_start=True)
    opt3 = _optimizer("adamw", 1e-3, 1e-2, 0.9, groups=2)
    sched3 = PolicyScheduler(opt3, default_bundle, total_steps=total, epochs=total)
    sched3.load_state_dict(amnesic)
    forgetful = []
    for val, train in losses[cut:]:
        sched3.step(val, train)
        forgetful.append(sched3.get_last_hparams())
    assert forgetful != expected


def test_sampled_actions_follow_the_schedulers_seed_resume_exactly_and_leave_torchs_generator(default_bundle):
    total, cut = 12, 5
    losses = _losses(total)

    def schedule(seed, deterministic=False, state=None, start=0):
        sched = PolicyScheduler(
            _optimizer("sgd", 0.05, 1e-4, 0.9),
            default_bundle,
            total_steps=total,
            epochs=total,
            deterministic=deterministic,
            seed=seed,
        )
        if state is not None:
            sched.load_state_dict(state)
        lrs, before = [], torch.get_rng_state()
        for val, train in losses[start:]:
            sched.step(val, train)
            lrs.append(sched.get_last_lr()[0])
            if sched.last_step == cut:
                buffer = io.BytesIO()
                torch.save(sched.state_dict(), buffer)
                buffer.seek(0)
                schedule.checkpoint = torch.load(buffer, weights_only=True)
        assert torch.equal(torch.get_rng_state(), before)  # the training loop's own draws are not shifted
        return lrs

    torch.manual_seed(123)
    first = schedule(seed=1)
    checkpoint = schedule.checkpoint
    torch.manual_seed(999)  # nor do they shift the policy's
    assert schedule(seed=1) == first
    assert schedule(seed=2) != first and schedule(seed=1, deterministic=True) != first
    assert schedule(seed=7, state=checkpoint, start=cut) == first[cut:]  # the saved generator wins
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        PolicyScheduler(_optimizer("sgd", 0.05, 1e-4, 0.9), default_bundle, total_steps=total, epochs=total, seed=-1)


def test_load_state_dict_rejects_other_policy_or_groups(default_bundle):
    sched = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), default_bundle, total_steps=4, epochs=4)
    state = sched.state_dict()
    other = ReplayPolicy(ActionDecoder(("lr",)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="controlling"):
        PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), other, total_steps=4).load_state_dict(state)
    with pytest.raises(ValueError, match="param groups"):
        PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9, groups=2), default_bundle, 4, epochs=4).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        sched.load_state_dict({"t": 3})
    # Not a mapping at all: a checkpoint's path (a common slip) gets the fix; others their type, not an AttributeError.
    with pytest.raises(
        TypeError, match=r"state_dict must be a dict.*got str 'ckpt.pt': load the file first, .*torch.load"
    ):
        sched.load_state_dict("ckpt.pt")
    with pytest.raises(TypeError, match="state_dict must be a dict, as PolicyScheduler.state_dict.. returns, got list"):
        sched.load_state_dict([state])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"base": torch.tensor([-1.0, 0.01])}, "base .* outside the policy's bounds"),
        ({"base": torch.tensor([float("nan"), 0.01])}, "base must hold 2 finite values"),
        ({"base": torch.tensor([0.01])}, "base must hold 2 finite values"),
        ({"last_action": torch.ones(7)}, "last_action must hold 2"),
        ({"last_action": torch.tensor([3.0, 0.0])}, r"outside \[-1, 1\]"),
        ({"t": -3}, "t=-3 one >= 0"),
        ({"total_steps": 0}, "total_steps=0 must be an integer >= 1"),
        ({"epochs": -1.0}, "epochs=-1.0 must be a positive number"),
        ({"features": {}}, r"malformed observation state: unknown entries \[\], missing entries"),
        ({"sampler": "{broken"}, "malformed scheduler state: sampler"),
        ({"history": {"step": torch.zeros(2)}}, r"malformed scheduler state: history \(KeyError"),
        ({"t": 3}, r"the history must hold t \+ 1 = 4 rows in every column"),
        ({"decisions": 7}, r"decisions=7 must be an integer in \[1, total_steps=4\]"),
        ({"group_train": torch.tensor([1.0, 1.0])}, r"losses of the 0 step\(\) calls since the last decision"),
        ({"total_steps": 8, "decisions": 2, "group_train": torch.tensor([5.0, 0.0])}, "0 without losses"),
        ({"total_steps": 8, "decisions": 2, "group_train": torch.tensor([1.0, 0.5])}, "group_train must hold"),
        ({"total_steps": 8, "decisions": 2, "group_train": torch.tensor([-1.0, 1.0])}, "group_train must hold"),
        ({"reference_val": float("inf")}, "reference_val=inf must be a finite number"),
    ],
)
def test_a_damaged_state_dict_is_refused_before_anything_changes(default_bundle, change, message):
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    sched = PolicyScheduler(opt, default_bundle, total_steps=4, epochs=4)
    sched.step(1.0, train_loss=1.0)
    state, before = sched.state_dict(), sched.get_last_hparams()
    with pytest.raises(ValueError, match=message):
        sched.load_state_dict({**state, **change})
    assert sched.get_last_hparams() == before and opt.param_groups[0]["lr"] == before["lr"][0]
    assert sched.last_step == 1 and sched.total_steps == 4  # nothing half-loaded


def test_a_state_whose_features_are_refused_leaves_the_epochs_as_they_were(default_bundle):
    # The observation state is checked last; a run length saved with it must not be taken before that.
    sched = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), default_bundle, total_steps=4, epochs=12)
    sched.step(1.0, train_loss=1.0)
    state = sched.state_dict()
    features = {**state["features"], "_ema": torch.zeros(3)}
    with pytest.raises(ValueError, match="observation state '_ema' has shape"):
        sched.load_state_dict({**state, "epochs": 50.0, "features": features})
    assert sched.epochs == 12.0 and sched.state_dict()["features"]["_epochs"].item() == pytest.approx(
        state["features"]["_epochs"].item()
    )


def test_a_policy_acting_beyond_its_bounds_saves_a_state_that_loads():
    """Gaussian heads sample outside [-1, 1]; the decoder clips, and so does the saved last action."""
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    sched = PolicyScheduler(opt, ReplayPolicy(ActionDecoder(("lr", "weight_decay")), [[1.7, 1.7]] * 4), total_steps=4)
    sched.step(1.0, train_loss=1.0)
    again = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), sched.bundle, total_steps=4)
    again.load_state_dict(sched.state_dict())
    assert again.get_last_hparams() == sched.get_last_hparams()
    with pytest.raises(ValueError, match="epochs must be a finite number > 0"):
        PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), sched.bundle, total_steps=4, epochs=0.0)


def test_load_state_dict_says_when_the_saved_run_length_replaces_the_given_one(default_bundle):
    state = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), default_bundle, total_steps=4, epochs=4).state_dict()
    longer = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), default_bundle, total_steps=8, epochs=16)
    with pytest.warns(UserWarning) as record:
        longer.load_state_dict(state)
    messages = " | ".join(str(w.message) for w in record)
    assert "epochs=4; it replaces this scheduler's epochs=16" in messages
    assert "total_steps=4 step() calls; it replaces this scheduler's total_steps=8" in messages
    assert (longer.total_steps, longer.epochs) == (4, 4.0)
    sampled = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), default_bundle, 4, epochs=4, deterministic=False)
    with pytest.warns(
        UserWarning, match="saved by a run of deterministic actions; it replaces this scheduler's sampled"
    ):
        sampled.load_state_dict(state)
    assert sampled.deterministic
    same = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), default_bundle, 4, epochs=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same length: silent
        same.load_state_dict(state)


def test_reset_restores_initial_values_and_replays_the_same_schedule(default_bundle):
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    sched = PolicyScheduler(opt, default_bundle, total_steps=6, epochs=6)
    first = []
    for val, train in _losses(6):
        sched.step(val, train)
        first.append(sched.get_last_lr())
    sched.reset()
    assert sched.get_last_lr() == [0.1] and opt.param_groups[0]["lr"] == 0.1 and sched.last_step == 0
    second = []
    for val, train in _losses(6):
        sched.step(val, train)
        second.append(sched.get_last_lr())
    assert first == second


# -- optimisers and param groups -------------------------------------------------------------------
def test_param_groups_keep_their_relative_scale_and_zero_weight_decay():
    decoder = ActionDecoder(("lr", "weight_decay", "momentum"))
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters()},
            {"params": model[1].parameters(), "lr": 0.01, "weight_decay": 0.0, "momentum": 0.8},
        ],
        lr=0.1,
        weight_decay=1e-3,
        momentum=0.9,
    )
    actions = np.array([[1.0, 1.0, 1.0], [-1.0, 0.5, -1.0], [0.3, -0.2, 0.4]])
    sched = PolicyScheduler(opt, ReplayPolicy(decoder, actions), total_steps=4)
    for val in (1.0, 0.9, 0.8):
        sched.step(val)
        g0, g1 = opt.param_groups
        assert g1["lr"] == pytest.approx(g0["lr"] * 0.1, rel=1e-12)
        assert g1["weight_decay"] == 0.0
        assert 1 - g1["momentum"] == pytest.approx((1 - g0["momentum"]) * 2.0, rel=1e-12)
    hp = sched.get_last_hparams()
    assert hp["lr"] == sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 10 ** (0.25 * (1 - 1 + 0.3)))


def test_a_no_decay_group_first_does_not_become_the_weight_decay_base():
    """timm-style groups: biases and norms without weight decay first. The base of weight decay is
    the first group that has one; the no-decay group keeps 0, and the learning rate's base stays 0."""
    decoder = ActionDecoder(("lr", "weight_decay"))
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(
        [{"params": [model.bias], "weight_decay": 0.0}, {"params": [model.weight], "weight_decay": 0.05}], lr=1e-3
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0 is not clipped: it is not the base
        sched = PolicyScheduler(opt, ReplayPolicy(decoder, [[0.5, -1.0]]), total_steps=10)
    sched.step(1.0)
    g0, g1 = opt.param_groups
    assert g0["weight_decay"] == 0.0
    assert g1["weight_decay"] == pytest.approx(0.05 * 10 ** -decoder.specs[1].max_log10_change)
    assert g0["lr"] == g1["lr"] == pytest.approx(1e-3 * 10 ** (0.5 * decoder.specs[0].max_log10_change))
    # The policy observed the groups' real weight decay, and a state dict restores the base groups.
    restored = PolicyScheduler(
        torch.optim.AdamW(
            [{"params": [model.bias], "weight_decay": 0.0}, {"params": [model.weight], "weight_decay": 0.05}], lr=1e-3
        ),
        ReplayPolicy(decoder, [[0.5, -1.0]]),
        total_steps=10,
    )
    restored.load_state_dict(sched.state_dict())
    assert restored.get_last_hparams() == sched.get_last_hparams()


def test_without_any_weight_decay_only_the_first_group_takes_the_policys():
    """No group has weight decay to keep a ratio to: group 0 is the base, clipped up to the policy's
    lower bound, and the others keep 0 (the Hugging Face Trainer puts its decay group first and its
    no-decay group, biases and norms, second)."""
    decoder = ActionDecoder(("lr", "weight_decay"))
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}], lr=1e-3, weight_decay=0.0)
    with pytest.warns(UserWarning, match="initial weight_decay=0 of param group 0 is outside"):
        sched = PolicyScheduler(opt, ReplayPolicy(decoder, [[0.0, 1.0], [0.0, 1.0]]), total_steps=3)
    lower = decoder.specs[1].lower
    assert [g["weight_decay"] for g in opt.param_groups] == [lower, 0.0]
    sched.step(1.0, train_loss=1.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [
        pytest.approx(lower * 10 ** decoder.specs[1].max_log10_change),
        0.0,
    ]


def test_a_missing_train_loss_warns_once_per_run():
    """The policy was meta-trained with the training loss at every decision: without it, it sees an
    input it never saw, which the user is told (once per run, not at every call)."""
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched = PolicyScheduler(opt, ReplayPolicy(ActionDecoder(("lr",)), [[0.0]]), total_steps=4)
    with pytest.warns(UserWarning, match=r"no train_loss.*step\(val_loss, train_loss="):
        sched.step(1.0)
    assert sched.last_observation[sched.features.feature_names().index("has_train_loss")] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step(0.9)
        sched.step(0.8, train_loss=0.7)
    sched.reset()
    with pytest.warns(UserWarning, match="no train_loss"):
        sched.step(1.0)


def test_a_horizon_far_from_meta_training_warns():
    """Meta-training runs have 10-30 decisions; far outside that (fewer than 10, more than 60) the
    scheduler says so at construction, pointing at the caller's line, and says how to fix it."""
    from hpo_env.tasks import DECISIONS_PER_RUN

    assert (min(DECISIONS_PER_RUN), max(DECISIONS_PER_RUN)) == (10, 30)
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    policy = ReplayPolicy(ActionDecoder(("lr",)), [[0.0]])
    for total_steps in (1, 9, 61, 500):
        calls = rf"{total_steps} step\(\) calls \(total_steps={total_steps}\)"
        fix = "10-60 decisions, with total_steps" if total_steps < 10 else "Pass decisions=25"
        each = "" if total_steps < 10 else ", each a decision,"
        with pytest.warns(UserWarning, match=calls + each + r" in the run.*runs of 10-30 decisions.*" + fix) as caught:
            PolicyScheduler(opt, policy, total_steps=total_steps)
        assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match=r"decides once per 20 step\(\) calls on average"):
        PolicyScheduler(opt, policy, total_steps=500)
    # With decisions=, the decisions are what counts.
    for decisions in (5, 100):
        with pytest.warns(
            UserWarning, match=rf"^{decisions} decisions \(decisions={decisions}\) in the run.*between 10"
        ):
            PolicyScheduler(opt, policy, total_steps=500, decisions=decisions)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for total_steps in (10, 25, 60):
            PolicyScheduler(opt, policy, total_steps=total_steps)
        PolicyScheduler(opt, policy, total_steps=500, decisions=25)
        PolicyScheduler(opt, policy, total_steps=25, decisions=25)


def _grouped_run(policy, total_steps, decisions, losses):
    """Drive a scheduler through ``losses`` (val, train per step() call); its hyperparameters after each call."""
    opt = _optimizer("sgd", 0.1, 1e-3, 0.9)
    sched = PolicyScheduler(opt, policy, total_steps=total_steps, decisions=decisions)
    after = []
    for val, train in losses:
        sched.step(val, train_loss=train)
        after.append(sched.get_last_hparams())
    return sched, after


def test_decisions_group_the_calls_and_the_policy_sees_what_it_would_with_one_call_per_decision():
    """13 calls grouped into 5 decisions (at calls 3, 6, 8, 11 and 13) show the policy exactly what 5
    calls would: the deciding call's validation loss, the mean training loss since the last decision."""
    decoder = ActionDecoder(("lr", "weight_decay"))
    actions = [[0.8, -0.3], [-0.5, 0.6], [1.0, 1.0], [-1.0, 0.2]]
    rng = np.random.default_rng(1)
    calls = [(float(v), float(tr)) for v, tr in zip(rng.uniform(0.5, 2.0, 13), rng.uniform(0.5, 2.0, 13))]
    deciding = [3, 6, 8, 11, 13]
    starts = [0, *deciding[:-1]]
    grouped_losses = [(calls[d - 1][0], float(np.mean([tr for _, tr in calls[a:d]]))) for a, d in zip(starts, deciding)]

    direct = ReplayPolicy(decoder, actions)
    _, after_direct = _grouped_run(direct, 5, None, grouped_losses)
    grouped = ReplayPolicy(decoder, actions)
    sched, after = _grouped_run(grouped, 13, 5, calls)

    assert len(grouped.seen) == len(direct.seen) == 4  # the last decision only observes
    for a, b in zip(grouped.seen, direct.seen):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    assert [after[d - 1] for d in deciding] == after_direct
    before = [{"lr": [0.1], "weight_decay": [1e-3]}, *after[:-1]]  # the values each call started from
    for call in set(range(1, 14)) - set(deciding):  # between decisions the values are held
        assert after[call - 1] == before[call - 1], call
    assert (sched.last_step, sched.decisions_made, sched.decisions) == (13, 5, 5)
    h = sched.history
    assert h["step"].tolist() == list(range(14))
    assert np.flatnonzero(np.isfinite(h["action_lr"])).tolist() == deciding[:-1]
    assert h["train_loss"][1:].tolist() == [tr for _, tr in calls]  # the history keeps what each call passed
    assert "decision 5/5" in repr(sched)


def test_calls_between_decisions_need_no_validation_loss(default_bundle):
    """The policy sees the validation loss only at its decisions: the calls in between may skip the
    evaluation (metrics=None) and the schedule is the same; a decision without one is refused."""
    losses = [(2.0 * 0.95**t, 2.1 * 0.94**t) for t in range(40)]

    def run(skip):
        opt = _optimizer("adamw", 1e-3, 1e-2, 0.9)
        sched = PolicyScheduler(opt, default_bundle, total_steps=40, epochs=40, decisions=10)
        for val, train in losses:
            sched.step(None if skip and not sched.next_step_decides else val, train_loss=train)
        return sched

    full, skipping = run(False), run(True)
    assert full.history["lr"].tolist() == skipping.history["lr"].tolist()
    assert np.isnan(skipping.history["val_loss"][1:]).sum() == 30  # the rows of the calls that skipped it
    sched = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), default_bundle, total_steps=4, epochs=4, decisions=2)
    sched.step(None, train_loss=1.0)  # call 1 of 4: between decisions
    with pytest.raises(
        ValueError, match=r"step\(\) call 2 of 4 is one of the policy's decisions.*needs the validation"
    ):
        sched.step(None, train_loss=1.0)


def test_a_divergence_between_decisions_cuts_the_rate_at_once_and_keeps_the_decision_points():
    decoder = ActionDecoder(("lr", "weight_decay"))
    policy = ReplayPolicy(decoder, np.full((5, 2), 0.5))
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    sched = PolicyScheduler(opt, policy, total_steps=12, decisions=4)  # decisions at calls 3, 6, 9, 12
    sched.step(1.0, train_loss=1.0)
    with pytest.warns(UserWarning, match="non-finite loss at scheduler step 2"):
        sched.step(1.0, train_loss=float("nan"))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 10**-0.25)
    assert len(policy.seen) == 0
    sched.step(0.9, train_loss=3.0)
    assert len(policy.seen) == 1  # the third call still decides, on the training loss after the cut (3)
    names = sched.features.feature_names()
    assert policy.seen[0][0][names.index("log_train_loss")] == pytest.approx(
        np.log(3.0 / 0.9), abs=1e-6
    )  # over the first val loss
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 10**-0.25 * 10**0.125)  # then the policy's +0.5
    h = sched.history
    assert h["diverged"].tolist() == [0.0, 0.0, 1.0, 0.0] and h["action_lr"][2] == -1.0


def test_a_divergence_at_a_deciding_call_and_at_the_last_one():
    policy = ReplayPolicy(ActionDecoder(("lr", "weight_decay")), np.full((5, 2), 0.5))
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    sched = PolicyScheduler(opt, policy, total_steps=6, decisions=3)  # decisions at calls 2, 4 and 6
    sched.step(1.0, train_loss=1.0)
    with pytest.warns(UserWarning, match="step 2 .* the learning rate is decreased"):
        sched.step(float("inf"), train_loss=1.0)  # a decision: the cut replaces it, the policy is not asked
    assert len(policy.seen) == 0 and sched.decisions_made == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 10**-0.25)
    sched.step(0.9, train_loss=0.9)
    sched.step(0.8, train_loss=0.8)  # decision 2: the policy starts its observations here
    assert len(policy.seen) == 1
    lr = opt.param_groups[0]["lr"]
    sched.step(0.7, train_loss=0.7)
    with pytest.warns(UserWarning, match="step 6 .* nothing is left to set"):
        sched.step(float("nan"), train_loss=0.7)
    assert opt.param_groups[0]["lr"] == lr and sched.decisions_made == 3


def test_grouped_calls_resume_mid_group_exactly(default_bundle):
    losses = [(2.0 * 0.95**t, 2.1 * 0.94**t) for t in range(40)]
    opt = _optimizer("adamw", 1e-3, 1e-2, 0.9)
    sched = PolicyScheduler(opt, default_bundle, total_steps=40, epochs=40, decisions=15)
    for val, train in losses[:17]:  # 17 * 15 // 40 = 6 decisions, then a group in progress
        sched.step(val, train_loss=train)
    state = sched.state_dict()
    assert sched.decisions_made == 6 and state["group_train"][1] == 1
    expected = []
    for val, train in losses[17:]:
        sched.step(val, train_loss=train)
        expected.append(sched.get_last_hparams())
    resumed = PolicyScheduler(_optimizer("adamw", 1e-3, 1e-2, 0.9), default_bundle, 40, epochs=40, decisions=15)
    resumed.load_state_dict(state)
    got = []
    for val, train in losses[17:]:
        resumed.step(val, train_loss=train)
        got.append(resumed.get_last_hparams())
    assert got == expected and resumed.decisions_made == 15
    # A state saved before grouping existed decided at every call; a different decisions= is said.
    old = {k: v for k, v in state.items() if k not in ("decisions", "group_train")}
    every = PolicyScheduler(_optimizer("adamw", 1e-3, 1e-2, 0.9), default_bundle, 40, epochs=40, decisions=15)
    with pytest.warns(
        UserWarning, match="and decisions=40; it replaces this scheduler's total_steps=40 and decisions=15"
    ):
        every.load_state_dict(old)
    assert every.decisions == 40
    with pytest.raises(ValueError, match=r"decisions=41 must be an integer in \[1, total_steps=40\]"):
        every.load_state_dict({**state, "decisions": 41})


def test_a_group_without_any_training_loss_warns_not_one_call_without(default_bundle):
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    sched = PolicyScheduler(opt, default_bundle, total_steps=40, epochs=40, decisions=20)  # decides every 2nd call
    _train_once(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step(1.0)  # the group's other call brings a training loss
        sched.step(0.9, train_loss=0.95)
        sched.step(0.8, train_loss=0.9)
        sched.step(0.7)
    with pytest.warns(UserWarning, match=r"step\(\) got no train_loss"):
        sched.step(0.6)
        sched.step(0.5)  # a decision without any training loss since the last one


def test_saving_between_decisions_says_the_gradient_statistics_are_not_saved():
    policy = ReplayPolicy(ActionDecoder(("lr", "weight_decay")), np.zeros((10, 2)))
    policy.gradient_features = True
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = PolicyScheduler(opt, policy, total_steps=20, decisions=10)

    def train_step():
        opt.zero_grad()
        model(torch.ones(4, 3)).pow(2).mean().backward()
        opt.step()

    train_step()
    sched.step(1.0, train_loss=1.0)  # not a decision: the step's statistics wait for the next one
    with pytest.warns(UserWarning, match=r"state_dict\(\) after 1 optimizer steps since the policy's last decision"):
        sched.state_dict()
    train_step()
    sched.step(0.9, train_loss=0.9)  # a decision
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.state_dict()


def test_bad_decisions_are_refused(default_bundle):
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    with pytest.raises(ValueError, match=r"decisions=21 is more than total_steps=20.*call step\(\) more often"):
        PolicyScheduler(opt, default_bundle, total_steps=20, epochs=20, decisions=21)
    with pytest.raises(ValueError, match="decisions must be at least 1, got 0"):
        PolicyScheduler(opt, default_bundle, total_steps=20, epochs=20, decisions=0)
    with pytest.raises(TypeError, match="decisions must be an int"):
        PolicyScheduler(opt, default_bundle, total_steps=20, epochs=20, decisions=2.5)


def test_a_clipped_base_does_not_move_the_other_groups_and_no_group_leaves_the_bounds():
    decoder = ActionDecoder(("lr",))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))

    def sgd(base_lr: float) -> torch.optim.Optimizer:
        groups = [{"params": model[i].parameters(), "lr": lr} for i, lr in enumerate((base_lr, 1e-3, 0.5))]
        return torch.optim.SGD(groups, lr=base_lr)

    # Layer-wise decay: a base far below the bounds is clipped up; the other groups keep their values.
    opt = sgd(1e-7)
    with pytest.warns(UserWarning, match="initial lr=1e-07 of param group 0 is outside"):
        sched = PolicyScheduler(opt, ReplayPolicy(decoder, [[1.0], [1.0], [1.0]]), total_steps=4)
    assert [g["lr"] for g in opt.param_groups] == [1e-5, pytest.approx(1e-3), pytest.approx(0.5)]
    for val in (1.0, 0.9, 0.8):  # the policy raises the base: the others follow, inside the bounds
        sched.step(val)
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[1] == pytest.approx(lrs[0] * 100) and lrs[2] == pytest.approx(min(lrs[0] * 5e4, 1.0))
    assert opt.param_groups[2]["lr"] == 1.0  # clipped at the policy's upper bound
    # A base clipped down leaves the others where they were, and a group outside the bounds is clipped.
    opt = sgd(5.0)
    opt.param_groups[2]["lr"] = 3.0
    with pytest.warns(UserWarning) as caught:
        PolicyScheduler(opt, ReplayPolicy(decoder, [[0.0]]), total_steps=3)
    assert any("lr=3 of param group 2 outside the policy's bounds" in str(w.message) for w in caught)
    assert [g["lr"] for g in opt.param_groups] == [1.0, pytest.approx(1e-3), 1.0]


def test_lr_max_rise_caps_a_deployed_policy_relative_to_the_start():
    decoder = ActionDecoder(("lr",), max_log10_change=0.5)
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.01)
    sched = PolicyScheduler(opt, ReplayPolicy(decoder, [[1.0]]), total_steps=12, lr_max_rise=1.0)
    assert sched.decoder.specs[0].max_log10_above_initial == 1.0 and decoder.specs[0].max_log10_above_initial is None
    lrs = []
    for t in range(8):  # 4 decades wanted, one allowed
        sched.step(1.0 - 0.1 * t, train_loss=1.0)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:2] == [pytest.approx(0.01 * 10**0.5), pytest.approx(0.1)] and max(lrs) == pytest.approx(0.1)
    # The cap is part of the scheduler's state: a scheduler without it refuses that state.
    state = sched.state_dict()
    opt2 = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.01)
    restored = PolicyScheduler(opt2, ReplayPolicy(decoder, [[1.0]]), total_steps=12, lr_max_rise=1.0)
    restored.load_state_dict(state)
    restored.step(0.2, train_loss=1.0)  # still capped from the saved start, 0.01
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="saved with lr_max_rise=1.0, this scheduler has lr_max_rise=None"):
        PolicyScheduler(opt2, ReplayPolicy(decoder, [[1.0]]), total_steps=8).load_state_dict(state)
    with pytest.raises(ValueError, match="lr_max_rise caps the learning rate, which this policy does not control"):
        PolicyScheduler(opt2, ReplayPolicy(ActionDecoder(("weight_decay",)), [[1.0]]), total_steps=8, lr_max_rise=1.0)
    for bad in (0.0, -1.0, float("nan"), "1.5"):
        with pytest.raises(ValueError, match="lr_max_rise must be a positive number of decades"):
            PolicyScheduler(opt2, ReplayPolicy(decoder, [[1.0]]), total_steps=8, lr_max_rise=bad)


@pytest.mark.filterwarnings("ignore:a torch LR scheduler")  # the warm-up beside it, whose hand-over is refused
def test_step_without_a_loss_and_torch_scheduler_combinators_say_what_to_do():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched = PolicyScheduler(opt, ReplayPolicy(ActionDecoder(("lr",)), [[0.0]]), total_steps=3)
    # The torch habit of step() without a loss (and ChainedScheduler, which calls it so) is told what to pass.
    with pytest.raises(TypeError, match=r"needs the validation loss .* step\(val_loss, train_loss="):
        sched.step()
    with pytest.raises(TypeError, match="needs the validation loss"):
        torch.optim.lr_scheduler.ChainedScheduler([sched]).step()
    warm_up = torch.optim.lr_scheduler.LinearLR(opt, total_iters=1)
    sequence = torch.optim.lr_scheduler.SequentialLR(opt, [warm_up, sched], milestones=[1])
    with pytest.raises(TypeError, match="SequentialLR.* cannot hold it"):
        sequence.step()  # the hand-over
    with pytest.raises(TypeError, match="SequentialLR.* cannot hold it"):  # the policy first: refused when built
        torch.optim.lr_scheduler.SequentialLR(opt, [sched, torch.optim.lr_scheduler.LinearLR(opt)], milestones=[1])
    assert sched.last_step == 0


def test_negative_losses_and_param_groups_added_later_are_refused():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched = PolicyScheduler(opt, ReplayPolicy(ActionDecoder(("lr",)), [[0.0]]), total_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a call that fails does not also warn (of the missing train_loss)
        with pytest.raises(ValueError, match="negative.*log losses"):
            sched.step(-0.5)
    with pytest.raises(TypeError, match=r"from_pretrained\('default', optimizer"):
        PolicyScheduler(opt, "default", total_steps=3)
    with pytest.raises(ValueError, match="train_loss=-1 is negative"):
        sched.step(0.5, train_loss=-1.0)
    assert sched.last_step == 0  # nothing was consumed
    with pytest.warns(UserWarning, match="treated as divergence"):
        sched.step(float("-inf"))  # a non-finite loss is a divergence, never an exception
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match="add_param_group.*requires_grad_"):
        sched.step(0.5)
    # The refused call changed nothing: with the group removed again the run goes on, and its state loads.
    assert sched.last_step == 1 and len(sched.history["step"]) == 2
    opt.param_groups.pop()
    sched.step(0.5)
    twin = PolicyScheduler(opt, ReplayPolicy(ActionDecoder(("lr",)), [[0.0]]), total_steps=3)
    twin.load_state_dict(sched.state_dict())
    assert twin.last_step == 2


def test_adam_momentum_is_beta1_and_beta2_is_kept():
    decoder = ActionDecoder(("lr", "momentum"))
    opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = PolicyScheduler(opt, ReplayPolicy(decoder, [[0.0, 1.0]]), total_steps=3)
    sched.step(1.0)
    beta1, beta2 = opt.param_groups[0]["betas"]
    assert beta1 == pytest.approx(1 - 0.1 * 10**-0.25) and beta2 == 0.95
    assert sched.adaptive


@pytest.mark.parametrize("make", [torch.optim.Adam, torch.optim.RMSprop, torch.optim.NAdam, torch.optim.Adagrad])
def test_weight_decay_added_to_the_gradient_of_an_adaptive_optimizer_is_refused(make):
    """The policy sets AdamW's decoupled decay (up to 0.3): as Adam's L2 penalty it wrecks training."""
    params = list(torch.nn.Linear(2, 2).parameters())
    policy = ReplayPolicy(ActionDecoder(("lr", "weight_decay")), [[0.0, 0.0]])
    with pytest.raises(ValueError, match=rf"{make.__name__} adds weight_decay to the gradient.*torch.optim.AdamW"):
        PolicyScheduler(make(params, lr=1e-3), policy, total_steps=3)
    # Decoupled decay is what the policy was trained with; a policy not controlling weight decay is fine too.
    PolicyScheduler(
        torch.optim.Adam(params, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True), policy, total_steps=3
    )
    PolicyScheduler(torch.optim.AdamW(params, lr=1e-3), policy, total_steps=3)
    lr_only = ReplayPolicy(ActionDecoder(("lr",)), [[0.0]])
    if make in (torch.optim.Adam, torch.optim.NAdam):
        PolicyScheduler(make(params, lr=1e-3), lr_only, total_steps=3)
    else:  # other update rules: accepted, with a warning (see the test below)
        with pytest.warns(UserWarning, match=f"{make.__name__} is neither"):
            PolicyScheduler(make(params, lr=1e-3), lr_only, total_steps=3)


def test_an_optimizer_unlike_those_meta_trained_on_warns():
    class Lion(torch.optim.Optimizer):  # a third-party update rule the policy has never seen
        def __init__(self, params, lr=1e-4, weight_decay=0.01):
            super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    class AdamW8bit(Lion):  # named like AdamW (bitsandbytes): AdamW's update, quantised state
        pass

    params = list(torch.nn.Linear(2, 2).parameters())
    policy = ReplayPolicy(ActionDecoder(("lr", "weight_decay")), [[0.0, 0.0]])
    with pytest.warns(UserWarning, match=r"Lion is neither.*treated as AdamW \(adaptive=True\).*decays the weights"):
        PolicyScheduler(Lion(params), policy, total_steps=10)
    with pytest.warns(UserWarning, match=r"treated as SGD with momentum \(adaptive=False\)") as record:
        PolicyScheduler(Lion(params), ReplayPolicy(ActionDecoder(("lr",)), [[0.0]]), total_steps=10, adaptive=False)
    assert "decays the weights" not in str(record[0].message), "weight decay is mentioned only when controlled"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
        for opt in (AdamW8bit(params), torch.optim.AdamW(params), sgd):
            PolicyScheduler(opt, policy, total_steps=10)


def test_tensor_learning_rate_is_updated_in_place():
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=torch.tensor(1e-3), foreach=False)
    lr_tensor = opt.param_groups[0]["lr"]
    sched = PolicyScheduler(opt, ReplayPolicy(ActionDecoder(("lr", "weight_decay")), [[1.0, 0.0]]), total_steps=3)
    sched.step(1.0)
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert float(lr_tensor) == pytest.approx(1e-3 * 10**0.25, rel=1e-6)


def test_initial_values_outside_bounds_are_clipped_with_a_warning():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=5.0)
    with pytest.warns(UserWarning, match="outside the policy's bounds"):
        sched = PolicyScheduler(opt, ReplayPolicy(ActionDecoder(("lr",)), [[0.0]]), total_steps=3)
    assert opt.param_groups[0]["lr"] == 1.0 and sched.get_last_lr() == [1.0]


def test_the_optimizer_trains_with_the_written_values(default_bundle):
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = PolicyScheduler.from_pretrained("default", opt, total_steps=5, epochs=5)
    used = []  # the rate and decay each optimiser step ran with (a hook of the user's beside the scheduler's)
    opt.register_step_pre_hook(lambda o, *_: used.append((o.param_groups[0]["lr"], o.param_groups[0]["weight_decay"])))
    expected = []
    for _ in range(5):
        expected += [(sched.get_last_lr()[0], sched.get_last_hparams()["weight_decay"][0])] * 3
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = torch.nn.functional.mse_loss(model(x), y)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the training loss still carries its graph: taken as is, silently
            sched.step(val, train_loss=loss)
    assert sched.last_step == 5 and used == expected
    assert len({lr for lr, _ in used}) > 1 and used[0][0] == 1e-3  # the policy moved the rate from its start


# -- bad input -------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors(default_bundle):
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        PolicyScheduler(torch.nn.Linear(2, 2), default_bundle, 5)
    with pytest.raises(TypeError, match="PolicyBundle"):
        PolicyScheduler(opt, object(), 5)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        PolicyScheduler(opt, default_bundle, 0)
    with pytest.raises(ValueError, match=r"got -1 \(-1 is what Lightning's trainer.max_epochs reads .* max_steps"):
        PolicyScheduler(opt, default_bundle, -1)  # total_steps=trainer.max_epochs in a run given max_steps
    with pytest.raises(TypeError, match="total_steps must be an int"):
        PolicyScheduler(opt, default_bundle, 2.5)
    with pytest.raises(ValueError, match="is not a policy bundle directory"):
        PolicyScheduler.from_pretrained("no-such-policy", opt, 5)
    with pytest.raises(TypeError, match="bundle directory .* or a shipped policy's name .* got None"):
        PolicyScheduler.from_pretrained(None, opt, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got ''"):
        PolicyScheduler.from_pretrained("", opt, 5)
    sched = PolicyScheduler(opt, default_bundle, 5, epochs=5)
    with pytest.raises(TypeError, match="metrics must be a real number"):
        sched.step("low")
    with pytest.raises(TypeError, match="one-element tensor"):
        sched.step(torch.ones(3))


def test_flags_and_writer_of_the_wrong_type_are_refused_at_construction(default_bundle):
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    with pytest.raises(TypeError, match="deterministic must be True or False, got 'no'"):
        PolicyScheduler(opt, default_bundle, 4, epochs=4, deterministic="no")
    with pytest.raises(TypeError, match="writer must be a torch.utils.tensorboard.SummaryWriter"):
        PolicyScheduler(opt, default_bundle, 4, epochs=4, writer="runs/x")


def test_a_directory_that_is_not_a_bundle_says_what_a_bundle_is(default_bundle, tmp_path):
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    with pytest.raises(ValueError, match="is not a policy bundle: a bundle is a directory holding model.zip"):
        PolicyScheduler.from_pretrained(tmp_path, opt, 5, epochs=5)
    (tmp_path / "model.zip").write_bytes(b"")  # a bundle that lost its config: re-save it
    with pytest.raises(ValueError, match="is missing config.json; re-save it"):
        PolicyScheduler.from_pretrained(tmp_path, opt, 5, epochs=5)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000000000064"  # hpo-train's checkpoint layout
    checkpoint.mkdir(parents=True)
    for name in ("model.zip", "vecnormalize.pkl"):
        (checkpoint / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"is an hpo-train checkpoint, not a policy bundle: pass the run's .*bundle"):
        PolicyScheduler.from_pretrained(checkpoint, opt, 5, epochs=5)


def test_numpy_and_tensor_scalars_are_accepted_where_numbers_are(default_bundle):
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    sched = PolicyScheduler(opt, default_bundle, 5, epochs=np.float32(5), lr_max_rise=np.float32(1.0))
    assert sched.decoder.specs[0].max_log10_above_initial == 1.0
    sched.step(1.0, train_loss=1.0, global_step=torch.tensor(7))  # a step counter kept as a tensor
    sched.step(0.9, train_loss=0.9, global_step=np.int64(9))
    assert sched.history["global_step"][1:].tolist() == [7.0, 9.0]
    with pytest.raises(ValueError, match="global_step must be an integer >= 0"):
        sched.step(0.8, global_step=torch.tensor(11.0))


def test_a_state_dict_of_another_policy_or_a_whole_checkpoint_is_refused_clearly():
    lr_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    lr_sched = PolicyScheduler(lr_opt, ReplayPolicy(ActionDecoder(("lr",)), [[0.0]]), total_steps=3)
    mom_sched = PolicyScheduler(
        torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9),
        ReplayPolicy(ActionDecoder(("momentum",)), [[0.0]]),
        total_steps=3,
    )
    for source, target in ((lr_sched, mom_sched), (mom_sched, lr_sched)):
        with pytest.raises(
            ValueError, match="saved for a policy controlling .* load it into a scheduler of the bundle"
        ):
            target.load_state_dict(source.state_dict())
    checkpoint = {"model": {}, "optimizer": lr_opt.state_dict(), "scheduler": lr_sched.state_dict()}
    with pytest.raises(
        ValueError, match=r"has keys \['model', 'optimizer', 'scheduler'\]\); .* pass state_dict\['scheduler'\]"
    ):
        lr_sched.load_state_dict(checkpoint)


@pytest.mark.parametrize("copy_by", ["deepcopy", "pickle"])
def test_a_copy_leaves_the_tensorboard_writer_behind(default_bundle, tmp_path, copy_by):
    import pickle

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    sched = PolicyScheduler(_optimizer("adamw", 1e-3, 1e-4, 0.9), default_bundle, 4, epochs=4, writer=writer)
    sched.step(1.0, train_loss=1.0)
    twin = copy.deepcopy(sched) if copy_by == "deepcopy" else pickle.loads(pickle.dumps(sched))
    assert twin.writer is None and sched.writer is writer
    twin.step(0.9, train_loss=0.9)  # logs nowhere, schedules as the original does
    sched.step(0.9, train_loss=0.9)
    assert twin.get_last_lr() == sched.get_last_lr()
    writer.close()


def test_metrics_take_one_element_arrays_and_refuse_strings_and_bools(default_bundle):
    sched = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), default_bundle, 5, epochs=5)
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match="must be a real number \\(a loss\\)"):
            sched.step(bad)
    with pytest.raises(TypeError, match="shape \\(2,\\)"):
        sched.step(np.array([0.5, 0.4]))
    sched.step(np.array([0.5]), train_loss=np.float32(0.6))  # numpy scalars and one-element arrays are numbers
    assert sched.last_step == 1


def test_an_optimizer_without_a_numeric_learning_rate_is_refused_clearly():
    class RelativeStep(torch.optim.SGD):  # transformers' Adafactor(relative_step=True) has lr=None
        def __init__(self, params):
            super().__init__(params, lr=0.1)
            self.param_groups[0]["lr"] = None

    with pytest.raises(ValueError, match=r"param group 0 of RelativeStep has lr=None.*relative_step=False"):
        PolicyScheduler(
            RelativeStep(torch.nn.Linear(2, 2).parameters()), ReplayPolicy(ActionDecoder(("lr",)), [[0.0]]), 3
        )
    empty = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1e-3)
    empty.param_groups.clear()
    with pytest.raises(ValueError, match="the AdamW has no param groups, so there is nothing to schedule"):
        PolicyScheduler(empty, ReplayPolicy(ActionDecoder(("lr",)), [[0.0]]), 3)


def test_another_lr_scheduler_is_reported_not_silently_overridden():
    """A torch warm-up beside the policy: it moved the starting rate, or it rewrites the policy's rates."""
    policy = ReplayPolicy(ActionDecoder(("lr",)), [[0.5]])
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10)  # lr is now 0.01
    with pytest.warns(UserWarning, match=r"torch LR scheduler \(a warm-up\?\) has changed.*lr=0.01, created with 0.1"):
        PolicyScheduler(opt, policy, total_steps=3)

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched = PolicyScheduler(opt, policy, total_steps=3)  # built first: the warm-up then rewrites the rates
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    opt.step()
    warmup.step()
    with pytest.warns(UserWarning, match=r"param group 0's lr is 0.02, but this PolicyScheduler set 0.1"):
        sched.step(1.0, train_loss=1.0)
    step = policy.decoder.specs[0].max_log10_change
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 10 ** (0.5 * step))  # the policy's value, written back
    opt.step()
    warmup.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per scheduler
        sched.step(1.0, train_loss=1.0)

    # The scheduler's own writes, a tensor lr's float32 rounding included, are not outside changes.
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=torch.tensor(1e-3), foreach=False)
    sched = PolicyScheduler(opt, ReplayPolicy(ActionDecoder(("lr", "weight_decay")), [[0.3, 0.1]]), 4)
    _train_once(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            sched.step(1.0, train_loss=1.0)


def test_sparse_gradients_with_a_policy_set_weight_decay_raise_a_clear_error():
    emb, head = torch.nn.EmbeddingBag(50, 4, sparse=True), torch.nn.Linear(4, 2)

    def train_step(opt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(emb(torch.randint(0, 50, (8, 3)))), torch.randint(0, 2, (8,))).backward()
        opt.step()

    policy = ReplayPolicy(ActionDecoder(("lr", "weight_decay")), [[0.0, 0.0]])
    opt = torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.1)  # every group at 0: clipped up
    with pytest.warns(UserWarning, match="outside the policy's bounds"):
        sched = PolicyScheduler(opt, policy, total_steps=3)  # kept: its check goes when the scheduler does
    with pytest.raises(ValueError, match=r"param group 0 has sparse gradients.*weight_decay=0 \(kept at 0\)"):
        train_step(opt)
    # Also when the embedding got no gradient at the first step (before, torch's "add(sparse, dense)" came later).
    opt = torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = PolicyScheduler(opt, policy, total_steps=3)
    opt.zero_grad()
    head(torch.randn(8, 4)).sum().backward()
    opt.step()  # the head alone
    for _ in range(2):  # raised at every step, not only once
        with pytest.raises(ValueError, match=r"param group 0 has sparse gradients"):
            train_step(opt)
    # The fix the message gives: the sparse parameters in a group of their own with no decay.
    opt = torch.optim.SGD(
        [{"params": head.parameters(), "weight_decay": 1e-4}, {"params": emb.parameters(), "weight_decay": 0.0}],
        lr=0.1,
    )
    sched = PolicyScheduler(opt, policy, total_steps=3)
    for _ in range(3):
        train_step(opt)
        sched.step(1.0, train_loss=1.0)
    assert sched.get_last_hparams()["weight_decay"][1] == 0.0


def test_frozen_parameters_cost_the_sparse_check_no_full_pass_at_every_step():
    """Parameters frozen in the optimizer (the documented way to unfreeze layers later) never get a gradient, so
    they stay pending: the full check ran at every optimizer step of the run, about 0.5 us per frozen tensor (a
    400-tensor frozen backbone: +200 us a step). It now runs only at a step where a pending parameter has one."""
    frozen = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(20)).requires_grad_(False)
    emb, head = torch.nn.EmbeddingBag(10, 2, sparse=True).requires_grad_(False), torch.nn.Linear(2, 1)
    opt = torch.optim.SGD([*frozen.parameters(), *emb.parameters(), *head.parameters()], lr=0.1, weight_decay=1e-4)
    sched = PolicyScheduler(opt, ReplayPolicy(ActionDecoder(("lr", "weight_decay")), [[0.0, 0.0]]), total_steps=3)
    full_checks = []
    check = sched._check_sparse_gradients
    sched._check_sparse_gradients = lambda pending: (full_checks.append(len(pending)), check(pending))
    for _ in range(10):
        opt.zero_grad()
        head(torch.randn(4, 2)).sum().backward()
        opt.step()
    assert full_checks == [43]  # the first step only (20 frozen layers' 40 tensors, the embedding, the head's 2)
    emb.requires_grad_(True)  # unfrozen later: its sparse gradient in a decayed group is still refused
    opt.zero_grad()
    head(emb(torch.randint(0, 10, (4, 3)))).sum().backward()
    with pytest.raises(ValueError, match=r"param group 0 has sparse gradients"):
        opt.step()


def test_warnings_point_at_the_users_line_through_from_pretrained_too(default_bundle):
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # weight_decay=0: clipped, with a warning
    with pytest.warns(UserWarning, match="outside the policy's bounds") as record:
        PolicyScheduler.from_pretrained("default", opt, 5, epochs=5)
    assert record[0].filename == __file__
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # a fresh one: the first was clipped
    with pytest.warns(UserWarning, match="outside the policy's bounds") as record:
        PolicyScheduler(opt, default_bundle, 5, epochs=5)
    assert record[0].filename == __file__


def test_a_policy_loads_and_runs_under_a_float64_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = PolicyScheduler.from_pretrained("default", opt, 3, epochs=3)
        assert torch.get_default_dtype() == torch.float64  # the user's setting survives the load
        for _ in range(3):
            sched.step(torch.tensor(0.5), train_loss=torch.tensor(0.6))
    finally:
        torch.set_default_dtype(previous)


def test_missing_hyperparameter_names_what_is_missing():
    momentum_policy = ReplayPolicy(ActionDecoder(("lr", "momentum")), [[0.0, 0.0]])
    with pytest.raises(ValueError, match=r"Adagrad has no 'momentum' or 'betas'"):
        PolicyScheduler(torch.optim.Adagrad(torch.nn.Linear(2, 2).parameters()), momentum_policy, 5)

    class PlainSGD(torch.optim.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

    wd_policy = ReplayPolicy(ActionDecoder(("lr", "weight_decay")), [[0.0, 0.0]])
    with pytest.raises(ValueError, match=r"no 'weight_decay'"):
        PolicyScheduler(PlainSGD(torch.nn.Linear(2, 2).parameters()), wd_policy, 5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), torch.tensor(float("nan"))])
def test_non_finite_loss_is_divergence_with_a_warning_and_a_smaller_lr(bad):
    decoder = ActionDecoder(("lr", "weight_decay"))
    policy = ReplayPolicy(decoder, np.full((10, 2), 0.5))
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    sched = PolicyScheduler(opt, policy, total_steps=6)
    sched.step(1.0)
    lr, wd = opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]
    with pytest.warns(UserWarning, match="divergence"):
        sched.step(bad)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr * 10**-0.25)
    assert opt.param_groups[0]["weight_decay"] == wd
    assert len(policy.seen) == 1  # the policy never sees a diverged loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step(0.9, train_loss=0.8)
    obs = sched.last_observation
    assert np.all(np.isfinite(obs))
    names = sched.features.feature_names()
    assert obs[names.index("lr_prev_action")] == -1.0 and obs[names.index("progress")] == pytest.approx(3 / 6)


def test_non_finite_first_loss_starts_the_features_at_the_next_finite_one():
    policy = ReplayPolicy(ActionDecoder(("lr",)), np.zeros((5, 1)))
    sched = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), policy, total_steps=4)
    with pytest.warns(UserWarning, match="divergence"):
        sched.step(1.0, train_loss=float("nan"))
    assert sched.last_observation is None
    sched.step(2.0)
    names = sched.features.feature_names()
    assert sched.last_observation[names.index("log_val_loss")] == 0.0  # 2.0 is the reference loss
    # The first decision sees the cut: the rate is a step below where the run started, by the action -1.
    assert sched.last_observation[names.index("lr_log_change")] == pytest.approx(-0.25)
    assert sched.last_observation[names.index("lr_prev_action")] == -1.0


def test_a_loss_far_above_the_runs_first_is_divergence_as_in_the_environment():
    policy = ReplayPolicy(ActionDecoder(("lr",)), np.zeros((8, 1)))
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    sched = PolicyScheduler(opt, policy, total_steps=6)
    sched.step(2.0, 2.0)
    sched.step(1999.0, 1999.0)  # below DIVERGENCE_FACTOR x the first: shown to the policy
    assert len(policy.seen) == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    state = sched.state_dict()
    with pytest.warns(UserWarning, match=r"validation loss 2001 at scheduler step 3, above 1000x the run's first one"):
        sched.step(2001.0, 2001.0)
    assert len(policy.seen) == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.1 * 10**-0.25)
    assert sched.history["diverged"][3] == 1.0
    # The reference is part of the state: a resumed run calls the same loss a divergence.
    again = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), policy, total_steps=6)
    again.load_state_dict(state)
    with pytest.warns(UserWarning, match="above 1000x the run's first one"):
        again.step(2001.0, 2001.0)
    # A state saved before the reference was (no "reference_val") takes the first decision's loss.
    old = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), policy, total_steps=6)
    old.load_state_dict({k: v for k, v in state.items() if k != "reference_val"})
    with pytest.warns(UserWarning, match=r"above 1000x the run's first one \(2\)"):
        old.step(2001.0, 2001.0)
    sched.reset()
    _train_once(sched.optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step(5000.0, 5000.0)  # a new run: its first loss is the reference again
    # A first loss of exactly 0 is no reference (as for the features): the next positive one is.
    zero = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), ReplayPolicy(ActionDecoder(("lr",)), np.zeros((8, 1))), 6)
    _train_once(zero.optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for loss in (0.0, 2e-3, 1e-2, 1.5):  # 1.5 is below 1000 x 2e-3
            zero.step(loss, loss)
    assert not zero.history["diverged"].any()
    # ...and that reference (not the features' 1, from the first loss of 0) is what a resumed run keeps.
    resumed = PolicyScheduler(
        _optimizer("sgd", 0.1, 1e-4, 0.9), ReplayPolicy(ActionDecoder(("lr",)), np.zeros((8, 1))), 6
    )
    resumed.load_state_dict(zero.state_dict())
    with pytest.warns(
        UserWarning, match=r"validation loss 2.5 at scheduler step 5, above 1000x the run's first one \(0.002\)"
    ):
        resumed.step(2.5, 2.5)


def test_steps_beyond_total_steps_warn_and_hold():
    policy = ReplayPolicy(ActionDecoder(("lr",)), [[1.0], [1.0], [1.0]])
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    sched = PolicyScheduler(opt, policy, total_steps=2)
    sched.step(1.0)
    sched.step(0.9)  # the last decision only observes
    lr = opt.param_groups[0]["lr"]
    assert lr == pytest.approx(0.1 * 10**0.25) and len(policy.seen) == 1
    with pytest.warns(UserWarning, match="more than total_steps=2"):
        sched.step(0.8)
    assert opt.param_groups[0]["lr"] == lr and len(policy.seen) == 1


# -- logging ---------------------------------------------------------------------------------------
class _RecordingWriter:
    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))


def test_tensorboard_tags(tmp_path):
    writer = _RecordingWriter()
    policy = ReplayPolicy(ActionDecoder(("lr", "weight_decay")), np.full((3, 2), 0.5))
    sched = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), policy, total_steps=3, writer=writer)
    lrs = []
    for val in (1.0, 0.5, 0.25):
        sched.step(val, train_loss=val)
        lrs.append(sched.get_last_lr()[0])
    assert [v for _, v in writer.scalars["scheduler/val_loss"]] == [1.0, 0.5, 0.25]
    # step 0: the rate the first interval ran with; step t: the one set for interval t + 1
    assert writer.scalars["scheduler/lr"] == [(0, pytest.approx(0.1)), *zip([1, 2, 3], lrs)] and lrs[0] > 0.1
    # on the training loop's own x-axis
    writer = _RecordingWriter()
    sched = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), policy, total_steps=3, writer=writer)
    for t in (1, 2):
        sched.step(1.0 / t, train_loss=1.0, global_step=100 * t)
    assert [s for s, _ in writer.scalars["scheduler/lr"]] == [0, 100, 200]
    assert [s for s, _ in writer.scalars["scheduler/val_loss"]] == [100, 200]
    with pytest.raises(ValueError, match="global_step must be an integer >= 0"):
        sched.step(1.0, global_step=-1)
    assert {"scheduler/train_loss", "scheduler/weight_decay", "scheduler/action_lr", "scheduler/diverged"} <= set(
        writer.scalars
    )

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as tb:
        sched = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), policy, total_steps=2, writer=tb)
        sched.step(1.0)
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_the_history_holds_what_tensorboard_gets_and_survives_a_checkpoint(default_bundle, tmp_path):
    writer = _RecordingWriter()
    total, cut = 6, 3
    losses = _losses(total)
    opt = _optimizer("adamw", 1e-3, 1e-2, 0.9)
    sched = PolicyScheduler(opt, default_bundle, total_steps=total, epochs=total, writer=writer)
    for i, (val, train) in enumerate(losses[:cut]):
        sched.step(val, train, global_step=10 * (i + 1))
    checkpoint = io.BytesIO()
    torch.save(sched.state_dict(), checkpoint)
    checkpoint.seek(0)
    for i, (val, train) in enumerate(losses[cut:], start=cut):
        sched.step(val, train, global_step=10 * (i + 1))
    with pytest.warns(UserWarning, match="more than total_steps"):
        sched.step(0.5, 0.5)  # past the end: recorded, values held, no action
    h = sched.history
    assert set(h) == {"step", "global_step", "val_loss", "train_loss", "diverged", "lr", "weight_decay"} | {
        "action_lr",
        "action_weight_decay",
    }
    assert all(len(column) == total + 2 for column in h.values())
    assert h["step"].tolist() == list(range(total + 2))
    assert h["global_step"][1:-1].tolist() == [10 * t for t in range(1, total + 1)] and np.isnan(h["global_step"][-1])
    assert h["val_loss"][1:-1].tolist() == [v for v, _ in losses] and np.isnan(h["val_loss"][0])
    # Every value TensorBoard got is the history's, at the same place on the axis.
    for tag, column in (("lr", "lr"), ("val_loss", "val_loss"), ("action_lr", "action_lr")):
        rows = np.flatnonzero(np.isfinite(h[column][: total + 1]))
        x = np.where(rows == 0, 0, h["global_step"][rows]).astype(int).tolist()
        assert writer.scalars[f"scheduler/{tag}"] == list(zip(x, h[column][rows].tolist())), tag
    assert (
        h["lr"][-1] == h["lr"][-2] == sched.get_last_lr()[0] and np.isnan(h["action_lr"][[0, total, total + 1]]).all()
    )
    assert h["lr"][0] == pytest.approx(1e-3) and (h["diverged"] == 0).all()
    # A resumed scheduler continues the history; reset() starts it again.
    resumed = PolicyScheduler(_optimizer("adamw", 1e-3, 1e-2, 0.9), default_bundle, total_steps=total, epochs=total)
    resumed.load_state_dict(torch.load(checkpoint, weights_only=True))
    for i, (val, train) in enumerate(losses[cut:], start=cut):
        resumed.step(val, train, global_step=10 * (i + 1))
    assert set(resumed.history) == set(h)
    for column, values in resumed.history.items():
        np.testing.assert_array_equal(values, h[column][:-1], err_msg=column)  # NaN where NaN, exactly
    resumed.reset()
    assert resumed.history["step"].tolist() == [0.0] and resumed.history["lr"][0] == pytest.approx(1e-3)
    # A state saved before the history existed: the start's row only, then it goes on.
    old_state = {k: v for k, v in sched.state_dict().items() if k != "history"}
    old = PolicyScheduler(_optimizer("adamw", 1e-3, 1e-2, 0.9), default_bundle, total_steps=total, epochs=total)
    old.load_state_dict(old_state)
    h_old = old.history
    assert h_old["step"].tolist() == list(range(total + 2)) and h_old["lr"][0] == pytest.approx(1e-3)
    assert np.isnan(h_old["val_loss"]).all() and np.isnan(h_old["lr"][1:]).all()  # unknown before the save
    old.step(0.4, 0.4)  # (past the end, already warned about in the saved run)
    again = PolicyScheduler(_optimizer("adamw", 1e-3, 1e-2, 0.9), default_bundle, total_steps=total, epochs=total)
    again.load_state_dict(old.state_dict())  # and it resumes again
    assert again.history["val_loss"][-1] == 0.4 and len(again.history["step"]) == total + 3
    # Past the end, a non-finite loss is still marked.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again.step(float("nan"), 0.4)
    assert again.history["diverged"][-1] == 1.0 and again.history["diverged"][-2] == 0.0


def test_the_history_of_a_long_run_takes_8_bytes_a_value():
    """A run that calls step() at every optimizer step (decisions= groups them) keeps a history row per call: as
    lists of Python floats that was 32 bytes a value (a million calls with lr and weight_decay: about 0.3 GB of
    memory), now 8 in memory as in the state dict."""
    policy = ReplayPolicy(ActionDecoder(("lr", "weight_decay")), [[0.1, -0.1]])
    sched = PolicyScheduler(_optimizer("sgd", 0.01, 1e-4, 0.9), policy, total_steps=20_000, decisions=25)
    sched._optimizer_stepped = True
    columns = len(sched.history)  # 9: step, global_step, losses, diverged, the 2 values and their actions
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5_000):
            sched.step(0.5 if sched.next_step_decides else None, train_loss=0.5)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 5_000 * columns * 8 * 1.2 + 50_000  # (lists of floats: 5,000 * 9 * 32 bytes)
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    assert len(buffer.getvalue()) < 5_000 * columns * 8 * 1.1 + 50_000
    resumed = PolicyScheduler(_optimizer("sgd", 0.01, 1e-4, 0.9), policy, total_steps=20_000, decisions=25)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for column, values in sched.history.items():
        np.testing.assert_array_equal(resumed.history[column], values)
    resumed.step(0.5 if resumed.next_step_decides else None, train_loss=0.5)  # and it goes on
    assert len(resumed.history["step"]) == 5_002


@pytest.mark.filterwarnings("ignore:param group 0's lr is")  # the copy writes the optimiser they share
@pytest.mark.parametrize("deterministic", [True, False])
def test_a_shallow_copy_keeps_its_own_history_observations_and_draws(default_bundle, deterministic):
    def scheduler():
        opt = _optimizer("adamw", 1e-3, 1e-2, 0.9)
        return PolicyScheduler(opt, default_bundle, total_steps=8, epochs=8, deterministic=deterministic, seed=3)

    losses = [(1.0, 1.1), (0.8, 0.9), (0.7, 0.75), (0.65, 0.6), (0.6, 0.55)]
    sched, reference = scheduler(), scheduler()
    for val, train in losses[:2]:
        sched.step(val, train)
        reference.step(val, train)
    twin = copy.copy(sched)
    assert twin.optimizer is sched.optimizer  # as a copy of a torch scheduler, it steps the same optimiser
    for val, train in ((3.0, 2.5), (2.0, 2.2)):  # the copy sees another run
        twin.step(val, train)
    assert len(sched.history["step"]) == 3 and len(twin.history["step"]) == 5
    for val, train in losses[2:]:  # the original goes on as if no copy had been made
        sched.step(val, train)
        reference.step(val, train)
        np.testing.assert_array_equal(sched.last_observation, reference.last_observation)
        assert sched.get_last_hparams() == reference.get_last_hparams()
    scheduler().load_state_dict(sched.state_dict())


def test_plot_of_losses_that_are_exactly_zero_keeps_a_linear_axis_without_warnings(default_bundle):
    sched = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), default_bundle, 4, epochs=4)
    for _ in range(2):
        sched.step(0.0, train_loss=0.0)  # allowed: the log-loss features saturate at their clip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = sched.plot()
    assert fig.axes[0].get_yscale() == "linear" and fig.axes[1].get_yscale() == "log"


def test_plot_draws_the_losses_and_the_schedule(default_bundle, tmp_path):
    opt = _optimizer("adamw", 1e-3, 1e-2, 0.9)
    sched = PolicyScheduler(opt, default_bundle, total_steps=4, epochs=4)
    for t, val in enumerate((1.0, 0.8, float("nan"), 0.6), start=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the non-finite loss's warning
            sched.step(val, train_loss=1.0, global_step=50 * t)
    fig = sched.plot(tmp_path / "schedule.png", title="my run")
    assert (tmp_path / "schedule.png").stat().st_size > 10_000 and fig._suptitle.get_text() == "my run"
    losses, lr, wd = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "lr", "weight decay"]
    assert lr.get_xlabel() == "" and wd.get_xlabel() == "global step" and lr.get_yscale() == "log"
    (line,) = lr.get_lines()
    assert (
        line.get_xdata().tolist() == [0, 50, 100, 150, 200, 250]  # the last value holds one interval more
        and line.get_ydata().tolist() == [*sched.history["lr"].tolist(), sched.history["lr"][-1]]
    )
    assert [text.get_text() for text in losses.get_legend().get_texts()] == [
        "val loss",
        "train loss",
        "non-finite loss",
    ]
    val_line = losses.get_lines()[0]  # a gap at the divergence (step 150), not a line through it
    assert val_line.get_xdata().tolist() == [50, 100, 150, 200] and np.isnan(val_line.get_ydata()[2])
    # Without global steps, the x-axis counts step() calls.
    sched.reset()
    sched.step(1.0, train_loss=1.0)
    assert sched.plot().axes[-1].get_xlabel() == "scheduler step"


# -- integrations ----------------------------------------------------------------------------------
def test_lightning_config_and_mixin_without_lightning():
    from agents.integrations import PolicySchedulerMixin, lightning_scheduler_config

    policy = ReplayPolicy(ActionDecoder(("lr", "weight_decay")), np.full((3, 2), 0.5))
    opt = _optimizer("sgd", 0.1, 1e-4, 0.9)
    sched = PolicyScheduler(opt, policy, total_steps=3)
    config = lightning_scheduler_config(sched, monitor="val_loss")
    assert config["scheduler"] is sched and config["reduce_on_plateau"] and config["monitor"] == "val_loss"
    with pytest.raises(TypeError, match="PolicyScheduler"):
        lightning_scheduler_config(torch.optim.lr_scheduler.StepLR(opt, 1))
    with pytest.raises(ValueError, match="interval"):
        lightning_scheduler_config(sched, interval="batch")
    # frequency is a count: 1.5 is not truncated to 1 (nor "2" parsed), and strict is a flag; NumPy ints pass.
    for frequency in (1.5, "2", None, True, 0):
        with pytest.raises(
            ValueError, match=rf"frequency must be an integer >= 1 .*, got {re.escape(repr(frequency))}"
        ):
            lightning_scheduler_config(sched, frequency=frequency)
    assert lightning_scheduler_config(sched, frequency=np.int64(2))["frequency"] == 2
    with pytest.raises(TypeError, match="strict must be True or False .*, got 'no'"):
        lightning_scheduler_config(sched, strict="no")
    # A score is refused (the policy would read an improving model as a diverging one); losses pass.
    for score in ("val_acc", "val/accuracy", "val_f1", "val_auroc", "eval_rouge1", "val_mAP50-95", "valAcc"):
        with pytest.raises(ValueError, match=rf"monitor='{score}' names a score .* \(e\.g\. 'val_loss'\)"):
            lightning_scheduler_config(sched, monitor=score)
    for loss in ("val_loss", "val/nll", "val_perplexity", "val_acc_loss", "valid_mse", "val_top1_error", "val_mape"):
        assert lightning_scheduler_config(sched, monitor=loss)["monitor"] == loss

    class _Trainer:
        callback_metrics: dict = {}
        accumulate_grad_batches = 2

    class Base:
        def lr_scheduler_step(self, scheduler, metric):
            scheduler.step()

    class Module(PolicySchedulerMixin, Base):
        trainer = _Trainer()

    # The interval's training loss is the mean of what training_step returned (Lightning hands it over divided
    # by accumulate_grad_batches), whether as a tensor or as a dict's "loss", each batch weighing as many as
    # it holds (as Lightning's epoch mean of a logged loss: a short last batch counts less); nothing else counts.
    module = Module()
    batches = ((torch.zeros(3, 2), torch.zeros(3)), {"x": torch.zeros(1, 2)}, None)
    for outputs, batch in zip((torch.tensor(0.3), {"loss": torch.tensor(0.4), "extra": 1}, None), batches):
        module.on_train_batch_end(outputs, batch, 0)
    module.lr_scheduler_step(sched, torch.tensor(1.0))
    names = sched.features.feature_names()
    assert sched.last_step == 1 and sched.last_observation[names.index("has_train_loss")] == 1.0
    assert sched.history["train_loss"][1] == pytest.approx((3 * 0.6 + 1 * 0.8) / 4)
    module.lr_scheduler_step(sched, torch.tensor(0.9))  # no batch since: no training loss
    assert math.isnan(sched.history["train_loss"][2])
    other = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.step()  # (no gradients: a no-op that keeps torch's call-order check quiet)
    Module().lr_scheduler_step(other, None)  # non-policy schedulers are stepped as Lightning would
    assert other.last_epoch == 1
    with pytest.raises(ValueError, match="monitor"):
        Module().lr_scheduler_step(sched, None)


def test_hf_eval_count_from_training_arguments():
    from types import SimpleNamespace

    from agents.integrations import _decisions_from_args

    state = SimpleNamespace(max_steps=100)
    assert _decisions_from_args(SimpleNamespace(eval_strategy="steps", eval_steps=10, logging_steps=5), state) == 10
    assert _decisions_from_args(SimpleNamespace(eval_strategy="steps", eval_steps=0.25, logging_steps=5), state) == 4
    assert _decisions_from_args(SimpleNamespace(eval_strategy="epoch", num_train_epochs=3.0), state) == 3
    # With max_steps the Trainer's state holds the real number of epochs (args keep the default 3).
    state = SimpleNamespace(max_steps=100, num_train_epochs=10)
    assert _decisions_from_args(SimpleNamespace(eval_strategy="epoch", num_train_epochs=3.0), state) == 10
    with pytest.raises(ValueError, match="eval_strategy"):
        _decisions_from_args(SimpleNamespace(eval_strategy="no"), state)
    # eval_delay: no evaluation before it (the Trainer evaluates at multiples of eval_steps >= eval_delay).
    state = SimpleNamespace(max_steps=100)
    delayed = SimpleNamespace(eval_strategy="steps", eval_steps=10, logging_steps=5, eval_delay=25)
    assert _decisions_from_args(delayed, state) == 8  # steps 30, 40, ..., 100
    assert _decisions_from_args(delayed, state, upto=50) == 3  # made before a resume at step 50
    assert _decisions_from_args(delayed, state, upto=20) == 0
    # transformers 5 also evaluates after the last step when it is not a multiple of eval_steps.
    uneven = SimpleNamespace(eval_strategy="steps", eval_steps=30, logging_steps=5)
    assert _decisions_from_args(uneven, state) == 3
    assert _decisions_from_args(uneven, state, final_eval=True) == 4
    by_epoch = SimpleNamespace(eval_strategy="epoch", num_train_epochs=5.0, eval_delay=2)
    assert _decisions_from_args(by_epoch, state) == 4  # epochs 2, 3, 4, 5
    assert _decisions_from_args(by_epoch, state, upto=3.0) == 2


def test_hf_epochs_from_the_trainers_steps_and_dataloader():
    from types import SimpleNamespace

    from agents.integrations import _epochs_from_args

    args, state = SimpleNamespace(gradient_accumulation_steps=2), SimpleNamespace(max_steps=100)
    assert _epochs_from_args(args, state, list(range(40))) == pytest.approx(5.0)  # 200 batches over 40 per epoch
    assert _epochs_from_args(args, state, iter(range(40))) is None  # no length: the user passes epochs=
    assert _epochs_from_args(args, SimpleNamespace(max_steps=0), list(range(40))) is None
    # 20 batches under accumulation 8: an epoch is 3 optimiser steps (8 + 8 + 4 batches), as the Trainer counts.
    eight = SimpleNamespace(gradient_accumulation_steps=8)
    assert _epochs_from_args(eight, SimpleNamespace(max_steps=9), list(range(20))) == pytest.approx(3.0)
    assert _epochs_from_args(eight, SimpleNamespace(max_steps=7), list(range(20))) == pytest.approx(2.4)


@pytest.fixture
def stand_in_transformers(monkeypatch):
    """A stand-in ``transformers`` module: the callback's own logic runs, with transformers installed or not."""
    import sys
    from types import ModuleType

    import agents.integrations as integrations

    fake = ModuleType("transformers")
    fake.__version__, fake.TrainerCallback = "5.0.0", object
    monkeypatch.setitem(sys.modules, "transformers", fake)
    integrations._hf_callback_class.cache_clear()
    yield integrations
    integrations._hf_callback_class.cache_clear()


def test_hf_callback_driven_as_the_trainer_drives_it(stand_in_transformers, default_bundle, tmp_path):
    """The Trainer's loop in miniature: 40 steps, a loss logged every 5, an evaluation and a checkpoint every 10."""
    from types import SimpleNamespace

    args = SimpleNamespace(
        eval_strategy="steps", eval_steps=10, logging_steps=5, output_dir=str(tmp_path), gradient_accumulation_steps=1
    )

    def trainer_state(step=0):
        return SimpleNamespace(max_steps=40, global_step=step, log_history=[], is_world_process_zero=True, epoch=0.0)

    def run(callback, state, opt, metric="eval_loss"):
        steps = []
        callback.on_train_begin(args, state, None, optimizer=opt, train_dataloader=list(range(10)))
        sched = callback.scheduler
        real_step = sched.step
        sched.step = lambda val, train_loss=None, **kw: (
            steps.append((val, train_loss)) or real_step(val, train_loss, **kw)
        )
        while state.global_step < 40:
            callback.on_step_begin(args, state, None)
            assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]  # the policy's rate runs, not the Trainer's
            opt.param_groups[0]["lr"] = 0.5  # the Trainer's own scheduler writes after its step
            state.global_step += 1
            if state.global_step % 5 == 0:
                state.log_history.append({"loss": 1.0 / state.global_step, "step": state.global_step})
            if state.global_step % 10 == 0:
                metrics = {metric: 2.0 / state.global_step}
                callback.on_evaluate(args, state, None, metrics=metrics)
                if metric == "eval_loss":
                    assert metrics["policy_lr"] == sched.get_last_lr()[0] != 0.5
                (tmp_path / f"checkpoint-{state.global_step}").mkdir(exist_ok=True)
                callback.on_save(args, state, None)
        callback.on_train_end(args, state, None)
        return sched, steps

    opt = torch.optim.AdamW(torch.nn.Linear(3, 1).parameters(), lr=1e-3)
    sched, steps = run(stand_in_transformers.hf_trainer_callback(default_bundle), trainer_state(), opt)
    # One decision per evaluation, over the run's 4; the epochs come from the dataloader (40 steps / 10).
    assert sched.total_steps == 4 and sched.last_step == 4 and sched.epochs == pytest.approx(4.0)
    # Each decision sees the evaluation's loss and the mean of the losses logged since the last one.
    assert steps == [(2.0 / s, (1.0 / (s - 5) + 1.0 / s) / 2) for s in (10, 20, 30, 40)]
    assert all((tmp_path / f"checkpoint-{s}" / "policy_scheduler.pt").is_file() for s in (10, 20, 30, 40))

    # Resuming from checkpoint-20: the policy continues from its saved state, not afresh.
    resumed = stand_in_transformers.hf_trainer_callback(default_bundle)
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 1).parameters(), lr=1e-3)
    resumed.on_train_begin(args, trainer_state(20), None, optimizer=opt2, train_dataloader=list(range(10)))
    assert resumed.scheduler.last_step == 2 and resumed.scheduler.total_steps == 4
    # ... and without the saved state it warns and restarts over the evaluations left.
    (tmp_path / "checkpoint-20" / "policy_scheduler.pt").unlink()
    afresh = stand_in_transformers.hf_trainer_callback(default_bundle)
    with pytest.warns(UserWarning, match="without the policy's state"):
        afresh.on_train_begin(args, trainer_state(20), None, optimizer=opt2, train_dataloader=list(range(10)))
    assert afresh.scheduler.last_step == 0 and afresh.scheduler.total_steps == 2

    # A metric the evaluations do not have: one warning, and the policy does not act.
    opt3 = torch.optim.AdamW(torch.nn.Linear(3, 1).parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="have no 'eval_loss'") as record:
        sched, steps = run(stand_in_transformers.hf_trainer_callback(default_bundle), trainer_state(), opt3, "eval_f1")
    assert len([w for w in record if "have no" in str(w.message)]) == 1 and steps == [] and sched.last_step == 0
    # A score as the metric fails when the callback is made, before the policy loads.
    with pytest.raises(ValueError, match=r"metric='eval_accuracy' names a score .* \(e\.g\. 'eval_loss'\)"):
        stand_in_transformers.hf_trainer_callback("no-such-policy", metric="eval_accuracy")


def test_hf_callback_with_grouped_decisions(stand_in_transformers, default_bundle, tmp_path):
    """40 evaluations, 20 decisions: a loss logged every 20 steps reaches every decision, so no warning; more
    decisions than evaluations are refused in the Trainer's terms."""
    from types import SimpleNamespace

    args = SimpleNamespace(
        eval_strategy="steps", eval_steps=10, logging_steps=20, output_dir=str(tmp_path), gradient_accumulation_steps=1
    )
    state = SimpleNamespace(max_steps=400, global_step=0, log_history=[], is_world_process_zero=True, epoch=0.0)
    opt = torch.optim.AdamW(torch.nn.Linear(3, 1).parameters(), lr=1e-3)
    callback = stand_in_transformers.hf_trainer_callback(default_bundle, decisions=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_train_begin(args, state, None, optimizer=opt, train_dataloader=list(range(10)))
        while state.global_step < 400:
            callback.on_step_begin(args, state, None)
            opt.step()  # (no gradients: only the scheduler's hook sees it)
            state.global_step += 1
            if state.global_step % 20 == 0:
                state.log_history.append({"loss": 1.0, "step": state.global_step})
            if state.global_step % 10 == 0:
                callback.on_evaluate(args, state, None, metrics={"eval_loss": 2.0})
    sched = callback.scheduler
    assert (sched.total_steps, sched.decisions, sched.last_step, sched.decisions_made) == (40, 20, 40, 20)
    assert np.isfinite(sched.history["action_lr"]).sum() == 19  # every second evaluation, the last only observes

    too_many = stand_in_transformers.hf_trainer_callback(default_bundle, decisions=50)
    fresh = SimpleNamespace(max_steps=400, global_step=0, log_history=[], is_world_process_zero=True, epoch=0.0)
    with pytest.raises(ValueError, match="decisions=50 is more than the run's 40 evaluations.*eval_steps"):
        too_many.on_train_begin(args, fresh, None, optimizer=opt, train_dataloader=list(range(10)))


def test_hf_callback_refuses_bad_scheduler_arguments_when_built(stand_in_transformers, default_bundle):
    """A typo or a bad value fails at hf_trainer_callback(...), not inside trainer.train() after its set-up."""
    build = stand_in_transformers.hf_trainer_callback
    with pytest.raises(
        TypeError, match=r"unknown scheduler argument\(s\) \['decison'\] \(decison: did you mean decisions\?\)"
    ):
        build(default_bundle, decison=25)
    with pytest.raises(ValueError, match="decisions must be an integer >= 1 .* evaluations"):
        build(default_bundle, decisions=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        build(default_bundle, seed=-1)
    with pytest.raises(ValueError, match="lr_max_rise must be a positive number"):
        build(default_bundle, lr_max_rise="1.5")
    with pytest.raises(TypeError, match="writer must be a torch.utils.tensorboard.SummaryWriter"):
        build(default_bundle, writer="runs/tb")
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1"):
        build(default_bundle, total_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the trial scheduler's warnings are the run's to give
        build(default_bundle, decisions=5, seed=3, lr_max_rise=1.0)


def test_hf_callback_warns_about_the_horizon_in_the_trainers_terms(stand_in_transformers, default_bundle, tmp_path):
    """The callback builds the scheduler, so the warning about too few or too many decisions names what the
    user sets, evaluations, and only once."""
    from types import SimpleNamespace

    def begin(max_steps, **kwargs):
        args = SimpleNamespace(
            eval_strategy="steps",
            eval_steps=10,
            logging_steps=5,
            output_dir=str(tmp_path),
            gradient_accumulation_steps=1,
        )
        state = SimpleNamespace(
            max_steps=max_steps, global_step=0, log_history=[], is_world_process_zero=True, epoch=0.0
        )
        opt = torch.optim.AdamW(torch.nn.Linear(3, 1).parameters(), lr=1e-3)
        callback = stand_in_transformers.hf_trainer_callback(default_bundle, **kwargs)
        callback.on_train_begin(args, state, None, optimizer=opt, train_dataloader=list(range(10)))
        return callback

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        begin(40)
    horizon = [str(w.message) for w in caught if "meta-trained on runs of" in str(w.message)]
    assert len(horizon) == 1 and horizon[0].startswith("4 evaluations (the callback's decisions) in the run")
    assert "Set eval_strategy/eval_steps so that the run has 10-60 evaluations" in horizon[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert begin(200).scheduler.total_steps == 20
        grouped = begin(2000, decisions=25).scheduler  # 200 evaluations, 25 of them decisions
        assert (grouped.total_steps, grouped.decisions) == (200, 25)
    with pytest.warns(UserWarning, match=r"^200 evaluations .*or pass decisions=25 to the callback") as caught:
        begin(2000)
    assert len(caught) == 1
    with pytest.warns(UserWarning, match=r"^5 decisions \(decisions=5, over 200 evaluations\) in the run") as caught:
        begin(2000, decisions=5)
    assert len(caught) == 1


def test_hf_callback_without_transformers_names_the_install(monkeypatch):
    import sys

    import agents.integrations as integrations

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    integrations._hf_callback_class.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install .hpo-meta\[hf\]. or pip install transformers accelerate"):
            integrations.hf_trainer_callback("default")
    finally:
        integrations._hf_callback_class.cache_clear()


def _quiet_lightning(test):
    """Lightning's own warnings about what these tests do on purpose."""
    for message in (
        "`isinstance\\(treespec, LeafSpec\\)` is deprecated",  # lightning 2.6 on torch 2.13
        "The dirpath has changed",  # a resumed run writes to its own directory
        ".*does not have many workers",
        ".*callbacks used to create the checkpoint need to be provided",
        ".*resuming from a checkpoint that ended before the epoch ended",  # mid-epoch checkpoints, on purpose
    ):
        test = pytest.mark.filterwarnings(f"ignore:{message}")(test)
    return test


def _lightning_fit(
    pl,
    tmp_path,
    name,
    *,
    interval="epoch",
    frequency=1,
    every_n_train_steps=None,
    ckpt=None,
    epochs=3,
    decisions=None,
    strict=False,
    save_on_train_epoch_end=None,
    callbacks=(),
    logger=False,
    **trainer_kw,
):
    """``epochs`` epochs of 4 batches of a linear model under the default policy (stepped per epoch, or every
    ``frequency`` batches with a validation each time, the training loss then logged per step);
    checkpoints of every save in ``tmp_path/name``. Returns the policy and the learning rate of every
    optimiser step."""
    from agents.integrations import PolicySchedulerMixin, lightning_scheduler_config

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    lrs: list[float] = []

    class Model(PolicySchedulerMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, i):
            loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.log("train_loss", loss, on_step=interval == "step", on_epoch=interval == "epoch")
            return loss

        def validation_step(self, batch, i):
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

        def on_before_optimizer_step(self, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
            total = epochs if interval == "epoch" else epochs * 4 // frequency
            self.policy = PolicyScheduler.from_pretrained(
                "default", opt, total_steps=total, epochs=epochs, decisions=decisions
            )
            config = lightning_scheduler_config(
                self.policy, monitor="val_loss", interval=interval, frequency=frequency, strict=strict
            )
            return {"optimizer": opt, "lr_scheduler": config}

    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / name,
        save_top_k=-1,
        filename="{step}",
        every_n_train_steps=every_n_train_steps,
        save_on_train_epoch_end=save_on_train_epoch_end,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[checkpoints, *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=frequency if interval == "step" else None,
        **trainer_kw,
    )
    model = Model()
    trainer.fit(model, loader, loader, ckpt_path=ckpt)
    return model.policy, lrs


# The integrations call step() only after an interval has trained, also when they resume: the warning that
# pyproject.toml silences for the unit tests above is an error in their end-to-end runs.
_NO_EARLY_STEP = pytest.mark.filterwarnings(
    "error:PolicyScheduler.step\\(\\) was called before any optimizer.step\\(\\):UserWarning"
)


@_quiet_lightning
@_NO_EARLY_STEP
def test_lightning_trainer_end_to_end(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    policy, full = _lightning_fit(pl, tmp_path, "full", epochs=4)
    assert policy.last_step == 4 and len(set(full)) > 2
    assert policy.get_last_lr() == [policy.optimizer.param_groups[0]["lr"]]
    # Resumed from an epoch-end checkpoint (ModelCheckpoint saves it before the epoch's decision, which
    # Lightning then skips on resuming; the mixin makes it), the run keeps the uninterrupted schedule.
    policy, resumed = _lightning_fit(pl, tmp_path, "resumed", ckpt=tmp_path / "full" / "step=8.ckpt", epochs=4)
    assert policy.last_step == 4 and resumed == full[8:]


@_quiet_lightning
@_NO_EARLY_STEP
def test_lightning_learning_rate_monitor_logs_the_made_up_decisions_rate_after_a_resume(tmp_path):
    """LearningRateMonitor reads the rates in its on_train_batch_start, which Lightning calls before the
    module's: the first batch of a run resumed from an epoch-end checkpoint was logged at the rate from before
    the decision the mixin makes up, though it trained with the decision's."""
    pl = pytest.importorskip("lightning.pytorch")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _lightning_fit(pl, tmp_path, "full", epochs=4)
    logger = pl.loggers.TensorBoardLogger(tmp_path / "tb", name="resumed", version=0)
    monitor = pl.callbacks.LearningRateMonitor(logging_interval="step")
    _, trained = _lightning_fit(
        pl,
        tmp_path,
        "resumed",
        ckpt=tmp_path / "full" / "step=8.ckpt",
        epochs=4,
        callbacks=[monitor],
        logger=logger,
        log_every_n_steps=1,
    )
    events = EventAccumulator(str(tmp_path / "tb" / "resumed" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("policy")}  # lightning_scheduler_config's name
    assert sorted(logged) == list(range(8, 16))
    assert [logged[step] for step in range(8, 16)] == pytest.approx(trained)


@_quiet_lightning
@_NO_EARLY_STEP
def test_lightning_resumes_exactly_from_a_checkpoint_saved_at_validation_end(tmp_path):
    """Saved at validation end, before Lightning averages the epoch's training loss: the checkpoint holds the
    interval's training losses as the mixin summed them, so the decision made up after resuming sees the
    same mean as the uninterrupted run's."""
    pl = pytest.importorskip("lightning.pytorch")
    policy, full = _lightning_fit(pl, tmp_path, "full", epochs=4, save_on_train_epoch_end=False)
    assert policy.last_step == 4
    trained = policy.history["train_loss"]
    policy, resumed = _lightning_fit(
        pl, tmp_path, "resumed", ckpt=tmp_path / "full" / "step=8.ckpt", epochs=4, save_on_train_epoch_end=False
    )
    assert policy.last_step == 4 and resumed == full[8:]
    np.testing.assert_array_equal(policy.history["train_loss"][2:], trained[2:])  # the made-up decision included


@_quiet_lightning
@_NO_EARLY_STEP
def test_lightning_with_grouped_decisions_resumes_mid_group_exactly(tmp_path):
    """Six epochs, stepped every epoch, three decisions (after epochs 2, 4 and 6, the last only observing):
    the rate holds for two epochs at a time, and a run resumed after epoch 3, inside a group, keeps it."""
    pl = pytest.importorskip("lightning.pytorch")
    policy, full = _lightning_fit(pl, tmp_path, "full", epochs=6, decisions=3)
    assert (policy.last_step, policy.decisions_made) == (6, 3)
    assert [len(set(full[i : i + 8])) for i in (0, 8, 16)] == [1, 1, 1] and len(set(full)) == 3  # 4 batches an epoch
    policy, resumed = _lightning_fit(
        pl, tmp_path, "resumed", ckpt=tmp_path / "full" / "step=12.ckpt", epochs=6, decisions=3
    )
    assert (policy.last_step, policy.decisions_made) == (6, 3) and resumed == full[12:]


@_quiet_lightning
@pytest.mark.filterwarnings("ignore:ReduceLROnPlateau conditioned on metric val_loss which is not available")
@_NO_EARLY_STEP
def test_lightning_mixin_leaves_a_fresh_run_to_lightning(tmp_path):
    """Validation every other epoch with strict=False: Lightning skips the epochs without one, and a run
    that never resumed gets no catch-up decisions and no resume warning; the mixin says before training
    that the validations do not line up with the policy's steps, and after it that a step was missed."""
    pl = pytest.importorskip("lightning.pytorch")
    with pytest.warns(UserWarning, match="PolicySchedulerMixin") as record:
        policy, _ = _lightning_fit(pl, tmp_path, "every2", epochs=4, check_val_every_n_epoch=2)
    said = [str(w.message) for w in record if "PolicySchedulerMixin" in str(w.message)]
    assert len(said) == 2
    assert "validation runs every 2 epochs (check_val_every_n_epoch) but the policy steps every 1" in said[0]
    assert "the run ended after 3 of the scheduler's total_steps=4 step() calls" in said[1]
    # Lightning's own steps only: none at epoch 0 (no val_loss yet), then one per epoch (at epoch 2 with
    # epoch 1's val_loss still logged: strict=False's stale value)
    assert policy.last_step == 3


@_quiet_lightning
def test_lightning_mixin_refuses_validations_that_do_not_line_up_before_training(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    with pytest.raises(ValueError, match=r"frequency=3 must be a multiple of 2 \(total_steps is then"):
        _lightning_fit(pl, tmp_path, "acc", interval="step", frequency=3, accumulate_grad_batches=2)
    assert not list((tmp_path / "acc").glob("*.ckpt"))  # refused before the first batch
    with pytest.raises(ValueError, match=r"validation runs every 2 epochs .* \(or strict=False, to step it"):
        _lightning_fit(pl, tmp_path, "every2", epochs=4, check_val_every_n_epoch=2, strict=True)


@_quiet_lightning
@_NO_EARLY_STEP
def test_lightning_step_interval_resumes_from_its_validation_checkpoints(tmp_path):
    """interval="step": a resumed run starts with no logged metrics, and Lightning, stepping the policy at
    the resumed batch, raised for the missing val_loss; the checkpoint's values now stand in for it."""
    pl = pytest.importorskip("lightning.pytorch")
    policy, full = _lightning_fit(pl, tmp_path, "full", interval="step", frequency=2)
    assert policy.last_step == policy.total_steps == 6 and len(set(full)) > 2
    for step in (4, 6):  # saved after a validation at an epoch's end, and mid-epoch
        ckpt = tmp_path / "full" / f"step={step}.ckpt"
        policy, resumed = _lightning_fit(pl, tmp_path, f"from{step}", interval="step", frequency=2, ckpt=ckpt)
        assert policy.last_step == 6
        if step == 4:  # at an epoch's end Lightning resumes exactly (mid-epoch it replays the epoch's data)
            assert resumed == full[step:]


@_quiet_lightning
@_NO_EARLY_STEP
def test_lightning_epoch_interval_resumes_from_training_step_checkpoints(tmp_path):
    """Checkpoints saved every 2 training steps (every_n_train_steps): Lightning skips the decision of the
    epoch it resumes in; the mixin makes it before the next batch, from the validation that epoch ran.
    Saved at an epoch's last batch, before its validation, the resumed run skips that validation too: the
    decision is lost, with a warning, and the schedule goes on one behind."""
    pl = pytest.importorskip("lightning.pytorch")
    policy, full = _lightning_fit(pl, tmp_path, "full", every_n_train_steps=2)
    assert policy.last_step == 3 and len(set(full)) > 1
    policy, _ = _lightning_fit(pl, tmp_path, "mid", ckpt=tmp_path / "full" / "step=6.ckpt")  # mid epoch 1
    assert policy.last_step == 3
    with pytest.warns(
        UserWarning, match="has had 1 of the 2 step\\(\\) calls due before epoch 2.*skipped the validation"
    ):
        policy, _ = _lightning_fit(pl, tmp_path, "last", ckpt=tmp_path / "full" / "step=8.ckpt")  # epoch 1's end
    assert policy.last_step == 2  # epoch 1's decision is lost; epoch 2's, which Lightning skipped, is made


class _Regressor(torch.nn.Module):
    """A model as the Hugging Face Trainer wants it: a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def _regression_data(n: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, generator=gen), "labels": torch.randn(1, generator=gen)} for _ in range(n)]


def _hf_trainer(transformers, args, data, *callbacks):
    """A Trainer of a fresh :class:`_Regressor` on ``data`` (its first 16 samples also evaluate)."""
    return transformers.Trainer(
        model=_Regressor(), args=args, train_dataset=data, eval_dataset=data[:16], callbacks=list(callbacks)
    )


def _hf_args(transformers, output_dir, **overrides):
    """TrainingArguments of a 20-step CPU run, evaluated (and the loss logged) every 5 steps, at lr 1e-3."""
    base = dict(
        output_dir=str(output_dir),
        max_steps=20,
        per_device_train_batch_size=8,
        eval_strategy="steps",
        eval_steps=5,
        logging_steps=5,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    return transformers.TrainingArguments(**{**base, **overrides})


def _lr_spy(transformers, seen: list[float]):
    class Spy(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            seen.append(optimizer.param_groups[0]["lr"])

    return Spy()


@pytest.mark.filterwarnings("ignore:initial weight_decay=0")  # checked once below, then expected
@_NO_EARLY_STEP
def test_hf_trainer_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    from agents.integrations import hf_trainer_callback

    data = _regression_data()
    args = _hf_args(
        transformers,
        tmp_path,
        lr_scheduler_type="linear",  # the callback must win against the Trainer's own schedule
        eval_on_start=True,  # not a decision: no training interval came before it
    )
    writer = _RecordingWriter()
    callback = hf_trainer_callback("default", writer=writer)
    seen_lrs = []
    trainer = _hf_trainer(transformers, args, data, callback, _lr_spy(transformers, seen_lrs))
    # TrainingArguments' default weight_decay=0 is below the policy's bounds: it starts at the bound, and says so.
    with pytest.warns(UserWarning, match=r"initial weight_decay=0 .*clipped to 1e-06"), warnings.catch_warnings():
        # The Trainer's own scheduler writes its rate after every step, which the callback undoes: not
        # the "something else writes the hyperparameters" of a second scheduler the user added.
        warnings.filterwarnings("error", message=".*something else.*writes the hyperparameters")
        trainer.train()
    assert trainer.optimizer.param_groups[0]["weight_decay"] > 0
    sched = callback.scheduler
    assert sched.total_steps == 4 and sched.last_step == 4
    # the policy's schedule on the Trainer's x-axis (optimiser steps), beside the Trainer's own curves
    assert [s for s, _ in writer.scalars["scheduler/val_loss"]] == [5, 10, 15, 20]
    # Every optimiser step ran with the policy's learning rate of its interval, not the linear decay.
    lrs = [seen_lrs[i * 5 : (i + 1) * 5] for i in range(4)]
    assert all(len(set(chunk)) == 1 for chunk in lrs)
    assert lrs[0][0] == pytest.approx(1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.evaluate()  # after training: not a decision either
    assert sched.last_step == 4

    # A metric the evaluation does not produce: a warning naming the ones it does, and no decision.
    missing = hf_trainer_callback("default", metric="eval_mse")
    trainer = _hf_trainer(transformers, args, data, missing)
    with pytest.warns(UserWarning, match="no 'eval_mse'.*eval_loss"):
        trainer.train()
    assert missing.scheduler.last_step == 0

    # 22 steps: transformers 5 evaluates once more after the last step, with no loss logged since step 20.
    # That last decision only observes, so no warning about the missing training loss.
    callback = hf_trainer_callback("default")
    trainer = _hf_trainer(transformers, dataclasses.replace(args, max_steps=22), data, callback)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="PolicySchedulerCallback: no training loss")
        trainer.train()
    assert callback.scheduler.total_steps == callback.scheduler.last_step == 5


@pytest.mark.filterwarnings("ignore:initial weight_decay=0")
@_NO_EARLY_STEP
def test_hf_trainer_with_several_eval_datasets_decides_on_the_named_one(tmp_path):
    """Each eval dataset of a dict is evaluated on its own: the one without the metric is no decision and
    no warning; a metric in none of them is said once, at the next step's evaluations."""
    transformers = pytest.importorskip("transformers")
    from agents.integrations import hf_trainer_callback

    data = _regression_data()
    for metric, decisions in (("eval_a_loss", 4), ("eval_b_loss", 4), ("eval_c_loss", 0)):
        callback = hf_trainer_callback("default", metric=metric)
        trainer = transformers.Trainer(
            model=_Regressor(),
            args=_hf_args(transformers, tmp_path),
            train_dataset=data,
            eval_dataset={"a": data[:16], "b": data[16:32]},
            callbacks=[callback],
        )
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer.train()
        said = [str(w.message) for w in record if "evaluation metrics have no" in str(w.message)]
        assert callback.scheduler.last_step == decisions
        assert len(said) == (decisions == 0), said


@_NO_EARLY_STEP
def test_hf_trainer_with_a_warm_up_starts_every_group_from_its_learning_rate(tmp_path):
    """The Trainer's warm-up has set every lr to 0 before the callback starts: the policy starts from the
    TrainingArguments' learning_rate instead (a group left at 0, the biases here, would never train)."""
    transformers = pytest.importorskip("transformers")
    from agents.integrations import hf_trainer_callback

    args = _hf_args(transformers, tmp_path, weight_decay=1e-4, lr_scheduler_type="linear", warmup_steps=4)
    callback, seen = hf_trainer_callback("default"), []

    class GroupSpy(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            seen.append([g["lr"] for g in optimizer.param_groups])

    trainer = _hf_trainer(transformers, args, _regression_data(), callback, GroupSpy())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(a torch LR scheduler|outside the policy's bounds)")
        trainer.train()
    assert len(trainer.optimizer.param_groups) == 2  # weights with decay, the bias without
    assert seen[0] == pytest.approx([1e-3, 1e-3])
    assert all(lr > 0 for lrs in seen for lr in lrs)
    assert all(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters())


@_NO_EARLY_STEP
def test_hf_trainer_resumes_the_policy_from_its_checkpoint(tmp_path, default_bundle):
    """The callback saves the scheduler into each Trainer checkpoint: a run resumed from one makes the
    uninterrupted run's decisions; a checkpoint without it restarts the policy over what is left."""
    transformers = pytest.importorskip("transformers")
    from agents.integrations import HF_SCHEDULER_FILE, hf_trainer_callback

    data = _regression_data()
    args = _hf_args(
        transformers,
        tmp_path / "run",
        save_strategy="steps",
        save_steps=10,
        weight_decay=1e-4,  # inside the policy's bounds (the end-to-end test above checks the default 0)
        eval_on_start=True,  # a resumed run evaluates on start too: no decision, as in a fresh one
    )

    def train(resume: str | None = None) -> tuple[list[float], object]:
        seen: list[float] = []
        callback = hf_trainer_callback("default")
        _hf_trainer(transformers, args, data, callback, _lr_spy(transformers, seen)).train(
            resume_from_checkpoint=resume
        )
        return seen, callback

    full, _ = train()
    checkpoint = tmp_path / "run" / "checkpoint-10"
    assert (checkpoint / HF_SCHEDULER_FILE).is_file()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="a torch LR scheduler")  # the resumed rates are the policy's
        resumed, callback = train(str(checkpoint))
    assert callback.scheduler.total_steps == 4 and callback.scheduler.last_step == 4
    assert resumed == pytest.approx(full[10:], rel=1e-6)
    assert len(set(full)) > 2  # the policy did move the learning rate

    (checkpoint / HF_SCHEDULER_FILE).unlink()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, callback = train(str(checkpoint))
    messages = [str(w.message) for w in record]
    assert any(re.search("resuming at step 10 without the policy's state.*over the 2 evaluations", m) for m in messages)
    assert not any("a torch LR scheduler" in m for m in messages)  # the resumed rates are the policy's
    assert callback.scheduler.total_steps == 2 and callback.scheduler.last_step == 2

    with pytest.raises(ValueError, match="already loaded"):
        hf_trainer_callback(default_bundle, device="cpu")

    # A checkpoint saved between two evaluations (at step 7 of the interval 5-10): the decision at step 10
    # still sees the mean training loss of steps 6-10, so the resumed run keeps the uninterrupted schedule.
    args = dataclasses.replace(args, output_dir=str(tmp_path / "between"), save_steps=7, logging_steps=1)
    full, _ = train()
    resumed, callback = train(str(tmp_path / "between" / "checkpoint-7"))
    assert callback.scheduler.last_step == 4
    assert resumed == pytest.approx(full[7:], rel=1e-6)


# -- the example and the benchmark run (tiny budgets) ----------------------------------------------
def test_example_script_runs_and_writes_its_plot(tmp_path, capsys, load_script):
    example = load_script("examples/deploy_policy.py")
    threads = torch.get_num_threads()
    try:
        runs = example.main(
            ["--problems", "digits", "--seeds", "1", "--decisions", "3", "--lr-grid", "1", "3", "--out", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
    assert {r.schedule for r in runs} == {"policy", "constant", "cosine", "constant x3", "cosine x3"}
    assert all(len(r.val_loss) == 3 and len(r.lr) == 60 for r in runs)
    assert (tmp_path / "deploy_policy.png").is_file()
    assert all(math.isfinite(r.test_loss) and 0 <= r.test_accuracy <= 1 for r in runs)
    out = capsys.readouterr().out
    policy = next(r for r in runs if r.schedule == "policy")
    for r in runs:  # one table row per schedule, with its test loss and whether the policy beat it
        wins = "" if r.schedule == "policy" else f"{int(policy.test_loss < r.test_loss)}/1"
        row = rf"{re.escape(r.problem)}\s+{re.escape(r.schedule)}\s+\S+\s+{r.test_loss:.4f}\s+\S+\s+{wins}"
        assert re.search(row, out), r.schedule


def test_example_transformer_keeps_its_no_decay_group_at_zero(load_script):
    """The example's Transformer trains under the policy with AdamW's usual two groups: the policy moves the
    decayed group's rates, and the group of biases, norms and positions keeps weight decay 0."""
    example = load_script("examples/deploy_policy.py")
    problem = example.transformer_problem()
    torch.manual_seed(0)
    model = problem.make_model()
    optimizer = problem.make_optimizer(model)
    decayed, plain = optimizer.param_groups
    assert plain["weight_decay"] == 0 and decayed["weight_decay"] == 1e-2
    assert sum(p.numel() for g in (decayed, plain) for p in g["params"]) == sum(p.numel() for p in model.parameters())
    scheduler = PolicyScheduler.from_pretrained("default", optimizer, total_steps=4, epochs=problem.epochs)
    rng = np.random.default_rng(0)
    for _ in range(3):
        for _ in range(2):
            loss, _, _ = problem.loss(model, *problem.batch(rng))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_loss, accuracy = example.evaluate(problem, model, problem.val)
        assert math.isfinite(val_loss) and 0 <= accuracy <= 1
        scheduler.step(val_loss, train_loss=loss.item())
    assert decayed["lr"] == plain["lr"] != 1e-3  # the policy moved the rate; both groups keep their 1:1 ratio
    assert decayed["weight_decay"] != 1e-2 and plain["weight_decay"] == 0


def test_horizon_script_runs_the_policy_at_each_number_of_decisions(tmp_path, load_script):
    bench = load_script("benchmarks/horizon.py")
    threads = torch.get_num_threads()
    try:
        results = bench.main(
            ["--problems", "digits", "--seeds", "1", "--steps", "20", "--calls", "2", "10", "--grouped", "2"]
            + ["--json", str(tmp_path / "h.json")]
        )
    finally:
        torch.set_num_threads(threads)
    rows = results["digits CNN (SGD)"]
    assert list(rows) == [
        "constant",
        "cosine",
        "policy, 2 decisions",
        "policy, 10 decisions",
        "policy, 10 calls, decisions=2",
    ]
    assert all(math.isfinite(row["test_loss"]) for row in rows.values())
    # Ten calls grouped into two decisions are the run of two calls.
    assert rows["policy, 10 calls, decisions=2"]["test_loss"] == pytest.approx(rows["policy, 2 decisions"]["test_loss"])
    assert json.loads((tmp_path / "h.json").read_text()) == results


def test_benchmark_script_reports_a_median(tmp_path, load_script, capsys):
    bench = load_script("benchmarks/scheduler_step.py")
    results = bench.main(["--calls", "30", "--warmup", "5", "--json", str(tmp_path / "r.json")])
    assert results["policy_scheduler_step_median_ms"] > 0
    assert json.loads((tmp_path / "r.json").read_text()) == pytest.approx(results)
    # The table names the policy timed (it said "default policy" whatever --policy was).
    mine = shutil.copytree(default_policy_path(), tmp_path / "mine")
    assert bench.main(["--calls", "3", "--warmup", "0", "--policy", str(mine)])["policy"] == str(mine)
    printed = capsys.readouterr().out
    assert f"policy: {mine}\n" in printed and "default policy" not in printed


# -- optimisers and wrappers as users hold them ------------------------------------------------------
class _GradientReplay(ReplayPolicy):
    gradient_features = True


def _train_once(opt: torch.optim.Optimizer) -> None:
    params = [p for group in opt.param_groups for p in group["params"]]
    opt.zero_grad()
    sum((p**2).sum() for p in params).backward()
    opt.step()


@pytest.mark.parametrize("copy_by", ["deepcopy", "pickle"])
def test_a_copied_scheduler_still_observes_its_optimizers_steps(copy_by):
    """torch's optimisers drop their hooks when copied: the copy registers its own again."""
    import copy
    import pickle

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3, weight_decay=1e-4)
    sched = PolicyScheduler(opt, _GradientReplay(ActionDecoder(), np.zeros((4, 2))), total_steps=4)
    _train_once(opt)
    sched.step(1.0, train_loss=1.0)
    twin = copy.deepcopy(sched) if copy_by == "deepcopy" else pickle.loads(pickle.dumps(sched))
    assert twin.optimizer is not opt
    _train_once(twin.optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="no optimizer.step")
        twin.step(0.9, train_loss=0.9)
    assert twin.last_observation[-2:].any()  # gradient features observed, not the zeros of "no step ran"


def test_a_shallow_copy_keeps_its_gradient_statistics_apart():
    import copy

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3, weight_decay=1e-4)
    sched = PolicyScheduler(opt, _GradientReplay(ActionDecoder(), np.zeros((4, 2))), total_steps=4)
    _train_once(opt)
    twin = copy.copy(sched)  # the same optimiser: two hooks, one per scheduler
    _train_once(opt)
    # each counts the step once (the copy from the step it was copied with): before, the original counted 3
    assert sched._grad_stats.steps_observed()[0] == 2 and twin._grad_stats.steps_observed()[0] == 2
    assert twin._grad_stats is not sched._grad_stats


@pytest.mark.parametrize("frozen", [False, True])
def test_gradient_features_do_not_depend_on_which_parameters_got_a_gradient(frozen):
    """A parameter without a gradient at a step (a branch the batch skipped) is a zero gradient, as
    zero_grad(set_to_none=False) leaves it: before, the flat gradients of two steps were compared
    position by position with different parameters in each position. Frozen parameters are left out."""
    seen = []
    for set_to_none in (True, False):
        torch.manual_seed(0)
        shared, a, b, off = (torch.nn.Linear(4, 4), torch.nn.Linear(4, 1), torch.nn.Linear(4, 1), torch.nn.Linear(4, 4))
        off.requires_grad_(not frozen)
        params = [*shared.parameters(), *a.parameters(), *b.parameters(), *off.parameters()]
        opt = torch.optim.SGD(params, lr=0.01)  # no update from a zero gradient (no momentum, no decay)
        policy = _GradientReplay(ActionDecoder(("lr",)), np.zeros((3, 1)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = PolicyScheduler(opt, policy, total_steps=3)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        for _ in range(2):
            for i in range(4):  # the heads take turns: half the parameters get no gradient at each step
                opt.zero_grad(set_to_none=set_to_none)
                ((a if i % 2 == 0 else b)(torch.relu(shared(x))) - y).pow(2).mean().backward()
                opt.step()
            sched.step(1.0, train_loss=1.0)
        seen.append(sched.last_observation[-2:])
        assert np.isfinite(seen[-1]).all()
    np.testing.assert_allclose(seen[0], seen[1], rtol=1e-5)


def test_a_step_before_any_optimizer_step_warns(default_bundle):
    """As torch's schedulers do: a loop that evaluates and steps the scheduler before training runs the
    policy's schedule one interval behind, without an error or a warning at the end."""
    message = "PolicyScheduler.step\\(\\) was called before any optimizer.step"
    opt = torch.optim.AdamW(torch.nn.Linear(3, 1).parameters(), lr=1e-3, weight_decay=1e-4)
    sched = PolicyScheduler(opt, default_bundle, total_steps=10, epochs=10)
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=message)
        with pytest.warns(UserWarning, match=message):
            sched.step(1.0, train_loss=1.0)
        sched.reset()  # a new run: again
        with pytest.warns(UserWarning, match=message):
            sched.step(1.0, train_loss=1.0)
        sched.reset()
        warnings.filterwarnings("error", message=message)
        for t in range(3):  # train first, then step(): no warning
            _train_once(opt)
            sched.step(1.0 / (t + 1), train_loss=1.0)
        twin = copy.deepcopy(sched)
        twin.reset()  # a copy notes its own optimizer's steps
        _train_once(twin.optimizer)
        twin.step(1.0, train_loss=1.0)


def test_a_state_saved_after_the_first_intervals_training_resumes_without_the_early_step_warning(default_bundle):
    """A checkpoint saved after the first interval's optimizer steps, before its step() (Lightning's at the
    first epoch's end, whose decision the resumed run then makes before any optimizer step of its own), is
    not a loop stepping the scheduler first; one saved before any training still is."""
    message = "PolicyScheduler.step\\(\\) was called before any optimizer.step"
    opt = torch.optim.AdamW(torch.nn.Linear(3, 1).parameters(), lr=1e-3, weight_decay=1e-4)
    sched = PolicyScheduler(opt, default_bundle, total_steps=10, epochs=10)
    untrained = sched.state_dict()
    _train_once(opt)
    trained = sched.state_dict()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=message)
        resumed = PolicyScheduler(opt, default_bundle, total_steps=10, epochs=10)
        resumed.load_state_dict(trained)
        resumed.step(1.0, train_loss=1.0)
        warnings.filterwarnings("always", message=message)
        resumed = PolicyScheduler(opt, default_bundle, total_steps=10, epochs=10)
        resumed.load_state_dict(untrained)
        with pytest.warns(UserWarning, match=message):
            resumed.step(1.0, train_loss=1.0)


def test_tensor_hyperparameters_are_filled_in_place():
    """Tensor lr and betas stay tensors (torch wants both betas tensors or both floats), also when they
    require grad; a bfloat16 lr rounds the value, which is not mistaken for an outside write."""
    param = torch.nn.Parameter(torch.ones(3))
    betas = (torch.tensor(0.9), torch.tensor(0.999))
    opt = torch.optim.AdamW([param], lr=torch.tensor(1e-3, dtype=torch.bfloat16), betas=betas, weight_decay=1e-4)
    lr, beta1 = opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]
    decoder = ActionDecoder(("lr", "weight_decay", "momentum"))
    sched = PolicyScheduler(opt, ReplayPolicy(decoder, np.full((4, 3), 0.5)), total_steps=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*something else")
        for t in range(3):
            _train_once(opt)
            sched.step(1.0 / (t + 1))
    group = opt.param_groups[0]
    assert group["lr"] is lr and group["betas"][0] is beta1 and isinstance(group["betas"][1], torch.Tensor)
    assert float(lr) == pytest.approx(sched.get_last_lr()[0], rel=1e-2) and float(beta1) != 0.9

    grad_lr = torch.tensor(1e-3, requires_grad=True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=grad_lr, momentum=0.9, weight_decay=1e-4)
    PolicyScheduler(opt, ReplayPolicy(ActionDecoder(), np.zeros((2, 2))), total_steps=2).step(1.0)
    assert opt.param_groups[0]["lr"] is grad_lr


def test_rmsprop_without_momentum_is_refused_for_a_momentum_policy():
    """RMSprop creates its momentum buffer only when created with momentum > 0: raising it later crashed torch."""
    decoder = ActionDecoder(("lr", "momentum"))
    opt = torch.optim.RMSprop([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    with pytest.raises(ValueError, match="RMSprop keeps a momentum buffer only when created with momentum > 0"):
        PolicyScheduler(opt, ReplayPolicy(decoder, np.zeros((2, 2))), total_steps=2)
    opt = torch.optim.RMSprop([torch.nn.Parameter(torch.ones(3))], lr=1e-3, momentum=0.9)
    with pytest.warns(UserWarning, match="RMSprop is neither"):
        sched = PolicyScheduler(opt, ReplayPolicy(decoder, np.ones((2, 2))), total_steps=2)
    _train_once(opt)
    sched.step(1.0)
    _train_once(opt)


def test_wrappers_are_looked_through():
    """accelerate's AcceleratedOptimizer keeps the optimiser in .optimizer, ZeroRedundancyOptimizer in .optim."""
    from agents.scheduler import _inner_optimizer

    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)

    class Accelerated:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    class Zero(torch.optim.Optimizer):
        def __init__(self, optim):
            self.optim = optim

    assert _inner_optimizer(Accelerated(sgd)) is sgd and _inner_optimizer(Zero(sgd)) is sgd
    assert _inner_optimizer(Accelerated(Zero(sgd))) is sgd and _inner_optimizer(sgd) is sgd


def test_a_state_resumed_into_another_kind_of_optimizer_warns():
    saved = PolicyScheduler(_optimizer("adamw", 1e-3, 1e-4, 0.9), ReplayPolicy(ActionDecoder(), np.zeros((3, 2))), 3)
    saved.step(1.0)
    sched = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), ReplayPolicy(ActionDecoder(), np.zeros((3, 2))), 3)
    with pytest.warns(
        UserWarning, match=r"saved with an adaptive .* this scheduler's is an SGD-like optimizer \(SGD\)"
    ):
        sched.load_state_dict(saved.state_dict())


def test_steps_past_the_end_warn_once():
    sched = PolicyScheduler(_optimizer("sgd", 0.1, 1e-4, 0.9), ReplayPolicy(ActionDecoder(), np.zeros((2, 2))), 1)
    sched.step(1.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            sched.step(1.0)
    assert len([w for w in record if "more than total_steps" in str(w.message)]) == 1


def test_plain_sgd_warns_that_the_policy_learned_momentum():
    """Meta-training's SGD has momentum 0.8-0.95: at 0 the same learning rate takes ~10x smaller steps."""
    params = [torch.nn.Parameter(torch.ones(3))]
    policy = ReplayPolicy(ActionDecoder(), np.zeros((2, 2)))
    with pytest.warns(UserWarning, match=r"momentum in \[0.8, 0.95\].*momentum=0: .* = 1 lr, against 10 lr"):
        PolicyScheduler(torch.optim.SGD(params, lr=0.01, weight_decay=1e-4), policy, total_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PolicyScheduler(torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4), policy, total_steps=10)
        momentum_policy = ReplayPolicy(ActionDecoder(("lr", "momentum")), np.zeros((2, 2)))  # it moves momentum
        PolicyScheduler(torch.optim.SGD(params, lr=0.01, momentum=0.85), momentum_policy, total_steps=10)
