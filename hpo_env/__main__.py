"""``python -m hpo_env`` / ``hpo-demo``: run one episode of the environment with a simple schedule."""

from __future__ import annotations

import argparse

import numpy as np

from hpo_env.envs import HPOEnv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--distribution", default="train", help="train, test, all or toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr-action", type=float, default=-0.2, help="constant action on the learning rate, in [-1, 1]"
    )
    args = parser.parse_args(argv)
    env = HPOEnv(args.distribution, render_mode="ansi")
    obs, info = env.reset(seed=args.seed)
    print(f"task {info['task_id']}: {env.task}")
    print(env.render(), end="")
    action = np.zeros(env.action_space.shape, dtype=np.float32)
    action[0] = args.lr_action
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        done = terminated or truncated
        print(env.render(), end="")
    print(f"return {total:+.4f} = log(L_1 / L_T); final validation loss {info['val_loss']:.4g}")


if __name__ == "__main__":
    main()
