"""``python -m hpo_env`` / ``hpo-demo``: run one episode of the environment with a simple schedule."""

from __future__ import annotations

import argparse
import math

import numpy as np

from hpo_env.envs import HPOEnv
from hpo_env.tasks import SPLITS


def _action(text: str) -> float:
    try:
        value = float(text)
    except ValueError:  # argparse would say "invalid _action value"
        value = math.nan
    if not (math.isfinite(value) and -1.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number in [-1, 1] (the action's range), got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # argparse would say "invalid _seed value"
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hpo-demo",
        description="Run one episode of the environment with a constant action (python -m hpo_env).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--distribution", default="train", choices=[*SPLITS, "toy"], help="task families to draw the task from"
    )
    parser.add_argument("--seed", type=_seed, default=0, help="seed of reset(seed=...): which task, and its run")
    parser.add_argument(
        "--lr-action", type=_action, default=-0.2, help="constant action on the learning rate, in [-1, 1]"
    )
    args = parser.parse_args(argv)
    env = HPOEnv(args.distribution, render_mode="ansi")
    obs, info = env.reset(seed=args.seed)
    print(f"task {info['task_id']}: {env.task}")
    print(env.render(), end="")
    assert env.action_space.shape is not None  # a Box, whose shape is never None
    action = np.zeros(env.action_space.shape, dtype=np.float32)
    action[0] = args.lr_action
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        done = terminated or truncated
        print(env.render(), end="")
    if info.get("diverged"):
        print(f"return {total:+.4f}: the run diverged (the return of a diverged episode is -divergence_penalty)")
    else:
        print(f"return {total:+.4f} = log(L_1 / L_T); final validation loss {info['val_loss']:.4g}")


if __name__ == "__main__":
    main()
