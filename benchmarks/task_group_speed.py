"""Meta-training environment speed with and without task groups, side by side.

Steps the ``full`` preset's environment (``agents.make_meta_env``) with random actions, with groups of
each given size (slots per task) in interleaved blocks, and prints decisions per second and each
size's ratio to the first's::

    python benchmarks/task_group_speed.py [--group-sizes 1 2 4] [--blocks 4] [--steps 48]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from agents import get_preset, make_meta_env
from training.cli import HelpFormatter, positive_int, run_script


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--group-sizes", type=positive_int, nargs="+", default=[1, 2], help="task group sizes to compare")
    p.add_argument("--blocks", type=positive_int, default=4, help="interleaved blocks per setting")
    p.add_argument("--steps", type=positive_int, default=48, help="environment steps per block")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sizes = tuple(dict.fromkeys(args.group_sizes))
    envs = {g: make_meta_env(get_preset("full", task_group_size=g), seed=0) for g in sizes}
    rates: dict[int, list[float]] = {g: [] for g in sizes}
    rng = np.random.default_rng(0)
    for env in envs.values():
        env.reset()
    for _ in range(args.blocks):
        for g, env in envs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                env.step(rng.uniform(-1, 1, (env.num_envs, env.action_space.shape[0])).astype(np.float32))
            rates[g].append(args.steps * env.num_envs / (time.perf_counter() - start))
    for g in sizes:
        print(
            f"task_group_size {g}: {np.median(rates[g]):.0f} decisions/s (blocks: {', '.join(f'{r:.0f}' for r in rates[g])})"
        )
    for g in sizes[1:]:
        print(f"ratio (groups of {g} / {sizes[0]}): {np.median(rates[g]) / np.median(rates[sizes[0]]):.2f}x")


if __name__ == "__main__":
    sys.exit(run_script(main))
