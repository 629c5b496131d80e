"""The benchmark end to end on a tiny configuration, its statistics, store and reference runners."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from agents import load_bundle
from agents.baselines import ConstantSchedule, schedule_decoder
from hpo_env import ActionDecoder, BatchedTrainer, TaskDistribution, ToyTaskDistribution
from hpo_env.data import build_splits
from hpo_env.models import ModelLayout
from training import benchmark as bench
from training.hypergradient import run_hypergradient
from training.rollout import run_episodes
from training.stats import (
    bootstrap_ci,
    divergence_rate,
    headroom,
    loss_ratios,
    lr_level,
    median_ratio,
    paired_comparison,
    win_indicators,
    win_rate,
    within_family_correlation,
)
from training.store import ResultStore, RunKey, RunResult
from training.threads import torch_threads

DECODER = ActionDecoder(("lr", "weight_decay"))


# -- statistics ----------------------------------------------------------------------------------


def test_win_rate_counts_ties_half_and_divergence_as_a_loss():
    policy = [1.0, 2.0, 3.0, np.nan, np.inf, 5.0]
    baseline = [2.0, 2.0, 1.0, 1.0, np.nan, np.nan]
    np.testing.assert_array_equal(win_indicators(policy, baseline), [1, 0.5, 0, 0, 0.5, 1])
    assert win_rate(policy, baseline) == pytest.approx(3 / 6)
    np.testing.assert_array_equal(loss_ratios(policy, baseline), [0.5, 1.0, 3.0, np.inf, 1.0, 0.0])
    assert median_ratio(policy, baseline) == pytest.approx(1.0)
    assert divergence_rate([True, False, False, False]) == 0.25
    with pytest.raises(ValueError, match="equally many"):
        win_rate([1.0], [1.0, 2.0])


def test_lr_level_is_the_median_ratio_of_mean_learning_rates_over_pairs_that_have_both():
    # Ratios 2, 0.5, 3 and a pair without a policy schedule (NaN), left out.
    level = lr_level([0.2, 0.05, 0.3, np.nan], [0.1, 0.1, 0.1, 0.1])
    assert level == {"median_ratio": pytest.approx(2.0), "share_higher": pytest.approx(2 / 3), "pairs": 3}
    assert lr_level([np.nan], [0.1]) == {
        "median_ratio": pytest.approx(np.nan, nan_ok=True),
        "share_higher": pytest.approx(np.nan, nan_ok=True),
        "pairs": 0,
    }
    with pytest.raises(ValueError, match="one learning rate per pair"):
        lr_level([0.1, 0.2], [0.1])


def test_within_family_correlation_removes_each_familys_means_before_pooling():
    # Within each family y rises with x exactly; family b sits far higher in both, and a correlation over
    # all tasks as they are would mix that offset in. A NaN task is left out.
    x = [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, np.nan]
    y = [5.0, 6.0, 7.0, -3.0, -2.0, -1.0, 1.0]
    fams = ["a", "a", "a", "b", "b", "b", "b"]
    c = within_family_correlation(x, y, fams)
    assert c["r"] == pytest.approx(1.0) and c["tasks"] == 6
    assert c["by_family"] == {"a": {"r": pytest.approx(1.0), "tasks": 3}, "b": {"r": pytest.approx(1.0), "tasks": 3}}
    assert np.corrcoef(x[:6], y[:6])[0, 1] < 0  # pooled as they are, the families' offset reverses the sign
    # Fewer than three tasks, or a constant, has no correlation.
    few = within_family_correlation([1.0, 2.0], [1.0, 3.0], ["a", "a"])
    assert math.isnan(few["r"]) and math.isnan(few["by_family"]["a"]["r"])
    assert math.isnan(within_family_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], ["a"] * 3)["r"])
    # Constant within every family (0.1 three times does not average to exactly 0.1): no pooled correlation.
    flat = within_family_correlation(
        [0.1, 0.1, 0.1, 0.7, 0.7, 0.7], [1.0, 2.0, 3.0, 4.0, 6.0, 5.0], ["a"] * 3 + ["b"] * 3
    )
    assert math.isnan(flat["r"])
    with pytest.raises(ValueError, match="one x, y and family per task"):
        within_family_correlation([1.0, 2.0], [1.0], ["a", "a"])


def test_headroom_bins_tasks_by_how_far_their_defaults_end_from_the_oracle():
    # Task "a": the better default ends at the oracle on both seeds (headroom 1); task "b": 5% behind
    # (sqrt(1.1 * 1.0) ~ 1.049); task "c": far behind, one default diverged on a seed (the other did not).
    groups = ["a", "a", "b", "b", "c", "c"]
    oracle = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    constant = [1.0, 1.3, 1.1, 1.0, np.inf, 2.0]
    cosine = [1.2, 1.0, 1.2, 1.1, 3.0, np.nan]
    policy = [0.9, 1.1, 1.05, 0.95, 1.2, np.inf]
    bins = headroom(policy, oracle, [constant, cosine], groups)
    assert [(b["tasks"], b["pairs"]) for b in bins] == [(1, 2), (1, 2), (1, 2)]
    assert [b["label"] for b in bins] == [
        "defaults at most 2% behind the oracle, or ahead of it",
        "defaults 2%-10% behind the oracle",
        "defaults more than 10% behind the oracle",
    ]
    a, b, c = bins
    # Beating both defaults is strict: in "a" the oracle ties the better default on both seeds.
    assert (a["policy_beats_all_defaults"], a["oracle_beats_all_defaults"]) == (0.5, 0.0)
    assert (b["policy_beats_all_defaults"], b["oracle_beats_all_defaults"]) == (1.0, 0.5)
    assert a["median_ratio"] == pytest.approx(1.0) and a["geomean_ratio"] == pytest.approx(math.sqrt(0.99))
    # A diverged policy run has no log ratio: the geometric mean is over the pair that finished.
    assert c["policy_beats_all_defaults"] == 0.5 and c["geomean_ratio"] == pytest.approx(1.2)
    # Empty bins are left out; custom edges.
    only = headroom(policy[:2], oracle[:2], [constant[:2], cosine[:2]], groups[:2], edges=(1.5,))
    assert [(x["label"], x["pairs"]) for x in only] == [("defaults at most 50% behind the oracle, or ahead of it", 2)]
    with pytest.raises(ValueError, match="one policy, oracle, group"):
        headroom(policy, oracle, [], groups)
    with pytest.raises(ValueError, match="positive and increasing"):
        headroom(policy, oracle, [constant, cosine], groups, edges=(1.1, 1.02))


def test_bootstrap_interval_covers_the_true_median_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true_median = math.exp(0.3)  # of a lognormal(0.3, 0.5)
    hits = 0
    reps = 200
    for _ in range(reps):
        sample = rng.lognormal(0.3, 0.5, size=60)
        lo, hi = bootstrap_ci(sample, rng=rng, n_boot=400)
        hits += lo <= true_median <= hi
    assert 0.89 <= hits / reps <= 0.99


def test_statistics_refuse_inputs_that_would_give_silent_nonsense():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"reduce the last axis .* np.median\(x, axis=-1\)"):
        bootstrap_ci(np.arange(10.0), np.median, rng=rng)  # reduces everything: a zero-width interval
    with pytest.raises(ValueError, match="n_boot must be a positive integer"):
        bootstrap_ci(np.arange(10.0), rng=rng, n_boot=2.5)
    with pytest.raises(ValueError, match="one loss per pair"):
        win_rate(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="losses, which are >= 0"):
        win_rate([-1.0, 2.0], [1.0, -2.0])


def test_bootstrap_of_medians_over_diverged_runs_is_infinite_not_nan():
    # Two of five tasks diverged on every seed (ratio inf): many resampled medians are inf.
    ratios = np.repeat([1.0, 1.02, 0.98, np.inf, np.inf], 5)
    groups = np.repeat(np.arange(5), 5)
    low, high = bootstrap_ci(ratios, rng=np.random.default_rng(0), groups=groups, n_boot=500)
    assert np.isfinite(low) and high == np.inf
    assert bootstrap_ci([1.0, np.inf, np.inf], rng=np.random.default_rng(0), n_boot=200)[1] == np.inf


def test_bootstrap_is_reproducible_and_resamples_whole_groups():
    values = np.array([1.0, 1.1, 5.0, 5.2, 9.0, 9.1])
    a = bootstrap_ci(values, rng=np.random.default_rng(1), groups=["a", "a", "b", "b", "c", "c"], n_boot=300)
    b = bootstrap_ci(values, rng=np.random.default_rng(1), groups=["a", "a", "b", "b", "c", "c"], n_boot=300)
    assert a == b
    # One group: every resample is that group, so the interval collapses onto its statistic.
    assert bootstrap_ci([1.0, 3.0], rng=np.random.default_rng(0), groups=["t", "t"]) == (2.0, 2.0)
    # Unequal groups take the general path.
    lo, hi = bootstrap_ci([1.0, 2.0, 3.0], rng=np.random.default_rng(0), groups=[0, 0, 1], n_boot=200)
    assert 1.0 <= lo <= hi <= 3.0
    with pytest.raises(TypeError, match="Generator"):
        bootstrap_ci(values, rng=0)
    with pytest.raises(ValueError, match="label every value"):
        bootstrap_ci(values, rng=np.random.default_rng(0), groups=[1, 2])
    stats = paired_comparison([1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], rng=np.random.default_rng(0), n_boot=50)
    assert stats["win_rate"] == stats["win_rate_low"] == stats["win_rate_high"] == 1.0
    assert stats["median_ratio"] == 0.5 and stats["pairs"] == 4


def test_bootstrap_interval_is_the_central_percentiles_of_the_resampled_statistic():
    """The interval is exactly the (1 - confidence) / 2 tails of the resampled statistics, linearly
    interpolated: a coverage check alone would pass a 97.5% or 90% interval as well."""
    values = np.random.default_rng(3).lognormal(0.0, 0.5, size=15)
    for statistic, reduce in ((None, np.median), (lambda x: np.mean(x, axis=-1), np.mean)):
        for confidence in (0.95, 0.8):
            kwargs = {} if statistic is None else {"statistic": statistic}
            got = bootstrap_ci(values, rng=np.random.default_rng(7), n_boot=500, confidence=confidence, **kwargs)
            draws = np.random.default_rng(7).integers(0, values.size, size=(500, values.size))
            tail = 50 * (1 - confidence)
            expected = np.percentile(reduce(values[draws], axis=-1), [tail, 100 - tail])
            assert got == pytest.approx(tuple(expected), rel=1e-12)


def test_ratios_of_two_zero_losses_are_one_and_the_geometric_mean_skips_lone_divergences():
    from training.stats import geomean_ratio

    ratios = loss_ratios([0.0, 1.0, 2.0, 1.0, np.nan], [0.0, 2.0, 1.0, np.nan, 3.0])
    np.testing.assert_array_equal(ratios, [1.0, 0.5, 2.0, 0.0, np.inf])
    assert geomean_ratio(ratios) == pytest.approx(1.0)  # over 1, 0.5 and 2: the 0 and the inf have no log
    assert math.isnan(geomean_ratio([0.0, np.inf]))


# -- store -----------------------------------------------------------------------------------------


def test_oracle_picks_the_fewest_divergences_then_the_lowest_mean_log_loss():
    inf = np.inf
    assert bench._best_rate(np.array([[1.0, 2.0], [1.5, 1.5], [0.5, inf]])) == 0  # exp(mean log): sqrt(2) < 1.5
    # Every rate diverged somewhere: the fewest divergences win, not the first row.
    assert bench._best_rate(np.array([[inf, inf], [0.1, inf], [inf, 0.3]])) == 1
    assert bench._best_rate(np.array([[inf, inf], [inf, inf]])) == 0


def test_code_version_names_the_code_torch_device_and_cpu_threads():
    cpu, cuda = bench.default_code_version("cpu", threads=1), bench.default_code_version("cuda:0", threads=1)
    assert cpu != cuda and cpu.endswith(", cpu, 1 thread") and cuda.endswith(", cuda")
    assert bench.default_code_version("cpu", threads=2).endswith(", cpu, 2 threads")
    with torch_threads(2):  # by default, the count in use
        assert bench.default_code_version("cpu") == bench.default_code_version("cpu", threads=2)
    assert f"torch {torch.__version__}" in cpu and f"code {bench.run_code_hash()}" in cpu
    assert len(bench.run_code_hash()) == 12 and bench.run_code_hash() == bench.run_code_hash()


def test_report_prints_ratios_to_four_decimals():
    assert bench._ratio(1.0041) == "1.0041" and bench._ratio(0.99962) == "0.9996"
    assert bench._ratio(float("inf")) == "inf" and bench._ratio(None) == "n/a"


def test_a_foreign_sqlite_file_is_refused_as_a_store(tmp_path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE runs (id INTEGER, name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="'runs' table of another layout .* pass another --store path"):
        ResultStore(path)
    (tmp_path / "text.sqlite").write_text("not a database" * 100)
    with pytest.raises(ValueError, match="is not a usable SQLite results store"):
        ResultStore(tmp_path / "text.sqlite")
    # A store whose header is intact but a later page is damaged is refused when opened, not mid-benchmark.
    damaged = tmp_path / "damaged.sqlite"
    with ResultStore(damaged) as store:
        store.put_many(
            (RunKey(f"task/{i}", "constant", 0, "v1"), RunResult("tabular", final_val_loss=1.0, val_loss=[1.0] * 50))
            for i in range(200)
        )
    with open(damaged, "r+b") as f:
        f.seek(4096 * 3)
        f.write(b"\xde\xad" * 2048)
    with pytest.raises(ValueError, match=r"not a usable SQLite results store \(.*\): move it aside"):
        ResultStore(damaged)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="folder .*a_file' cannot be created"):
        ResultStore(tmp_path / "a_file" / "runs.sqlite")


def test_store_round_trip_missing_and_replace(tmp_path):
    path = tmp_path / "sub" / "runs.sqlite"
    keys = [RunKey("task/a", "cosine@lr=0.01", s, "v1") for s in range(3)]
    with ResultStore(path) as store:
        assert store.missing(keys + keys[:1]) == keys
        result = RunResult("tabular", final_val_loss=0.5, val_loss=[1.0, 0.5], hparams={"lr": [0.01, 0.005]})
        store.put_many([(keys[0], result), (keys[1], RunResult("tabular", diverged=True))])
        assert store.missing(keys) == [keys[2]]
        assert len(store) == 2 and keys[0] in store
    with ResultStore(path) as store:  # persisted
        back = store.get(keys[0])
        assert back.to_json() == result.to_json()  # NaN fields included
        assert math.isnan(store.get(keys[1]).final_val_loss) and store.get(keys[1]).diverged
        store.put_many([(keys[0], RunResult("tabular", final_val_loss=0.25))])
        assert store.get(keys[0]).final_val_loss == 0.25 and len(store) == 2
        assert store.get(RunKey("task/a", "cosine@lr=0.01", 0, "v2")) is None  # another code version
        # Runs missing under v2 that v1 holds: what a code edit made stale.
        v2 = [k._replace(code_version="v2") for k in keys]
        store.put_many([(RunKey("task/a", "cosine@lr=0.01", 0, "v0"), result)])
        assert store.other_versions(v2 + v2) == {"v1": 2, "v0": 1}
        assert store.other_versions(keys[:1]) == {"v0": 1} and store.other_versions(keys[2:]) == {}
        with pytest.raises(TypeError, match="RunKey"):
            store.put_many([(("a", "b", 0, "v"), result)])
    (tmp_path / "junk.sqlite").write_text("not a database " * 100)
    with pytest.raises(ValueError, match="not a usable SQLite"):
        ResultStore(tmp_path / "junk.sqlite").keys()


# -- reference runners and predictions ------------------------------------------------------------


@pytest.mark.parametrize("family, optimizer", [("tabular", "sgd"), ("teacher_regression", "adamw")])
def test_trainer_predictions_agree_with_evaluate(family, optimizer):
    spec = TaskDistribution.default("all").sample_family(family, np.random.default_rng(3), optimizer=optimizer)
    spec = spec.replace(total_steps=20, steps_per_action=10)
    trainer = BatchedTrainer(2)
    trainer.load(0, spec)
    trainer.load(1, spec.replace(seed=spec.seed + 1))
    trainer.train_chunk([0, 1])  # both live in one stack now
    loss, acc = trainer.evaluate([0, 1], split="test")
    from hpo_env import build_splits

    y = build_splits(spec).y_test.numpy()
    for slot, pred in enumerate(trainer.predictions([0, 1], split="test")):
        if spec.task_type == "classification":
            assert pred.shape == y.shape
            assert np.mean(pred == y) == pytest.approx(acc[slot], abs=1e-6)
        else:
            assert np.mean(np.sum((pred - y) ** 2, axis=-1) / y.shape[-1]) == pytest.approx(loss[slot], rel=1e-5)
    with pytest.raises(ValueError, match="split"):
        trainer.predictions([0], split="train")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_hypergradient_with_beta_zero_reproduces_the_environment(optimizer):
    spec = TaskDistribution.default("all").sample_family("tabular", np.random.default_rng(5), optimizer=optimizer)
    spec = spec.replace(total_steps=30, steps_per_action=10)
    exact = schedule_decoder(DECODER)
    env_run = run_episodes(ConstantSchedule(exact), [spec], exact)[0]
    hd0 = run_hypergradient(spec, exact, beta=0.0)
    np.testing.assert_allclose(hd0.val_loss, env_run.val_loss, rtol=1e-5)
    assert hd0.test_loss == pytest.approx(env_run.test_loss, rel=1e-5)
    assert hd0.test_macro_f1 == pytest.approx(env_run.test_macro_f1, abs=1e-9)
    assert hd0.episode_return == pytest.approx(env_run.episode_return, abs=1e-5)
    hd = run_hypergradient(spec, exact, beta=1e-2 if optimizer == "sgd" else 1e-5)
    assert not np.allclose(hd.hparams["lr"], hd.hparams["lr"][0])  # the rate adapts
    assert all(1e-5 <= lr <= 1.0 for lr in hd.hparams["lr"])
    with pytest.raises(ValueError, match="beta"):
        run_hypergradient(spec, exact, beta=-1.0)


def test_rollout_records_macro_f1_for_classification_only():
    spec = TaskDistribution.default("all").sample_family("tabular", np.random.default_rng(0))
    cls_spec = spec.replace(dataset="wine", total_steps=20, steps_per_action=10)
    reg_spec = ToyTaskDistribution().sample(np.random.default_rng(0))
    recs = run_episodes(ConstantSchedule(DECODER), [cls_spec, reg_spec], DECODER)
    assert 0.0 <= recs[0].test_macro_f1 <= 1.0 and math.isnan(recs[1].test_macro_f1)


def test_end_of_run_metrics_match_sklearn_on_the_trained_models():
    """Test loss, accuracy and macro-F1 (and the final validation loss) of finished runs are those sklearn
    computes from the models' own outputs, for models batched with others of other class counts (padded
    classes) and a regression table in the same stack."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss, mean_squared_error

    from hpo_env import EpisodeBatch
    from hpo_env.models import forward
    from training.rollout import _macro_f1

    dist = TaskDistribution.default("all")
    rng = np.random.default_rng(4)
    specs = [dist.sample_family(f, rng) for f in ("teacher_classification", "make_classification", "tabular")]
    specs += [dist.sample_family("teacher_regression", rng)]
    specs = [s.replace(hidden=(16,), total_steps=2 * s.steps_per_action) for s in specs]
    assert len({s.n_classes for s in specs[:2]}) == 2, "two class counts: the stack pads classes"
    batch = EpisodeBatch(len(specs), DECODER)
    batch.start(list(range(len(specs))), specs)
    _, _, done, infos = batch.step(list(range(len(specs))), np.zeros((len(specs), DECODER.num_actions)))
    assert done.all() and not any(info["diverged"] for info in infos)
    for slot, (spec, info) in enumerate(zip(specs, infos)):
        data = build_splits(spec)
        layout = ModelLayout.build(spec, data)
        params = [p.double().unsqueeze(0) for p in batch.trainer.parameters(slot)]
        val, test = (
            forward(layout.arch, layout.activation, params, x.double().unsqueeze(0))[0]
            for x in (data.x_val, data.x_test)
        )
        if data.task_type == "regression":
            assert info["test_loss"] == pytest.approx(mean_squared_error(data.y_test, test), rel=1e-5)
            assert info["final_val_loss"] == pytest.approx(mean_squared_error(data.y_val, val), rel=1e-5)
            continue
        labels = list(range(data.n_outputs))
        assert info["test_loss"] == pytest.approx(log_loss(data.y_test, test.softmax(-1), labels=labels), rel=1e-5)
        assert info["final_val_loss"] == pytest.approx(log_loss(data.y_val, val.softmax(-1), labels=labels), rel=1e-5)
        assert info["test_accuracy"] == pytest.approx(accuracy_score(data.y_test, test.argmax(-1)), abs=1e-6)
        assert _macro_f1(batch, slot) == pytest.approx(f1_score(data.y_test, test.argmax(-1), average="macro"))


# -- the benchmark ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A RecurrentPPO policy trained for one short rollout on the toy task: a real, loadable bundle."""
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.vec_env import VecNormalize

    from agents import save_bundle
    from hpo_env import HPOVecEnv

    env = VecNormalize(HPOVecEnv(4, "toy", seed=0), norm_reward=False)
    model = RecurrentPPO(
        "MlpLstmPolicy", env, n_steps=16, batch_size=32, n_epochs=1, seed=0,
        policy_kwargs=dict(lstm_hidden_size=8, net_arch=[8]), device="cpu",
    )  # fmt: skip
    model.learn(64)
    return save_bundle(tmp_path_factory.mktemp("bundle") / "tiny", model, env.venv.decoder, obs_rms=env.obs_rms)


def _tiny_config(bundle, out, **kw) -> bench.BenchmarkConfig:
    settings = dict(
        policy=str(bundle), families=("tabular", "digits_cnn"), tasks_per_family=1, seeds=2, grid_size=2,
        total_steps=20, steps_per_action=5, out=str(out), chunk_size=8, bootstrap=200, progress=False,
    )  # fmt: skip
    settings.update(kw)
    return bench.BenchmarkConfig(**settings)


def test_a_rerun_stopped_while_writing_its_report_leaves_the_previous_report_whole(tiny_bundle, tmp_path, monkeypatch):
    """benchmark.json and report.md are replaced whole, and together: a full disk mid-write or a kill
    between the two leaves the previous pair, not a truncated file or a json of another run than its report."""
    import errno

    config = _tiny_config(tiny_bundle, tmp_path / "out", families=("tabular",), seeds=1, grid_size=1, plots=False)
    first = bench.run_benchmark(config)
    before = {p.name: p.read_bytes() for p in (first.json_path, first.report_path)}
    rerun = dataclasses.replace(config, bootstrap=300)  # (the stored runs, another summary)
    real_write_text = Path.write_text

    def disk_full(path, data, *args, **kwargs):
        real_write_text(path, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        bench.run_benchmark(rerun)
    monkeypatch.setattr(Path, "write_text", real_write_text)
    monkeypatch.setattr(bench, "render_report", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmark(rerun)
    assert {p.name: p.read_bytes() for p in (first.json_path, first.report_path)} == before
    assert sorted(p.name for p in first.json_path.parent.iterdir()) == ["benchmark.json", "report.md", "results.sqlite"]


def test_a_read_only_output_is_refused_before_any_run(tiny_bundle, tmp_path, monkeypatch):
    config = _tiny_config(tiny_bundle, tmp_path / "out", families=("tabular",), seeds=1, grid_size=1, plots=False)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(bench.os, "access", lambda path, mode: Path(path) != tmp_path / "out")
    monkeypatch.setattr(bench, "run_episodes", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(ValueError, match=r"^--out '.*out' is not writable \(a read-only folder or file system\)"):
        bench.run_benchmark(config)


def test_a_full_disk_or_read_only_store_ends_hpo_bench_with_a_line_that_says_how_to_resume(monkeypatch, capsys):
    import errno

    for err in (
        sqlite3.OperationalError("database or disk is full"),
        sqlite3.OperationalError("attempt to write a readonly database"),
        OSError(errno.ENOSPC, "No space left on device"),
    ):
        monkeypatch.setattr(bench, "run_benchmark", lambda config, err=err: (_ for _ in ()).throw(err))
        assert bench.main(["--policy", "default"]) == 1
        assert capsys.readouterr().err == (
            f"hpo-bench: error: the benchmark stopped: it cannot write its files ({err}); the finished runs are in "
            "the store: make room (or pass a writable --out or --store) and rerun the same command to resume\n"
        )
    monkeypatch.setattr(bench, "run_benchmark", lambda config: (_ for _ in ()).throw(BrokenPipeError()))
    with pytest.raises(BrokenPipeError):  # not a full disk: as it is
        bench.main(["--policy", "default"])


def test_benchmark_end_to_end_interrupted_resumed_and_rerun(tiny_bundle, tmp_path, monkeypatch, capsys, load_script):
    config = _tiny_config(tiny_bundle, tmp_path / "out", threads=1)
    real_run_chunks = bench.run_chunks
    tasks = bench.make_tasks(config)
    assert [t.family for t in tasks] == ["tabular", "digits_cnn"] and all(t.total_steps == 20 for t in tasks)

    # An interruption after two batches keeps what finished.
    calls = {"n": 0}
    real = bench.run_episodes

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_episodes", flaky)
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmark(config)
    monkeypatch.setattr(bench, "run_episodes", real)
    with ResultStore(config.store_path) as store:
        stored_after_interrupt = len(store)
    assert stored_after_interrupt == 4 + 4  # the policy's and the random policy's batches

    # Resuming computes only what is missing, on the config's one thread, whatever the caller's count.
    with torch_threads(2):
        result = bench.run_benchmark(config)
        assert torch.get_num_threads() == 2
    # 2 tasks x 2 seeds x (policy, 2 defaults, fixed rule, 2x2 grid, 4 schedules, HD, random, replay,
    # replay per task); on a 2-point grid no rate coincides with the default, so every key is distinct.
    total = 2 * 2 * (1 + 3 + 4 + 4 + 1 + 1 + 1 + 1)
    assert result.computed == total - stored_after_interrupt and result.reused == stored_after_interrupt
    with ResultStore(config.store_path) as store:
        assert len(store) == total
        schedules = {k.schedule for k in store.keys()}
        assert {k.code_version for k in store.keys()} == {bench.default_code_version("cpu", threads=1)}
    assert any(s.startswith("policy@") for s in schedules) and any(s.startswith("replay@") for s in schedules)
    # One per-task replay schedule per task, from that task's policy runs.
    assert len({s for s in schedules if s.startswith("replay_task@")}) == 2

    summary = json.loads(result.json_path.read_text())  # strict JSON: no NaN tokens
    names = [r["name"] for r in summary["rows"]]
    assert names == [r.name for r in bench.rows(2)]
    for row in summary["rows"]:
        assert row["all"]["pairs"] == 4 and row["runs"] == 4
        assert 0.0 <= row["all"]["win_rate_low"] <= row["all"]["win_rate"] <= row["all"]["win_rate_high"] <= 1.0
        assert row["all"]["median_ratio_low"] <= row["all"]["median_ratio_high"]
    tuned = {r["name"]: r for r in summary["rows"]}["cosine_tuned"]
    assert tuned["cost_runs_per_task_seed"] == 2

    # "Beats both untuned defaults" for every row, from the per-run losses (the defaults themselves: None).
    def final(row):
        return [np.inf if r["diverged"] else r["final_val_loss"] for r in summary["per_run"][row]]

    const, cos = final("constant_default"), final("cosine_default")
    for row in summary["rows"]:
        if row["name"] in bench.UNTUNED_DEFAULTS:
            assert row["beats_both_untuned_defaults"] is None
            continue
        expected = np.mean([x < a and x < b for x, a, b in zip(final(row["name"]), const, cos)])
        assert row["beats_both_untuned_defaults"] == pytest.approx(expected)
    expected = np.mean([x < a and x < b for x, a, b in zip(final("policy"), const, cos)])
    assert summary["targets"]["beats_both_untuned_defaults"] == pytest.approx(expected)
    assert set(summary["oracle_lr"]["cosine_tuned"]) == {t.task_id for t in tasks}
    tabular = summary["per_run"]["policy"][0]
    assert tabular["family"] == "tabular" and 0 <= tabular["test_macro_f1"] <= 1
    assert summary["policy"]["divergence_rate"] is not None
    # The learning-rate level: per pair, the policy's mean learning rate over the intervals it ran
    # against the tuned cosine oracle's, from the runs' recorded schedules.
    oracle = summary["oracle_lr"]["cosine_tuned"]
    for row in ("policy", "cosine_tuned"):
        assert all(r["mean_lr"] > 0 for r in summary["per_run"][row])
    cos_means = [r["mean_lr"] for r in summary["per_run"]["cosine_tuned"]]
    for r, m in zip(summary["per_run"]["cosine_tuned"], cos_means):
        assert m < oracle[r["task_id"]]  # a cosine's mean lies below its peak
    ratios = [p["mean_lr"] / c for p, c in zip(summary["per_run"]["policy"], cos_means)]
    level = summary["policy"]["lr_level_vs_cosine_tuned"]
    assert level["pairs"] == 4 and level["median_ratio"] == pytest.approx(np.median(ratios))
    assert level["share_higher"] == pytest.approx(np.mean(np.array(ratios) > 1))
    assert level["by_family"]["tabular"]["pairs"] == 2
    report = result.report_path.read_text()
    assert "## Targets" in report and "cosine, tuned oracle (K=2)" in report and "## digits_cnn" in report
    assert "| beats both defaults |" in report
    # The oracle chosen on each task's other seed, scored on the same pairs; 2 tasks are too few for intervals.
    crossfit = summary["targets"]["vs_cosine_tuned_crossfit"]
    assert crossfit["pairs"] == 4 and crossfit["median_ratio_low"] <= crossfit["median_ratio_high"]
    assert "chosen on each task's other seeds" in report and "only 2 tasks: too few" in report
    # Where the targets are won or lost: every pair in one headroom bin, the section in the report.
    bins = summary["headroom_vs_cosine_tuned"]
    assert sum(b["pairs"] for b in bins) == 4 and sum(b["tasks"] for b in bins) == 2
    assert "## Where the targets are won or lost" in report and bins[0]["label"].removeprefix("defaults ") in report
    assert report.count("Learning-rate level: over a run, the policy's mean learning rate is a median") == 3
    assert {p.name for p in result.plot_paths} == {"curves_tabular.png", "curves_digits_cnn.png", "win_rates.png"}
    assert all(p.stat().st_size > 10_000 for p in result.plot_paths)

    # A rerun (through the command line) computes nothing and reports the same numbers.
    argv = ["--policy", str(tiny_bundle), "--families", "tabular,digits_cnn", "--tasks-per-family", "1",
            "--seeds", "2", "-K", "2", "--total-steps", "20", "--steps-per-action", "5", "--out", config.out,
            "--chunk-size", "8", "--bootstrap", "200", "--no-progress", "--no-plots"]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "0 runs computed" in printed and "(K = 2: too coarse for a tuned search, a smoke test)" in printed
    again = json.loads(result.json_path.read_text())
    assert again["rows"] == summary["rows"] and again["run"]["computed_runs"] == 0

    # Under another code version nothing is reused, and the warning says how to reuse the stored runs.
    monkeypatch.setattr(bench, "run_chunks", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    stale = dataclasses.replace(config, code_version="edited code")
    label, todo = bench.default_code_version("cpu", threads=1), total - 2 * 4  # the replays come later
    with pytest.warns(UserWarning, match=rf"{todo} of the {todo} runs to compute \(before any replay controls\) are "
                      rf"stored under another code version, '{re.escape(label)}', not under --code-version 'edited "
                      rf"code', .* pass --code-version '{re.escape(label)}'$") as warned:  # fmt: skip
        with pytest.raises(KeyboardInterrupt):
            bench.run_benchmark(stale)
    assert warned[0].filename == __file__  # it points at the call of run_benchmark
    monkeypatch.setattr(bench, "run_chunks", real_run_chunks)

    # Pooling reports (benchmarks/pool_reports.py): one report pooled alone keeps its statistics; the
    # same report twice would count its tasks twice, and a report of another policy does not pool.
    pool = load_script("benchmarks/pool_reports.py")
    pooled = pool.main([f"once={config.out}", "--headroom", "--json", str(tmp_path / "pooled.json")])["once"]
    rows_by_name = {r["name"]: r for r in summary["rows"]}
    assert pooled["pairs"] == 4
    with pytest.raises(ValueError, match="given twice"):
        pool.main([f"twice={config.out},{config.out}"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "benchmark.json").write_text(
        json.dumps({**json.loads(result.json_path.read_text()), "policy_fingerprint": "0123456789ab"})
    )
    with pytest.raises(ValueError, match="not made like the first report.*policy_fingerprint"):
        pool.main([f"mixed={config.out},{other}"])
    assert pooled["beats_both_untuned_defaults"] == pytest.approx(summary["targets"]["beats_both_untuned_defaults"])
    assert pooled["median_ratio_vs_cosine_tuned"] == pytest.approx(rows_by_name["cosine_tuned"]["all"]["median_ratio"])
    assert pooled["win_rate_vs_random"] == pytest.approx(rows_by_name["random"]["all"]["win_rate"])
    low, high = pooled["median_ratio_vs_cosine_tuned_ci95"]
    assert low <= pooled["median_ratio_vs_cosine_tuned"] <= high
    assert set(pooled["median_ratio_vs_cosine_tuned_by_family"]) == {"tabular", "digits_cnn"}
    assert pooled["lr_level_vs_cosine_tuned"]["median_ratio"] == pytest.approx(level["median_ratio"])
    strict = json.loads((tmp_path / "pooled.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert strict["once"]["pairs"] == 4
    assert pooled["headroom_vs_cosine_tuned"] == summary["headroom_vs_cosine_tuned"]
    printed = capsys.readouterr().out
    assert "once  pairs    4" in printed and f"{bins[0]['label']}: {bins[0]['tasks']} tasks" in printed
    # --descriptors: each task's parameter count and epochs as its model and data give them; with one
    # task per family there is no correlation to take (NaN, written to JSON as null).
    described = pool.main([f"once={config.out}", "--descriptors", "--json", str(tmp_path / "described.json")])
    d = described["once"]["task_descriptors"]
    assert d["tasks"] == 2 and set(d["family_means"]) == {"tabular", "digits_cnn"}
    for spec in tasks:
        data = build_splits(spec)
        means = d["family_means"][spec.family]
        assert 10 ** means["log10_params"] == pytest.approx(ModelLayout.build(spec, data).num_params)
        assert 10 ** means["log10_epochs"] == pytest.approx(spec.total_steps * spec.batch_size / len(data.x_train))
    assert math.isnan(d["correlations"]["log10_lr_over_oracle"]["log10_params"]["r"])
    strict = json.loads((tmp_path / "described.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert strict["once"]["task_descriptors"]["tracking"]["tabular"]["slope"] is None
    assert "lr level vs oracle ~ parameters n/a (tabular n/a, digits_cnn n/a)" in capsys.readouterr().out
    # --paired: a report against itself is level on every pair; against a copy whose policy lost 10%
    # more everywhere, it is lower on every pair at a ratio of 1/1.1.
    worse = tmp_path / "worse"
    worse.mkdir()
    doctored = json.loads(result.json_path.read_text())
    for r in doctored["per_run"]["policy"]:
        r["final_val_loss"] *= 1.1
    (worse / "benchmark.json").write_text(json.dumps(doctored))
    same = pool.main(["--paired", f"a={config.out}", f"b={config.out}"])["paired"]
    assert (same["a_lower"], same["ties"], same["median_ratio"], same["win_rate"]) == (0, 4, 1.0, 0.5)
    better = pool.main(["--paired", f"a={config.out}", f"b={worse}"])["paired"]
    assert better["a_lower"] == 4 and better["median_ratio"] == pytest.approx(1 / 1.1)
    assert better["geomean_ratio"] == pytest.approx(1 / 1.1) and "lower on 4 of 4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pool.main(["--paired", f"a={config.out}"])
    assert "--paired compares two policies; got 1 labels" in capsys.readouterr().err
    # --settings: the mean and spread over runs of one setting (here the report and its doctored copy,
    # whose geometric mean is 1.1x the report's).
    grouped = pool.main([f"a={config.out}", f"b={worse}", "--settings", "both=a,b", "--settings", "one=a"])["settings"]
    geo = grouped["both"]["geomean_ratio_vs_cosine_tuned"]
    assert geo["values"] == pytest.approx(
        [pooled["geomean_ratio_vs_cosine_tuned"], 1.1 * pooled["geomean_ratio_vs_cosine_tuned"]]
    )
    assert geo["mean"] == pytest.approx(1.05 * pooled["geomean_ratio_vs_cosine_tuned"])
    assert grouped["one"]["runs"] == 1 and grouped["one"]["geomean_ratio_vs_cosine_tuned"]["sd"] is None
    assert "both  2 runs  both" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pool.main([f"a={config.out}", "--settings", "x=a,nope"])
    assert "--settings x: unknown labels ['nope']; the labels given are ['a']" in capsys.readouterr().err
    copy = shutil.copytree(worse, tmp_path / "worse-copy")
    with pytest.raises(ValueError, match="share 2 task"):  # the same tasks twice
        pool.compare_policies([config.out], [worse, copy])
    renamed = json.loads((copy / "benchmark.json").read_text())
    for runs in renamed["per_run"].values():
        for r in runs:
            r["task_id"] += "-other"
    (copy / "benchmark.json").write_text(json.dumps(renamed))
    with pytest.raises(ValueError, match="same \\(task, seed\\) pairs"):
        pool.compare_policies([config.out], [worse, copy])
    with pytest.raises(FileNotFoundError, match="hpo-bench --out"):
        pool.pooled_summary([tmp_path])
    with pytest.raises(SystemExit):
        pool.main(["no-folders"])


def test_pool_reports_refuses_empty_repeated_or_reserved_labels_and_unreadable_reports(tmp_path, load_script, capsys):
    """Each mistake is a one-line usage error, not a traceback (``a=,``: KeyError 'policy') nor a silent
    drop (``a=X a=Y`` printed and wrote only Y; a label ``paired`` was overwritten by the comparison)."""
    pool = load_script("benchmarks/pool_reports.py")
    for argv, message in [
        (["a=,"], "expected LABEL=DIR[,DIR...], got 'a=,'"),
        ([f"a={tmp_path}", f"a={tmp_path}"], "labels ['a'] given more than once"),
        (["--paired", f"paired={tmp_path}", f"b={tmp_path}"], "labels ['paired'] name sections of the output"),
        ([f"a={tmp_path}", "--settings", "s=a", "--settings", "s=a"], "--settings names ['s'] given more than once"),
        ([f"a={tmp_path}", "--seed", "-1"], "argument --seed: must be an integer >= 0"),  # numpy's words, no flag
    ]:
        with pytest.raises(SystemExit) as exit_info:
            pool.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    cut, other = tmp_path / "cut", tmp_path / "other"
    for folder, text in ((cut, '{"per_run": {"pol'), (other, "[1, 2]")):
        folder.mkdir()
        (folder / "benchmark.json").write_text(text)
    with pytest.raises(ValueError, match=r"cut.benchmark\.json is not readable JSON \(.*\); is it an hpo-bench report"):
        pool.main([f"a={cut}"])
    with pytest.raises(ValueError, match=r"other.benchmark\.json has no per-run results of a policy"):
        pool.main([f"a={other}"])
    # A folder of reports (feature_ablation.py's --out) is not one: the message names the reports inside.
    with pytest.raises(FileNotFoundError, match=rf"; the reports inside it are {re.escape(str(cut))}, "):
        pool.main([f"a={tmp_path}"])


def test_benchmark_rejects_bad_settings(tiny_bundle, tmp_path, capsys):
    with pytest.raises(ValueError, match="split"):
        _tiny_config(tiny_bundle, tmp_path, split="holdout")
    with pytest.raises(ValueError, match="seeds"):
        _tiny_config(tiny_bundle, tmp_path, seeds=0)
    with pytest.raises(ValueError, match="multiple of the sampled steps_per_action"):
        bench.make_tasks(_tiny_config(tiny_bundle, tmp_path, total_steps=21, steps_per_action=None))
    assert bench.main(["--policy", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no policy bundle" in capsys.readouterr().err
    # Errors name the command line's options.
    assert bench.main(["--policy", str(tiny_bundle), "--task-seed", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "error: --task-seed must be an integer >= 0, got -1" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert bench.main(["--policy", str(tiny_bundle), "--out", str(blocker / "o"), "--no-progress"]) == 2
    assert "error: --out '" in (err := capsys.readouterr().err) and "cannot be created (Not a directory)" in err


def test_benchmark_says_when_a_policy_cannot_or_should_not_be_benchmarked(tiny_bundle, tmp_path):
    from agents import load_bundle

    bundle = load_bundle(tiny_bundle)
    no_lr = dataclasses.replace(bundle, decoder=ActionDecoder(("weight_decay",)))
    with pytest.raises(ValueError, match=r"needs a policy that controls lr; .* controls \['weight_decay'\]"):
        bench.run_benchmark(_tiny_config(tiny_bundle, tmp_path), policy=no_lr, policy_hash="x")
    assert bench.trained_families(bundle) == set()  # the toy task: no family of the benchmark's
    trained = dataclasses.replace(bundle, config={**bundle.config, "env": {"task_families": ["digits_mlp", "tabular"]}})
    assert bench.trained_families(trained) == {"digits_mlp", "tabular"}
    with pytest.warns(UserWarning, match=r"meta-trained on \['tabular'\], which this benchmark runs as held-out"):
        bench._warn_if_trained_on(trained, ("tabular", "digits_cnn"))
    split = dataclasses.replace(bundle, config={**bundle.config, "env": {"task_distribution": "all"}})
    assert bench.trained_families(split) >= {"tabular", "digits_cnn"}


def test_store_file_is_plain_sqlite(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.put_many([(RunKey("t", "s", 0, "v"), RunResult("tabular", final_val_loss=1.0))])
    rows = sqlite3.connect(tmp_path / "r.sqlite").execute("SELECT task_id, schedule, seed, code_version FROM runs")
    assert list(rows) == [("t", "s", 0, "v")]


def test_console_script_help():
    """``hpo-bench`` is installed next to the interpreter by ``pip install -e .``."""
    script = Path(sys.executable).parent / "hpo-bench"
    assert script.exists(), "hpo-bench is not installed: run pip install -e . -c constraints.txt"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--policy" in out and "--grid-size" in out and "Resumable" in out


@pytest.mark.parametrize(
    "flag, value, field, expected",
    [
        ("--grid-decades", "2.0", "grid_decades", 2.0),
        ("--hd-beta-sgd", "0.01", "hd_beta_sgd", 0.01),
        ("--hd-beta-adamw", "1e-7", "hd_beta_adamw", 1e-7),
        ("--code-version", "mine", "code_version", "mine"),
        ("--store", "s.sqlite", "store", "s.sqlite"),
        ("--threads", "2", "threads", 2),
        ("--task-seed", "3", "task_seed", 3),
        ("--chunk-size", "4", "chunk_size", 4),
        ("--workers", "2", "workers", 2),
    ],
)
def test_every_option_reaches_the_config(flag, value, field, expected):
    args = bench.build_parser().parse_args(["--policy", "default", flag, value])
    assert getattr(bench.config_from_args(args), field) == expected


@pytest.mark.parametrize("families", [["tabular", "digits_cnn"], ["tabular,digits_cnn"], ["tabular, digits_cnn"]])
def test_families_as_hpo_train_takes_them_or_comma_separated(families):
    args = bench.build_parser().parse_args(["--policy", "default", "--families", *families])
    assert bench.config_from_args(args).families == ("tabular", "digits_cnn")


def test_empty_or_repeated_families_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--policy", "default", "--families", ","])
    assert "--families needs at least one name, got ','" in capsys.readouterr().err
    args = bench.build_parser().parse_args(["--policy", "default", "--families", "tabular", "tabular"])
    with pytest.raises(ValueError, match=r"families must not repeat .* got \['tabular', 'tabular'\]"):
        bench.config_from_args(args)


def test_config_values_of_the_wrong_kind_are_refused_naming_them(tmp_path):
    def config(**kw):
        return bench.BenchmarkConfig(policy="p", out=str(tmp_path / "out"), **kw)

    # One family by name, as TaskDistribution takes it: not split into letters (which read as repeats, or as
    # unknown families once the bundle had loaded); an unknown name is refused here, with the choices.
    assert config(families="tabular").families == ("tabular",)
    with pytest.raises(ValueError, match=r"unknown task families \['tabx'\]; choose from \['teacher_regression'"):
        config(families=["tabx"])
    # Numbers: a string or None failed on '>=' with Python's message; a bool is no count.
    for name, value in (("grid_decades", "1.5"), ("hd_beta_sgd", None), ("hd_beta_adamw", "0")):
        with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got {re.escape(repr(value))}"):
            config(**{name: value})
    for name in ("seeds", "tasks_per_family", "seed", "total_steps"):
        with pytest.raises(ValueError, match=rf"{name} must be .*integer.*, got True"):
            config(**{name: True})
    assert config(seeds=np.int64(2), grid_decades=np.float32(1.0)).seeds == 2
    with pytest.raises(TypeError, match="config must be a BenchmarkConfig, got dict"):
        bench.run_benchmark({"policy": "default"})


def test_workers_store_the_runs_one_process_stores(tiny_bundle, tmp_path, monkeypatch):
    """Batch for batch the same runs, also where two arms share a key (an odd K's middle rate and the default)."""
    config = _tiny_config(tiny_bundle, tmp_path / "one", grid_size=7, grid_decades=0.9, chunk_size=3, threads=1)
    one = bench.run_benchmark(config)
    with monkeypatch.context() as m:  # every run, the replay controls' too, is trained in the (spawned) workers
        m.setattr(bench, "run_chunks", lambda *a, **k: pytest.fail("a run was trained in the main process"))
        two = bench.run_benchmark(dataclasses.replace(config, workers=2, threads=None, out=str(tmp_path / "two")))
    assert two.computed == one.computed and two.summary["code_version"] == one.summary["code_version"]
    untimed = [
        [{k: v for k, v in row.items() if k != "wall_s_per_run"} for row in r.summary["rows"]] for r in (one, two)
    ]
    assert untimed[0] == untimed[1]
    with ResultStore(tmp_path / "one" / "results.sqlite") as a, ResultStore(tmp_path / "two" / "results.sqlite") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert (
                dataclasses.replace(a.get(key), wall_s=0.0).to_json()
                == dataclasses.replace(b.get(key), wall_s=0.0).to_json()
            ), key

    # A worker's error reaches the caller (here: the bundle's hash is not the one the benchmark started with).
    code_version = bench.default_code_version("cpu", threads=1)
    _, _, _, jobs = bench._plan(config, load_bundle(tiny_bundle).decoder, "not-its-hash", code_version)
    with pytest.raises(ValueError, match="changed while the benchmark ran"):
        bench._run_in_workers(
            jobs[:4], dataclasses.replace(config, workers=2), code_version, "not-its-hash", bench._NoBar(), list
        )


def test_the_stale_runs_warning_says_what_changed():
    old = "hpo-meta 0.1.0, features 1, benchmark 1, code abc, torch 2.13.0+cpu, cpu, 2 threads"
    with pytest.warns(UserWarning, match=r"3 of the 5 runs to compute \(before any replay controls\) .*\('2 threads' then, '1 thread' now; runs under 1 more "
                      r"version\(s\) too\).* pass --threads 2 to reuse them$"):  # fmt: skip
        bench._warn_if_stale({old: 3, "v0": 1}, 5, old.replace("2 threads", "1 thread"))
    with pytest.warns(UserWarning, match=r"\('code abc' then, 'code def' now\).*--code-version 'hpo-meta.*2 threads'$"):
        bench._warn_if_stale({old: 3}, 3, old.replace("abc", "def"))
    # A --code-version label of the user's: no threads or code to blame, only the label to change.
    with pytest.warns(
        UserWarning, match=r"not under --code-version mylabel, .* pass --code-version 'hpo-meta.*2 threads'$"
    ):
        bench._warn_if_stale({old: 3}, 3, "mylabel", labelled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bench._warn_if_stale({}, 3, old)


def test_workers_refuse_an_in_memory_policy_and_a_bad_count(tiny_bundle, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        _tiny_config(tiny_bundle, tmp_path, workers=0)
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(ValueError, match="each worker process loads the policy from config.policy"):
        bench.run_benchmark(_tiny_config(tiny_bundle, tmp_path, workers=2), policy=bundle, policy_hash="abc")
    # More threads than cores: said, and run anyway.
    monkeypatch.setattr(bench, "available_cores", lambda: 2)
    config = _tiny_config(tiny_bundle, tmp_path / "out", workers=2, threads=2, tasks_per_family=1, seeds=1, grid_size=1)
    with pytest.warns(UserWarning, match=r"2 workers x 2 thread\(s\) on 2 available CPU core\(s\)"):
        bench.run_benchmark(config)


def test_a_bad_thread_count_is_refused_with_the_flags_name(capsys):
    assert bench.main(["--policy", "default", "--threads", "0"]) == 2
    assert "hpo-bench: error: --threads must be a positive integer" in capsys.readouterr().err


def test_random_policy_runs_are_stored_per_action_space():
    """A policy with other step sizes or hyperparameters gets its own random-policy control runs."""
    default = bench._decoder_tag(ActionDecoder(("lr", "weight_decay")))
    assert default == ""  # the default action space keeps the plain key (stores stay valid)
    tags = {
        bench._decoder_tag(ActionDecoder(("lr", "weight_decay"), max_log10_change={"lr": 0.5})),
        bench._decoder_tag(ActionDecoder(("lr",))),
        bench._decoder_tag(ActionDecoder(("lr", "weight_decay", "momentum"))),
    }
    assert len(tags) == 3 and "" not in tags


def test_feature_ablation_holds_features_and_compares_on_the_same_pairs(
    tiny_bundle, tmp_path, load_script, capsys, monkeypatch
):
    ablation = load_script("benchmarks/feature_ablation.py")
    bundle = load_bundle(tiny_bundle)
    held = ablation.HeldFeatures(bundle, ("log_val_loss", "log_train_loss"))
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3, bundle.obs_dim)).astype(np.float32)
    other = obs.copy()
    other[:, held.index] += 5.0  # only the held features differ: the policy cannot tell
    a, _ = held.predict(obs, None, None, deterministic=True)
    b, _ = held.predict(other, None, None, deterministic=True)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="needs a policy_hash"):
        bench.run_benchmark(_tiny_config(tiny_bundle, tmp_path / "x"), policy=held)

    out = tmp_path / "ablation"
    argv = ["--policy", str(tiny_bundle), "--families", "tabular,digits_cnn", "--tasks-per-family", "1",
            "--seeds", "2", "-K", "2", "--total-steps", "20", "--steps-per-action", "5", "--out", str(out),
            "--chunk-size", "8", "--bootstrap", "200", "--no-progress", "--no-plots",
            "--groups", "loss_level", "hp_position"]  # fmt: skip
    results = ablation.main(argv)
    assert list(results) == ["intact", "loss_level", "hp_position"]
    assert results["hp_position"]["features_held"] == ["lr_position", "weight_decay_position"]
    for label, s in results.items():
        assert s["pairs"] == 4 and (s["intact_win_rate"] is None) == (label == "intact")
    assert "intact wins" in capsys.readouterr().out
    with ResultStore(out / "results.sqlite") as store:  # one store: baselines once, one policy key per row
        policies = {k.schedule for k in store.keys() if k.schedule.startswith("policy@")}
        # per policy row: its runs and its two replay controls (all runs, per task) on the 4 pairs
        assert len(policies) == 3 and len(store) == 3 * 2 * 2 + 2 * 2 * (3 + 4 + 4 + 1 + 1) + 3 * 2 * 2 * 2
    assert json.loads((out / "ablation.json").read_text())["loss_level"]["pairs"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit):
        ablation.main([*argv[:-2], "no_such_group"])
    assert "unknown groups ['no_such_group']; choose from" in capsys.readouterr().err
    # An ensemble cannot hold features: refused before the intact benchmark runs (it ran it first).
    from agents import save_ensemble

    twin = shutil.copytree(tiny_bundle, tmp_path / "twin")
    ensemble = save_ensemble(tmp_path / "ensemble", [tiny_bundle, twin])
    monkeypatch.setattr(ablation, "run_benchmark", lambda *a, **k: pytest.fail("benchmarked before refusing"))
    with pytest.raises(ValueError, match="needs a single-policy bundle"):
        ablation.main(["--policy", str(ensemble), *argv[2:]])


def test_benchmark_runs_a_gradient_feature_policy_next_to_the_baselines(tiny_bundle, tmp_path):
    """Its batches observe the gradients, and every other arm sees the observations without them;
    measuring gradients does not change training, so the baselines' runs equal those of a benchmark
    of a plain policy."""
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.vec_env import VecNormalize

    from agents import save_bundle
    from hpo_env import HPOVecEnv

    env = VecNormalize(HPOVecEnv(2, "toy", seed=0, gradient_features=True), norm_reward=False)
    model = RecurrentPPO(
        "MlpLstmPolicy", env, n_steps=8, batch_size=16, n_epochs=1, seed=0,
        policy_kwargs=dict(lstm_hidden_size=8, net_arch=[8]), device="cpu",
    )  # fmt: skip
    model.learn(16)
    bundle = save_bundle(tmp_path / "g", model, env.venv.decoder, obs_rms=env.obs_rms, gradient_features=True)
    stores = {}
    for name, policy in (("grad", bundle), ("plain", tiny_bundle)):
        bench.run_benchmark(_tiny_config(policy, tmp_path / name, families=("tabular",), seeds=1))
        with ResultStore(tmp_path / name / "results.sqlite") as store:
            stores[name] = {k: store.get(k) for k in store.keys()}
    baselines = [k for k in stores["grad"] if not k.schedule.startswith(("policy@", "replay@", "replay_task@"))]
    assert len(baselines) > 5 and any(k.schedule.startswith("policy@") for k in stores["grad"])
    for key in baselines:
        assert stores["grad"][key].final_val_loss == stores["plain"][key].final_val_loss, key


def test_baseline_keys_tell_custom_bounds_apart_and_keep_the_default_keys():
    """Baselines clip their starting values to the policy's bounds, so a policy with other bounds must not
    reuse their stored runs; a default-bounded policy keeps the keys every existing store holds."""
    from agents.baselines import schedule_decoder
    from hpo_env import ActionDecoder, TaskDistribution

    spec = TaskDistribution.default("test").sample(np.random.default_rng(0))
    config = bench.BenchmarkConfig(policy="unused")

    def keys(decoder):
        arms = bench.task_arms(spec, config, schedule_decoder(decoder), "hash", decoder)
        return {a.row: a.key for a in arms if a.kind in ("schedule", "hypergradient")}

    default = keys(ActionDecoder())
    assert default["constant_default"] == f"constant@lr={bench._fmt_lr(1e-3 if spec.optimizer == 'adamw' else 1e-2)}"
    assert keys(ActionDecoder(("lr", "weight_decay", "momentum"))) == default  # default bounds: shared runs
    custom = keys(ActionDecoder(bounds={"lr": (2e-5, 0.5)}))
    tag = custom["step_decay"][custom["step_decay"].index("@bounds=") :]
    assert len(tag) == len("@bounds=") + 10 and all(key.endswith(tag) for key in custom.values())
    # A grid that leaves the bounds would run its end rates at the bound under their own names: refused.
    with pytest.raises(ValueError, match=r"learning rates \[.*\] lie outside the policy's learning-rate bounds"):
        keys(ActionDecoder(bounds={"lr": (1e-4, 0.1)}))
    wide = bench.BenchmarkConfig(policy="unused", grid_decades=3.0)
    with pytest.raises(ValueError, match="Narrow --grid-decades \\(now 3\\)"):
        bench.task_arms(spec, wide, schedule_decoder(ActionDecoder()), "hash", ActionDecoder())


def test_lr_gain_sweep_scales_the_rates_and_compares_pair_by_pair(tiny_bundle, tmp_path, load_script, capsys):
    sweep = load_script("benchmarks/lr_gain_sweep.py")
    assert sweep.check_gains([2, 0.5, 2]) == [0.5, 1.0, 2.0]  # 1 (the policy as deployed) is always there
    with pytest.raises(ValueError, match="positive finite"):
        sweep.check_gains([0.0, 2.0])

    out = tmp_path / "sweep"
    argv = ["--policy", str(tiny_bundle), "--families", "tabular,digits_cnn", "--tasks-per-family", "1",
            "--seeds", "2", "--gains", "0.25", "4", "--total-steps", "20", "--steps-per-action", "5",
            "--out", str(out), "--bootstrap", "200", "--no-progress"]  # fmt: skip
    rows = sweep.main(argv)
    assert [r["gain"] for r in rows] == [0.25, 1.0, 4.0]
    raw = json.loads((out / "lr_gain_sweep.json").read_text())
    assert len(raw["pairs"]) == 4 and (out / "lr_gain_sweep.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "the policy as deployed" in printed and "tabular" in printed
    assert raw["computed_runs"] == 12 and raw["reused_runs"] == 0

    # Every run is in the store: a rerun with one more gain computes only that gain's four runs.
    rows_again = sweep.main([*argv[:-1], "--gains", "0.25", "4", "2", "--no-progress"])
    again = json.loads((out / "lr_gain_sweep.json").read_text())
    assert again["computed_runs"] == 4 and again["reused_runs"] == 12
    assert again["losses"]["4.0"] == raw["losses"]["4.0"] and [r["gain"] for r in rows_again] == [0.25, 1.0, 2.0, 4.0]
    with ResultStore(out / "results.sqlite") as store:  # gain 1 under hpo-bench's policy key: a bench store serves it
        policy_key = f"policy@{bench.bundle_fingerprint(tiny_bundle)}"
        assert {k.schedule for k in store.keys()} == {policy_key, *(f"{policy_key}|lr_gain={g}" for g in (0.25, 2, 4))}

    # Gain 1 is the policy as deployed: the same final losses as a plain run of the same pairs.
    config = _tiny_config(tiny_bundle, tmp_path / "plain", task_seed=7)  # the sweep's default task seed
    bundle = load_bundle(tiny_bundle)
    specs = [bench.seeded(t, s) for t in bench.make_tasks(config) for s in range(2)]
    plain = [r.final_val_loss for r in run_episodes(bundle, specs, bundle.decoder)]
    np.testing.assert_allclose(raw["losses"]["1.0"], plain, rtol=1e-6)
    # A gain changes the inner training (the optimiser steps with the scaled rate), not only the label.
    assert not np.allclose(raw["losses"]["4.0"], plain)

    # The comparison is paired: a gain whose runs end at half the loss on every pair wins all of them.
    hand = {"pairs": [{"task": t, "seed": s, "family": f} for t, f in ((0, "a"), (1, "b")) for s in (0, 1)],
            "losses": {"1.0": [1.0, 2.0, 3.0, 4.0], "2.0": [0.5, 1.0, 1.5, float("nan")]}}  # fmt: skip
    row = sweep.summarise(hand, n_boot=100)[1]
    assert row["gain"] == 2.0 and row["diverged"] == 1 and row["win_rate"] == 0.75
    assert row["family_median_ratio"]["a"] == 0.5 and row["geomean_ratio"] == pytest.approx(0.5)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sweep.main([*argv[:-1], "--families", "no_such_family"])
    assert "unknown task families ['no_such_family']" in capsys.readouterr().err
    # hpo-bench's options that the sweep does not use are refused, not silently ignored, and not in --help.
    with pytest.raises(SystemExit):
        sweep.main([*argv, "-K", "16", "--workers", "2"])
    assert "lr_gain_sweep.py does not use --grid-size, --workers: it trains no oracle grid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--help"])
    assert "--grid-size" not in capsys.readouterr().out


def test_bad_output_folder_and_device_are_usage_errors(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is a file; the benchmark writes a folder"):
        bench.BenchmarkConfig(policy="unused", out=str(tmp_path / "a-file"))
    with pytest.raises(ValueError, match="device='foo' is not a torch device"):
        bench.BenchmarkConfig(policy="unused", device="foo")
    with pytest.raises(ValueError, match="grid_decades=0 makes the K=2 grid one learning rate 2 times"):
        bench.BenchmarkConfig(policy="unused", grid_size=2, grid_decades=0.0)
    assert bench.BenchmarkConfig(policy="unused", grid_size=1, grid_decades=0.0).grid_size == 1
    assert bench.main(["--policy", "unused", "--out", str(tmp_path / "a-file")]) == 2
    assert "hpo-bench: error: --out '" in capsys.readouterr().err
    assert bench.main(["--policy", "no-such-policy", "--out", str(tmp_path / "out")]) == 2
    assert "'no-such-policy' is not a policy bundle directory, and no policy named" in capsys.readouterr().err


def test_a_shipped_policy_is_benchmarked_by_name():
    from agents import default_policy_path

    args = bench.build_parser().parse_args(["--policy", "default"])
    assert bench.config_from_args(args).policy == str(default_policy_path("default"))
    assert "(default: 5)" in " ".join(bench.build_parser().format_help().split()), "--help shows the defaults"


def test_a_numpy_thread_count_runs():
    with torch_threads(np.int64(1)) as n:
        assert n == 1 == torch.get_num_threads()


def test_the_progress_bar_knows_its_total_from_the_start(tiny_bundle, tmp_path, monkeypatch):
    """The replay controls' runs exist only once the policy's have run; the bar counts them from the start."""
    import tqdm.auto

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.first_total = kwargs["total"]
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    result = bench.run_benchmark(_tiny_config(tiny_bundle, tmp_path, families=("tabular",), seeds=1, progress=True))
    (bar,) = bars
    assert bar.first_total == bar.total == result.computed > 0


def test_plots_leave_the_callers_matplotlib_backend_and_figures_alone(tiny_bundle, tmp_path):
    """A notebook that runs the benchmark keeps its own backend (its plots keep showing) and figures."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        result = bench.run_benchmark(_tiny_config(tiny_bundle, tmp_path, families=("tabular",), seeds=1))
        assert [p.name for p in result.plot_paths] == ["curves_tabular.png", "win_rates.png"]
        assert all(p.stat().st_size > 0 for p in result.plot_paths)
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize(("low", "high"), [(0.82, 1.35), (1.6, 3.0)])
def test_narrow_log_axes_label_round_numbers_across_their_range(low, high):
    """A ratio axis from 0.82 to 1.35 used to be labelled only 0.9 and 1, and a loss axis from 1.6 to 3 only 2
    and 3: nothing said where the upper half of the intervals ended."""
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    ax.plot([low, high], [0, 1])
    ax.set_xscale("log")
    bench._plain_log_ticks(ax.xaxis, [low, high])
    ax.figure.canvas.draw()
    vmin, vmax = ax.get_xlim()
    labelled = [
        float(t.get_text()) for t in ax.get_xticklabels() if t.get_text() and vmin <= t.get_position()[0] <= vmax
    ]
    assert len(labelled) >= 3
    assert min(labelled) < low * 1.3 and max(labelled) > high / 1.3  # both ends can be read off the axis
    assert not [t for t in ax.xaxis.get_minorticklabels() if t.get_text()]
