"""hpo-average: the mean of a run's checkpointed policies, as a bundle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from agents import BundleError, PolicyScheduler, load_bundle
from training.averaging import average_run, average_state_dicts, main, run_checkpoints
from training.callbacks import CHECKPOINT_MODEL


def test_average_state_dicts_means_floats_and_keeps_the_last_of_the_rest():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    avg = average_state_dicts([a, b])
    torch.testing.assert_close(avg["w"], torch.tensor([2.0, 4.0]))
    assert avg["n"].item() == 5 and avg["w"].dtype == torch.float32
    with pytest.raises(ValueError, match="nothing to average"):
        average_state_dicts([])
    with pytest.raises(ValueError, match="keys"):
        average_state_dicts([a, {"w": b["w"]}])
    with pytest.raises(ValueError, match="shapes"):
        average_state_dicts([a, {"w": torch.zeros(3), "n": b["n"]}])


def test_averaged_bundle_holds_the_mean_of_the_kept_checkpoints(tiny_meta_training, tmp_path, capsys):
    """A run trained with --keep-checkpoints 0 keeps every checkpoint; the averaged bundle's weights are
    their mean, with the final bundle's decoder and observation statistics, and it deploys."""
    result = tiny_meta_training("--total-timesteps", "96", "--checkpoint-freq", "32", "--keep-checkpoints", "0")
    checkpoints = run_checkpoints(result.run_dir)
    assert [t for t, _ in checkpoints] == [32, 64, 96]

    from stable_baselines3.common.save_util import load_from_zip_file

    weights = [
        load_from_zip_file(p / CHECKPOINT_MODEL, device="cpu", load_data=False)[1]["policy"] for _, p in checkpoints
    ]
    path = average_run(result.run_dir, from_timesteps=64)
    assert path == result.run_dir / "averaged_bundle"
    averaged, final = load_bundle(path), load_bundle(result.bundle_path)
    for key, value in averaged.model.policy.state_dict().items():
        torch.testing.assert_close(value, (weights[1][key] + weights[2][key]) / 2)
    assert any(
        not torch.equal(v, final.model.policy.state_dict()[k]) for k, v in averaged.model.policy.state_dict().items()
    )
    assert averaged.decoder == final.decoder and averaged.epochs_feature == final.epochs_feature
    np.testing.assert_array_equal(averaged.obs_mean, final.obs_mean)
    np.testing.assert_array_equal(averaged.obs_var, final.obs_var)
    assert (averaged.clip_obs, averaged.epsilon) == (final.clip_obs, final.epsilon)
    config = json.loads((path / "config.json").read_text())
    assert config["averaged"]["checkpoints"] == [64, 96] and "evaluation" not in config
    assert config["training"] == final.config["training"]

    # the CLI: --last N, and errors that say what the run has and what to do
    out = tmp_path / "last3"
    assert main([str(result.run_dir), "--last", "3", "--out", str(out), "--description", "three"]) == 0
    assert "mean of 3 policies (32 to 96 timesteps)" in capsys.readouterr().out
    assert load_bundle(out).config["averaged"]["checkpoints"] == [32, 64, 96]
    assert load_bundle(out).config["description"] == "three"
    with pytest.raises(SystemExit) as exit_info:  # an existing --out is replaced only with --force
        main([str(result.run_dir), "--last", "2", "--out", str(out)])
    assert exit_info.value.code == 2 and "exists (a policy bundle): choose a new directory, or pass --force" in (
        capsys.readouterr().err
    )
    assert main([str(result.run_dir), "--last", "2", "--out", str(out), "--force"]) == 0
    assert load_bundle(out).config["averaged"]["checkpoints"] == [64, 96]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([str(result.run_dir), "--from-timesteps", "-1"])
    assert "must be an integer >= 0, got '-1'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(result.run_dir), "--last", "4"])
    assert exit_info.value.code == 2
    assert "checkpoints at 32, 64, 96 timesteps only (pick fewer" in capsys.readouterr().err
    for protected in ("bundle", "best_bundle", "checkpoints/step_000000000096"):
        with pytest.raises(ValueError, match="would replace the run's own files"):
            average_run(result.run_dir, last=2, out=result.run_dir / protected)
    # a run whose last checkpoint is not its final policy (lost, or the bundle replaced) is refused
    shutil.rmtree(checkpoints[-1][1])
    with pytest.raises(ValueError, match="is not its final bundle's policy .*finish the run first"):
        average_run(result.run_dir, last=2)

    # deployable like any bundle
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=1e-4)
    scheduler = PolicyScheduler.from_pretrained(path, optimizer, total_steps=4, epochs=4)
    scheduler.step(1.0, train_loss=1.0)
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] != 0.01  # the averaged policy acted


def test_average_run_refuses_runs_it_cannot_average(tiny_meta_training):
    result = tiny_meta_training(
        "--algorithm", "framestack", "--total-timesteps", "96", "--checkpoint-freq", "32"
    )  # keeps the last 2
    with pytest.raises(ValueError, match="exactly one"):
        average_run(result.run_dir)
    with pytest.raises(ValueError, match="keep-checkpoints 0"):
        average_run(result.run_dir, last=3)
    with pytest.raises(ValueError, match="pruned its older ones .* pass --last 2"):  # not silently 2 of 3
        average_run(result.run_dir, from_timesteps=32)
    # the frame-stacked control averages like the recurrent policy
    averaged = load_bundle(average_run(result.run_dir, last=2))
    assert averaged.frame_stack == load_bundle(result.bundle_path).frame_stack > 1
    # a bundle given for its run folder: the message names the run folder (not "hpo-train --resume BUNDLE")
    with pytest.raises(ValueError, match="not an hpo-train run folder .*policy bundle; pass the run folder above it"):
        average_run(result.bundle_path, last=2)
    # and the run folder given for a bundle: the message names the bundles inside it
    with pytest.raises(BundleError, match="is an hpo-train run folder, not a policy bundle: pass .*bundle"):
        load_bundle(result.run_dir)
    with pytest.raises(BundleError, match=r"holds hpo-train runs, not a policy bundle: pass one run's bundle, e\.g\. "):
        load_bundle(result.run_dir.parent)  # the --logdir of runs
    shutil.rmtree(result.bundle_path)
    with pytest.raises(ValueError, match="no final bundle"):
        average_run(result.run_dir, last=2)


def test_hpo_average_says_when_the_run_folder_does_not_exist(tmp_path, capsys):
    """A mistyped run folder read "is not an hpo-train run folder (no settings.json)", as if it existed."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "typo"), "--last", "2"])
    assert exit_info.value.code == 2
    assert f"run folder '{tmp_path / 'typo'}' does not exist: pass the folder of an hpo-train run" in (
        capsys.readouterr().err
    )
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="run folder .* is a file"):
        average_run(tmp_path / "file", last=2)
