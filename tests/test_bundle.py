"""Policy bundles: exact round trip of a trained meta-agent, and a clear BundleError for every corruption."""

from __future__ import annotations

import io
import json
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from agents import (
    BundleError,
    EnsembleBundle,
    PolicyScheduler,
    get_preset,
    load_bundle,
    make_meta_agent,
    make_meta_env,
    policy_signature,
    save_bundle,
    save_ensemble,
)
from agents.bundle import main as ensemble_main
from agents.factory import frame_stack_of, get_vec_normalize
from hpo_env import ActionDecoder, ObservationBuilder
from training.benchmark import bundle_fingerprint


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


def test_predict_refuses_observations_of_the_wrong_width(good_bundle):
    bundle = load_bundle(good_bundle)
    d = bundle.obs_dim
    bundle.predict(np.zeros((2, d), np.float32))
    for shape in [(2, d // 2), (d + 1,), (1, 2, d)]:  # (2, d/2) used to be reshaped into one row silently
        with pytest.raises(ValueError, match=rf"raw observations of shape \({d},\) or \(n, {d}\), got shape"):
            bundle.predict(np.zeros(shape, np.float32))


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
    with pytest.raises(BundleError, match="format version 999 .*install the hpo-meta that wrote it"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"mean": "nan"}, "mean must be finite"),
        ({"var": -1.0}, "var finite and >= 0"),
        ({"clip_obs": 0.0}, "clip_obs=0.0 and epsilon=.* must be positive finite"),
    ],
)
def test_bad_normalisation_statistics_are_refused_at_load(bundle_copy, changes, match):
    """Not at the first step, as a NaN deep inside the policy's action distribution."""
    norm = json.loads((bundle_copy / "obs_norm.json").read_text())
    for key, value in changes.items():
        norm[key] = [float(value)] * len(norm[key]) if isinstance(norm[key], list) else value
    (bundle_copy / "obs_norm.json").write_text(json.dumps(norm))
    with pytest.raises(BundleError, match=f"obs_norm.json is corrupted: .*{match}"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"kind": [1]}, r"config.json has an unknown bundle kind \[1\]"),
        ({"frame_stack": "x"}, "config.json has frame_stack='x', expected a positive integer"),
        ({"algorithm": 3}, "config.json has algorithm=3"),
    ],
)
def test_config_fields_of_the_wrong_type_name_the_file(bundle_copy, changes, match):
    _edit_json(bundle_copy / "config.json", **changes)
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle_copy)


def test_loading_a_policy_leaves_the_global_generators_alone(good_bundle):
    """SB3's load re-seeds Python's, NumPy's and torch's global generators with the training seed: a user's
    seeded training loop must not become the same run whatever its seed."""
    import random

    import torch

    def draws(load: bool) -> list[float]:
        out = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            np.random.seed(seed)  # noqa: NPY002 (what a user's script does)
            random.seed(seed)
            if load:
                load_bundle(good_bundle)
            out += [torch.rand(()).item(), np.random.rand(), random.random()]  # noqa: NPY002
        return out

    assert draws(load=True) == draws(load=False)


def test_a_device_that_is_not_one_is_not_called_corruption(good_bundle):
    with pytest.raises(BundleError, match="device='gpu' is not a torch device.*'cpu', 'cuda'"):
        load_bundle(good_bundle, device="gpu")


def test_a_capped_policy_is_saved_as_a_version_older_hpo_meta_refuses(good_bundle, tmp_path):
    """An older hpo-meta ignores unknown decoder keys: it would deploy a capped policy without its cap."""
    bundle = load_bundle(good_bundle)
    assert bundle.config["format_version"] == 1
    capped = load_bundle(save_bundle(tmp_path / "capped", bundle.model, bundle.decoder.with_cap("lr", 1.5)))
    assert capped.config["format_version"] == 2 and capped.decoder.specs[0].max_log10_above_initial == 1.5
    plain = load_bundle(save_bundle(tmp_path / "plain", bundle.model, bundle.decoder))
    assert plain.config["format_version"] == 1 and plain.decoder == bundle.decoder


def test_wrong_obs_dim_in_config(bundle_copy):
    _edit_json(bundle_copy / "config.json", obs_dim=5)
    with pytest.raises(BundleError, match="obs_dim=5"):
        load_bundle(bundle_copy)


def test_wrong_normalisation_shape(bundle_copy):
    _edit_json(bundle_copy / "obs_norm.json", mean=[0.0, 1.0], var=[1.0, 1.0])
    with pytest.raises(BundleError, match=r"statistics of shapes \(2,\) and \(2,\)"):
        load_bundle(bundle_copy)


def test_model_for_other_observations(bundle_copy):
    # The config claims three controlled hyperparameters (a larger observation) than the model saw.
    decoder = ActionDecoder(("lr", "weight_decay", "momentum"))
    options = {
        k: json.loads((bundle_copy / "config.json").read_text())[k] for k in ("gradient_features", "epochs_feature")
    }
    dim = ObservationBuilder(decoder, **options).dim
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


@pytest.mark.parametrize(
    "options, message",
    [
        ({"frame_stack": 0}, "frame_stack must be a positive integer"),
        ({"clip_obs": -1.0}, "clip_obs must be a finite number > 0"),
        ({"obs_rms": types.SimpleNamespace(mean=np.zeros(3), var=np.ones(3))}, r"obs_rms has shapes \(3,\)"),
    ],
)
def test_save_refuses_what_load_would_refuse_before_writing(good_bundle, tmp_path, options, message):
    bundle = load_bundle(good_bundle)
    with pytest.raises(BundleError, match=message):
        save_bundle(tmp_path / "bad", bundle.model, bundle.decoder, **options)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("model", [None, "runs/x/bundle"])
def test_save_refuses_what_is_not_a_model(good_bundle, tmp_path, model):
    """save_bundle(None, ...) failed with an AttributeError from inside the feature check."""
    with pytest.raises(
        BundleError, match=rf"model must be a trained SB3 RecurrentPPO or PPO .*, got {type(model).__name__}"
    ):
        save_bundle(tmp_path / "bad", model, load_bundle(good_bundle).decoder)
    assert not (tmp_path / "bad").exists()


def test_saved_bundle_is_readable_by_others(good_bundle, tmp_path):
    bundle = load_bundle(good_bundle)
    path = save_bundle(tmp_path / "shared", bundle.model, bundle.decoder)
    (tmp_path / "plain").mkdir()
    expected = (tmp_path / "plain").stat().st_mode & 0o777  # what the umask gives any new folder
    assert path.stat().st_mode & 0o777 == expected, "not a private temp folder"


def test_saving_never_replaces_a_folder_that_is_not_a_bundle(good_bundle, tmp_path):
    bundle = load_bundle(good_bundle)
    work = tmp_path / "runs"
    (work / "other_run").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="exists and is not a policy bundle .*refusing to replace it"):
        save_bundle(work, bundle.model, bundle.decoder)
    assert (work / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert load_bundle(save_bundle(tmp_path / "empty", bundle.model, bundle.decoder)).config["kind"] == "policy"
    save_bundle(tmp_path / "empty", bundle.model, bundle.decoder)  # a bundle is replaced


def test_interrupted_replacement_points_at_the_previous_bundle(bundle_copy):
    bundle_copy.rename(bundle_copy.with_name(f".{bundle_copy.name}.old"))
    with pytest.raises(BundleError, match="previous bundle is intact"):
        load_bundle(bundle_copy)


# -- ensembles ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory) -> Path:
    config, env, model = _trained("recurrent", seed=1)
    return _save(tmp_path_factory.mktemp("bundles") / "second", config, env, model)


@pytest.fixture(scope="module")
def framestack_bundle(tmp_path_factory) -> Path:
    config, env, model = _trained("framestack", seed=2)
    return _save(tmp_path_factory.mktemp("bundles") / "framestack", config, env, model)


@pytest.fixture
def ensemble(good_bundle, framestack_bundle, tmp_path) -> Path:
    """A recurrent and a frame-stacked member: both kinds of policy state in one ensemble."""
    return save_ensemble(tmp_path / "ensemble", [good_bundle, framestack_bundle], config={"description": "mixed"})


def test_ensemble_acts_with_the_mean_of_its_members_actions(ensemble, good_bundle, framestack_bundle):
    loaded = load_bundle(ensemble)
    assert isinstance(loaded, EnsembleBundle) and len(loaded.members) == 2
    assert loaded.config["description"] == "mixed" and loaded.config["kind"] == "ensemble"
    assert loaded.decoder == load_bundle(good_bundle).decoder and loaded.is_recurrent
    assert policy_signature(loaded) == "ensemble[recurrent, mlp over 4 frames]"
    members = [load_bundle(good_bundle), load_bundle(framestack_bundle)]
    rng = np.random.default_rng(0)
    state = loaded.initial_state(3)
    member_states = [m.initial_state(3) for m in members]
    differs = False
    for t in range(12):
        obs = rng.normal(size=(3, loaded.obs_dim)).astype(np.float32)
        starts = np.array([t == 0, t % 5 == 0, False])  # episode starts reset each member's LSTM
        action, state = loaded.predict(obs, state, starts, deterministic=True)
        alone = []
        for i, member in enumerate(members):
            a, member_states[i] = member.predict(obs, member_states[i], starts, deterministic=True)
            alone.append(a)
        np.testing.assert_array_equal(action, ((alone[0].astype(np.float64) + alone[1]) / 2).astype(np.float32))
        differs |= not np.array_equal(alone[0], alone[1])
    assert differs, "the two members should disagree somewhere, or the test shows nothing"
    single, _ = loaded.predict(obs[0], None, None, deterministic=True)  # one unbatched observation
    assert single.shape == (loaded.decoder.num_actions,)
    sampled, sampled_state = loaded.predict(obs, state, None, deterministic=False)
    assert sampled.shape == action.shape and np.all(np.abs(sampled) <= 1.0) and len(sampled_state) == 2


def test_ensemble_state_must_be_its_list_of_member_states(ensemble):
    loaded = load_bundle(ensemble)
    obs = np.zeros((1, loaded.obs_dim), np.float32)
    _, state = loaded.predict(obs, loaded.initial_state(1), None, deterministic=True)
    lstm_state = state[0]  # a member's (h, c) pair is not the ensemble's state
    with pytest.raises(ValueError, match="list of 2 member states .*got tuple of length 2"):
        loaded.predict(obs, lstm_state, None)


def test_scheduler_state_of_another_kind_of_policy_is_refused(ensemble, good_bundle):
    opt = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.05, weight_decay=1e-4)
    sched = PolicyScheduler.from_pretrained(ensemble, opt, total_steps=6, epochs=6)
    sched.step(1.0)
    single = PolicyScheduler.from_pretrained(good_bundle, opt, total_steps=6, epochs=6)
    with pytest.raises(ValueError, match=r"saved with a ensemble\[recurrent, mlp over 4 frames\] policy.*recurrent"):
        single.load_state_dict(sched.state_dict())
    with pytest.raises(ValueError, match=r"saved with a recurrent policy, this scheduler runs a ensemble"):
        sched.load_state_dict(single.state_dict())


def test_ensemble_drives_a_scheduler_and_resumes_from_its_state_dict(ensemble):
    def make():
        net = torch.nn.Linear(3, 2)
        return torch.optim.SGD(net.parameters(), lr=0.05, weight_decay=1e-4, momentum=0.9)

    losses = [2.0 * 0.9**t for t in range(10)]
    opt = make()
    sched = PolicyScheduler.from_pretrained(ensemble, opt, total_steps=10, epochs=10)
    for val in losses[:4]:
        sched.step(val)
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    expected = []
    for val in losses[4:]:
        sched.step(val)
        expected.append(sched.get_last_lr())
    resumed = PolicyScheduler.from_pretrained(ensemble, make(), total_steps=10, epochs=10)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = []
    for val in losses[4:]:
        resumed.step(val)
        got.append(resumed.get_last_lr())
    assert got == expected


def test_ensemble_fingerprint_covers_its_members(ensemble, good_bundle, tmp_path):
    fingerprint = bundle_fingerprint(ensemble)
    assert fingerprint == bundle_fingerprint(shutil.copytree(ensemble, tmp_path / "moved"))
    assert fingerprint not in {bundle_fingerprint(good_bundle), bundle_fingerprint(ensemble / "members" / "0")}
    # Rebuilt from the same members named another way, or re-described: the same policy, the same hash.
    members = [ensemble / "members" / "0", os.path.relpath(ensemble / "members" / "1")]
    rebuilt = save_ensemble(tmp_path / "rebuilt", members, config={"description": "another text"})
    assert bundle_fingerprint(rebuilt) == fingerprint
    _edit_json(ensemble / "members" / "1" / "obs_norm.json", count=1.0)
    assert bundle_fingerprint(ensemble) != fingerprint


def test_ensemble_command_writes_a_loadable_bundle(good_bundle, second_bundle, tmp_path, capsys):
    assert ensemble_main([str(tmp_path / "ens"), str(good_bundle), str(second_bundle), "--description", "cli"]) == 0
    assert "ensemble of 2 policies" in capsys.readouterr().out
    assert load_bundle(tmp_path / "ens").config["description"] == "cli"
    with pytest.raises(SystemExit) as exc:
        ensemble_main([str(tmp_path / "one"), str(good_bundle)])
    assert exc.value.code == 2
    assert "at least two member bundles, got 1" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()

    # A forgotten OUT makes the first member the output: refused, the bundle untouched, unless --force.
    before = (good_bundle / "model.zip").read_bytes()
    with pytest.raises(SystemExit) as exc:
        ensemble_main([str(good_bundle), str(second_bundle), str(tmp_path / "ens")])
    assert exc.value.code == 2 and (good_bundle / "model.zip").read_bytes() == before
    err = capsys.readouterr().err
    assert "exists (a policy bundle)" in err and "pass --force to replace it" in err
    with pytest.raises(SystemExit) as exc:
        ensemble_main([str(tmp_path / "ens"), str(good_bundle), str(second_bundle)])  # an existing ensemble too
    assert exc.value.code == 2 and "exists (a policy bundle)" in capsys.readouterr().err
    assert ensemble_main([str(tmp_path / "ens"), str(good_bundle), str(second_bundle), "--force"]) == 0
    assert "description" not in load_bundle(tmp_path / "ens").config
    # The same bundle twice is not an ensemble.
    with pytest.raises(SystemExit):
        ensemble_main([str(tmp_path / "twice"), str(good_bundle), str(good_bundle / ".." / good_bundle.name)])
    assert "are the same bundle" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    with pytest.raises(SystemExit) as exc:  # a mistyped shipped name: a message, not a traceback
        ensemble_main([str(tmp_path / "named"), "default", "no-such-policy"])
    assert exc.value.code == 2 and "no policy named 'no-such-policy' ships" in capsys.readouterr().err


def test_ensemble_errors(ensemble, good_bundle, tmp_path):
    # members trained for other hyperparameters
    other = tmp_path / "other"
    shutil.copytree(good_bundle, other)
    data = json.loads((other / "config.json").read_text())
    data["action_decoder"]["hyperparameters"][0]["upper"] = 0.5
    (other / "config.json").write_text(json.dumps(data))
    with pytest.raises(
        BundleError, match=r"member 1 controls .*\(lr upper 1.0 against 0.5\): .*same hyperparameters and bounds"
    ):
        save_ensemble(tmp_path / "mixed", [good_bundle, other])
    with pytest.raises(BundleError, match="is an ensemble; list its members"):
        save_ensemble(tmp_path / "nested", [ensemble, good_bundle])
    with pytest.raises(BundleError, match="would replace its own member"):
        save_ensemble(good_bundle, [good_bundle, ensemble / "members" / "1"])
    with pytest.raises(BundleError, match="would replace its own member"):  # a folder holding a member
        save_ensemble(ensemble.parent, [good_bundle, ensemble / "members" / "1"])
    assert (ensemble / "members" / "1" / "model.zip").is_file()
    # what an older hpo-meta, or a damaged config, would present
    old = tmp_path / "old"
    shutil.copytree(ensemble, old)
    _edit_json(old / "config.json", format_version=1)
    with pytest.raises(
        BundleError,
        match=r"format version 1 \(written by hpo-meta .*\), but hpo-meta .* reads versions \[2\] .*'ensemble'",
    ):
        load_bundle(old)
    _edit_json(old / "config.json", kind="ensembel")
    with pytest.raises(BundleError, match="unknown bundle kind 'ensembel'"):
        load_bundle(old)
    damaged = shutil.copytree(ensemble, tmp_path / "damaged")
    (damaged / "members" / "0" / "obs_norm.json").write_text("{")
    with pytest.raises(BundleError, match="member 'members/0': .*obs_norm.json is corrupted.*rebuild the ensemble"):
        load_bundle(damaged)
    # a damaged ensemble directory
    shutil.rmtree(ensemble / "members" / "1")
    with pytest.raises(BundleError, match="missing its member 'members/1'"):
        load_bundle(ensemble)
    _edit_json(ensemble / "config.json", members=["members/0", "../../elsewhere"])
    with pytest.raises(BundleError, match="outside the ensemble's directory"):
        load_bundle(ensemble)
    _edit_json(ensemble / "config.json", members="members/0")
    with pytest.raises(BundleError, match="no list of 'members'"):
        load_bundle(ensemble)
    _edit_json(ensemble / "config.json", members=["members/0"])
    with pytest.raises(BundleError, match="at least two member policies, got 1"):
        load_bundle(ensemble)


def test_fingerprint_ignores_descriptions_and_recorded_results(good_bundle, tmp_path):
    """Writing a benchmark summary into a bundle must not orphan the runs that benchmark stored."""
    bundle = shutil.copytree(good_bundle, tmp_path / "b")
    fingerprint = bundle_fingerprint(bundle)
    _edit_json(bundle / "config.json", description="re-described", benchmark={"pairs": 80}, benchmarked=True)
    assert bundle_fingerprint(bundle) == fingerprint
    _edit_json(bundle / "config.json", frame_stack=2)  # defines behaviour: a different policy
    assert bundle_fingerprint(bundle) != fingerprint


def test_an_interrupted_replacement_keeps_the_previous_bundle(tmp_path, monkeypatch):
    from agents.bundle import _write_atomically

    target = tmp_path / "bundle"
    _write_atomically(target, lambda tmp: (tmp / "config.json").write_text('{"v": 1}'))
    real_rename = Path.rename

    def interrupted(self, dest):  # Ctrl-C lands between moving the old bundle away and moving the new one in
        if self.name.endswith(".tmp"):
            raise KeyboardInterrupt
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write_atomically(target, lambda tmp: (tmp / "config.json").write_text('{"v": 2}'))
    monkeypatch.setattr(Path, "rename", real_rename)
    assert (target / "config.json").read_text() == '{"v": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    _write_atomically(target, lambda tmp: (tmp / "config.json").write_text('{"v": 3}'))  # and replacing still works
    assert (target / "config.json").read_text() == '{"v": 3}' and sorted(p.name for p in tmp_path.iterdir()) == [
        "bundle"
    ]


def test_the_ensemble_error_says_what_differs_between_two_decoders():
    from agents.bundle import _decoder_difference
    from hpo_env import ActionDecoder

    assert _decoder_difference(ActionDecoder(("lr",)), ActionDecoder(("lr", "weight_decay"))) == (
        "hyperparameters ['lr'] against ['lr', 'weight_decay']"
    )
    capped = ActionDecoder(("lr",)).with_cap("lr", 1.5)
    assert _decoder_difference(ActionDecoder(("lr",)), capped) == "lr max_log10_above_initial None against 1.5"


def test_a_folder_named_like_a_shipped_policy_is_used_only_if_it_holds_a_bundle(tmp_path, monkeypatch):

    from agents import default_policy_path, load_bundle, resolve_policy

    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError, match=r"default_policy_path\('default'\)\) or PolicyScheduler.from_pretrained"):
        load_bundle("default")  # load_bundle takes folders only, and says where the shipped one is
    (tmp_path / "default").mkdir()  # e.g. an output folder of the user's that happens to be called so
    with pytest.warns(UserWarning, match="holds no policy bundle: loading the shipped policy 'default' instead"):
        assert resolve_policy("default") == default_policy_path("default")
    shutil.rmtree(tmp_path / "default")
    shutil.copytree(default_policy_path("default"), tmp_path / "default")  # a bundle of the user's
    with pytest.warns(UserWarning, match="is a bundle folder here .* loading the folder"):
        assert resolve_policy("default") == Path("default")
    assert resolve_policy("./default") == Path("default")  # a path: no ambiguity, no warning
