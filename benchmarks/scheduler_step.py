"""Median cost of one ``PolicyScheduler.step()`` call (target: well under 1 ms on 2 CPU cores).

Measures, in one run and side by side, per call:

* ``PolicyScheduler.step`` with the shipped default policy (LSTM; or ``--policy``) on an AdamW optimiser;
* the part of it spent in the policy (``PolicyBundle.predict``: normalisation + SB3 forward);
* ``torch.optim.lr_scheduler.ReduceLROnPlateau.step`` as a familiar reference.

Run from the repository root::

    python benchmarks/scheduler_step.py --calls 3000 --json results/scheduler_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from agents import PolicyScheduler, load_bundle, resolve_policy
from agents.scheduler import HORIZON_WARNING
from training.cli import HelpFormatter, non_negative_int, positive_int, run_script


def _time_calls(fn, calls: int) -> np.ndarray:
    out = np.empty(calls)
    for i in range(calls):
        start = time.perf_counter_ns()
        fn(i)
        out[i] = time.perf_counter_ns() - start
    return out / 1e6  # ms


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--calls", type=positive_int, default=3000, help="timed step() calls per measurement")
    parser.add_argument("--warmup", type=non_negative_int, default=200, help="untimed calls first")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.add_argument("--policy", default="default", help="bundle directory or shipped policy name")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    path = resolve_policy(args.policy)
    bundle = load_bundle(path)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    n = args.warmup + args.calls
    rng = np.random.default_rng(0)
    losses = 2.0 * np.exp(-np.linspace(0, 3, n)) * (1 + 0.05 * rng.random(n))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():  # a run this long is only here so that it never runs out of decisions
        warnings.filterwarnings("ignore", message=HORIZON_WARNING)
        sched = PolicyScheduler(opt, bundle, total_steps=10 * n, epochs=10 * n)
    opt.step()  # no gradients, no update: step() expects an optimizer step before its first call
    _time_calls(lambda i: sched.step(losses[i], train_loss=losses[i] * 0.9), args.warmup)
    step_ms = _time_calls(lambda i: sched.step(losses[i], train_loss=losses[i] * 0.9), args.calls)

    obs = sched.last_observation[None]
    state = bundle.initial_state(1)
    starts = np.zeros(1, dtype=bool)

    def predict(_: int) -> None:
        nonlocal state
        _, state = bundle.predict(obs, state=state, episode_start=starts, deterministic=True)

    predict_ms = _time_calls(predict, args.calls)

    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt2, patience=5)
    plateau_ms = _time_calls(lambda i: plateau.step(losses[i]), args.calls)

    results = {
        "torch_threads": torch.get_num_threads(),
        "calls": args.calls,
        "policy": str(path),
        "policy_scheduler_step_median_ms": statistics.median(step_ms),
        "policy_scheduler_step_p90_ms": float(np.percentile(step_ms, 90)),
        "policy_predict_median_ms": statistics.median(predict_ms),
        "reduce_lr_on_plateau_step_median_ms": statistics.median(plateau_ms),
    }
    results["policy_share_of_step"] = results["policy_predict_median_ms"] / results["policy_scheduler_step_median_ms"]
    results["ratio_to_reduce_lr_on_plateau"] = (
        results["policy_scheduler_step_median_ms"] / results["reduce_lr_on_plateau_step_median_ms"]
    )
    print(f"policy: {path}")
    print(f"torch threads: {results['torch_threads']}, {args.calls} timed calls each (after {args.warmup} warm-up)")
    print(f"{'measurement':42s} {'median ms':>10s} {'p90 ms':>10s}")
    for label, ms in (
        ("PolicyScheduler.step", step_ms),
        ("  of which PolicyBundle.predict", predict_ms),
        ("ReduceLROnPlateau.step (reference)", plateau_ms),
    ):
        print(f"{label:42s} {statistics.median(ms):10.4f} {np.percentile(ms, 90):10.4f}")
    print(
        f"policy share of step: {results['policy_share_of_step']:.0%}; "
        f"step / ReduceLROnPlateau: {results['ratio_to_reduce_lr_on_plateau']:.0f}x"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(run_script(main))
