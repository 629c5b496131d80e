"""Wall time of one whole episode per task family, and HPOVecEnv inner steps/s on a distribution.

    python benchmarks/episode_time.py                      # 5 tasks per family; N = 1, 8, 32
    python benchmarks/episode_time.py --tasks 3 --slots 1 8

Episodes run with the constant schedule (action 0) through ``HPOEnv``; the vectorised numbers step
``HPOVecEnv`` with random actions for a fixed number of environment steps (auto-resets included).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from hpo_env import FAMILIES, SPLITS, HPOEnv, HPOVecEnv, TaskDistribution
from training.cli import HelpFormatter, non_negative_int, positive_int, run_script


def _episode(spec, seed: int) -> float:
    """Seconds of one whole episode of ``spec`` with the constant schedule."""
    env = HPOEnv("all")
    start = time.perf_counter()
    env.reset(seed=seed, options={"task": spec})
    done = False
    while not done:
        _, _, done, _, _ = env.step(np.zeros(env.action_space.shape, np.float32))
    return time.perf_counter() - start


def episode_times(tasks_per_family: int, seed: int) -> list[tuple[str, float, float, float]]:
    rows = []
    dist = TaskDistribution.default("all")
    # The first episode of a process pays one-time costs (about 1.4 s, where a teacher_regression episode
    # takes 0.1 s): one untimed episode first, or they land on the first family's row.
    _episode(dist.sample_family(FAMILIES[0], np.random.default_rng(seed)), seed)
    for family in FAMILIES:
        rng = np.random.default_rng(seed)
        times, steps = [], []
        for _ in range(tasks_per_family):
            spec = dist.sample_family(family, rng)
            times.append(_episode(spec, seed))
            steps.append(spec.total_steps)
        rows.append((family, float(np.median(times)), float(np.mean(steps)), float(np.sum(steps) / np.sum(times))))
    return rows


def vec_throughput(n: int, split: str, env_steps: int, seed: int) -> float:
    vec = HPOVecEnv(n, split, seed=seed)
    vec.reset()
    rng = np.random.default_rng(seed)
    before = vec.trainer.stats.model_steps
    start = time.perf_counter()
    for _ in range(env_steps):
        vec.step(rng.uniform(-1, 1, size=(n, vec.action_space.shape[0])).astype(np.float32))
    return (vec.trainer.stats.model_steps - before) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--tasks", type=positive_int, default=5, help="tasks per family")
    parser.add_argument("--slots", type=positive_int, nargs="+", default=[1, 8, 32], help="HPOVecEnv sizes N")
    parser.add_argument("--split", default="train", choices=sorted(SPLITS), help="distribution of the HPOVecEnv runs")
    parser.add_argument("--env-steps", type=positive_int, default=30, help="vectorised env steps per measurement")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the task draws")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}")
    print(f"{'family':>24}  {'median episode s':>16}  {'mean inner steps':>16}  {'inner steps/s':>13}")
    for family, median, steps, rate in episode_times(args.tasks, args.seed):
        print(f"{family:>24}  {median:16.2f}  {steps:16.0f}  {rate:13.0f}")
    print(f"\nHPOVecEnv on the {args.split!r} distribution, random actions, {args.env_steps} env steps:")
    print(f"{'N':>5}  {'inner steps/s':>13}")
    for n in args.slots:
        print(f"{n:>5}  {vec_throughput(n, args.split, args.env_steps, args.seed):13.0f}")


if __name__ == "__main__":
    sys.exit(run_script(main))
