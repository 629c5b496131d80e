"""Pooling ``hpo-bench`` reports over task sets (``training.pooling``), on two hand-made reports.

The end-to-end benchmark test makes only one report, so this checks what pooling adds: pairs of
several sets counted together, tasks told apart by set (bootstrap clusters are (set, task)), and the
refusals that keep a pooled number honest (the same report, or the same tasks, twice).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from training import pooling
from training.pooling import load_pairs, pooled_summary, settings_summary


def _write_report(folder: Path, losses: dict[str, list[float]], task_ids: list[str], **extra) -> Path:
    """A ``benchmark.json`` holding only what pooling reads; ``inf`` marks a diverged run."""
    folder.mkdir()
    families = ["tabular" if t.startswith("tab") else "digits_cnn" for t in task_ids]
    per_run = {
        row: [
            {"task_id": t, "family": f, "diverged": not np.isfinite(x), "final_val_loss": None if np.isinf(x) else x}
            for t, f, x in zip(task_ids, families, values)
        ]
        for row, values in losses.items()
    }
    report = {"per_run": per_run, "policy_fingerprint": "abc", "config": {"grid_size": 8}, "code_version": "v"}
    (folder / "benchmark.json").write_text(json.dumps({**report, **extra}))
    return folder


@pytest.fixture
def two_sets(tmp_path):
    # Set A: two tasks x two seeds; set B: one more tabular task (another task seed's draw).
    a_ids = ["tab-0", "tab-0", "cnn-0", "cnn-0"]
    a = {
        "policy": [1.0, 2.0, 0.5, float("inf")],
        "constant_default": [2.0, 3.0, 0.6, 1.0],
        "cosine_default": [1.5, 1.0, 0.7, 1.0],
        "cosine_tuned": [1.0, 1.0, 1.0, 1.0],
        "constant_tuned": [2.0, 2.0, 2.0, 2.0],
        "random": [3.0, 1.0, 0.5, 1.0],
        "replay": [0.5, 3.0, 0.6, 0.9],
    }
    b_ids = ["tab-1", "tab-1"]
    b = {
        "policy": [0.9, 1.2],
        "constant_default": [1.0, 1.0],
        "cosine_default": [1.0, 1.0],
        "cosine_tuned": [1.0, 1.0],
        "constant_tuned": [1.0, 1.0],
        "random": [1.0, 1.0],
        "replay": [1.0, 1.0],
    }
    return _write_report(tmp_path / "a", a, a_ids), _write_report(tmp_path / "b", b, b_ids)


def test_pooled_numbers_are_those_of_all_pairs_together(two_sets):
    s = pooled_summary(list(two_sets), n_boot=500)
    assert s["pairs"] == 6
    # Beats both untuned defaults strictly: pairs 0 (1 < 2, 1.5), 2 (0.5 < 0.6, 0.7) and 4 (0.9 < 1, 1).
    assert s["beats_both_untuned_defaults"] == pytest.approx(3 / 6)
    ratios = np.array([1.0, 2.0, 0.5, np.inf, 0.9, 1.2])
    assert s["median_ratio_vs_cosine_tuned"] == pytest.approx(np.median(ratios))
    # Over the pairs where neither side alone diverged (the divergence is counted by the divergence rate).
    finite = ratios[np.isfinite(ratios)]
    assert s["geomean_ratio_vs_cosine_tuned"] == pytest.approx(np.exp(np.mean(np.log(finite))))
    assert s["policy_divergence_rate"] == pytest.approx(1 / 6)
    # tabular: 1.0, 2.0 (set A) and 0.9, 1.2 (set B); digits_cnn: 0.5 and a divergence.
    assert s["median_ratio_vs_cosine_tuned_by_family"] == {"tabular": pytest.approx(1.1), "digits_cnn": np.inf}
    # Wins (ties half) against random: 1, 0, 0.5, 0, 1, 0 -> 2.5 / 6; against replay: 0, 1, 1, 0, 1, 0.
    assert s["win_rate_vs_random"] == pytest.approx(2.5 / 6)
    assert s["win_rate_vs_replay"] == pytest.approx(3 / 6)
    assert s["win_rate_vs_replay_task"] is None  # reports made before that control existed
    assert s["policy_divergence_rate"] == pytest.approx(1 / 6)
    low, high = s["median_ratio_vs_cosine_tuned_ci95"]
    assert low <= s["median_ratio_vs_cosine_tuned"] <= high
    # Headroom per (set, task): set A's "tab-0" (best defaults 1.5, 1.0 against the oracle's 1.0: 22%
    # behind) and set B's "tab-1" (1.0, 1.0) in different bins; "cnn-0" (0.6, 1.0).
    bins = {b["label"]: (b["tasks"], b["pairs"]) for b in s["headroom_vs_cosine_tuned"]}
    assert bins == {
        "defaults at most 2% behind the oracle, or ahead of it": (2, 4),
        "defaults more than 10% behind the oracle": (1, 2),
    }


def test_bootstrap_clusters_are_the_tasks_of_each_set(two_sets):
    groups = load_pairs(list(two_sets))["policy"]["groups"]
    assert groups == ["0:tab-0", "0:tab-0", "0:cnn-0", "0:cnn-0", "1:tab-1", "1:tab-1"]
    assert len(set(groups)) == 3


def test_the_same_tasks_in_two_reports_are_refused(two_sets, tmp_path):
    """A rerun into another --out, or a set made with a forgotten --task-seed: its pairs would count twice."""
    a, _ = two_sets
    shutil.copytree(a, tmp_path / "rerun")
    with pytest.raises(ValueError, match=r"share 2 task\(s\), e\.g\. 'cnn-0'.*--task-seed"):
        load_pairs([a, tmp_path / "rerun"])


def test_pooling_refuses_reports_that_do_not_belong_together(two_sets, tmp_path):
    a, b = two_sets
    # Reports of another grid (or policy, or code version) measure something else.
    other = json.loads((b / "benchmark.json").read_text())
    other["config"]["grid_size"] = 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "benchmark.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="grid_size"):
        load_pairs([a, tmp_path / "other"])
    # A report without a row the others have.
    del other["per_run"]["replay"]
    other["config"]["grid_size"] = 8
    (tmp_path / "other" / "benchmark.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="holds rows"):
        load_pairs([a, tmp_path / "other"])
    # A row that does not cover the policy's pairs in order.
    broken = json.loads((b / "benchmark.json").read_text())
    broken["per_run"]["random"] = broken["per_run"]["random"][::-1]
    broken["per_run"]["random"][0]["task_id"] = "tab-9"
    (tmp_path / "other" / "benchmark.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'random' does not cover"):
        load_pairs([a, tmp_path / "other"])
    with pytest.raises(ValueError, match="given twice"):
        load_pairs([a, b, a])


def test_pooled_learning_rate_level_reads_the_mean_rates_and_skips_reports_without_them(tmp_path):
    ids = ["tab-0", "tab-0", "cnn-0", "cnn-0"]
    losses = {row: [1.0] * 4 for row in ("policy", "constant_default", "cosine_default", "cosine_tuned",
                                         "constant_tuned", "random", "replay")}  # fmt: skip
    with_lr = _write_report(tmp_path / "a", losses, ids)
    report = json.loads((with_lr / "benchmark.json").read_text())
    for row, rates in (("policy", [0.2, 0.3, 0.05, 0.1]), ("cosine_tuned", [0.1, 0.1, 0.1, 0.1])):
        for run, rate in zip(report["per_run"][row], rates):
            run["mean_lr"] = rate
    (with_lr / "benchmark.json").write_text(json.dumps(report))
    without = _write_report(tmp_path / "b", {row: v[:2] for row, v in losses.items()}, ["tab-1", "tab-1"])  # older

    level = pooled_summary([with_lr, without], n_boot=100)["lr_level_vs_cosine_tuned"]
    # Ratios 2, 3 (tabular) and 0.5, 1 (digits_cnn); the older report's two pairs have no rates.
    assert level["pairs"] == 4 and level["median_ratio"] == pytest.approx(1.5)
    assert level["share_higher"] == pytest.approx(2 / 4)
    assert level["by_family"]["tabular"]["median_ratio"] == pytest.approx(2.5)
    assert level["by_family"]["digits_cnn"] == {"median_ratio": pytest.approx(0.75), "share_higher": 0.0, "pairs": 2}


def test_settings_summary_is_the_mean_and_spread_over_runs():
    runs = [
        {
            "pairs": 200,
            "beats_both_untuned_defaults": b,
            "median_ratio_vs_cosine_tuned": m,
            "geomean_ratio_vs_cosine_tuned": g,
        }
        for b, m, g in [(0.655, 1.015, 1.019), (0.56, 1.019, 1.025), (0.55, 1.019, 1.022), (0.585, 1.017, 1.037)]
    ]
    s = settings_summary(runs)
    assert (s["runs"], s["pairs"]) == (4, 200)
    assert s["beats_both_untuned_defaults"]["mean"] == pytest.approx(0.5875)
    assert s["beats_both_untuned_defaults"]["sd"] == pytest.approx(np.std([0.655, 0.56, 0.55, 0.585], ddof=1))
    assert s["median_ratio_vs_cosine_tuned"]["values"] == [1.015, 1.019, 1.019, 1.017]
    assert s["geomean_ratio_vs_cosine_tuned"]["mean"] == pytest.approx(1.02575)
    assert settings_summary(runs[:1])["median_ratio_vs_cosine_tuned"]["sd"] is None  # one run has no spread
    with pytest.raises(ValueError, match="same task sets"):
        settings_summary([runs[0], {**runs[1], "pairs": 80}])
    with pytest.raises(ValueError, match="at least one run"):
        settings_summary([])


def test_descriptor_summary_says_how_far_the_policy_follows_the_oracle(monkeypatch):
    # Four tasks per family; the policy moves half as far from the start as the oracle on "a", as far on
    # "b". Its level against the oracle then falls as the oracle rises on "a" (-1 correlation) and is
    # flat on "b", and the parameter count varies with neither.
    oracle = np.array([-1.0, 0.0, 1.0, 2.0, -1.0, 0.0, 1.0, 2.0])
    policy = np.concatenate([0.5 * oracle[:4], oracle[4:] + 0.1])
    level = policy - oracle
    level[4:] += np.array([0.01, -0.01, 0.01, -0.01])  # so that "b"'s level is not a constant
    fake = {
        "tasks": np.array([f"0:t{i}" for i in range(8)]),
        "families": np.array(["a"] * 4 + ["b"] * 4),
        "log10_params": np.array([3.0, 4.0, 4.0, 3.0, 3.0, 4.0, 4.0, 3.0]),
        "log10_epochs": np.arange(8.0),
        "log10_oracle_lr_over_start": oracle,
        "log10_lr_over_oracle": level,
        "log_loss_over_oracle": np.zeros(8),
    }
    monkeypatch.setattr(pooling, "task_descriptors", lambda folders: fake)
    s = pooling.descriptor_summary(["unused"])
    assert s["tasks"] == 8
    assert s["tracking"]["a"]["slope"] == pytest.approx(0.5) and s["tracking"]["a"]["r"] == pytest.approx(1.0)
    assert s["tracking"]["a"]["reverse_slope"] == pytest.approx(2.0)  # the oracle moves twice as far
    assert s["tracking"]["b"]["slope"] == pytest.approx(1.0, abs=0.02)
    c = s["correlations"]["log10_lr_over_oracle"]
    assert c["log10_oracle_lr_over_start"]["by_family"]["a"]["r"] == pytest.approx(-1.0)
    assert c["log10_params"]["by_family"]["a"]["r"] == pytest.approx(0.0, abs=1e-12)
    # A loss ratio that never varies has no correlation with anything.
    assert np.isnan(s["correlations"]["log_loss_over_oracle"]["log10_params"]["r"])
    assert s["family_means"]["a"]["log10_lr_over_oracle"] == pytest.approx(np.mean(level[:4]))


def test_descriptor_lines_of_reports_without_learning_rates(monkeypatch, load_script):
    # Reports from before learning rates were recorded: every lr level is NaN, so those correlations
    # have no task at all, and their line says n/a without an empty "()" for the families.
    fake = {
        "tasks": np.array([f"0:t{i}" for i in range(6)]),
        "families": np.array(["a"] * 3 + ["b"] * 3),
        "log10_params": np.array([3.0, 4.0, 5.0, 3.0, 4.0, 5.0]),
        "log10_epochs": np.arange(6.0),
        "log10_oracle_lr_over_start": np.full(6, np.nan),
        "log10_lr_over_oracle": np.full(6, np.nan),
        "log_loss_over_oracle": np.array([0.1, 0.0, 0.2, 0.3, 0.1, 0.2]),
    }
    monkeypatch.setattr(pooling, "task_descriptors", lambda folders: fake)
    lines = load_script("benchmarks/pool_reports.py")._descriptor_lines(pooling.descriptor_summary(["unused"]))
    assert "()" not in "\n".join(lines)
    assert lines[1].startswith("  lr level vs oracle ~ parameters n/a; epochs n/a;")
    assert "parameters +" in lines[2] and "(a " in lines[2]  # the loss ratio still has both families


def test_descriptors_need_reports_that_list_their_tasks(two_sets):
    with pytest.raises(ValueError, match="does not list its tasks; rerun hpo-bench"):
        pooling.task_descriptors(list(two_sets))


def test_a_run_without_a_learning_rate_reads_as_nan(two_sets):
    # hpo-bench writes a NaN mean learning rate as null (its JSON has no NaN).
    path = two_sets[0] / "benchmark.json"
    report = json.loads(path.read_text())
    for runs in report["per_run"].values():
        for r in runs:
            r["mean_lr"] = None
    path.write_text(json.dumps(report))
    assert np.isnan(load_pairs([two_sets[0]])["policy"]["mean_lr"]).all()
