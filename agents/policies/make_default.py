"""Train the stopgap ``"default"`` policy shipped in ``agents/policies/default/``.

This is a short, honest placeholder until the project's meta-training command (``hpo-train``)
produces the benchmarked policy: RecurrentPPO over :class:`~hpo_env.HPOVecEnv` on the meta-training
task families for a fixed wall-clock budget, observations normalised by ``VecNormalize`` (rewards
not), saved with :func:`agents.save_bundle`. Run from the repository root::

    python -m agents.policies.make_default --minutes 6 --out agents/policies/default
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecMonitor, VecNormalize

from agents.bundle import save_bundle
from hpo_env import HPOVecEnv


class _WallClock(BaseCallback):
    """Stops learning after ``seconds`` of wall time (checked at every environment step)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.deadline = time.monotonic() + seconds

    def _on_step(self) -> bool:
        return time.monotonic() < self.deadline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="wall-clock training budget")
    parser.add_argument("--num-envs", type=int, default=16, help="HPOVecEnv slots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "default")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    venv = HPOVecEnv(args.num_envs, "train", seed=args.seed)
    env = VecNormalize(VecMonitor(venv), norm_obs=True, norm_reward=False, clip_obs=10.0, gamma=0.99)
    model = RecurrentPPO(
        "MlpLstmPolicy",
        env,
        n_steps=64,
        batch_size=256,
        n_epochs=4,
        gamma=0.99,
        gae_lambda=0.95,
        learning_rate=3e-4,
        ent_coef=0.0,
        policy_kwargs={"lstm_hidden_size": 64, "net_arch": {"pi": [64], "vf": [64]}},
        seed=args.seed,
        device="cpu",
        verbose=0,
    )
    start = time.monotonic()
    model.learn(total_timesteps=10**9, callback=_WallClock(args.minutes * 60))
    elapsed = time.monotonic() - start
    ep_returns = [ep["r"] for ep in model.ep_info_buffer]
    mean_return = float(sum(ep_returns) / len(ep_returns)) if ep_returns else float("nan")
    command = (
        f"python -m agents.policies.make_default --minutes {args.minutes:g} --num-envs {args.num_envs} "
        f"--seed {args.seed}"
    )
    description = (
        f"STOPGAP, NOT BENCHMARKED. RecurrentPPO (MlpLstmPolicy, lstm_hidden_size=64, n_steps=64, "
        f"batch_size=256, n_epochs=4, gamma=0.99, lr=3e-4) over HPOVecEnv({args.num_envs}, 'train', "
        f"seed={args.seed}) wrapped in VecMonitor+VecNormalize(norm_reward=False), trained for "
        f"{model.num_timesteps} environment steps ({elapsed / 60:.1f} min wall clock, torch 1 thread, 2-core CPU). "
        f"Mean training-episode return over the last {len(ep_returns)} episodes: {mean_return:.3f} "
        f"(stochastic actions). Controls lr and weight_decay. Command: {command}. "
        "To be replaced by the benchmarked policy from hpo-train."
    )
    save_bundle(
        args.out,
        model,
        venv.decoder,
        obs_rms=env.obs_rms,
        clip_obs=env.clip_obs,
        epsilon=env.epsilon,
        config={
            "description": description,
            "command": command,
            "seed": args.seed,
            "timesteps": int(model.num_timesteps),
            "task_distribution": "train",
            "num_envs": args.num_envs,
            "benchmarked": False,
        },
    )
    print(description)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
