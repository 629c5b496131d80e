"""How much of the meta-training return is the task's and how much the actions': the case for a baseline.

Runs a policy stochastically on M tasks of the ``full`` preset's meta-training distribution, each
twice from the same initialisation and minibatches (different action noise), with default-LR twins
(``reference_runs``), and prints the variance of the returns R, of R minus the twin's return, and of
half the difference between a task's two runs (what the actions changed)::

    python benchmarks/reward_variance.py [--policy default] [--tasks 48]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from agents import load_bundle, resolve_policy
from hpo_env import TaskDistribution
from hpo_env.core import EpisodeBatch
from training.cli import HelpFormatter, non_negative_int, positive_int, run_script


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--policy", default="default", help="a bundle folder, or the name of a shipped policy")
    p.add_argument("--tasks", type=positive_int, default=48, help="tasks drawn from the training distribution")
    p.add_argument("--seed", type=non_negative_int, default=123, help="seed of the task draws")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)  # the policy's action noise (a script, not library code)
    bundle = load_bundle(resolve_policy(args.policy))
    dist = TaskDistribution.default("train", lr_spread=1.0, lr_center=0.5)  # the full preset's tasks
    rng = np.random.default_rng(args.seed)
    m = args.tasks
    tasks = [dist.sample(rng) for _ in range(m)] * 2
    batch = EpisodeBatch(2 * m, bundle.decoder, reference_runs=True, **bundle.feature_options)
    obs, _ = batch.start(list(range(2 * m)), tasks)
    returns, twin = np.zeros(2 * m), np.zeros(2 * m)
    live, state, start = np.ones(2 * m, bool), bundle.initial_state(2 * m), np.ones(2 * m, bool)
    while live.any():
        actions, state = bundle.predict(obs, state=state, episode_start=start, deterministic=False)
        start[:] = False
        slots = np.flatnonzero(live)
        new_obs, rewards, terminated, infos = batch.step(slots.tolist(), actions[slots])
        obs = obs.copy()
        obs[slots] = new_obs
        for j, s in enumerate(slots):
            returns[s] += rewards[j]
            twin[s] += infos[j]["reference_gain"]
            live[s] = not terminated[j]
    relative = returns - twin
    half_diff = (returns[:m] - returns[m:]) / 2
    print(f"{m} tasks x 2 runs of {args.policy!r}; returns from {returns.min():.3f} to {returns.max():.3f}")
    print(
        f"variance of the return R: {returns.var():.4f}; of R minus the default-LR twin's: {relative.var():.4f}"
        f" (correlation {np.corrcoef(returns, twin)[0, 1]:.3f})"
    )
    print(
        f"what the actions changed within a task, var((R1 - R2) / 2): {half_diff.var():.5f}"
        f" = {half_diff.var() / returns.var():.4f} of var(R)"
    )


if __name__ == "__main__":
    sys.exit(run_script(main))
