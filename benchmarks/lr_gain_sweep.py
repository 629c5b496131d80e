"""Is a policy's learning-rate level right? Scale the rates it sets by hidden factors and compare.

Each (task, seed) pair is trained once per gain ``c``: the policy runs as usual and observes the
learning rate it sets, but the inner optimiser steps with ``c`` times that rate (the task's hidden
:attr:`~hpo_env.TaskSpec.lr_gain`, the same mechanism as meta-training's ``--lr-gain-spread``). The
policy reacts to what the scaled rate does to the losses, so this measures its closed-loop response to
a run that is hotter or colder than it thinks, not just a shifted schedule. Every gain is compared
pair by pair with ``c = 1`` (the policy as deployed): if some ``c != 1`` wins clearly, the policy runs
systematically too hot or too cold on these tasks::

    python benchmarks/lr_gain_sweep.py --policy agents/policies/default --task-seed 7 \\
        --tasks-per-family 8 --seeds 4 --gains 0.5 0.71 1 1.41 2 2.83 --out runs/lr-gain

Use task seeds other than the benchmark's (0-3) to keep its tasks unseen. Per gain it prints the
share of pairs where the scaled run ends lower than ``c = 1`` (ties half) and the median ratio of
final validation losses, each with a 95% bootstrap interval over tasks, the geometric-mean ratio, the
per-family medians and the divergences; ``OUT/lr_gain_sweep.json`` holds every run's final loss and
``OUT/lr_gain_sweep.png`` plots the median ratio against the gain, per family.

Every run goes into ``hpo-bench``'s results store (``--store``, by default ``OUT/results.sqlite``) as
soon as its batch ends, so an interrupted sweep resumes and a rerun with more gains computes only the
new ones. Gain-1 runs are stored under the benchmark's own policy key: pointing ``--store`` at a
benchmark's store of the same task set reuses the policy runs it already holds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agents import load_bundle
from training.benchmark import (
    Arm,
    BenchmarkConfig,
    Job,
    bundle_fingerprint,
    config_from_args,
    default_code_version,
    jsonable,
    make_tasks,
    run_chunks,
    seeded,
)
from training.benchmark import build_parser as bench_parser
from training.cli import run_script
from training.stats import as_losses, geomean_ratio, loss_ratios, paired_comparison
from training.store import ResultStore, RunKey
from training.threads import torch_threads

#: ``hpo-bench`` options that do not apply here (no oracle grid, no hypergradient baselines, one process):
#: hidden from ``--help`` and refused if given.
UNUSED_OPTIONS = ("grid_size", "grid_decades", "hd_beta_sgd", "hd_beta_adamw", "workers")


def build_parser() -> argparse.ArgumentParser:
    """``hpo-bench``'s options (task set, seeds, chunk size, bootstrap, store...; not those of
    :data:`UNUSED_OPTIONS`), with this script's defaults and ``--gains``."""
    p = bench_parser()
    p.prog = "lr_gain_sweep.py"
    p.description = __doc__.split("\n\n")[0]
    for action in p._actions:
        if action.dest in UNUSED_OPTIONS:
            action.help = argparse.SUPPRESS
    p.set_defaults(task_seed=7, tasks_per_family=8, seeds=4, out="lr_gain_sweep")  # task seed 7: not a benchmark set
    p.add_argument("--gains", type=float, nargs="+", default=[0.5, 0.71, 1.0, 1.41, 2.0], help="factors; 1 is added")
    return p


def check_gains(gains: Sequence[float]) -> list[float]:
    """Sorted distinct gains with 1 among them.

    Raises:
        ValueError: a gain that is not a positive finite number.
    """
    bad = [g for g in gains if not (math.isfinite(g) and g > 0)]
    if bad:
        raise ValueError(f"gains must be positive finite factors on the learning rate, got {bad}")
    return sorted({float(g) for g in gains} | {1.0})


def schedule_key(policy_hash: str, gain: float) -> str:
    """The store's schedule label of a policy run at ``gain``; gain 1 is ``hpo-bench``'s own policy key."""
    return f"policy@{policy_hash}" if gain == 1.0 else f"policy@{policy_hash}|lr_gain={gain:g}"


def sweep(config: BenchmarkConfig, gains: Sequence[float]) -> dict:
    """Train every (task, seed) pair of ``config`` once per gain (``config.chunk_size`` runs per batched
    call), skipping runs already in the store; return the final losses per gain."""
    from tqdm.auto import tqdm

    bundle = load_bundle(config.policy, device=config.device)
    policy_hash = bundle_fingerprint(config.policy)
    code_version = config.code_version or default_code_version(config.device)
    gains = check_gains(gains)
    tasks = make_tasks(config)
    pairs = [(ti, si) for ti in range(len(tasks)) for si in range(config.seeds)]
    arm = Arm(f"policy@{policy_hash}", "policy", "policy")
    jobs = [
        Job(ti, si, arm, RunKey(tasks[ti].task_id, schedule_key(policy_hash, gain), si, code_version),
            seeded(tasks[ti], si).replace(lr_gain=gain))
        for gain in gains
        for ti, si in pairs
    ]  # fmt: skip
    with ResultStore(config.store_path) as store:
        todo = set(store.missing([j.key for j in jobs]))
        todo_jobs = [j for j in jobs if j.key in todo]
        with tqdm(total=len(todo_jobs), unit="run", desc="lr gains", disable=not config.progress) as bar:
            run_chunks(todo_jobs, bundle.decoder, bundle, config, store, bar)
        results = store.get_many([j.key for j in jobs])
    losses: dict[float, list[float]] = {g: [] for g in gains}
    for job in jobs:
        run = results[job.key]
        losses[job.spec.lr_gain].append(float("nan") if run.diverged else run.final_val_loss)
    return {
        "policy": config.policy,
        "task_seed": config.task_seed,
        "seeds": config.seeds,
        "tasks": [t.task_id for t in tasks],
        "pairs": [{"task": ti, "seed": si, "family": tasks[ti].family} for ti, si in pairs],
        "losses": {str(g): v for g, v in losses.items()},
        "computed_runs": len(todo_jobs),
        "reused_runs": len(jobs) - len(todo_jobs),
    }


def summarise(raw: dict, *, seed: int = 0, n_boot: int = 2000) -> list[dict]:
    """One row per gain: how its runs compare with the same pairs at gain 1."""
    groups = [p["task"] for p in raw["pairs"]]
    families = np.array([p["family"] for p in raw["pairs"]])
    base = as_losses(raw["losses"]["1.0"])
    rows = []
    for key, values in raw["losses"].items():
        scaled = as_losses(values)
        row = {"gain": float(key), "diverged": int(np.sum(~np.isfinite(scaled)))}
        if key != "1.0":
            rng = np.random.default_rng(seed)
            row.update(paired_comparison(scaled, base, rng=rng, groups=groups, n_boot=n_boot))
            ratios = loss_ratios(scaled, base)
            row["geomean_ratio"] = geomean_ratio(ratios)
            row["family_median_ratio"] = {f: float(np.median(ratios[families == f])) for f in dict.fromkeys(families)}
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows = sorted(rows, key=lambda r: r["gain"])
    gains = [r["gain"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    ax.axhline(1.0, color="grey", lw=0.8)
    # Gain 1 is the reference (ratio 1 by definition); a gain without a finite median is left out, not drawn at 1.
    nan = float("nan")
    med = [1.0 if r["gain"] == 1.0 else r.get("median_ratio", nan) for r in rows]
    lo = [r.get("median_ratio_low", nan) for r in rows]
    hi = [r.get("median_ratio_high", nan) for r in rows]
    ax.fill_between(gains, lo, hi, alpha=0.2, label="all pairs: 95% interval")
    ax.plot(gains, med, "o-", label="all pairs", zorder=2)
    ax.plot([1.0], [1.0], "o", mfc="white", color="C0", zorder=4, label="gain 1: the policy as deployed")
    families = next((list(r["family_median_ratio"]) for r in rows if "family_median_ratio" in r), [])
    for k, f in enumerate(families):
        values = [1.0 if r["gain"] == 1.0 else r.get("family_median_ratio", {}).get(f, nan) for r in rows]
        ax.plot(gains, values, "--", marker="sv^D<>"[k % 6], zorder=3, label=f)
    for r in rows:
        if r.get("diverged"):
            ax.annotate(f"{r['diverged']} diverged", (r["gain"], 1.0), textcoords="offset points", xytext=(0, -14),
                        ha="center", fontsize=7, color="tab:red")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(gains)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("hidden gain on the policy's learning rate")
    ax.set_ylabel("median final val loss / gain 1 (below 1: better)")
    n = next((r.get("pairs") for r in rows if r.get("pairs")), None)
    ax.set_title("The policy's learning rates scaled by a hidden gain" + (f", {n} pairs" if n else ""), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [
        action.option_strings[0]
        for action in parser._actions
        if action.dest in UNUSED_OPTIONS and getattr(args, action.dest) != action.default
    ]
    if given:  # silently ignored, they would read as part of the measurement
        parser.error(
            f"lr_gain_sweep.py does not use {', '.join(given)}: it trains no oracle grid or hypergradient "
            "baseline, and computes its runs in one process"
        )
    try:
        gains = check_gains(args.gains)
        config = config_from_args(args)
        make_tasks(config)  # unknown families and bad budgets fail here, before any training
    except ValueError as err:
        parser.error(str(err))
    with torch_threads(config.threads):
        raw = sweep(config, gains)
    rows = summarise(raw, seed=config.seed, n_boot=config.bootstrap)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_gain_sweep.json").write_text(json.dumps(jsonable({**raw, "rows": rows}), indent=1, allow_nan=False))
    if config.plots:
        plot(rows, out / "lr_gain_sweep.png")
    n = len(raw["pairs"])
    print(
        f"\nhidden learning-rate gains on {config.policy} ({n} pairs, task seed {config.task_seed}; "
        f"{raw['computed_runs']} runs computed, {raw['reused_runs']} reused from {config.store_path}); against gain 1:"
    )
    print("gain   lower than gain 1 [95% CI]   median ratio [95% CI]      geomean  diverged  per-family medians")
    for r in rows:
        if r["gain"] == 1.0:
            print(f"{1.0:<5.2f}  (the policy as deployed)                                          {r['diverged']:>3}")
            continue
        fam = ", ".join(f"{f} {m:.3f}" for f, m in r["family_median_ratio"].items())
        print(
            f"{r['gain']:<5.2f}  {r['win_rate']:5.1%} [{r['win_rate_low']:.1%}, {r['win_rate_high']:.1%}]    "
            f"{r['median_ratio']:.3f} [{r['median_ratio_low']:.3f}, {r['median_ratio_high']:.3f}]    "
            f"{r['geomean_ratio']:.3f}  {r['diverged']:>8}  {fam}"
        )
    return rows


if __name__ == "__main__":
    sys.exit(run_script(main, ok=lambda result: result is not None))
