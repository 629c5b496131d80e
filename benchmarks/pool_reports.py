"""Pool several ``hpo-bench`` reports of one policy into one comparison over all their (task, seed) pairs.

One task set of 40-80 pairs is noisy (the same policy beat both untuned defaults on 65% of one set and
47.5% of another), so meta-training levers are compared on the pairs of several task sets at once.
Each argument is ``LABEL=DIR[,DIR...]``: the ``benchmark.json`` of each folder (one ``hpo-bench --out``
per task set, same policy) is read and its pairs are pooled; tasks are told apart by set, so the
cluster bootstrap resamples whole (set, task) groups, as ``hpo-bench`` does within one set::

    python benchmarks/pool_reports.py \\
        shipped=runs/bench80-shipped,runs/bench-ts1-shipped,runs/bench-ts2-shipped \\
        candidate=runs/bench80-cand,runs/bench-ts1-cand,runs/bench-ts2-cand

Per label it prints: pairs, the share of pairs beating both untuned defaults, the median ratio of final
validation losses to the K-point grid-tuned cosine oracle with its 95% bootstrap interval, the geometric
mean of that ratio, the per-family medians, the median ratio to the tuned constant oracle, and the win
rates against the random policy and the replay control. ``--json PATH`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from training.benchmark import UNTUNED_DEFAULTS
from training.stats import beats_all_rate, bootstrap_ci, loss_ratios, median_ratio, win_rate


def load_pairs(folders: list[str | Path]) -> dict[str, dict]:
    """Per row (``policy``, ``cosine_tuned``...), pooled losses, families and (set, task) groups.

    Raises:
        FileNotFoundError: a folder without ``benchmark.json``.
        ValueError: the reports do not hold the same rows, or a report is not an ``hpo-bench`` one.
    """
    pooled: dict[str, dict] = {}
    for k, folder in enumerate(folders):
        path = Path(folder) / "benchmark.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass folders written by `hpo-bench --out FOLDER`")
        per_run = json.loads(path.read_text()).get("per_run")
        if not isinstance(per_run, dict) or "policy" not in per_run:
            raise ValueError(f"{path} has no per-run results of a policy; is it an hpo-bench report?")
        if pooled and set(per_run) != set(pooled):
            raise ValueError(f"{path} holds rows {sorted(per_run)}, the first report {sorted(pooled)}")
        for row, runs in per_run.items():
            entry = pooled.setdefault(row, {"losses": [], "families": [], "groups": []})
            for r in runs:
                entry["losses"].append(np.inf if r["diverged"] else float(r["final_val_loss"]))
                entry["families"].append(r["family"])
                entry["groups"].append(f"{k}:{r['task_id']}")
    for row, entry in pooled.items():
        if entry["groups"] != pooled["policy"]["groups"]:
            raise ValueError(f"row {row!r} does not cover the policy's (task, seed) pairs in the same order")
        entry["losses"] = np.asarray(entry["losses"], dtype=np.float64)
    return pooled


def pooled_summary(folders: list[str | Path], *, seed: int = 0, n_boot: int = 2000) -> dict:
    """The pooled headline numbers of one policy's reports (see the module docstring)."""
    rows = load_pairs(folders)
    policy = rows["policy"]["losses"]
    groups, families = rows["policy"]["groups"], np.asarray(rows["policy"]["families"])
    ratios = loss_ratios(policy, rows["cosine_tuned"]["losses"])
    low, high = bootstrap_ci(ratios, rng=np.random.default_rng(seed), groups=groups, n_boot=n_boot)
    return {
        "reports": [str(f) for f in folders],
        "pairs": int(policy.size),
        "beats_both_untuned_defaults": beats_all_rate(policy, [rows[name]["losses"] for name in UNTUNED_DEFAULTS]),
        "median_ratio_vs_cosine_tuned": float(np.median(ratios)),
        "median_ratio_vs_cosine_tuned_ci95": [low, high],
        "geomean_ratio_vs_cosine_tuned": float(np.exp(np.mean(np.log(ratios)))),
        "median_ratio_vs_cosine_tuned_by_family": {
            fam: float(np.median(ratios[families == fam])) for fam in dict.fromkeys(families.tolist())
        },
        "median_ratio_vs_constant_tuned": median_ratio(policy, rows["constant_tuned"]["losses"]),
        "win_rate_vs_random": win_rate(policy, rows["random"]["losses"]),
        "win_rate_vs_replay": win_rate(policy, rows["replay"]["losses"]),
        "policy_divergence_rate": float(np.isinf(policy).mean()),
    }


def _parse(arg: str) -> tuple[str, list[str]]:
    label, sep, folders = arg.partition("=")
    if not sep or not label or not folders:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR[,DIR...], got {arg!r}")
    return label, [f for f in folders.split(",") if f]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("policies", nargs="+", type=_parse, metavar="LABEL=DIR[,DIR...]")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    args = parser.parse_args(argv)
    out = {label: pooled_summary(folders, seed=args.seed) for label, folders in args.policies}
    width = max(len(label) for label in out)
    for label, s in out.items():
        lo, hi = s["median_ratio_vs_cosine_tuned_ci95"]
        fams = ", ".join(f"{f} {v:.3f}" for f, v in s["median_ratio_vs_cosine_tuned_by_family"].items())
        print(
            f"{label:<{width}}  pairs {s['pairs']:>4}  both {s['beats_both_untuned_defaults']:6.1%}  "
            f"vs tuned cosine: median {s['median_ratio_vs_cosine_tuned']:.3f} [{lo:.3f}, {hi:.3f}], "
            f"geomean {s['geomean_ratio_vs_cosine_tuned']:.3f} ({fams})  "
            f"vs tuned constant {s['median_ratio_vs_constant_tuned']:.3f}  random {s['win_rate_vs_random']:.1%}  "
            f"replay {s['win_rate_vs_replay']:.1%}  diverged {s['policy_divergence_rate']:.1%}"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(None if main() else 1)
