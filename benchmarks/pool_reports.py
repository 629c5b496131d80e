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
rates against the random policy and the replay controls, the divergence rate and, for reports that
record it, the learning-rate level (median over pairs of the policy's mean learning rate over a run
divided by the tuned cosine oracle's, overall and per family). ``--headroom`` adds, per policy, where
the targets are won or lost: the pairs binned by how far the better untuned default is from the tuned
cosine oracle on their task (:func:`training.stats.headroom`), with the share beating both defaults for
the policy and for the oracle itself, and the policy's ratios to the oracle. ``--json PATH`` writes the
same numbers.

``--descriptors`` adds, per policy, whether its misses against the tuned cosine oracle vary with what
is known of a task before training it (:func:`training.pooling.descriptor_summary`): per task, the
policy's learning-rate level and log loss ratio against the oracle, correlated within families with the
model's parameter count and the run's epochs (both known before training, so candidate observations),
and, as a diagnostic, the oracle's learning rate over the starting one. A descriptor that the misses do
not vary with would give a policy observing it nothing to correct.

``--paired`` (two labels, the same task sets in the same order) also compares the first policy with the
second pair by pair: on how many pairs its final validation loss is lower, and the median (with its
interval) and geometric mean of its loss over the second's. Use it for two policies of one run, e.g.
``hpo-average``'s and the final one, whose difference the pooled numbers blur.

``--settings NAME=LABEL,LABEL,...`` (repeatable) groups the labelled runs of one setting, e.g. the
meta-training seeds of one command, and prints the mean and standard deviation over those runs of the
share beating both defaults, the median and the geometric mean (:func:`training.pooling.settings_summary`):
two seeds of one command differ by several points of share, so levers are compared by these means::

    python benchmarks/pool_reports.py s1=... s2=... s3=... g1=... g2=... g3=... \\
        --settings shipped=s1,s2,s3 --settings gains=g1,g2,g3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from training.benchmark import jsonable
from training.cli import HelpFormatter, non_negative_int, run_script
from training.pooling import (
    DESCRIPTORS,
    OUTCOMES,
    compare_policies,
    descriptor_summary,
    load_pairs,
    pooled_summary,
    settings_summary,
)

__all__ = ["load_pairs", "main", "compare_policies", "pooled_summary", "settings_summary"]

#: How the descriptor lines name the outcomes and descriptors.
_SHORT = {
    "log10_lr_over_oracle": "lr level",
    "log_loss_over_oracle": "loss ratio",
    "log10_params": "parameters",
    "log10_epochs": "epochs",
    "log10_oracle_lr_over_start": "oracle lr / start",
}


def _parse(arg: str) -> tuple[str, list[str]]:
    label, sep, folders = arg.partition("=")
    names = [f for f in folders.split(",") if f]
    if not sep or not label or not names:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR[,DIR...], got {arg!r}")
    return label, names


def _lr_level(level: dict) -> str:
    """The policy's mean learning rate against the tuned cosine oracle's (median ratio), if recorded."""
    if not level["pairs"]:
        return ""
    fams = ", ".join(f"{f} {v['median_ratio']:.2f}" for f, v in level["by_family"].items() if v["pairs"])
    return f"  lr level {level['median_ratio']:.2f}x ({fams})"


def _headroom_bin(b: dict) -> str:
    """One bin of :func:`training.stats.headroom` as a line."""
    return (
        f"{b['label']}: {b['tasks']} tasks, {b['pairs']} pairs; beats both defaults: policy "
        f"{b['policy_beats_all_defaults']:.1%}, oracle {b['oracle_beats_all_defaults']:.1%}; policy/oracle median "
        f"{b['median_ratio']:.3f}, geomean {b['geomean_ratio']:.3f}"
    )


def _num(value: float, spec: str = "+.2f") -> str:
    """A correlation or slope, or ``n/a`` where there is none (fewer than 3 tasks, or a constant)."""
    return "n/a" if np.isnan(value) else format(value, spec)


def _chance_r(n: int) -> float:
    """The |r| that a Pearson correlation of ``n`` pairs reaches by chance 5% of the time (two-sided)."""
    from scipy import stats

    t = stats.t.ppf(0.975, n - 2)
    return float(t / np.sqrt(n - 2 + t * t))


def _descriptor_lines(d: dict) -> list[str]:
    """Per outcome, its within-family correlation with each descriptor (and per family)."""
    counts = ", ".join(f"{f} {n}" for f, n in d["family_tasks"].items())
    n = min(d["family_tasks"].values(), default=0)
    chance = (
        f"with {n} tasks, |r| below {_chance_r(n):.2f} is within chance at the 5% level"
        if n > 3
        else "too few tasks to tell a correlation from chance"
    )
    lines = [
        f"task descriptors ({d['tasks']} tasks: {counts}; correlation within families, per family in brackets; "
        f"{chance}):"
    ]
    for outcome in OUTCOMES:
        parts = []
        for desc in DESCRIPTORS:
            c = d["correlations"][outcome][desc]
            fams = ", ".join(f"{f} {_num(v['r'])}" for f, v in c["by_family"].items())
            built_in = (
                " [by construction]"
                if (outcome, desc) == ("log10_lr_over_oracle", "log10_oracle_lr_over_start")
                else ""
            )
            # No family in brackets where no task had both values (reports without learning rates).
            parts.append(f"{_SHORT[desc]} {_num(c['r'])}{f' ({fams})' if fams else ''}{built_in}")
        lines.append(f"  {_SHORT[outcome]} vs oracle ~ " + "; ".join(parts))
    follows = ", ".join(
        f"{f} {_num(t['slope'], '.2f')} (r {_num(t['r'])}; reverse {_num(t['reverse_slope'], '.2f')})"
        for f, t in d["tracking"].items()
    )
    lines.append(f"  slope of policy lr / start on oracle lr / start: {follows}")
    return lines


def _settings_line(g: dict) -> str:
    """One setting's mean (and sample standard deviation) over its runs, from :func:`settings_summary`."""

    def stat(key: str, fmt: str) -> str:
        v = g[key]
        return f"{v['mean']:{fmt}}" + ("" if v["sd"] is None else f" ± {v['sd']:{fmt}}")

    return (
        f"{g['runs']} run{'s' * (g['runs'] != 1)}  both {stat('beats_both_untuned_defaults', '.2%')}  "
        f"median {stat('median_ratio_vs_cosine_tuned', '.4f')}  geomean {stat('geomean_ratio_vs_cosine_tuned', '.4f')}"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "policies",
        nargs="+",
        type=_parse,
        metavar="LABEL=DIR[,DIR...]",
        help="a label for a policy and the hpo-bench output folders of its task sets (comma-separated)",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the bootstrap resampling")
    parser.add_argument(
        "--headroom",
        action="store_true",
        help="also break each policy's pairs down by how far the untuned defaults are from the tuned oracle",
    )
    parser.add_argument(
        "--descriptors",
        action="store_true",
        help="also correlate each policy's misses against the tuned oracle with task descriptors (parameters, ...)",
    )
    parser.add_argument(
        "--paired", action="store_true", help="also compare the first policy with the second, pair by pair"
    )
    parser.add_argument(
        "--settings",
        action="append",
        type=_parse,
        default=[],
        metavar="NAME=LABEL,LABEL,...",
        help="also print the mean and spread over these labelled runs of one setting (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.paired and len(args.policies) != 2:
        parser.error(f"--paired compares two policies; got {len(args.policies)} labels")
    labels = [label for label, _ in args.policies]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:  # one would silently replace the other in the printed lines and the JSON
        parser.error(f"labels {repeated} given more than once; give each policy its own label")
    reserved = [
        name for name, used in (("paired", args.paired), ("settings", args.settings)) if used and name in labels
    ]
    if reserved:
        parser.error(f"labels {reserved} name sections of the output with --{reserved[0]}; choose other labels")
    for name, members in args.settings:
        unknown = [m for m in members if m not in labels]
        if unknown:
            parser.error(f"--settings {name}: unknown labels {unknown}; the labels given are {labels}")
    names = [name for name, _ in args.settings]
    if len(set(names)) < len(names):
        parser.error(f"--settings names {sorted({n for n in names if names.count(n) > 1})} given more than once")
    out = {label: pooled_summary(folders, seed=args.seed) for label, folders in args.policies}
    width = max(len(label) for label in out)
    for label, s in out.items():
        lo, hi = s["median_ratio_vs_cosine_tuned_ci95"]
        fams = ", ".join(f"{f} {v:.3f}" for f, v in s["median_ratio_vs_cosine_tuned_by_family"].items())
        print(
            f"{label:<{width}}  pairs {s['pairs']:>4}  both {s['beats_both_untuned_defaults']:6.1%}  "
            f"vs tuned cosine: median {s['median_ratio_vs_cosine_tuned']:.3f} [{lo:.3f}, {hi:.3f}] ({fams}), "
            f"geomean {s['geomean_ratio_vs_cosine_tuned']:.3f}  "
            f"vs tuned constant {s['median_ratio_vs_constant_tuned']:.3f}  random {s['win_rate_vs_random']:.1%}  "
            f"replay {s['win_rate_vs_replay']:.1%}"
            + ("" if s["win_rate_vs_replay_task"] is None else f"  replay per task {s['win_rate_vs_replay_task']:.1%}")
            + f"  diverged {s['policy_divergence_rate']:.1%}"
            + _lr_level(s["lr_level_vs_cosine_tuned"])
        )
        if args.headroom:
            for b in s["headroom_vs_cosine_tuned"]:
                print(f"{'':<{width}}    {_headroom_bin(b)}")
        if args.descriptors:
            s["task_descriptors"] = descriptor_summary(dict(args.policies)[label])
            for line in _descriptor_lines(s["task_descriptors"]):
                print(f"{'':<{width}}    {line}")
    if args.paired:
        (label_a, folders_a), (label_b, folders_b) = args.policies
        p = compare_policies(folders_a, folders_b, seed=args.seed)
        lo, hi = p["median_ratio_low"], p["median_ratio_high"]
        print(
            f"{label_a} over {label_b}, pair by pair: lower on {p['a_lower']} of {p['pairs']} (ties {p['ties']}), "
            f"median ratio {p['median_ratio']:.4f} [{lo:.4f}, {hi:.4f}], geomean {p['geomean_ratio']:.4f}, "
            f"worst {p['max_ratio']:.3f}"
        )
        out["paired"] = {"a": label_a, "b": label_b, **p}
    if args.settings:
        out["settings"] = {}
        width = max(len(name) for name, _ in args.settings)
        for name, members in args.settings:
            g = out["settings"][name] = {"labels": members, **settings_summary([out[m] for m in members])}
            print(f"{name:<{width}}  {_settings_line(g)}")
    if args.json:
        args.json.write_text(json.dumps(jsonable(out), indent=1, allow_nan=False))  # an infinite ratio: null
    return out


if __name__ == "__main__":
    sys.exit(run_script(main, ok=bool))
