"""Policy bundles: exact round trip of a trained meta-agent, and a clear BundleError for every corruption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agents import BundleError, get_preset, load_bundle, make_meta_agent, make_meta_env, save_bundle
from agents.factory import frame_stack_of, get_vec_normalize
from hpo_env import ActionDecoder, ObservationBuilder


def _trained(algorithm: str, seed: int = 0):
    config = get_preset(
        "quick", algorithm=algorithm, task_distribution="toy", n_envs=2, n_steps=8, batch_size=16, n_epochs=2
    )
    env = make_meta_env(config, seed=seed)
    model = make_meta_agent(env, config, seed=seed, device="cpu")
    model.learn(32)
    return config, env, model


def _save(path: Path, config, env, model) -> Path:
    vecnorm = get_vec_normalize(env)
    return save_bundle(
        path,
        model,
        env.unwrapped.decoder,
        obs_rms=vecnorm.obs_rms,
        clip_obs=vecnorm.clip_obs,
        epsilon=vecnorm.epsilon,
        frame_stack=frame_stack_of(config),
        config={"training": {"seed": 0, "timesteps": int(model.num_timesteps)}},
    )


@pytest.mark.parametrize("algorithm", ["recurrent", "framestack"])
def test_loaded_bundle_predicts_exactly_what_the_trained_model_did(tmp_path, algorithm):
    config, env, model = _trained(algorithm)
    bundle = load_bundle(_save(tmp_path / "policy", config, env, model))
    assert bundle.is_recurrent == (algorithm == "recurrent")
    assert bundle.frame_stack == frame_stack_of(config)
    vecnorm = get_vec_normalize(env)
    vecnorm.training = False  # freeze the statistics the bundle saved
    obs = env.reset()  # normalised (and stacked) as the model sees it
    model_state, bundle_state = None, bundle.initial_state(env.num_envs)
    starts = np.ones(env.num_envs, dtype=bool)
    finished = 0
    for _ in range(24):  # more than one toy episode (9 decisions), so episode starts are exercised
        raw = vecnorm.get_original_obs()
        expected, model_state = model.predict(obs, state=model_state, episode_start=starts, deterministic=True)
        actual, bundle_state = bundle.predict(raw, state=bundle_state, episode_start=starts, deterministic=True)
        np.testing.assert_array_equal(actual, expected)
        obs, _, starts, _ = env.step(expected)
        finished += int(starts.sum())
    assert finished >= env.num_envs


def test_bundle_config_records_settings_and_versions(tmp_path):
    config, env, model = _trained("recurrent")
    bundle = load_bundle(_save(tmp_path / "policy", config, env, model))
    for key in ("feature_set_version", "hpo_meta_version", "action_decoder", "obs_dim", "feature_names"):
        assert key in bundle.config
    assert bundle.config["training"]["timesteps"] == model.num_timesteps
    assert bundle.decoder.names == ("lr", "weight_decay")


# -- corruption -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    config, env, model = _trained("recurrent")
    return _save(tmp_path_factory.mktemp("bundles") / "good", config, env, model)


@pytest.fixture
def bundle_copy(good_bundle, tmp_path) -> Path:
    path = tmp_path / "copy"
    shutil.copytree(good_bundle, path)
    load_bundle(path)  # the untouched copy is fine
    return path


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_directory(tmp_path):
    with pytest.raises(BundleError, match="no policy bundle at .*expected a directory"):
        load_bundle(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["model.zip", "obs_norm.json", "config.json"])
def test_missing_file(bundle_copy, name):
    (bundle_copy / name).unlink()
    with pytest.raises(BundleError, match=f"is missing {name}"):
        load_bundle(bundle_copy)


def test_truncated_model(bundle_copy):
    model = bundle_copy / "model.zip"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="model.zip is corrupted"):
        load_bundle(bundle_copy)


def test_garbage_model(bundle_copy):
    (bundle_copy / "model.zip").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(BundleError, match="model.zip is corrupted"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["config.json", "obs_norm.json"])
def test_bad_json(bundle_copy, name):
    (bundle_copy / name).write_text('{"mean": [0.1, ')
    with pytest.raises(BundleError, match=f"{name} is corrupted"):
        load_bundle(bundle_copy)


def test_config_not_an_object(bundle_copy):
    (bundle_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="must hold a JSON object"):
        load_bundle(bundle_copy)


def test_feature_set_version_mismatch(bundle_copy):
    _edit_json(bundle_copy / "config.json", feature_set_version="0-old")
    with pytest.raises(BundleError, match="trained on feature set '0-old'.*retrain"):
        load_bundle(bundle_copy)


def test_format_version_mismatch(bundle_copy):
    _edit_json(bundle_copy / "config.json", format_version=999)
    with pytest.raises(BundleError, match="format version 999"):
        load_bundle(bundle_copy)


def test_wrong_obs_dim_in_config(bundle_copy):
    _edit_json(bundle_copy / "config.json", obs_dim=5)
    with pytest.raises(BundleError, match="obs_dim=5"):
        load_bundle(bundle_copy)


def test_wrong_normalisation_shape(bundle_copy):
    _edit_json(bundle_copy / "obs_norm.json", mean=[0.0, 1.0], var=[1.0, 1.0])
    with pytest.raises(BundleError, match=r"statistics of shape \(2,\)"):
        load_bundle(bundle_copy)


def test_model_for_other_observations(bundle_copy):
    # The config claims three controlled hyperparameters (a larger observation) than the model saw.
    decoder = ActionDecoder(("lr", "weight_decay", "momentum"))
    dim = ObservationBuilder(decoder).dim
    _edit_json(bundle_copy / "config.json", action_decoder=decoder.to_config(), obs_dim=dim)
    _edit_json(bundle_copy / "obs_norm.json", mean=[0.0] * dim, var=[1.0] * dim)
    with pytest.raises(
        BundleError, match=f"model.zip expects observations of shape .*but the bundle's features give \\({dim},\\)"
    ):
        load_bundle(bundle_copy)


def test_unknown_algorithm(bundle_copy):
    _edit_json(bundle_copy / "config.json", algorithm="DQN")
    with pytest.raises(BundleError, match="unknown algorithm 'DQN'"):
        load_bundle(bundle_copy)


def test_saved_bundle_is_readable_by_others(good_bundle, tmp_path):
    bundle = load_bundle(good_bundle)
    path = save_bundle(tmp_path / "shared", bundle.model, bundle.decoder)
    (tmp_path / "plain").mkdir()
    expected = (tmp_path / "plain").stat().st_mode & 0o777  # what the umask gives any new folder
    assert path.stat().st_mode & 0o777 == expected, "not a private temp folder"


def test_interrupted_replacement_points_at_the_previous_bundle(bundle_copy):
    bundle_copy.rename(bundle_copy.with_name(f".{bundle_copy.name}.old"))
    with pytest.raises(BundleError, match="previous bundle is intact"):
        load_bundle(bundle_copy)
