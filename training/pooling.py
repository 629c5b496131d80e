"""Pool the ``benchmark.json`` reports of one policy over several task sets (or compare reports pair by pair).

One task set of 40-80 pairs is noisy, so meta-training levers are compared on the pairs of several
task sets at once; tasks are told apart by set, so the cluster bootstrap resamples whole (set, task)
groups, as ``hpo-bench`` does within one set. ``benchmarks/pool_reports.py`` is the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hpo_env.data import build_splits
from hpo_env.models import ModelLayout
from hpo_env.tasks import TaskSpec
from training.benchmark import UNTUNED_DEFAULTS
from training.stats import (
    beats_all_rate,
    bootstrap_ci,
    geomean_ratio,
    headroom,
    loss_ratios,
    lr_level,
    median_ratio,
    paired_comparison,
    win_rate,
    within_family_correlation,
)

__all__ = [
    "DESCRIPTORS",
    "OUTCOMES",
    "compare_policies",
    "descriptor_summary",
    "load_pairs",
    "pooled_summary",
    "settings_summary",
    "task_descriptors",
]


def load_pairs(folders: list[str | Path]) -> dict[str, dict]:
    """Per row (``policy``, ``cosine_tuned``...), pooled losses, families and (set, task) groups.

    Raises:
        FileNotFoundError: a folder without ``benchmark.json``.
        ValueError: the reports do not hold the same rows, a report is given twice or is not an
            ``hpo-bench`` one, two reports share tasks, or the reports differ in policy, grid or
            code version.
    """
    pooled: dict[str, dict] = {}
    seen: dict[Path, str] = {}
    task_sets: dict[str, set[str]] = {}
    first: dict[str, object] | None = None
    for k, folder in enumerate(folders):
        path = Path(folder) / "benchmark.json"
        if not path.is_file():
            # feature_ablation.py's --out holds one report per row: name them.
            inside = sorted(str(p.parent) for p in Path(folder).glob("*/benchmark.json"))
            raise FileNotFoundError(
                f"{path} not found: pass folders written by `hpo-bench --out FOLDER`"
                + (f"; the reports inside it are {', '.join(inside)}" if inside else "")
            )
        if path.resolve() in seen:
            # Its tasks would count twice as independent ones and narrow the interval.
            raise ValueError(f"{folder} is given twice (also as {seen[path.resolve()]}); pool each report once")
        seen[path.resolve()] = str(folder)
        try:
            report = json.loads(path.read_text())
        except ValueError as err:  # a report cut short (a copy interrupted, a full disk) or another file
            raise ValueError(f"{path} is not readable JSON ({err}); is it an hpo-bench report?") from err
        per_run = report.get("per_run") if isinstance(report, dict) else None
        if not isinstance(per_run, dict) or "policy" not in per_run:
            raise ValueError(f"{path} has no per-run results of a policy; is it an hpo-bench report?")
        # One policy, measured the same way: same bundle, grid and code version in every report.
        identity = {
            "policy_fingerprint": report.get("policy_fingerprint"),
            "grid_size": (report.get("config") or {}).get("grid_size"),
            "grid_decades": (report.get("config") or {}).get("grid_decades"),
            "code_version": report.get("code_version"),
        }
        if first is None:
            first = identity
        elif identity != first:
            differs = {key: (first[key], identity[key]) for key in identity if identity[key] != first[key]}
            raise ValueError(
                f"{path} was not made like the first report (first, this): {differs}; pool the reports of one "
                "policy, benchmarked with the same grid and code"
            )
        if pooled and set(per_run) != set(pooled):
            raise ValueError(f"{path} holds rows {sorted(per_run)}, the first report {sorted(pooled)}")
        # The same tasks in two folders (a rerun into another --out, a forgotten --task-seed) would also
        # count twice as independent ones.
        tasks = {r["task_id"] for r in per_run["policy"]}
        for other, other_tasks in task_sets.items():
            if tasks & other_tasks:
                raise ValueError(
                    f"{folder} and {other} share {len(tasks & other_tasks)} task(s), e.g. "
                    f"{sorted(tasks & other_tasks)[0]!r}; pool reports of disjoint task sets (hpo-bench --task-seed)"
                )
        task_sets[str(folder)] = tasks
        for row, runs in per_run.items():
            entry = pooled.setdefault(row, {"losses": [], "families": [], "groups": [], "mean_lr": []})
            for r in runs:
                entry["losses"].append(np.inf if r["diverged"] else float(r["final_val_loss"]))
                # Reports made before the learning-rate level existed have no mean_lr: NaN, left out.
                # A run that recorded none is written as null (hpo-bench's JSON has no NaN).
                mean_lr = r.get("mean_lr")
                entry["mean_lr"].append(np.nan if mean_lr is None else float(mean_lr))
                entry["families"].append(r["family"])
                entry["groups"].append(f"{k}:{r['task_id']}")
    for row, entry in pooled.items():
        if entry["groups"] != pooled["policy"]["groups"]:
            raise ValueError(f"row {row!r} does not cover the policy's (task, seed) pairs in the same order")
        entry["losses"] = np.asarray(entry["losses"], dtype=np.float64)
        entry["mean_lr"] = np.asarray(entry["mean_lr"], dtype=np.float64)
    return pooled


def pooled_summary(folders: list[str | Path], *, seed: int = 0, n_boot: int = 2000) -> dict:
    """The pooled headline numbers of one policy's reports (see the module docstring)."""
    rows = load_pairs(folders)
    policy = rows["policy"]["losses"]
    groups, families = rows["policy"]["groups"], np.asarray(rows["policy"]["families"])
    untuned = [rows[name]["losses"] for name in UNTUNED_DEFAULTS]
    ratios = loss_ratios(policy, rows["cosine_tuned"]["losses"])
    low, high = bootstrap_ci(ratios, rng=np.random.default_rng(seed), groups=groups, n_boot=n_boot)
    return {
        "reports": [str(f) for f in folders],
        "pairs": int(policy.size),
        "beats_both_untuned_defaults": beats_all_rate(policy, untuned),
        "median_ratio_vs_cosine_tuned": float(np.median(ratios)),
        "median_ratio_vs_cosine_tuned_ci95": [low, high],
        "geomean_ratio_vs_cosine_tuned": geomean_ratio(ratios),
        "median_ratio_vs_cosine_tuned_by_family": {
            fam: float(np.median(ratios[families == fam])) for fam in dict.fromkeys(families.tolist())
        },
        "median_ratio_vs_constant_tuned": median_ratio(policy, rows["constant_tuned"]["losses"]),
        "win_rate_vs_random": win_rate(policy, rows["random"]["losses"]),
        "win_rate_vs_replay": win_rate(policy, rows["replay"]["losses"]),
        # Reports made before the per-task replay control existed have no such row.
        "win_rate_vs_replay_task": win_rate(policy, rows["replay_task"]["losses"]) if "replay_task" in rows else None,
        "policy_divergence_rate": float(np.isinf(policy).mean()),
        "lr_level_vs_cosine_tuned": lr_level(rows["policy"]["mean_lr"], rows["cosine_tuned"]["mean_lr"], families),
        "headroom_vs_cosine_tuned": headroom(policy, rows["cosine_tuned"]["losses"], untuned, groups),
    }


def compare_policies(
    folders_a: list[str | Path], folders_b: list[str | Path], *, seed: int = 0, n_boot: int = 2000
) -> dict:
    """Two policies' reports on the same task sets, compared pair by pair (A over B).

    Made for two policies of one run (e.g. ``hpo-average``'s against the final one) or two runs: on the
    same (task, seed) pairs, how often A's final validation loss is lower, A's win rate and the median of
    A's loss over B's (:func:`training.stats.paired_comparison`, with 95% cluster-bootstrap intervals
    over (set, task)), and the geometric mean and the largest of those ratios.

    Raises:
        ValueError: the two lists do not cover the same (task, seed) pairs in the same order.
    """
    a, b = load_pairs(folders_a)["policy"], load_pairs(folders_b)["policy"]
    if a["groups"] != b["groups"] or a["families"] != b["families"]:
        raise ValueError(
            "the two policies' reports do not cover the same (task, seed) pairs in the same order: pass the "
            "reports of the same task sets, in the same order, for both"
        )
    ratios = loss_ratios(a["losses"], b["losses"])
    stats = paired_comparison(
        a["losses"], b["losses"], rng=np.random.default_rng(seed), groups=a["groups"], n_boot=n_boot
    )
    return {
        **stats,
        "a_lower": int(np.sum(a["losses"] < b["losses"])),
        "ties": int(np.sum(a["losses"] == b["losses"])),
        "geomean_ratio": geomean_ratio(ratios),
        "max_ratio": float(np.max(ratios)),
    }


#: The pooled numbers that :func:`settings_summary` averages over the runs of one setting.
SETTINGS_KEYS = ("beats_both_untuned_defaults", "median_ratio_vs_cosine_tuned", "geomean_ratio_vs_cosine_tuned")


def settings_summary(summaries: list[dict]) -> dict:
    """Mean and spread over meta-training runs (seeds) of one setting, from their :func:`pooled_summary`.

    Two runs of the same command can land far apart (the shipped settings' four seeds beat both untuned
    defaults on 55.0-65.5% of the same 200 pairs), so a lever is judged by its runs' mean against the
    spread of one run, not by one run. For each of :data:`SETTINGS_KEYS`: the runs' values, their mean
    and their sample standard deviation (``None`` for a single run).

    Raises:
        ValueError: no summaries, or runs pooled over different numbers of pairs (different task sets).
    """
    if not summaries:
        raise ValueError("settings_summary needs the pooled summary of at least one run")
    pairs = {s["pairs"] for s in summaries}
    if len(pairs) != 1:
        raise ValueError(
            f"the runs of one setting must be pooled over the same task sets; got pair counts {sorted(pairs)}"
        )
    out: dict = {"runs": len(summaries), "pairs": pairs.pop()}
    for key in SETTINGS_KEYS:
        values = np.array([s[key] for s in summaries], dtype=float)
        out[key] = {
            "values": values.tolist(),
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if values.size > 1 else None,
        }
    return out


#: What :func:`task_descriptors` records of each task: two things known before training it (the model's
#: parameter count, and how many passes over its training set the run makes), and, as a diagnostic that
#: no policy could observe, where the tuned cosine oracle's learning rate (its mean over the run) sits
#: relative to the rate the run starts at.
DESCRIPTORS = ("log10_params", "log10_epochs", "log10_oracle_lr_over_start")
#: How the policy did on each task against the tuned cosine oracle, over the task's seeds: the mean of
#: ``log10`` of its mean learning rate over the oracle's (above 0: it ran hotter), and the mean log
#: ratio of final validation losses (above 0: it ended worse; pairs where either diverged left out).
OUTCOMES = ("log10_lr_over_oracle", "log_loss_over_oracle")


def _report_tasks(folder: str | Path) -> list[dict]:
    path = Path(folder) / "benchmark.json"
    tasks = json.loads(path.read_text()).get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "task_id" in t for t in tasks):
        raise ValueError(f"{path} does not list its tasks; rerun hpo-bench to write a report that does")
    return tasks


def task_descriptors(folders: list[str | Path]) -> dict:
    """Per task of one policy's reports: its family, :data:`DESCRIPTORS` and :data:`OUTCOMES`.

    Made to ask whether a task descriptor would help the policy (as an observation) before training one
    with it: if the policy's misses against the oracle do not vary with a descriptor, there is nothing
    for it to correct. The model is built from the report's task spec (its data from the bundled
    datasets, as the benchmark did) to count its parameters. Returns a dict of per-task arrays (and
    ``tasks``, the ``set:task_id`` groups as :func:`load_pairs` names them).
    """
    rows = load_pairs(folders)
    groups = np.asarray(rows["policy"]["groups"])
    with np.errstate(divide="ignore", invalid="ignore"):
        lr_log = np.log10(rows["policy"]["mean_lr"] / rows["cosine_tuned"]["mean_lr"])
        loss_log = np.log(loss_ratios(rows["policy"]["losses"], rows["cosine_tuned"]["losses"]))
    # A pair where either side diverged has no loss ratio to average (loss_ratios calls two divergences a tie).
    loss_log[np.isinf(rows["policy"]["losses"]) | np.isinf(rows["cosine_tuned"]["losses"])] = np.nan
    out: dict[str, list] = {"tasks": [], "families": [], **{k: [] for k in (*DESCRIPTORS, *OUTCOMES)}}
    for k, folder in enumerate(folders):
        for t in _report_tasks(folder):
            group = f"{k}:{t['task_id']}"
            pairs = groups == group
            if not pairs.any():
                raise ValueError(f"{folder} lists task {t['task_id']!r} but holds no run of it")
            spec = TaskSpec.from_dict({key: v for key, v in t.items() if key != "task_id"})
            data = build_splits(spec)
            lr, loss = lr_log[pairs], loss_log[pairs]
            oracle_lr = rows["cosine_tuned"]["mean_lr"][pairs]
            out["tasks"].append(group)
            out["families"].append(spec.family)
            out["log10_params"].append(np.log10(ModelLayout.build(spec, data).num_params))
            out["log10_epochs"].append(np.log10(spec.total_steps * spec.batch_size / data.x_train.shape[0]))
            with np.errstate(divide="ignore", invalid="ignore"):
                out["log10_oracle_lr_over_start"].append(float(np.nanmean(np.log10(oracle_lr / spec.lr))))
            # Mean over the seeds with a finite value; NaN (left out of the correlations) if none has one.
            out["log10_lr_over_oracle"].append(float(lr[np.isfinite(lr)].mean()) if np.isfinite(lr).any() else np.nan)
            out["log_loss_over_oracle"].append(
                float(loss[np.isfinite(loss)].mean()) if np.isfinite(loss).any() else np.nan
            )
    return {key: np.asarray(v) for key, v in out.items()}


def _finite_mean(values: np.ndarray) -> float:
    """The mean of the finite values, NaN (without numpy's empty-slice warning) where there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def descriptor_summary(folders: list[str | Path]) -> dict:
    """How each of :data:`OUTCOMES` correlates with each of :data:`DESCRIPTORS` over one policy's tasks.

    Per outcome and descriptor, :func:`training.stats.within_family_correlation` (pooled after removing
    each family's means, and per family), and per family the mean of each outcome.

    The learning-rate level correlates with the oracle's rate over the start by construction (both hold
    the oracle's rate, with opposite signs: a policy that ignored the task would give -1), so
    ``tracking`` says how far the policy follows the oracle from the start instead: per family, the
    least-squares slope of ``log10(policy lr / start)`` on ``log10(oracle lr / start)`` (1: it moves
    as far as the oracle; 0: not at all), their correlation, and the slope the other way round,
    ``reverse_slope``. A policy that guesses the oracle's rate from partial information should move
    less than the oracle (slope below 1) and yet be calibrated: the oracle then moves, on average, as
    far as the policy does (reverse slope 1). A reverse slope above 1 says its run-mean rate moves less
    than the oracle's; run means mix level and schedule shape (a cosine averages half its peak, and the
    policy's first interval runs at the start), so check a reading in closed loop before acting on it
    (``benchmarks/lr_gain_sweep.py`` scales every rate the policy sets).
    """
    d = task_descriptors(folders)
    fams = d["families"]
    oracle = d["log10_oracle_lr_over_start"]
    policy = d["log10_lr_over_oracle"] + oracle
    tracking = {}
    for f in dict.fromkeys(fams.tolist()):
        m = (fams == f) & np.isfinite(oracle) & np.isfinite(policy)
        fit = m.sum() >= 3 and np.ptp(oracle[m]) > 0 and np.ptp(policy[m]) > 0
        tracking[f] = {
            "slope": float(np.polyfit(oracle[m], policy[m], 1)[0]) if fit else float("nan"),
            "reverse_slope": float(np.polyfit(policy[m], oracle[m], 1)[0]) if fit else float("nan"),
            "r": within_family_correlation(oracle[m], policy[m], fams[m])["r"],
            "tasks": int(m.sum()),
        }
    return {
        "tasks": int(fams.size),
        "correlations": {
            outcome: {desc: within_family_correlation(d[desc], d[outcome], fams) for desc in DESCRIPTORS}
            for outcome in OUTCOMES
        },
        "tracking": tracking,
        "family_tasks": {f: int(np.sum(fams == f)) for f in dict.fromkeys(fams.tolist())},
        "family_means": {
            f: {key: _finite_mean(d[key][fams == f]) for key in (*DESCRIPTORS, *OUTCOMES)}
            for f in dict.fromkeys(fams.tolist())
        },
    }
