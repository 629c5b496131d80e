"""Average the policy weights of a run's late checkpoints into one bundle (``hpo-average``).

PPO's final policy is one point of a trajectory that keeps moving: between two held-out evaluations
of the same run, a family's mean return can swing by half its value. A uniform average of the
policy weights at several late checkpoints (stochastic weight averaging: Izmailov et al., 2018; for
deep RL, Nikishin et al., 2018) is a cheap way to take the centre of that late trajectory instead of
its last point. It needs no retraining, only the checkpoints: train with ``hpo-train
--keep-checkpoints 0`` (and a ``--checkpoint-freq`` as fine as the averaging should be).

The averaged bundle keeps everything else of the run's final bundle: its action decoder, its
features, its configuration and its observation statistics (``VecNormalize`` changes little late in
a run; the final statistics are those the last policies were trained with). Its config records which
checkpoints were averaged.

Usage::

    hpo-average runs/full-s1 --from-timesteps 196608      # -> runs/full-s1/averaged_bundle
    hpo-average runs/full-s1 --last 8 --out my_bundle

The averaged ``model.zip`` carries the final model's optimiser state; it is for deployment and
benchmarks, not for continuing PPO from.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch

from agents.bundle import NORM_FILE, BundleError, PolicyBundle, load_bundle, save_bundle
from training.callbacks import CHECKPOINT_MODEL, list_checkpoints, read_checkpoint_state
from training.cli import non_negative_int, readable_warnings

__all__ = ["average_run", "average_state_dicts", "run_checkpoints"]

#: Where :func:`average_run` writes by default, inside the run directory.
AVERAGED_BUNDLE = "averaged_bundle"


def average_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors across ``state_dicts`` (others: the last one's).

    Raises:
        ValueError: no state dicts, or their keys or shapes differ (not checkpoints of one model).
    """
    if not state_dicts:
        raise ValueError("nothing to average: no state dicts given")
    keys = list(state_dicts[-1])
    averaged: dict[str, torch.Tensor] = {}
    for i, sd in enumerate(state_dicts):
        if set(sd) != set(keys):
            raise ValueError(
                f"state dict {i} differs from the last one in its keys (only in it: {sorted(set(sd) - set(keys))}; "
                f"only in the last: {sorted(set(keys) - set(sd))}): only checkpoints of one model can be averaged"
            )
    for key in keys:
        tensors = [sd[key] for sd in state_dicts]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"{key!r} has shapes {sorted(shapes)} across the state dicts; they must agree")
        last = tensors[-1]
        if last.is_floating_point():
            stacked = torch.stack([t.detach().to(torch.float64) for t in tensors])
            averaged[key] = stacked.mean(dim=0).to(last.dtype)
        else:
            averaged[key] = last.clone()
    return averaged


def run_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run, as ``(timesteps, directory)`` in order of timesteps."""
    return [
        (int(read_checkpoint_state(p)["num_timesteps"]), p) for p in list_checkpoints(Path(run_dir) / "checkpoints")
    ]


def _policy_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    from stable_baselines3.common.save_util import load_from_zip_file

    try:
        _, params, _ = load_from_zip_file(checkpoint / CHECKPOINT_MODEL, device="cpu", load_data=False)
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, RuntimeError, OSError) as err:
        raise BundleError(
            f"{checkpoint / CHECKPOINT_MODEL} is corrupted ({err}); leave that checkpoint out of the average"
        ) from err
    if not params or "policy" not in params:
        raise BundleError(f"{checkpoint / CHECKPOINT_MODEL} holds no policy weights")
    # sb3 annotates params as a TensorDict, but each entry is a whole module's state dict.
    return params["policy"]  # type: ignore[return-value]


def average_run(
    run_dir: str | Path,
    *,
    from_timesteps: int | None = None,
    last: int | None = None,
    out: str | Path | None = None,
    description: str | None = None,
) -> Path:
    """Write a bundle whose policy is the mean of the run's checkpointed policies; returns its path.

    Args:
        run_dir: a finished ``hpo-train`` run (its ``bundle/`` and ``checkpoints/``).
        from_timesteps: average every checkpoint at or after this many timesteps.
        last: or average the ``last`` most recent checkpoints (give exactly one of the two).
        out: the bundle directory to write (default ``RUN_DIR/averaged_bundle``; replaced if it exists,
            but never the run's own ``bundle/`` or ``best_bundle/``).
        description: a line saying what the bundle is (default: which checkpoints were averaged).

    Raises:
        ValueError: bad selection, fewer than two checkpoints selected, or a run without its final
            bundle or whose last checkpoint is not the final bundle's policy.
    """
    run_dir = Path(run_dir)
    if (from_timesteps is None) == (last is None):
        raise ValueError("give exactly one of from_timesteps (e.g. 196608) and last (e.g. 8)")
    if last is not None and last < 2:
        raise ValueError(f"last must be >= 2 checkpoints to average, got {last}")
    final_dir = run_dir / "bundle"
    if not run_dir.is_dir():
        raise ValueError(
            f"run folder {str(run_dir)!r} "
            + ("is a file" if run_dir.exists() else "does not exist")
            + ": pass the folder of an hpo-train run (--logdir/--run-name, e.g. runs/NAME)"
        )
    if not (run_dir / "settings.json").is_file():
        bundle = (run_dir / "config.json").is_file()
        raise ValueError(
            f"{str(run_dir)!r} is not an hpo-train run folder (no settings.json)"
            + (f": it is a policy bundle; pass the run folder above it, {str(run_dir.parent)!r}" if bundle else "")
        )
    if not final_dir.is_dir():
        raise ValueError(
            f"{run_dir} has no final bundle ({final_dir}): average a finished run "
            f"(continue it with: hpo-train --resume {run_dir})"
        )
    target = run_dir / AVERAGED_BUNDLE if out is None else Path(out)
    protected = [run_dir / "bundle", run_dir / "best_bundle", run_dir / "checkpoints"]
    if any(target.resolve() == p.resolve() or p.resolve() in target.resolve().parents for p in protected):
        raise ValueError(f"--out {str(target)!r} would replace the run's own files; write the average elsewhere")
    final = load_bundle(final_dir)
    if not isinstance(final, PolicyBundle):
        raise ValueError(f"{final_dir} is an ensemble; average the checkpoints of one run")
    checkpoints = run_checkpoints(run_dir)
    if not checkpoints:
        raise ValueError(
            f"{run_dir / 'checkpoints'} holds no complete checkpoint; train with --keep-checkpoints 0 and a "
            "--checkpoint-freq that leaves several checkpoints"
        )
    # Both selections end with the last checkpoint, which must be the final bundle's policy.
    # With last None, from_timesteps is given (exactly one of the two is).
    chosen = checkpoints[-last:] if last is not None else [c for c in checkpoints if c[0] >= cast(int, from_timesteps)]
    if last is None and checkpoints[0][0] > cast(int, from_timesteps) and not _kept_every_checkpoint(run_dir):
        kept = ", ".join(f"{t:,}" for t, _ in checkpoints)
        raise ValueError(
            f"asked for the checkpoints from {from_timesteps:,} timesteps on, but the run pruned its older ones "
            f"(it kept {kept} only), so the average would not be of the window asked for: pass --last "
            f"{len(checkpoints)} to average what is kept, or train with --keep-checkpoints 0 to keep them all"
        )
    if len(chosen) < 2 or (last is not None and len(chosen) < last):
        kept = ", ".join(f"{t:,}" for t, _ in checkpoints)
        wanted = (
            f"the last {last} checkpoints"
            if last is not None
            else f"the checkpoints from {from_timesteps:,} timesteps on (at least 2; found {len(chosen)})"
        )
        hint = (
            "pick fewer or earlier ones, or train with a finer --checkpoint-freq"
            if _kept_every_checkpoint(run_dir)
            else "train with --keep-checkpoints 0 to keep them all"
        )
        raise ValueError(f"asked for {wanted}, but the run has checkpoints at {kept} timesteps only ({hint})")
    state_dicts = [_policy_state_dict(path) for _, path in chosen]
    if checkpoints[-1][0] != final.model.num_timesteps or any(
        not torch.equal(state_dicts[-1][k], v)
        for k, v in final.model.policy.state_dict().items()
        if k in state_dicts[-1]
    ):
        raise ValueError(
            f"the run's last checkpoint ({checkpoints[-1][0]:,} timesteps) is not its final bundle's policy "
            f"({final.model.num_timesteps:,} timesteps): finish the run first (hpo-train --resume {run_dir})"
        )
    try:
        final.model.policy.load_state_dict(average_state_dicts(state_dicts))
    except RuntimeError as err:  # checkpoints of another architecture than the final bundle's
        raise BundleError(f"the checkpoints of {run_dir} do not fit its final bundle's policy: {err}") from err

    norm = json.loads((final_dir / NORM_FILE).read_text())
    obs_rms = None if norm is None else SimpleNamespace(mean=norm["mean"], var=norm["var"], count=norm.get("count", 0))
    steps = [t for t, _ in chosen]
    # save_bundle writes the format keys itself; the final policy's in-training evaluation is not this one's
    config: dict[str, Any] = {k: v for k, v in final.config.items() if k != "evaluation"}
    config["averaged"] = {
        "method": "uniform mean of the policy weights (stochastic weight averaging)",
        "checkpoints": steps,
        "observation_statistics": "the final bundle's",
    }
    config["description"] = description or (
        f"the policy weights of {run_dir.name} averaged over {len(steps)} checkpoints "
        f"({steps[0]:,} to {steps[-1]:,} timesteps)"
    )
    return save_bundle(
        target,
        final.model,
        final.decoder,
        obs_rms=obs_rms,
        clip_obs=final.clip_obs,
        epsilon=final.epsilon,
        frame_stack=final.frame_stack,
        config=config,
        **final.feature_options,
    )


def _kept_every_checkpoint(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "settings.json").read_text()).get("keep_checkpoints") == 0
    except (OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """``hpo-average RUN (--from-timesteps T | --last N) [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="hpo-average",
        description="Average the policy weights of a finished run's late checkpoints into one bundle "
        "(train with --keep-checkpoints 0 so that they are kept). Use the result anywhere a bundle goes.",
    )
    parser.add_argument("run", help="the run directory (runs/NAME)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--from-timesteps", type=non_negative_int, help="average every checkpoint at or after this many timesteps"
    )
    which.add_argument("--last", type=non_negative_int, help="average the N most recent checkpoints")
    parser.add_argument(
        "--out",
        default=None,
        help=f"bundle directory to write (default RUN/{AVERAGED_BUNDLE}, replaced if it exists; another existing "
        "directory only with --force)",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--description", default=None, help="a line saying what the bundle is")
    args = parser.parse_args(argv)
    if args.out is not None and Path(args.out).exists() and not args.force:
        out = Path(args.out)
        what = "a policy bundle" if (out / "config.json").is_file() else "a file" if out.is_file() else "a directory"
        parser.exit(
            2,
            f"hpo-average: error: --out {args.out!r} exists ({what}): choose a new directory, or pass --force to "
            "replace it\n",
        )
    try:
        with readable_warnings("hpo-average"):
            path = average_run(
                args.run, from_timesteps=args.from_timesteps, last=args.last, out=args.out, description=args.description
            )
    except ValueError as err:  # BundleError included
        parser.exit(2, f"hpo-average: error: {err}\n")
    steps = load_bundle(path).config["averaged"]["checkpoints"]
    print(f"wrote the mean of {len(steps)} policies ({steps[0]:,} to {steps[-1]:,} timesteps) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
