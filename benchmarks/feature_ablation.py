"""Which observation features does a trained policy act on? Hold each group fixed and benchmark it.

For every feature group the policy runs the ``hpo-bench`` protocol with those features held at their
meta-training mean (the bundle's normalisation mean: after normalisation they read 0, "an average
state"), while everything else it sees is real. A group whose ablation changes nothing is one the
policy ignores; one whose ablation costs a lot is one its decisions depend on. The intact policy and
every ablation run on the same (task, seed) pairs in one call, sharing one results store, so the
baselines are trained once and the comparison is paired::

    python benchmarks/feature_ablation.py --policy agents/policies/default \\
        --tasks-per-family 8 --seeds 5 --grid-size 8 --out runs/ablation

It takes every ``hpo-bench`` option (task set, seeds, grid, store...) and ``--groups`` to choose the
groups. Per row it prints the share of pairs beating both untuned defaults, the median ratio to the
K-point tuned cosine with its 95% cluster-bootstrap interval, the geometric-mean ratio, and the win
rate of the intact policy over the ablated one on the same pairs (ties half; above 50%: the group
helps). ``OUT/<group>/`` holds each row's full report; ``OUT/ablation.json`` the numbers.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from agents import PolicyBundle, load_bundle
from hpo_env import EPOCHS_FEATURE, GRADIENT_FEATURES, ObservationBuilder
from training.benchmark import build_parser, bundle_fingerprint, config_from_args, run_benchmark
from training.cli import run_script
from training.pooling import load_pairs, pooled_summary
from training.stats import win_rate

_HP_KINDS = ("log_change", "position", "prev_action")
#: Feature groups by meaning; the hyperparameter groups are filled in from the policy's decoder.
BASE_GROUPS = {
    "progress": ("progress",),
    "loss_level": ("log_val_loss", "log_train_loss"),
    "loss_dynamics": ("val_loss_change", "train_loss_change", "val_loss_trend", "train_loss_trend"),
    "generalisation_gap": ("train_val_gap", "val_above_best"),
    "flags": ("has_train_loss", "adaptive_optimizer"),
}


def feature_groups(feature_names: list[str], hyperparameters: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """The groups of :data:`BASE_GROUPS`, one per hyperparameter feature kind (``hp_position``...), and
    ``gradients`` and ``epochs`` for a policy that observes those optional features."""
    groups = dict(BASE_GROUPS)
    for kind in _HP_KINDS:
        groups[f"hp_{kind}"] = tuple(f"{h}_{kind}" for h in hyperparameters)
    if set(GRADIENT_FEATURES) <= set(feature_names):
        groups["gradients"] = GRADIENT_FEATURES
    if EPOCHS_FEATURE in feature_names:
        groups["epochs"] = (EPOCHS_FEATURE,)
    unknown = sorted({n for names in groups.values() for n in names} - set(feature_names))
    if unknown:
        raise ValueError(f"features {unknown} are not in this policy's feature set {feature_names}")
    return groups


class HeldFeatures:
    """A policy bundle that sees some raw features replaced by their meta-training mean (SB3 ``predict``)."""

    def __init__(self, bundle: PolicyBundle, names: tuple[str, ...]) -> None:
        if not isinstance(bundle, PolicyBundle) or bundle.obs_mean is None:
            raise ValueError(
                "feature ablation needs a single-policy bundle with observation normalisation (its mean is the "
                f"held value), got {type(bundle).__name__}"
            )
        all_names = ObservationBuilder(bundle.decoder, **bundle.feature_options).feature_names()
        self.bundle, self.decoder, self.names = bundle, bundle.decoder, names
        self.index = np.array([all_names.index(n) for n in names], dtype=np.int64)
        self.value = np.asarray(bundle.obs_mean, dtype=np.float64)[self.index].astype(np.float32)

    @property
    def gradient_features(self) -> bool:
        return self.bundle.gradient_features

    @property
    def epochs_feature(self) -> bool:
        return self.bundle.epochs_feature

    def initial_state(self, n_envs: int = 1) -> Any:
        return self.bundle.initial_state(n_envs)

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        obs = np.array(observation, dtype=np.float32, copy=True)
        obs[..., self.index] = self.value
        return self.bundle.predict(obs, state, episode_start, deterministic)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    parser.prog = "feature_ablation.py"
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--groups", nargs="+", default=None, help="feature groups to hold (default: all)")
    args = parser.parse_args(argv)
    base = config_from_args(args)
    bundle = load_bundle(base.policy, device=base.device)
    names = ObservationBuilder(bundle.decoder, **bundle.feature_options).feature_names()
    groups = feature_groups(names, bundle.decoder.names)
    chosen = args.groups or list(groups)
    bad = sorted(set(chosen) - set(groups))
    if bad:
        parser.error(f"unknown groups {bad}; choose from {sorted(groups)}")
    # Built before any run: a bundle that cannot hold features (an ensemble) is refused before the
    # intact benchmark, not after it.
    held_by_group = {group: HeldFeatures(bundle, groups[group]) for group in chosen}
    out = Path(base.out)
    store = base.store or str(out / "results.sqlite")
    fingerprint = bundle_fingerprint(base.policy)

    folders = {"intact": out / "intact"}
    run_benchmark(replace(base, out=str(folders["intact"]), store=store))
    for group, held in held_by_group.items():
        tag = hashlib.sha1(f"{fingerprint}|held:{','.join(held.names)}".encode()).hexdigest()[:12]
        folders[group] = out / group
        run_benchmark(replace(base, out=str(folders[group]), store=store), policy=held, policy_hash=tag)

    intact = load_pairs([folders["intact"]])["policy"]["losses"]
    results = {}
    for label, folder in folders.items():
        s = pooled_summary([folder], seed=base.seed, n_boot=base.bootstrap)
        losses = load_pairs([folder])["policy"]["losses"]
        s["features_held"] = list(groups.get(label, ()))
        s["intact_win_rate"] = None if label == "intact" else win_rate(intact, losses)
        results[label] = s
    width = max(len(label) for label in results)
    print(f"\nfeature ablation of {base.policy} ({results['intact']['pairs']} pairs, task seed {base.task_seed})")
    print(f"{'held':<{width}}  both    median vs tuned cosine [95% CI]  geomean  intact wins  features")
    for label, s in results.items():
        lo, hi = s["median_ratio_vs_cosine_tuned_ci95"]
        wins = "-" if s["intact_win_rate"] is None else f"{s['intact_win_rate']:.1%}"
        print(
            f"{label:<{width}}  {s['beats_both_untuned_defaults']:5.1%}  {s['median_ratio_vs_cosine_tuned']:.3f} "
            f"[{lo:.3f}, {hi:.3f}]            {s['geomean_ratio_vs_cosine_tuned']:.3f}  {wins:>11}  "
            f"{', '.join(s['features_held'])}"
        )
    (out / "ablation.json").write_text(json.dumps(results, indent=1))
    print(f"numbers: {out / 'ablation.json'}")
    return results


if __name__ == "__main__":
    sys.exit(run_script(main, ok=bool))
