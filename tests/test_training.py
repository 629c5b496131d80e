"""Meta-training: the hpo-train script end to end, its TensorBoard tags, checkpoints and resume."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecFrameStack, VecMonitor, VecNormalize

import training.callbacks as callbacks_module
from agents import PRESETS, MetaAgentConfig, get_preset, load_bundle, make_meta_agent, make_meta_env
from agents.factory import ActionChangePenalty, GroupRelativeReward, ReferenceBaseline
from hpo_env import SPLITS, ActionDecoder, HPOVecEnv, TaskDistribution
from training.callbacks import (
    HeldOutEvalCallback,
    find_latest_checkpoint,
    make_eval_tasks,
    read_checkpoint_state,
    restore_rng_state,
    save_checkpoint,
    summarize_episodes,
)
from training.rollout import EpisodeRecord
from training.train import (
    BUDGETS,
    RESUMABLE_OVERRIDES,
    RunFolderError,
    TrainSettings,
    _field_docs,
    _lock_run_folder,
    load_checkpoint_agent,
    main,
    parse_settings,
    segment_env_seed,
    train,
)

# A toy run: 4 slots x 16 decisions = 64 timesteps per rollout; toy episodes are 9 decisions long.
TINY = [
    "--task-distribution", "toy", "--eval-distribution", "toy", "--n-envs", "4", "--n-steps", "16",
    "--batch-size", "32", "--n-epochs", "2", "--eval-tasks", "2", "--no-progress-bar",
]  # fmt: skip


def _hpo_train() -> list[str]:
    script = Path(sys.executable).with_name("hpo-train")
    # The console script, as a user runs it (falls back to the module where the package is not installed).
    return [str(script)] if script.exists() else [sys.executable, "-m", "training.train"]


def _documented_tags() -> set[str]:
    """Concrete tags listed in training/callbacks.py's docstring (families and names filled in for the toy run)."""
    tags = set()
    for tag in re.findall(r"``([a-z_]+/[a-z0-9_/<>]+)``", callbacks_module.__doc__):
        tag = tag.replace("<family>", "teacher_regression").replace("<name>", "lr")
        tags.add(tag)
    return tags


def _read_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tiny_run_writes_bundle_and_documented_tensorboard_tags(tmp_path):
    proc = subprocess.run(
        [
            *_hpo_train(),
            *TINY,
            "--total-timesteps",
            "256",
            "--eval-freq",
            "128",
            "--logdir",
            str(tmp_path),
            "--run-name",
            "tiny",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "tiny"
    # the summary says where everything is
    assert f"tensorboard --logdir {tmp_path}" in proc.stdout
    assert str(run / "bundle") in proc.stdout
    bundle = load_bundle(run / "bundle")
    assert bundle.is_recurrent and bundle.obs_mean is not None
    training = bundle.config["training"]
    assert training["timesteps"] == 256 and training["seed"] == 0 and training["command"].startswith("hpo-train ")
    assert bundle.config["evaluation"]["timesteps"] == 256
    best = load_bundle(run / "best_bundle")
    assert best.config["evaluation"]["mean_return"] == pytest.approx(
        max(e.value for e in _read_events(run).Scalars("eval/mean_return")), rel=1e-5
    )
    # every documented tag was written, read back with TensorBoard's own reader
    acc = _read_events(run)
    tags = acc.Tags()
    written = set(tags["scalars"]) | set(tags["images"]) | {t.removesuffix("/text_summary") for t in tags["tensors"]}
    missing = _documented_tags() - written
    assert not missing, f"documented but not written: {sorted(missing)}"
    for tag in ("rollout/ep_rew_mean", "train/value_loss", "train/approx_kl", "time/fps"):
        assert tag in written
    assert [e.step for e in acc.Scalars("eval/mean_return")] == [128, 256]
    # one point per PPO update and rollout: an evaluation between two updates does not write one twice
    for tag in tags["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), f"{tag} has repeated or unordered steps {steps}"
    # rollouts of 4 x 16 = 64: SB3 writes update k's statistics with rollout k + 1's (the last one unwritten)
    assert [e.step for e in acc.Scalars("train/value_loss")] == [128, 192, 256]
    assert acc.Images("eval/schedules")[-1].width > 100
    # the HParams tab: the run's identity as resolved, nothing a resume may change, no "None" columns
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)
    assert hparams["agent.n_envs"].number_value == 4 and hparams["seed"].number_value == 0
    assert not {"total_timesteps", "eval_freq", "resume", "run_dir"} & set(hparams)
    assert all(v.string_value != "None" for v in hparams.values())
    settings = json.loads((run / "settings.json").read_text())
    assert settings["run_name"] == "tiny" and settings["total_timesteps"] == 256
    # the options as given (null: the preset's), and the values they resolved to, for a reader
    assert settings["lr_step"] is None and settings["agent_config"]["lr_step"] == 0.5
    assert settings["agent_config"]["n_envs"] == 4
    # progress.csv: every row, the evaluations' included, says where it is on the run's x-axis
    import csv

    with open(run / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    evaluations = [row for row in rows if row.get("eval/mean_return")]
    assert [row["time/total_timesteps"] for row in evaluations] == ["128", "256"]
    assert all(row["time/total_timesteps"] for row in rows)


def _wait_for_a_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 240) -> None:
    """Wait until the hpo-train process ``proc`` has written a first checkpoint in ``run``."""
    deadline = time.monotonic() + timeout
    while find_latest_checkpoint(run / "checkpoints") is None:
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no checkpoint within {timeout:.0f} s"
        time.sleep(0.05)


def test_killed_run_resumes_to_the_full_timestep_count(tmp_path):
    run = tmp_path / "killed"
    args = [*TINY, "--total-timesteps", "1024", "--eval-freq", "0", "--checkpoint-freq", "64"]
    proc = subprocess.Popen(
        [*_hpo_train(), *args, "--logdir", str(tmp_path), "--run-name", "killed"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_a_checkpoint(proc, run)
        proc.send_signal(signal.SIGKILL)  # kill -9: no chance to clean up
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    checkpoint = find_latest_checkpoint(run / "checkpoints")
    done = read_checkpoint_state(checkpoint)["num_timesteps"]
    assert 64 <= done < 1024
    assert not (run / "bundle").exists()
    # nothing already written is corrupted: every complete checkpoint loads
    for step_dir in sorted((run / "checkpoints").glob("step_*")):
        RecurrentPPO.load(step_dir / "model.zip", device="cpu")
    # The resumed segment draws its own tasks: load() reseeds the environment with the run's seed,
    # which must not make the segment replay the run's first tasks.
    settings = parse_settings(["--resume", str(run)])
    seed = segment_env_seed(settings.seed, done)
    env, _ = load_checkpoint_agent(checkpoint, settings.agent_config(), seed, settings)
    assert env.unwrapped._seeds == [seed + i for i in range(env.num_envs)] and seed != settings.seed

    resumed = subprocess.run(
        [*_hpo_train(), "--resume", str(run), "--no-progress-bar"], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at {done:,}" in resumed.stdout
    final = find_latest_checkpoint(run / "checkpoints")
    state = read_checkpoint_state(final)
    assert state["num_timesteps"] == 1024
    assert [s["start"] for s in state["segments"]] == [0, done]
    assert MetaAgentConfig(**state["agent_config"]) == parse_settings(["--resume", str(run)]).agent_config()
    assert load_bundle(run / "bundle").config["training"]["timesteps"] == 1024
    steps = [e.step for e in _read_events(run).Scalars("rollout/ep_rew_mean")]
    assert max(steps) == 1024


def test_a_resumed_run_keeps_the_configuration_it_was_made_with(capsys):
    """settings.json holds only the options given; a preset changed since must not change the run."""
    from training.train import _run_config

    made_with = get_preset("full", lr_step=0.25)
    today = get_preset("full")
    assert _run_config({"agent_config": made_with.to_dict()}, today) == made_with
    assert "presets have changed since this run was made (lr_step)" in capsys.readouterr().out
    assert _run_config({}, today) is today  # a checkpoint from before the record: as resolved


def test_resume_refuses_to_change_the_run_identity(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({**TrainSettings().to_dict(), "run_name": "run", "seed": 3}))
    settings = parse_settings(["--resume", str(run), "--total-timesteps", "99", "--threads", "2"])
    assert (settings.seed, settings.total_timesteps, settings.threads) == (3, 99, 2)
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--resume", str(run), "--seed", "4"])
    assert exc.value.code == 2
    assert "these cannot change: --seed. Changeable: --checkpoint-freq" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--resume", str(tmp_path / "not-a-run")])
    assert "not-a-run': no settings.json there; is it a run folder made by hpo-train?" in capsys.readouterr().err
    # Restating the value an option left to the preset resolved to is no change (settings.json records it).
    resolved = {**TrainSettings().to_dict(), "run_name": "run", "agent_config": {"n_epochs": 4, "lr_step": 0.5}}
    (run / "settings.json").write_text(json.dumps(resolved))
    assert parse_settings(["--resume", str(run), "--n-epochs", "4"]).n_epochs is None  # the run's own, as before
    with pytest.raises(SystemExit):
        parse_settings(["--resume", str(run), "--n-epochs", "5"])
    assert "these cannot change: --n-epochs." in capsys.readouterr().err


def test_resume_before_the_first_checkpoint_starts_the_run_again(tmp_path, capsys):
    """A run stopped before its first checkpoint (e.g. during an imitation warm start) is neither lost
    nor stuck: --resume starts it again in its folder, with its settings."""
    from training.train import main

    run = tmp_path / "early"
    args = [*TINY, "--logdir", str(tmp_path), "--run-name", "early", "--total-timesteps", "128", "--eval-freq", "0"]
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({**parse_settings(args).to_dict(), "run_name": "early"}))
    (run / "checkpoints").mkdir()
    assert main(args) == 2  # a new run does not take the folder ...
    assert "--resume" in capsys.readouterr().err
    assert main(["--resume", str(run)]) == 0  # ... --resume starts it again
    assert "no complete checkpoint yet" in capsys.readouterr().out
    assert load_bundle(run / "bundle").config["training"]["timesteps"] == 128
    # A run that saved its policy but lost its checkpoints is not started again over it.
    for step_dir in (run / "checkpoints").glob("step_*"):
        for f in step_dir.iterdir():
            f.unlink()
        step_dir.rmdir()
    assert main(["--resume", str(run)]) == 2
    assert "would overwrite them" in capsys.readouterr().err


def test_configuration_errors_are_usage_errors_before_any_folder(tmp_path, capsys):
    from training.train import main

    assert main([*TINY, "--logdir", str(tmp_path), "--run-name", "bad", "--init-lr-spread", "1"]) == 2
    assert "hpo-train: error: the 'toy' task distribution has its own fixed learning rates" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # Devices and the log folder are checked as usage errors too, not as tracebacks once the folder exists.
    (tmp_path / "a-file").write_text("")
    for options, message in (
        (["--device", "foo"], "--device 'foo' is not a torch device"),
        (["--env-device", "gpu"], "--env-device 'gpu' is not a torch device"),
        (["--logdir", str(tmp_path / "a-file")], "is a file, not a folder"),
    ):
        with pytest.raises(SystemExit):
            main([*TINY, "--logdir", str(tmp_path), "--run-name", "bad", *options])
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main([*TINY, "--logdir", str(tmp_path), "--run-name", "bad", "--env-device", "cuda"])
        assert "no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, capsys):
    from training.train import main

    args = [*TINY, "--total-timesteps", "64", "--eval-freq", "0", "--logdir", str(tmp_path), "--run-name", "dmg"]
    assert main(args) == 0
    checkpoint = find_latest_checkpoint(tmp_path / "dmg" / "checkpoints")
    (checkpoint / "model.zip").write_bytes(b"not a zip")
    assert main(["--resume", str(tmp_path / "dmg"), "--total-timesteps", "128"]) == 2
    assert "move that folder out of checkpoints/" in capsys.readouterr().err
    # with env workers: the same error, and the workers are stopped (not left running in this process)
    assert main(["--resume", str(tmp_path / "dmg"), "--total-timesteps", "128", "--env-workers", "2"]) == 2
    assert "move that folder out of checkpoints/" in capsys.readouterr().err
    assert not [p for p in multiprocessing.active_children() if p.name == "hpo-env-worker"]


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    from training.train import main

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "settings.json").write_text("{}")
    assert main([*TINY, "--logdir", str(tmp_path), "--run-name", "taken"]) == 2
    assert "already exists" in capsys.readouterr().err


# -- settings and command line ----------------------------------------------------------------------


def test_every_setting_is_documented_and_a_cli_option():
    from training.train import build_parser

    docs = _field_docs(TrainSettings)
    fields = TrainSettings.__dataclass_fields__
    assert set(docs) == set(fields)
    help_text = build_parser().format_help()
    for name in fields:
        assert f"--{name.replace('_', '-')}" in help_text
    assert RESUMABLE_OVERRIDES <= set(fields)
    # "the preset's" defaults are spelled out (budgets and agent settings alike)
    flat = " ".join(help_text.split())
    assert "(default: the preset's)" not in flat
    assert "(default: the preset's: quick 16,384, full 262,144)" in flat
    assert f"(default: the preset's: quick {PRESETS['quick'].n_envs}, full {PRESETS['full'].n_envs})" in flat


def test_parse_settings_types_and_validation(capsys):
    s = parse_settings(
        ["--preset", "full", "--n-envs", "8", "--hyperparameters", "lr", "momentum", "--no-progress-bar"]
    )
    assert s.preset == "full" and s.n_envs == 8 and s.hyperparameters == ("lr", "momentum") and s.progress_bar is False
    assert s.budget == BUDGETS["full"]
    assert s.agent_config().n_envs == 8 and s.agent_config().hyperparameters == ("lr", "momentum")
    defaults = parse_settings([])
    assert defaults == TrainSettings() and defaults.logdir == "runs" and defaults.device == "auto"
    for bad, message in (
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
        (["--n-envs", "0"], "--n-envs must be >= 1, got 0"),
        (["--total-timesteps", "x"], "argument --total-timesteps: invalid int value: 'x'"),
        (["--eval-freq", "-1"], "--eval-freq must be >= 0 timesteps, got -1"),
    ):
        with pytest.raises(SystemExit) as exc:
            parse_settings(bad)
        assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("seed", 1.5, "an integer"),  # ran with seed 1.5
        ("total_timesteps", 1e4, "an integer"),  # went on to SB3 as a float
        ("threads", "2", "an integer"),  # failed on '<' with Python's message
        ("preset", "medium", "one of ['quick', 'full']"),  # a KeyError once the budget was read
        ("eval_distribution", "tst", "one of ['validation', 'test', 'train', 'all', 'toy']"),  # accepted
        ("progress_bar", "no", "True or False"),  # a truthy string: a progress bar
        ("gamma", "0.99", "a number"),
    ],
)
def test_settings_built_in_python_are_checked_as_the_command_line_parses_them(field, value, expected):
    with pytest.raises(
        ValueError, match=rf"--{field.replace('_', '-')} must be {re.escape(expected)}, got {re.escape(repr(value))}"
    ):
        TrainSettings(**{field: value})


def test_settings_take_numpy_numbers_and_one_name_for_a_list():
    s = TrainSettings(seed=np.int64(3), total_timesteps=np.int64(64), gamma=np.float32(0.5), families="tabular")
    assert s.seed == 3 and s.budget.total_timesteps == 64 and s.families == ("tabular",)
    assert TrainSettings(hyperparameters="lr").hyperparameters == ("lr",)  # not ('l', 'r')


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--algorithm", "framestack", "--lstm-hidden-size", "32"], "--lstm-hidden-size does not apply"),
        (["--frame-stack", "4"], "--frame-stack does not apply to --algorithm recurrent"),
    ],
)
def test_options_of_the_other_algorithm_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv)
    assert message in capsys.readouterr().err


def test_quick_budget_is_whole_rollouts():
    for name, budget in BUDGETS.items():
        config = PRESETS[name]
        assert budget.total_timesteps % config.rollout_size == 0
        assert config.n_steps >= 29  # the longest episode of the default distribution fits in one rollout
        assert 0.99 <= config.gamma <= 0.995


# -- factory ------------------------------------------------------------------------------------------


def test_factory_builds_the_documented_stacks():
    config = get_preset("quick", task_distribution="toy", n_envs=2, n_steps=8, batch_size=16)
    env = make_meta_env(config, seed=0)
    assert isinstance(env, VecNormalize) and isinstance(env.venv, VecMonitor) and isinstance(env.unwrapped, HPOVecEnv)
    assert env.norm_obs and not env.norm_reward
    model = make_meta_agent(env, config, seed=0, device="cpu")
    assert isinstance(model, RecurrentPPO) and model.policy.lstm_actor.hidden_size == config.lstm_hidden_size
    assert model.gamma == config.gamma and model.n_steps == 8

    control = config.replace(algorithm="framestack", frame_stack=3)
    env = make_meta_env(control, seed=0)
    assert isinstance(env, VecFrameStack) and env.observation_space.shape == (
        3 * env.unwrapped.observation_space.shape[0],
    )
    assert type(make_meta_agent(env, control, device="cpu")) is PPO


def test_lr_step_reaches_the_environment_and_the_cli():
    config = get_preset("quick", task_distribution="toy", n_envs=2, lr_step=0.75)
    decoder = make_meta_env(config, seed=0).unwrapped.decoder
    assert decoder.specs[0].name == "lr" and decoder.specs[0].max_log10_change == 0.75
    assert decoder.specs[1].max_log10_change == 0.5  # weight decay keeps its default step
    assert parse_settings(["--lr-step", "0.5"]).agent_config().lr_step == 0.5
    assert parse_settings([]).agent_config().lr_step == 0.5  # the presets' choice (benchmarks/reports/levers.md)
    assert get_preset("quick", hyperparameters=("weight_decay",), lr_step=0.75).max_log10_change is None


def test_lr_step_up_makes_increases_slower_in_the_environment():
    config = parse_settings(["--lr-step-up", "0.25", "--task-distribution", "toy", "--n-envs", "2"]).agent_config()
    assert config.lr_step_up == 0.25 and config.lr_step == 0.5
    lr = make_meta_env(config, seed=0).unwrapped.decoder.specs[0]
    assert (lr.max_log10_change, lr.max_log10_up) == (0.5, 0.25)
    assert get_preset("quick").max_log10_increase is None  # off by default: symmetric steps
    with pytest.raises(ValueError, match="lr_step_up is set but 'lr' is not controlled"):
        MetaAgentConfig(hyperparameters=("weight_decay",), lr_step_up=0.25)


def test_lr_max_rise_caps_the_learning_rate_relative_to_the_start_in_the_environment():
    config = parse_settings(["--lr-max-rise", "1.5", "--task-distribution", "toy", "--n-envs", "2"]).agent_config()
    assert config.lr_max_rise == 1.5 and config.max_log10_above_initial == {"lr": 1.5}
    decoder = make_meta_env(config, seed=0).unwrapped.decoder
    assert decoder.specs[0].max_log10_above_initial == 1.5 and decoder.specs[1].max_log10_above_initial is None
    # The full preset caps at 1.5 decades (levers.md, nineteenth round); 0 turns a preset's cap off.
    assert get_preset("full").max_log10_above_initial == {"lr": 1.5}
    assert MetaAgentConfig().lr_max_rise is None and get_preset("quick").lr_max_rise is None
    assert parse_settings(["--preset", "full", "--lr-max-rise", "0"]).agent_config().lr_max_rise is None
    assert parse_settings(["--preset", "full"]).agent_config().lr_max_rise == 1.5
    with pytest.raises(ValueError, match="lr_max_rise must lie in"):
        MetaAgentConfig(lr_max_rise=-1.0)
    # Like lr_step, ignored when the learning rate is not controlled (the full preset's cap must not fail then).
    assert get_preset("full", hyperparameters=("weight_decay",)).max_log10_above_initial is None
    assert parse_settings(["--preset", "full", "--hyperparameters", "weight_decay"]).agent_config().lr_max_rise == 1.5
    # ... but given explicitly on the command line, an option for the learning rate that nothing uses is an error
    for options, named in (
        (["--lr-max-rise", "1.0"], "--lr-max-rise only applies"),
        (["--lr-step", "0.5", "--lr-step-up", "0.25"], "--lr-step, --lr-step-up only apply"),
    ):
        with pytest.raises(ValueError, match=f"{named} .* add lr to --hyperparameters"):
            TrainSettings(hyperparameters=["weight_decay"], **_options(options))
    assert TrainSettings(hyperparameters=["weight_decay"], lr_max_rise=0).agent_config().lr_max_rise is None
    # a run made before the check, where such an option was ignored, still resumes
    old = TrainSettings(hyperparameters=["weight_decay"], lr_max_rise=1.0, resume="runs/old")
    assert old.agent_config().max_log10_above_initial is None


def _options(argv: list[str]) -> dict:
    """``["--lr-step", "0.5"]`` as keyword arguments of :class:`TrainSettings`."""
    return {flag[2:].replace("-", "_"): float(value) for flag, value in zip(argv[::2], argv[1::2])}


def test_learning_rate_end_decays_the_agents_learning_rate_linearly():
    config = parse_settings(
        [
            "--learning-rate",
            "1e-3",
            "--learning-rate-end",
            "1e-4",
            "--task-distribution",
            "toy",
            "--n-envs",
            "2",
            "--n-steps",
            "8",
            "--batch-size",
            "16",
        ]
    ).agent_config()
    assert (config.learning_rate, config.learning_rate_end) == (1e-3, 1e-4)
    model = make_meta_agent(make_meta_env(config, seed=0), config, seed=0, device="cpu")
    assert [model.lr_schedule(p) for p in (1.0, 0.5, 0.0)] == pytest.approx([1e-3, 5.5e-4, 1e-4])
    constant = make_meta_agent(
        make_meta_env(get_preset("quick", task_distribution="toy", n_envs=2), seed=0),
        get_preset("quick", task_distribution="toy", n_envs=2),
        device="cpu",
    )
    assert constant.lr_schedule(0.0) == constant.lr_schedule(1.0) == PRESETS["quick"].learning_rate
    with pytest.raises(ValueError, match=r"learning_rate_end must lie in \[0, learning_rate"):
        MetaAgentConfig(learning_rate=1e-4, learning_rate_end=1e-3)


def test_action_change_penalty_shapes_only_the_agents_reward():
    config = get_preset("quick", task_distribution="toy", n_envs=2, action_change_penalty=0.1)
    assert parse_settings(["--action-change-penalty", "0.1"]).agent_config().action_change_penalty == 0.1
    env = make_meta_env(config, seed=0)
    shaped = env.venv
    assert isinstance(shaped, ActionChangePenalty) and isinstance(shaped.venv, VecMonitor)
    plain = make_meta_env(config.replace(action_change_penalty=0.0), seed=0)
    assert not isinstance(plain.venv, ActionChangePenalty)
    env.reset(), plain.reset()
    n_decisions = {t.num_decisions for t in env.unwrapped.tasks()}
    assert len(n_decisions) == 1
    (n_dec,) = n_decisions
    # Mostly downward learning-rate moves, so that no toy run diverges and both episodes run to the end.
    actions = [np.array([[-0.5, 0.0], [-0.5, 0.0]]), np.array([[0.5, 0.0], [-0.5, 0.0]]),
               np.array([[-3.0, 0.0], [-0.5, 0.2]])]  # fmt: skip
    expected = [np.zeros(2), np.array([1.0, 0.0]), np.array([1.5, 0.2])]  # |a_t - a_{t-1}|, clipped to [-1, 1]
    for a, change in zip(actions, expected):
        _, r_shaped, _, _ = env.step(a)
        _, r_plain, _, _ = plain.step(a)
        np.testing.assert_allclose(r_plain - r_shaped, 0.1 * change, rtol=1e-5, atol=1e-6)
    # No cost for the first decision of the next episode: the previous action belonged to another run.
    for _ in range(n_dec - 5):  # an episode takes n_dec - 1 steps (reset runs the first interval)
        env.step(actions[0]), plain.step(actions[0])
    _, r_shaped, d_shaped, _ = env.step(actions[1])
    _, r_plain, d_plain, _ = plain.step(actions[1])
    assert d_shaped.all() and d_plain.all()
    _, r_shaped, _, _ = env.step(actions[0])
    _, r_plain, _, _ = plain.step(actions[0])
    np.testing.assert_allclose(r_shaped, r_plain, rtol=1e-5, atol=1e-6)


def test_meta_training_lr_draws_reach_the_meta_training_tasks_only():
    config = parse_settings(["--init-lr-spread", "1.5"]).agent_config()
    assert config.init_lr_spread == 1.5
    dist = config.meta_task_distribution()
    assert dist.name == "train" and dist.lr_spread == 1.5
    assert config.meta_task_distribution("all").lr_spread == 1.5
    custom = TaskDistribution(["tabular"])
    assert config.meta_task_distribution(custom) is custom  # an instance is used as given
    env = make_meta_env(config.replace(n_envs=2), seed=0)
    assert env.unwrapped.task_distribution.lr_spread == 1.5
    assert get_preset("quick").meta_task_distribution().lr_spread == 0.5  # the benchmark's spread
    centred = parse_settings(["--init-lr-spread", "1.0", "--init-lr-center", "0.5"]).agent_config()
    dist = centred.meta_task_distribution()
    assert (dist.lr_spread, dist.lr_center) == (1.0, 0.5)
    assert get_preset("quick").meta_task_distribution().lr_center == 0.0
    with pytest.raises(ValueError, match=r"init_lr_center must lie in \[-3, 3\]"):
        get_preset("quick", init_lr_center=5.0)
    with pytest.raises(ValueError, match="'toy' task distribution has its own fixed learning rates"):
        get_preset("quick", task_distribution="toy", init_lr_center=0.5)
    # The full preset starts its tasks around the families' optimum (levers.md, seventeenth and
    # eighteenth rounds); with the toy tasks, which have fixed rates, its draws do not apply.
    full = get_preset("full").meta_task_distribution()
    assert (full.lr_spread, full.lr_center) == (1.0, 0.5)
    toy = get_preset("full", task_distribution="toy")
    assert (toy.init_lr_spread, toy.init_lr_center) == (0.5, 0.0)
    benchmark_like = parse_settings(["--preset", "full", "--init-lr-spread", "0.5", "--init-lr-center", "0"])
    assert benchmark_like.agent_config().meta_task_distribution().lr_spread == 0.5
    # Hidden learning-rate gains (twenty-third round): an option of meta-training's tasks only.
    gained = parse_settings(["--preset", "full", "--lr-gain-spread", "0.5"]).agent_config()
    assert gained.meta_task_distribution().lr_gain_spread == 0.5
    assert gained.meta_task_distribution("all").lr_gain_spread == 0.5
    assert get_preset("full").meta_task_distribution().lr_gain_spread == 0.0
    assert get_preset("full", task_distribution="toy", lr_gain_spread=None).lr_gain_spread == 0.0
    with pytest.raises(ValueError, match=r"lr_gain_spread must lie in \[0, 2\]"):
        get_preset("quick", lr_gain_spread=-0.1)
    with pytest.raises(ValueError, match="'toy' task distribution has its own fixed learning rates"):
        get_preset("quick", task_distribution="toy", lr_gain_spread=0.5)


def test_families_replace_the_splits_families_in_meta_training_only():
    families = (*SPLITS["train"], "glyphs_cnn")
    config = parse_settings(["--families", *families]).agent_config()
    assert config.task_families == families
    dist = config.meta_task_distribution()
    assert set(dist.families) == set(families) and dist.lr_spread == 0.5
    assert config.meta_task_distribution("test").families == SPLITS["test"]  # an explicit split wins
    env = make_meta_env(config.replace(n_envs=2), seed=0)
    assert env.unwrapped.task_distribution.families == families
    rng = np.random.default_rng(0)
    assert {dist.sample(rng).family for _ in range(200)} == set(families)
    with pytest.raises(ValueError, match=r"unknown or no families \['imagenet'\]"):
        MetaAgentConfig(task_families=("digits_mlp", "imagenet"))
    with pytest.raises(ValueError, match="'toy' distribution has none"):
        MetaAgentConfig(task_distribution="toy", task_families=("digits_mlp",))
    with pytest.raises(ValueError, match="task_families must not repeat"):
        MetaAgentConfig(task_families=("digits_mlp", "digits_mlp"))


def test_families_and_hyperparameters_take_commas_and_refuse_repeats_in_the_flags_words(capsys):
    settings = parse_settings(["--families", "digits_mlp,charlm", "--hyperparameters", "lr,", "weight_decay"])
    assert settings.families == ("digits_mlp", "charlm") and settings.hyperparameters == ("lr", "weight_decay")
    for argv, message in (
        (["tabular", "tabular"], "error: --families must not repeat, got ['tabular', 'tabular']"),
        (["imagenet"], "error: --families has unknown or no families ['imagenet']"),
        ([","], "error: --families needs at least one name, got ','"),
    ):
        with pytest.raises(SystemExit):
            parse_settings(["--families", *argv])
        assert message in capsys.readouterr().err


def test_meta_training_on_held_out_families_warns():
    from training.train import _warn_if_held_out_families_are_trained as warn_if

    glyphs = parse_settings(["--families", *SPLITS["train"], "glyphs_cnn"])
    with pytest.warns(UserWarning, match=r"validation families \['glyphs_cnn'\] are also meta-trained on, so the eval"):
        warn_if(glyphs.agent_config(), glyphs.eval_distribution)
    with pytest.warns(UserWarning, match=r"validation families \['glyphs_cnn'\] .* so hpo-bench --split validation"):
        warn_if(glyphs.agent_config(), "test")  # not evaluated on, but a benchmark of that split would mislead
    # The benchmark's test families, meta-trained on: a warning whatever the evaluation split.
    tabular = parse_settings(["--families", "digits_mlp", "tabular"])
    with pytest.warns(
        UserWarning, match=r"test families \['tabular'\] .* hpo-bench --split test \(the benchmark's held"
    ):
        warn_if(tabular.agent_config(), tabular.eval_distribution)
    for eval_split in ("test", "train"):
        with pytest.warns(UserWarning) as record:
            warn_if(get_preset("quick", task_distribution="all"), eval_split)
        assert [str(w.message).split(" are ")[0] for w in record] == [
            "the validation families ['small_tabular', 'glyphs_cnn']",
            "the test families ['tabular', 'digits_cnn']",
        ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if(get_preset("quick"), "validation")
        warn_if(get_preset("quick"), "test")


def test_bad_seed_learning_rate_and_logdir_are_usage_errors_before_any_folder(tmp_path, capsys):
    for argv, expected in (
        (["--seed", "-1"], r"--seed must be an integer in \[0, 2\*\*31\)"),
        (["--seed", str(2**32)], r"--seed must be an integer in \[0, 2\*\*31\)"),
        (["--learning-rate", "inf"], "--learning-rate must be a finite number > 0"),
        (["--task-group-size", "3"], "--task-group-size must be a positive integer dividing n_envs"),
    ):
        code = None
        try:
            code = main([*argv, "--logdir", str(tmp_path / "runs"), "--no-progress-bar"])
        except SystemExit as err:
            code = err.code
        assert code == 2, argv
        assert re.search(expected, capsys.readouterr().err), argv
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--logdir", str(blocker / "sub"), "--total-timesteps", "16", "--no-progress-bar"]) == 2
    assert "cannot be created (Not a directory): pass a writable --logdir" in capsys.readouterr().err


def test_factory_rejects_bad_configuration():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        MetaAgentConfig(algorithm="dqn")
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        MetaAgentConfig(hyperparameters=("lr", "beta2"))  # at construction, not when the env is built
    with pytest.raises(ValueError, match="n_envs must be a positive integer"):
        MetaAgentConfig(n_envs=0)
    with pytest.raises(ValueError, match="gamma"):
        MetaAgentConfig(gamma=1.5)
    with pytest.raises(ValueError, match=r"lr_step must lie in \(0, 3\]"):
        MetaAgentConfig(lr_step=0.0)
    with pytest.raises(ValueError, match=r"action_change_penalty must lie in \[0, 1\)"):
        MetaAgentConfig(action_change_penalty=-0.1)
    with pytest.raises(ValueError, match=r"init_lr_spread must lie in \[0, 3\]"):
        MetaAgentConfig(init_lr_spread=4.0)
    with pytest.raises(ValueError, match="'toy' task distribution has its own fixed learning rates"):
        MetaAgentConfig(task_distribution="toy", init_lr_spread=1.0)
    with pytest.raises(ValueError, match="unknown MetaAgentConfig fields"):
        get_preset("quick", n_env=3)
    with pytest.raises(TypeError, match="MetaAgentConfig"):
        make_meta_env({"n_envs": 2})


# -- evaluation and checkpoints -------------------------------------------------------------------------


def test_eval_tasks_are_fixed_and_cover_the_validation_families():
    tasks = make_eval_tasks(4, n_seeds=2)
    assert tasks == make_eval_tasks(4, n_seeds=2)
    # hpo-train chooses best_bundle/ on these: families held out of meta-training and of the benchmark
    assert len(tasks) == 8 and {t.family for t in tasks} == set(SPLITS["validation"])
    assert TrainSettings().eval_distribution == "validation"
    assert {t.family for t in make_eval_tasks(2, split="test")} == set(TaskDistribution.default("test").families)
    # seeds of one task share its data and differ in initialisation
    assert tasks[0].data_key == tasks[1].data_key and tasks[0].seed != tasks[1].seed
    with pytest.raises(ValueError, match="n_tasks"):
        make_eval_tasks(0)


def _record(task, final: float, ret: float, diverged: bool = False) -> EpisodeRecord:
    return EpisodeRecord(task, 0, rewards=[ret], final_val_loss=final, diverged=diverged)


def test_summarize_episodes_compares_with_references():
    tasks = make_eval_tasks(4)
    policy = [_record(t, f, r) for t, f, r in zip(tasks, [1.0, 2.0, 3.0, float("nan")], [1.0, 0.5, 0.2, -1.0])]
    policy[3].diverged = True
    constant = [_record(t, f, r) for t, f, r in zip(tasks, [2.0, 1.0, 4.0, 1.0], [0.4, 0.6, 0.1, 0.3])]
    s = summarize_episodes(policy, {"constant": constant})
    assert s["mean_return"] == pytest.approx(0.175)
    assert s["constant_mean_return"] == pytest.approx(0.35)
    assert s["return_minus_constant"] == pytest.approx(-0.175)
    assert s["win_rate_vs_constant"] == 0.5  # a diverged run loses
    assert s["divergence_rate"] == 0.25
    assert set(s["family_mean_return"]) == {t.family for t in tasks}
    with pytest.raises(ValueError, match="reference 'constant' has 1 episodes"):
        summarize_episodes(policy, {"constant": constant[:1]})
    # A pair where both runs diverged is a tie (ratio 1), not a NaN that makes the median NaN.
    constant[3].diverged = True
    constant[3].final_val_loss = float("nan")
    assert summarize_episodes(policy, {"constant": constant})["median_loss_ratio_vs_constant"] == 0.875  # 0.5 .75 1 2


def test_a_resumed_run_that_never_evaluated_evaluates_on_its_schedule():
    """eval_freq counts from the run's start, not from the resume: a run stopped more often than
    eval_freq still evaluates (and gets a best bundle) before it ends."""
    from types import SimpleNamespace

    callback = HeldOutEvalCallback(make_eval_tasks(1), ActionDecoder(), eval_freq=1024)
    callback.references = {"constant": []}  # (not rerun here)
    callback.model = SimpleNamespace(num_timesteps=384)  # resumed at 384, no evaluation so far
    callback._on_training_start()
    assert callback.last_eval_timestep == 0
    callback.last_summary = {"timesteps": 256}
    callback._on_training_start()
    assert callback.last_eval_timestep == 256


def test_a_policy_of_weight_decay_alone_trains_and_is_evaluated(tmp_path):
    """The held-out evaluation's constant reference holds whatever the policy controls."""
    from training.train import main

    args = [*TINY, "--hyperparameters", "weight_decay", "--total-timesteps", "64", "--eval-freq", "64"]
    assert main([*args, "--logdir", str(tmp_path), "--run-name", "wd"]) == 0
    bundle = load_bundle(tmp_path / "wd" / "bundle")
    assert bundle.decoder.names == ("weight_decay",)
    assert math.isfinite(bundle.config["evaluation"]["constant_mean_return"])


def test_extending_a_run_keeps_the_events_of_its_last_checkpoint(tmp_path):
    """A resumed run hides what the stopped run logged after its checkpoint, not the checkpoint's own step."""
    from training.train import main

    args = [*TINY, "--total-timesteps", "128", "--eval-freq", "64", "--logdir", str(tmp_path), "--run-name", "ext"]
    assert main(args) == 0
    assert main(["--resume", str(tmp_path / "ext"), "--total-timesteps", "192"]) == 0
    acc = _read_events(tmp_path / "ext")
    assert [e.step for e in acc.Scalars("eval/mean_return")] == [64, 128, 192]
    assert 128 in {e.step for e in acc.Scalars("rollout/ep_rew_mean")}


def test_env_workers_train_a_run_and_a_resume_may_change_them(tmp_path, capsys):
    """--env-workers steps the slots in processes; the count is a resumable setting, not the run's identity."""
    args = [*TINY, "--total-timesteps", "128", "--eval-freq", "64", "--logdir", str(tmp_path), "--run-name", "w"]
    assert main([*args[:-2], "--run-name", "too_many", "--env-workers", "5"]) == 2  # 4 slots: 4 groups at most
    assert "--env-workers 5 is more than the run's 4 task groups" in capsys.readouterr().err
    assert not (tmp_path / "too_many").exists()
    assert main(args) == 0
    assert main(["--resume", str(tmp_path / "w"), "--total-timesteps", "192", "--env-workers", "2"]) == 0
    state = read_checkpoint_state(find_latest_checkpoint(tmp_path / "w" / "checkpoints"))
    assert state["num_timesteps"] == 192 and [s["start"] for s in state["segments"]] == [0, 128]
    assert load_bundle(tmp_path / "w" / "bundle").config["training"]["timesteps"] == 192
    assert [e.step for e in _read_events(tmp_path / "w").Scalars("eval/mean_return")] == [64, 128, 192]
    capsys.readouterr()
    files = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert main(["--resume", str(tmp_path / "w"), "--total-timesteps", "64"]) == 0  # a smaller budget: nothing to do
    out = capsys.readouterr().out
    assert "w already has 192 of 64 timesteps; nothing to train" in out and "timesteps/s" not in out
    # Nothing is opened: no new events file or progress CSV, and the bundle is left as it was.
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == files
    assert load_bundle(tmp_path / "w" / "bundle").config["training"]["timesteps"] == 192


def test_a_smaller_keep_checkpoints_prunes_on_resume(tmp_path):
    run = tmp_path / "keep"
    args = [*TINY, "--total-timesteps", "128", "--checkpoint-freq", "64", "--eval-freq", "0", "--keep-checkpoints", "0"]
    assert main([*args, "--logdir", str(tmp_path), "--run-name", "keep"]) == 0
    assert len(list((run / "checkpoints").glob("step_*"))) == 2
    # A run folder another hpo-train holds is refused, not raced for its checkpoints.
    held: list[int] = []
    _lock_run_folder(run, held)
    try:
        with pytest.raises(RunFolderError, match="another hpo-train process is training .* wait for it to finish"):
            train(parse_settings(["--resume", str(run), "--total-timesteps", "256"]))
    finally:
        os.close(held[0])
    # A file system without locks: a warning, and the run goes on (unlocked).
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fcntl, "flock", no_locks)
        with pytest.warns(UserWarning, match="cannot be locked \\(Operation not supported\\)"):
            _lock_run_folder(run, held := [])
        assert held == []
    # A latest checkpoint that does not load: the error sends the user back to the one before, so a smaller
    # --keep-checkpoints must not have deleted it.
    model = find_latest_checkpoint(run / "checkpoints") / "model.zip"
    good = model.read_bytes()
    model.write_text("junk")
    with pytest.raises(RunFolderError, match="cannot resume from"):
        train(parse_settings(["--resume", str(run), "--total-timesteps", "256", "--keep-checkpoints", "1"]))
    assert len(list((run / "checkpoints").glob("step_*"))) == 2
    model.write_bytes(good)
    assert main(["--resume", str(run), "--keep-checkpoints", "1"]) == 0  # nothing left to train, still pruned
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == [find_latest_checkpoint(run / "checkpoints").name]
    # A budget below what the run has done trains nothing, and is not written over the run's own.
    assert main(["--resume", str(run), "--total-timesteps", "64"]) == 0
    assert json.loads((run / "settings.json").read_text())["total_timesteps"] == 128
    # A checkpoint damaged after it was written: a clear error before anything is changed, not a traceback.
    latest = find_latest_checkpoint(run / "checkpoints")
    (latest / "state.json").write_text("{broken")
    with pytest.raises(RunFolderError, match="cannot resume from .*damaged afterwards"):
        train(parse_settings(["--resume", str(run), "--total-timesteps", "256"]))
    assert json.loads((run / "settings.json").read_text())["total_timesteps"] == 128


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    config = get_preset("quick", task_distribution="toy", n_envs=2, n_steps=8, batch_size=16)
    env = make_meta_env(config, seed=0)
    model = make_meta_agent(env, config, seed=0, device="cpu")
    root = tmp_path / "checkpoints"
    assert find_latest_checkpoint(root) is None
    paths = []
    for steps in (16, 32, 48):
        model.num_timesteps = steps
        paths.append(save_checkpoint(root, model, state={"best_eval_mean_return": 0.5}, keep=2))
    assert sorted(p.name for p in root.glob("step_*")) == [paths[1].name, paths[2].name]
    assert find_latest_checkpoint(root) == paths[2]
    assert json.loads((root / "latest.json").read_text())["checkpoint"] == paths[2].name
    state = read_checkpoint_state(paths[2])
    assert state["num_timesteps"] == 48 and state["best_eval_mean_return"] == 0.5
    # a half-written checkpoint of a killed run (a temp dir, or a dir without state.json) is never chosen
    (root / ".tmp_step_000000000064_1").mkdir()
    broken = root / "step_000000000080"
    broken.mkdir()
    (broken / "model.zip").write_bytes(b"partial")
    assert find_latest_checkpoint(root) == paths[2]
    loaded = RecurrentPPO.load(paths[2] / "model.zip", device="cpu")
    assert loaded.num_timesteps == 48
    vecnorm = VecNormalize.load(
        str(paths[2] / "vecnormalize.pkl"), HPOVecEnv(2, "toy", epochs_feature=config.epochs_feature)
    )
    np.testing.assert_array_equal(vecnorm.obs_rms.mean, env.obs_rms.mean)

    # The global generators come back as they were when the checkpoint was written.
    def draws():
        return torch.rand(3).tolist(), np.random.rand(), random.random()  # noqa: NPY002 (the legacy state SB3 seeds)

    draws()  # the generators are no longer as seeding left them (a reseed would give these draws again)
    saved = save_checkpoint(root, model, keep=0)
    expected = draws()
    draws()
    assert restore_rng_state(saved) and draws() == expected
    assert not restore_rng_state(tmp_path)  # no rng_state.pt there
    # Resuming restores them too (the model's load() reseeds them with the run's seed before).
    draws()
    resumed_env, _ = load_checkpoint_agent(saved, config, 5, TrainSettings(device="cpu"))
    resumed_env.close()
    assert draws() == expected


def test_gamma_and_gae_lambda_reach_the_agent_and_the_cli():
    argv = ["--gamma", "1.0", "--gae-lambda", "0.9", "--task-distribution", "toy", "--n-envs", "2"]
    config = parse_settings(argv).agent_config()
    assert (config.gamma, config.gae_lambda) == (1.0, 0.9)
    assert (parse_settings([]).agent_config().gamma, parse_settings([]).agent_config().gae_lambda) == (0.995, 0.95)
    model = make_meta_agent(make_meta_env(config, seed=0), config, seed=0, device="cpu")
    assert (model.gamma, model.gae_lambda) == (1.0, 0.9)
    with pytest.raises(ValueError, match="gamma"):
        parse_settings(["--gamma", "1.5"]).agent_config()
    with pytest.raises(ValueError, match="gae_lambda"):
        parse_settings(["--gae-lambda", "0"]).agent_config()


def test_log_std_init_reaches_the_agent_and_is_checked():
    argv = ["--log-std-init", "-1.0", "--task-distribution", "toy", "--n-envs", "2"]
    config = parse_settings(argv).agent_config()
    assert config.log_std_init == -1.0 and parse_settings([]).agent_config().log_std_init == -0.5
    model = make_meta_agent(make_meta_env(config, seed=0), config, seed=0, device="cpu")
    np.testing.assert_allclose(model.policy.log_std.detach().numpy(), -1.0)
    for bad in ("nan", "2"):
        with pytest.raises(ValueError, match="log_std_init must lie in"):
            parse_settings(["--log-std-init", bad]).agent_config()


def test_a_batch_size_that_leaves_a_one_timestep_minibatch_is_refused_before_the_run_folder():
    # quick's rollout is 512 timesteps: 511 leaves a last minibatch of 1, whose advantages normalise to NaN
    for bad, nearest in (("1", "2"), ("511", "512")):
        with pytest.raises(
            ValueError, match=rf"batch_size={bad} leaves a PPO minibatch of one timestep .* e\.g\. {nearest}$"
        ):
            parse_settings(["--batch-size", bad]).agent_config()
    assert parse_settings(["--batch-size", "3"]).agent_config().batch_size == 3  # (a last minibatch of 2)


def test_ent_coef_reaches_the_agent_and_is_checked():
    config = parse_settings(["--ent-coef", "0.01", "--task-distribution", "toy", "--n-envs", "2"]).agent_config()
    assert config.ent_coef == 0.01 and parse_settings([]).agent_config().ent_coef == 0.0
    assert make_meta_agent(make_meta_env(config, seed=0), config, seed=0, device="cpu").ent_coef == 0.01
    with pytest.raises(ValueError, match="ent_coef must be a finite number >= 0"):
        parse_settings(["--ent-coef", "-0.1"]).agent_config()


def test_one_seed_makes_one_policy(tiny_meta_training):
    """Meta-training is reproducible on one code version: the same command gives the same weights and
    normalisation statistics, and another seed does not."""

    def trained(result):
        bundle = load_bundle(result.bundle_path)
        return {k: v.numpy() for k, v in bundle.model.policy.state_dict().items()}, bundle.obs_mean

    (first, mean), (again, mean_again) = (
        trained(tiny_meta_training(run_name="a")),
        trained(tiny_meta_training(run_name="b")),
    )
    other, _ = trained(tiny_meta_training("--seed", "7", run_name="c"))
    assert all(np.array_equal(first[k], again[k]) for k in first) and np.array_equal(mean, mean_again)
    assert not all(np.array_equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"ent_coef": float("nan")}, "ent_coef must be a finite number >= 0, got nan"),
        ({"vf_coef": -1.0}, "vf_coef must be a finite number > 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be a finite number > 0"),
        ({"target_kl": -1.0}, "target_kl must be a finite number > 0 or None"),
        ({"divergence_penalty": "x"}, "divergence_penalty must be a finite number >= 0, got 'x'"),
        ({"learning_rate": "3e-4"}, "learning_rate must be a finite number > 0"),
        ({"net_arch": (-4,)}, "net_arch must hold positive layer widths"),
        ({"task_distribution": "bogus"}, "task_distribution must be one of"),
    ],
)
def test_meta_agent_config_refuses_nonsense_at_construction(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_preset("quick", **override)


def test_meta_agent_config_takes_one_name_and_numpy_integers():
    config = get_preset("quick", hyperparameters="lr", task_families="charlm", n_envs=np.int64(4), task_group_size=2)
    assert config.hyperparameters == ("lr",) and config.task_families == ("charlm",)
    assert config.n_envs == 4 and type(config.n_envs) is int


def test_agent_and_display_options_reach_the_settings():
    settings = parse_settings(["--algorithm", "framestack", "--frame-stack", "3", "--no-progress-bar"])
    config = settings.agent_config()
    assert (config.frame_stack, settings.progress_bar) == (3, False)
    assert parse_settings(["--lstm-hidden-size", "32"]).agent_config().lstm_hidden_size == 32
    assert parse_settings([]).progress_bar


def test_a_failing_run_closes_its_logger_and_environments(tiny_meta_training, monkeypatch):
    import threading

    import agents.bundle

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    tiny_meta_training()  # warm: the first run starts threads that stay (matplotlib, tqdm)
    before = threading.active_count()
    monkeypatch.setattr(agents.bundle, "save_bundle", broken)
    for name in ("f1", "f2"):
        with pytest.raises(RuntimeError, match="disk full"):
            tiny_meta_training(run_name=name)
    assert threading.active_count() == before  # no TensorBoard writer thread left per failed run


def test_a_full_disk_mid_run_stops_it_with_an_error_that_says_how_to_resume(tiny_meta_training, monkeypatch, tmp_path):
    """A checkpoint that cannot be written (disk full, read-only folder) ends the run with a one-line error
    naming the checkpoint it can resume from, not a traceback; that checkpoint is intact and resumes."""
    import errno

    real = callbacks_module._write_synced
    writes = []

    def disk_full(path, text):
        writes.append(path.name)
        if len(writes) == 3:  # the second checkpoint's state.json
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr(callbacks_module, "_write_synced", disk_full)
    run = tmp_path / "full"
    with pytest.raises(RunFolderError) as stopped:
        tiny_meta_training("--total-timesteps", "96", "--checkpoint-freq", "32", run_name="full")
    first = run / "checkpoints" / "step_000000000032"
    assert str(stopped.value) == (
        f"the run stopped: it cannot write its files ([Errno 28] No space left on device: "
        f"'{run / 'checkpoints' / '.tmp_step_000000000064_'}{os.getpid()}/state.json'); make room (or make {run} "
        f"writable) and resume: last checkpoint {first}; continue with: hpo-train --resume {run}"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", first.name]
    monkeypatch.setattr(callbacks_module, "_write_synced", real)
    resumed = train(parse_settings(["--resume", str(run), "--no-progress-bar", "--verbose", "0"]))
    assert (resumed.resumed_from, resumed.num_timesteps) == (32, 96)

    # Other OS errors (a broken pipe to a worker, ...) are not dressed as a run folder's.
    monkeypatch.setattr(callbacks_module, "_write_synced", lambda path, text: (_ for _ in ()).throw(BrokenPipeError()))
    with pytest.raises(BrokenPipeError):
        tiny_meta_training(run_name="pipe")


def test_a_run_folder_that_cannot_be_written_is_a_clean_error_before_training(tmp_path, monkeypatch, capsys):
    import errno

    import training.train as train_module

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src))

    monkeypatch.setattr(train_module.os, "replace", read_only)
    assert train_module.main([*TINY, "--logdir", str(tmp_path), "--run-name", "ro"]) == 2
    assert capsys.readouterr().err == (
        f"hpo-train: error: cannot write the settings of the run in {tmp_path / 'ro'} (Read-only file system): the "
        "run folder must be writable to train (a full disk, or a read-only folder or file system: copy it somewhere "
        "writable)\n"
    )


def test_a_ctrl_c_in_the_warm_start_says_how_to_resume(tiny_meta_training, monkeypatch, tmp_path, capsys):
    import training.imitation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.imitation, "warm_start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_meta_training("--imitation-tasks", "1", run_name="warm")
    hint = f"no checkpoint yet; hpo-train --resume {tmp_path / 'warm'} starts it again"
    assert capsys.readouterr().err.endswith(f"\ninterrupted ({hint})\n")


def test_training_in_process_gives_back_the_callers_thread_count(tiny_meta_training):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tiny_meta_training("--threads", "1")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_reference_reward_trains_on_the_gain_over_the_default_lr_twin():
    config = get_preset("quick", task_distribution="toy", n_envs=2, reference_reward=True)
    assert parse_settings(["--reference-reward"]).agent_config().reference_reward
    assert not parse_settings([]).agent_config().reference_reward and not PRESETS["full"].reference_reward
    env = make_meta_env(config, seed=0)
    relative = env.venv
    assert isinstance(relative, ReferenceBaseline) and isinstance(relative.venv, VecMonitor)
    env.reset()
    finished, agent_returns, twin_gains = 0, np.zeros(2), np.zeros(2)
    for _ in range(40):
        _, reward, done, infos = relative.step(np.zeros((2, 2), np.float32))
        agent_returns += reward
        twin_gains += [info["reference_gain"] for info in infos]
        for i in np.flatnonzero(done):
            # The monitor sees the validation gain log(L_1 / L_T); the agent that gain minus the twin's.
            monitored = infos[i]["episode"]["r"]
            np.testing.assert_allclose(monitored, np.log(infos[i]["first_val_loss"] / infos[i]["val_loss"]), rtol=1e-4)
            np.testing.assert_allclose(agent_returns[i], monitored - twin_gains[i], rtol=1e-4, atol=1e-5)
            assert abs(twin_gains[i]) > 1e-3  # the twin trained: the two returns differ
            finished, agent_returns[i], twin_gains[i] = finished + 1, 0.0, 0.0
    assert finished >= 2
    # Without the environment's reference runs the wrapper has nothing to subtract.
    bare = ReferenceBaseline(VecMonitor(HPOVecEnv(1, "toy", seed=0)))
    bare.reset()
    with pytest.raises(RuntimeError, match="reference_runs=True"):
        bare.step(np.zeros((1, 2), np.float32))


def test_task_groups_train_on_the_gain_over_the_groups_mean():
    config = get_preset("quick", task_distribution="toy", n_envs=4, task_group_size=2)
    assert parse_settings(["--task-group-size", "2"]).agent_config().task_group_size == 2
    assert PRESETS["full"].task_group_size == 2 and PRESETS["full"].gae_lambda == 1.0
    assert PRESETS["quick"].task_group_size == 1
    env = make_meta_env(config, seed=0)
    relative = env.venv
    assert isinstance(relative, GroupRelativeReward) and isinstance(relative.venv, VecMonitor)
    relative.reset()
    rng = np.random.default_rng(0)
    agent, episodes, compared = np.zeros(4), 0, 0
    for _ in range(30):
        _, reward, done, infos = relative.step(rng.uniform(-0.5, 0.5, (4, 2)).astype(np.float32))
        np.testing.assert_allclose(reward.reshape(2, 2).sum(axis=1), 0, atol=1e-6)  # zero-sum within a group
        agent += reward
        for i in np.flatnonzero(done):
            episodes += 1
            monitored = infos[i]["episode"]["r"]  # the validation gain log(L_1 / L_T), unshaped
            np.testing.assert_allclose(monitored, np.log(infos[i]["first_val_loss"] / infos[i]["val_loss"]), rtol=1e-4)
            sibling = i ^ 1
            if done[sibling]:  # both ended: the agent's return is half the difference of the two gains
                other = np.log(infos[sibling]["first_val_loss"] / infos[sibling]["val_loss"])
                np.testing.assert_allclose(agent[i], (monitored - other) / 2, rtol=1e-3, atol=1e-5)
                compared += 1
        agent[done] = 0.0
    assert episodes >= 4 and compared >= 4
    with pytest.raises(ValueError, match="task_group_size must be a positive integer dividing n_envs = 16"):
        get_preset("quick", task_group_size=3)
    with pytest.raises(ValueError, match="reference_reward and task_group_size > 1 are two baselines"):
        get_preset("quick", task_group_size=2, reference_reward=True)
    with pytest.raises(ValueError, match="build HPOVecEnv with task_group_size >= 2"):
        GroupRelativeReward(VecMonitor(HPOVecEnv(2, "toy")))


def test_resuming_a_full_run_made_before_task_groups_keeps_them_off(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    settings = parse_settings(["--preset", "full", "--run-name", "old"]).to_dict()
    del settings["task_group_size"], settings["gae_lambda"]  # a settings.json written before the options existed
    (run / "settings.json").write_text(json.dumps(settings))
    config = parse_settings(["--resume", str(run)]).agent_config()
    assert (config.task_group_size, config.gae_lambda) == (1, 0.95)
    assert parse_settings(["--preset", "full"]).agent_config().task_group_size == 2  # a new run gets the preset's


def test_resuming_a_finished_run_leaves_its_bundle_as_it_was(tiny_meta_training):
    """Nothing to train: the bundle is not saved again (a new model.zip would change the policy's
    fingerprint, and every benchmark result stored under it would be computed again)."""
    from training.benchmark import bundle_fingerprint
    from training.train import parse_settings, train

    result = tiny_meta_training()
    before = (result.bundle_path / "model.zip").read_bytes()
    fingerprint = bundle_fingerprint(result.bundle_path)
    again = train(parse_settings(["--resume", str(result.run_dir), "--no-progress-bar"]))
    assert (again.bundle_path / "model.zip").read_bytes() == before
    assert bundle_fingerprint(again.bundle_path) == fingerprint
    # a bundle that does not load is written again from the final checkpoint
    (result.bundle_path / "model.zip").write_bytes(b"damaged")
    train(parse_settings(["--resume", str(result.run_dir), "--no-progress-bar"]))
    assert load_bundle(result.bundle_path).decoder == load_bundle(result.run_dir / "best_bundle").decoder
    # ... and so is one older than the last checkpoint (a longer run stopped after it, resumed to that point)
    older = result.run_dir / "older_bundle"
    shutil.copytree(result.bundle_path, older)
    train(parse_settings(["--resume", str(result.run_dir), "--total-timesteps", "64", "--no-progress-bar"]))
    shutil.rmtree(result.bundle_path)
    shutil.copytree(older, result.bundle_path)
    train(parse_settings(["--resume", str(result.run_dir), "--total-timesteps", "64", "--no-progress-bar"]))
    assert load_bundle(result.bundle_path).config["training"]["timesteps"] == 64


def test_training_in_process_gives_back_the_callers_random_generators(tiny_meta_training):
    """SB3 seeds the global generators with the run's seed: a script calling train() keeps its own draws."""
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002 (the legacy global state is what SB3 seeds)
    random.seed(123)
    before = torch.get_rng_state(), np.random.get_state(), random.getstate()  # noqa: NPY002
    tiny_meta_training()
    after = torch.get_rng_state(), np.random.get_state(), random.getstate()  # noqa: NPY002
    assert torch.equal(before[0], after[0])
    assert all(np.array_equal(a, b) for a, b in zip(before[1], after[1]))
    assert before[2] == after[2]


@pytest.mark.parametrize("reader", ["event_accumulator", "plugin_event_accumulator"])
def test_a_resumed_runs_tensorboard_hides_what_the_stopped_session_logged_after_its_checkpoint(tmp_path, reader):
    """The TensorBoard app reads with plugin_event_accumulator, which takes a run folder's first SessionLog.START
    for the run's start: a first resume's purge (a fresh run's writer marks no start) hid nothing in the app,
    though the older EventAccumulator showed it working."""
    import importlib

    from torch.utils.tensorboard import SummaryWriter

    from training.callbacks import PurgingTensorBoardFormat

    with SummaryWriter(str(tmp_path)) as first:  # a fresh run: no purge step, as hpo-train writes it
        for step in range(1, 11):
            first.add_scalar("train/loss", float(step), step)
    module = importlib.import_module(f"tensorboard.backend.event_processing.{reader}")

    def resume(purge_step: int, last: int) -> list[tuple[int, float]]:
        writer = PurgingTensorBoardFormat(str(tmp_path), purge_step=purge_step).writer
        for step in range(purge_step, last + 1):
            writer.add_scalar("train/loss", -float(step), step)
        writer.close()
        acc = module.EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        if reader == "event_accumulator":
            return [(e.step, e.value) for e in acc.Scalars("train/loss")]
        from tensorboard.util import tensor_util

        return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors("train/loss")]

    # resumed from a checkpoint at step 6 (the purge step is the next one), stopped at 8; then resumed at 3
    assert resume(7, 8) == [*((s, float(s)) for s in range(1, 7)), (7, -7.0), (8, -8.0)]
    assert resume(4, 5) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, -4.0), (5, -5.0)]


def test_the_eval_schedules_figure_of_one_task_shows_its_whole_title():
    """With one held-out task (--eval-tasks 1) the figure was one 3.2-inch column, narrower than its title,
    which TensorBoard's eval/schedules image showed cut off at both sides."""
    from training.callbacks import schedule_figure

    task = callbacks_module.make_eval_tasks(1, split="toy")[0]
    decoder = ActionDecoder(("lr", "weight_decay"))

    def record(scale: float) -> EpisodeRecord:
        steps = np.arange(1, 6)
        return EpisodeRecord(
            task=task,
            seed_index=0,
            hparams={"lr": list(1e-3 * scale**steps), "weight_decay": [1e-4] * 5},
            val_loss=list(2.0 / steps),
        )

    fig = schedule_figure([record(0.9)], {"constant": [record(1.0)], "random": [record(1.2)]}, decoder, 4, 262_144)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = FigureCanvasAgg(fig)  # (a matplotlib Figure made without pyplot has no drawing canvas)
    canvas.draw()
    title = fig.get_suptitle()
    (text,) = [c for c in fig.get_children() if isinstance(c, Text) and c.get_text() == title]
    box = text.get_window_extent(canvas.get_renderer())
    assert "262144" in title and 0 <= box.x0 and box.x1 <= fig.bbox.width


def _signal_at(monkeypatch, signals: dict[int, int]) -> None:
    """Send this process ``signals[t]`` (SIGINT, SIGTERM) when meta-training reaches timestep ``t``, mid-rollout."""
    step = callbacks_module.HPOEpisodeLogger._on_step

    def on_step(self):
        signum = signals.pop(self.model.num_timesteps, None)
        if signum is not None:
            os.kill(os.getpid(), signum)  # (its handler runs before the next bytecode)
        return step(self)

    monkeypatch.setattr(callbacks_module.HPOEpisodeLogger, "_on_step", on_step)


def _policy(checkpoint: Path) -> dict[str, torch.Tensor]:
    return RecurrentPPO.load(checkpoint / "model.zip", device="cpu").policy.state_dict()


# 2 slots x 16 decisions: rollouts of 32 timesteps
STOPPABLE = [*TINY, "--n-envs", "2", "--batch-size", "16", "--total-timesteps", "128", "--eval-freq", "0"]


def test_a_first_ctrl_c_stops_at_the_next_rollout_boundary_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    """A first Ctrl-C (or SIGTERM) finishes the rollout and its update, saves a checkpoint there (the same
    as a periodic one at that step) and stops, status 130 (143); resuming reaches the full count, as
    from a periodic checkpoint at that step."""
    # an uninterrupted run's checkpoint at 64, resumed: the reference
    whole = [*STOPPABLE, "--checkpoint-freq", "32", "--keep-checkpoints", "0", "--logdir", str(tmp_path)]
    assert main([*whole, "--run-name", "whole"]) == 0
    reference = tmp_path / "reference"
    shutil.copytree(tmp_path / "whole", reference)
    for later in ("checkpoints/step_000000000096", "checkpoints/step_000000000128", "bundle", "best_bundle"):
        shutil.rmtree(reference / later)
    assert main(["--resume", str(reference), "--no-progress-bar"]) == 0

    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        name = f"stopped{signum}"
        run = tmp_path / name
        capsys.readouterr()
        _signal_at(monkeypatch, {40: signum})  # in the second rollout (32-64)
        assert main([*STOPPABLE, "--checkpoint-freq", "1000", "--logdir", str(tmp_path), "--run-name", name]) == status
        err = capsys.readouterr().err
        checkpoint = run / "checkpoints" / "step_000000000064"
        assert (
            "\nhpo-train: stopping after the current rollout to save a checkpoint; press Ctrl-C again to stop now\n"
            in err
        )
        assert err.endswith(f"\nstopped (last checkpoint {checkpoint}; continue with: hpo-train --resume {run})\n")
        assert find_latest_checkpoint(run / "checkpoints") == checkpoint
        assert not (run / "bundle").exists()  # a stopped run is not a finished one
        for key, value in _policy(tmp_path / "whole" / "checkpoints" / checkpoint.name).items():
            assert torch.equal(_policy(checkpoint)[key], value), key
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

        assert main(["--resume", str(run), "--no-progress-bar"]) == 0
        assert load_bundle(run / "bundle").config["training"]["timesteps"] == 128
        last = find_latest_checkpoint(run / "checkpoints")
        assert read_checkpoint_state(last)["segments"][1]["start"] == 64
        for key, value in _policy(find_latest_checkpoint(reference / "checkpoints")).items():
            assert torch.equal(_policy(last)[key], value), key


def test_a_second_ctrl_c_stops_at_once(tmp_path, monkeypatch, capsys):
    _signal_at(monkeypatch, {40: signal.SIGINT, 44: signal.SIGINT})
    args = [*STOPPABLE, "--checkpoint-freq", "32", "--logdir", str(tmp_path), "--run-name", "twice"]
    assert main(args) == 130
    run = tmp_path / "twice"
    first = run / "checkpoints" / "step_000000000032"
    assert find_latest_checkpoint(run / "checkpoints") == first  # none at 64: the rollout was cut short
    err = capsys.readouterr().err
    assert err.endswith(f"\ninterrupted (last checkpoint {first}; continue with: hpo-train --resume {run})\n")
    assert main(["--resume", str(run), "--no-progress-bar", "--verbose", "0"]) == 0
    assert load_bundle(run / "bundle").config["training"]["timesteps"] == 128


def test_a_ctrl_c_to_the_process_group_stops_a_run_with_env_workers_at_a_checkpoint(tmp_path):
    """A terminal's Ctrl-C goes to every process of the foreground group: the environment workers ignore
    it, and keep stepping until the run's checkpoint at the next rollout boundary."""
    run = tmp_path / "workers"
    args = [*TINY, "--total-timesteps", "4096", "--eval-freq", "0", "--checkpoint-freq", "64", "--env-workers", "2"]
    proc = subprocess.Popen(
        [*_hpo_train(), *args, "--logdir", str(tmp_path), "--run-name", "workers"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # (its own process group, as a terminal's foreground job)
    )
    try:
        _wait_for_a_checkpoint(proc, run)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    last = find_latest_checkpoint(run / "checkpoints")
    assert 64 < read_checkpoint_state(last)["num_timesteps"] < 4096  # (one past the first, at which it was sent)
    assert err.endswith(f"\nstopped (last checkpoint {last}; continue with: hpo-train --resume {run})\n"), err[-3000:]


def test_workers_stopped_by_the_same_signal_end_a_requested_stop_as_an_interrupt(tmp_path, monkeypatch, capsys):
    """A SIGTERM sent to every process of the run (Slurm, systemd) stops the workers too: the run cannot
    reach its checkpoint, and stops at once as a second signal would (status 143, the resume hint)."""
    from hpo_env.subproc import WorkerStoppedError

    _signal_at(monkeypatch, {40: signal.SIGTERM})
    step = callbacks_module.HPOEpisodeLogger._on_step

    def on_step(self):
        if self.model.num_timesteps == 44:
            raise WorkerStoppedError("environment worker 0 of 2 stopped (exit code -15); the environment is closed")
        return step(self)

    monkeypatch.setattr(callbacks_module.HPOEpisodeLogger, "_on_step", on_step)
    args = [*STOPPABLE, "--checkpoint-freq", "32", "--logdir", str(tmp_path), "--run-name", "group"]
    assert main(args) == 143
    first = tmp_path / "group" / "checkpoints" / "step_000000000032"
    assert capsys.readouterr().err.endswith(
        f"\ninterrupted: the signal stopped the environment workers too (last checkpoint {first}; continue with: "
        f"hpo-train --resume {tmp_path / 'group'})\n"
    )


def test_a_ctrl_c_during_an_evaluation_stops_after_it(tmp_path, monkeypatch, capsys):
    """A stop asked for while the run evaluates (at a rollout boundary) stops there, after the evaluation,
    with the checkpoint of that step (which holds it), not after one more rollout."""
    evaluate = HeldOutEvalCallback.evaluate

    def interrupted(self):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(self)

    monkeypatch.setattr(HeldOutEvalCallback, "evaluate", interrupted)
    args = [*STOPPABLE, "--eval-freq", "64", "--checkpoint-freq", "1000", "--logdir", str(tmp_path), "--run-name", "ev"]
    assert main(args) == 130
    checkpoint = find_latest_checkpoint(tmp_path / "ev" / "checkpoints")
    assert checkpoint.name == "step_000000000064"
    assert read_checkpoint_state(checkpoint)["last_eval"]["timesteps"] == 64
    assert "\nstopped (last checkpoint" in capsys.readouterr().err
