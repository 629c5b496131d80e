"""How often to call ``PolicyScheduler.step()``: the same run, decided 10 to 250 times.

Meta-training runs have 10-30 decisions (``hpo_env.tasks.DECISIONS_PER_RUN``). A user may call
``step()`` once per epoch over 200 epochs, or once per 2 optimiser steps. This script trains the
problems of ``examples/deploy_policy.py`` (models the policy never saw) for their usual number of
optimiser steps (500), with the policy deciding every ``500 / T`` steps for each ``T`` given, and
prints the test loss per ``T`` (mean ± sd over seeds), with the peak and final learning rate as
multiples of the start, next to the untuned constant and cosine schedules, whose runs do not depend
on ``T``. With ``--grouped D`` (``D`` among the ``T``, dividing every larger one), every ``T`` above ``D``
also runs with ``step()`` called ``T`` times and ``PolicyScheduler(decisions=D)``: the policy then
decides every ``T / D`` calls, at the same optimiser steps as the ``T = D`` row, which these runs should
match (the training loss it sees is a mean of means, equal up to float rounding).

Run from the repository root (about 15 minutes on 2 CPU cores for the defaults)::

    python benchmarks/horizon.py
    python benchmarks/horizon.py --problems digits --seeds 5 --calls 10 25 50 100 250
    python benchmarks/horizon.py --problems digits --seeds 5 --calls 25 100 250 --grouped 25
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from agents import load_bundle, resolve_policy
from agents.scheduler import HORIZON_WARNING
from training.cli import HelpFormatter, positive_int, run_script

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deploy_policy.py"


def _example():
    """``examples/deploy_policy.py`` as a module (its problems and its training loop)."""
    spec = importlib.util.spec_from_file_location("deploy_policy", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["deploy_policy"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    example = _example()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "--problems",
        nargs="+",
        choices=sorted(example.PROBLEMS),
        default=["digits", "charlm", "transformer"],
        help="models to train (those of examples/deploy_policy.py)",
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="runs per problem and number of decisions")
    parser.add_argument(
        "--calls",
        "--decisions",
        dest="calls",
        type=positive_int,
        nargs="+",
        default=[10, 25, 50, 100, 250],
        help="numbers of step() calls per run, T, each a decision (unless --grouped); each must divide the "
        "problem's optimiser steps (500)",
    )
    parser.add_argument(
        "--grouped",
        type=positive_int,
        default=None,
        metavar="D",
        help="also run every number of calls above D with PolicyScheduler(decisions=D), to compare with the D row "
        "(D must be one of --calls and divide the larger ones)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="optimiser steps per run (default: the problem's, 500)"
    )
    parser.add_argument("--policy", default="default", help="policy bundle directory or shipped name")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.json is not None and args.json.is_dir():  # found out only when the numbers are written, at the end
        parser.error(
            f"--json {str(args.json)!r} is a folder; give the JSON file's path, e.g. {args.json / 'horizon.json'}"
        )
    if args.grouped is not None:
        uneven = [t for t in args.calls if t > args.grouped and t % args.grouped]
        if args.grouped not in args.calls or uneven:
            parser.error(
                f"--grouped {args.grouped} must be one of --calls {args.calls} and divide the larger ones"
                + (f" (not {uneven})" if uneven else "")
                + ", so that the grouped runs decide at the same optimiser steps as that row"
            )
    torch.set_num_threads(1)  # tiny models run best on one thread
    bundle = load_bundle(resolve_policy(args.policy))
    with warnings.catch_warnings():  # horizons outside 10-60 decisions are what this measures: known
        warnings.filterwarnings("ignore", message=HORIZON_WARNING)
        results = _measure(example, parser, args, bundle)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _measure(example, parser: argparse.ArgumentParser, args: argparse.Namespace, bundle) -> dict:
    results: dict = {}
    for key in args.problems:
        problem = example.PROBLEMS[key]()
        total = args.steps or problem.steps_per_decision * problem.decisions
        bad = [t for t in args.calls if total % t]
        if bad:
            parser.error(f"--calls {bad} do not divide {problem.name}'s {total} optimiser steps")
        rows = results[problem.name] = {}
        # The baselines' runs do not depend on the decisions, only on when validation is measured.
        problem.steps_per_decision, problem.decisions = total // args.calls[0], args.calls[0]
        for schedule in ("constant", "cosine"):
            test = [example.train(problem, schedule, seed, bundle).test_loss for seed in range(args.seeds)]
            rows[schedule] = {"test_loss": float(np.mean(test)), "sd": float(np.std(test))}
            print(f"{problem.name:22s} {schedule:>14s}  test {np.mean(test):.4f} ± {np.std(test):.4f}", flush=True)
        variants = [(calls, None) for calls in args.calls]
        if args.grouped is not None:
            variants += [(calls, args.grouped) for calls in args.calls if calls > args.grouped]
        for calls, grouped in variants:
            problem.steps_per_decision, problem.decisions = total // calls, calls
            runs = [
                example.train(problem, "policy", seed, bundle, policy_decisions=grouped) for seed in range(args.seeds)
            ]
            test = [r.test_loss for r in runs]
            peak = float(np.mean([max(r.lr) / r.lr[0] for r in runs]))
            final = float(np.mean([r.lr[-1] / r.lr[0] for r in runs]))
            label = f"{calls} decisions" if grouped is None else f"{calls} calls, decisions={grouped}"
            rows[f"policy, {label}"] = {
                "test_loss": float(np.mean(test)),
                "sd": float(np.std(test)),
                "peak_lr_x": peak,
                "final_lr_x": final,
                "test_losses": [float(v) for v in test],
            }
            print(
                f"{problem.name:22s} {label:>26s}  test {np.mean(test):.4f} ± {np.std(test):.4f}  "
                f"(step() every {total // calls} steps; lr peak x{peak:.1f}, final x{final:.2f})",
                flush=True,
            )
    return results


if __name__ == "__main__":
    sys.exit(run_script(main))
