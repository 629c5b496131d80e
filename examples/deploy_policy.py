"""Tune two models the policy has never seen, in a plain PyTorch training loop.

Trains (1) a small CNN on scikit-learn's ``load_digits`` with SGD and (2) a character-level GRU
language model on the docstrings of Python's standard library with AdamW, and with ``--problems
transformer`` (3) a two-layer causal Transformer on the same text, with AdamW's usual two param groups
(no weight decay on biases, norms and positions); each with three learning-rate schedules at the same
step budget and the same initial hyperparameters:

* ``policy``: the meta-trained :class:`~agents.PolicyScheduler` (``lr`` and ``weight_decay``),
* ``constant``: the optimiser's initial learning rate throughout,
* ``cosine``: ``torch.optim.lr_scheduler.CosineAnnealingLR`` from the initial learning rate to 0,

and optionally (``--lr-grid 0.3 3 10``) constant and cosine at multiples of the initial learning
rate: a small tuning grid, since untuned defaults are an easy bar.

It prints a comparison table (final validation and test loss, test accuracy; mean and standard
deviation over seeds) and saves a plot of the schedules and validation curves. The integration is
five lines (marked ``# <--`` below)::

    scheduler = PolicyScheduler.from_pretrained("default", optimizer, total_steps=decisions, epochs=epochs)  # <--
    for t in range(decisions):
        train_for(steps_per_decision)                                                          # <--
        val_loss = evaluate()                                                                  # <--
        scheduler.step(val_loss, train_loss=mean_train_loss)                                   # <--

Run from the repository root (2-3 minutes on 2 CPU cores)::

    python examples/deploy_policy.py                       # the digits CNN and the GRU, 3 seeds
    python examples/deploy_policy.py --problems digits --seeds 1 --out runs/examples
    python examples/deploy_policy.py --problems transformer --lr-grid 1 0.3 3   # an architecture not meta-trained on
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from agents import PolicyScheduler, load_bundle, resolve_policy
from hpo_env.data import CHAR_VOCAB, python_text_corpus
from training.cli import HelpFormatter, positive_float, positive_int, run_script

SCHEDULES = ("policy", "constant", "cosine")


# --------------------------------------------------------------------------------------------------
# The problems: data, model, optimiser, minibatches and evaluation in plain PyTorch.
@dataclass
class Problem:
    """One training problem in plain PyTorch.

    Attributes:
        name: label in the table and plot.
        make_model: builds a fresh model (uses torch's global generator, seeded per run).
        make_optimizer: builds the optimiser with its initial hyperparameters.
        batch: draws a training minibatch ``(x, y)`` from a generator.
        loss: ``loss(model, x, y) -> (mean loss, number of correct predictions, number of predictions)``.
        val, test: fixed evaluation sets ``(x, y)``.
        steps_per_decision: optimiser steps between two ``scheduler.step()`` calls (K).
        decisions: number of decision intervals (T); the run has ``K * T`` optimiser steps.
        samples_per_step: training examples (targets) per minibatch.
        train_size: training examples in all; with the above, how many epochs the run makes.
    """

    name: str
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    batch: Callable[[np.random.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, int, int]]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    steps_per_decision: int
    decisions: int
    samples_per_step: int
    train_size: int

    @property
    def epochs(self) -> float:
        """Passes over the training set in the whole run (a policy with the epochs feature observes it)."""
        return self.steps_per_decision * self.decisions * self.samples_per_step / self.train_size


def digits_problem() -> Problem:
    """A two-layer CNN on 8x8 digit images, SGD with momentum at PyTorch-typical settings."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    order = np.random.default_rng(0).permutation(len(x))  # a fixed split, the same for every run
    tr, va, te = order[:1100], order[1100:1450], order[1450:]

    def make_model() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )

    def batch(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(rng.choice(tr, size=32, replace=False))
        return x[idx], y[idx]

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        logits = model(xb)
        return F.cross_entropy(logits, yb), int((logits.argmax(-1) == yb).sum()), len(yb)

    return Problem(
        name="digits CNN (SGD)",
        make_model=make_model,
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4),
        batch=batch,
        loss=loss,
        val=(x[va], y[va]),
        test=(x[te], y[te]),
        steps_per_decision=20,
        decisions=25,
        samples_per_step=32,
        train_size=len(tr),
    )


class CharGRU(nn.Module):
    """Embedding -> GRU -> next-character logits at every position."""

    def __init__(self, vocab: int, embedding: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.gru = nn.GRU(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(ids))
        return self.head(out)


class CharTransformer(nn.Module):
    """Causal self-attention over characters: embedding plus learned positions, pre-norm Transformer
    layers, next-character logits at every position (an architecture absent from meta-training)."""

    def __init__(self, vocab: int, window: int, width: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(window, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(window), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        hidden = self.blocks(self.embed(ids) + self.position[:n], mask=self.causal[:n, :n], is_causal=True)
        return self.head(self.norm(hidden))


def transformer_adamw(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW as Transformers are usually trained: weight decay on the matrices only (a second param group
    with ``weight_decay=0`` for biases, norms and positions, which the scheduler keeps at 0)."""
    named = list(model.named_parameters())
    decay = [p for name, p in named if p.dim() >= 2 and name != "position"]
    no_decay = [p for name, p in named if p.dim() < 2 or name == "position"]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, weight_decay=1e-2)


def char_lm_problem(
    name: str,
    make_model: Callable[[int], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    window: int = 48,
) -> Problem:
    """A character-level language model on the docstrings of Python's standard library: 80/10/10 split,
    minibatches of 32 random windows, 500 optimiser steps; ``make_model(window)`` builds the model."""
    ids = torch.from_numpy(python_text_corpus())
    n = len(ids)
    train_ids, val_ids, test_ids = ids[: int(0.8 * n)], ids[int(0.8 * n) : int(0.9 * n)], ids[int(0.9 * n) :]

    def windows(source: torch.Tensor, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.stack([source[s : s + window + 1] for s in starts])
        return chunk[:, :-1], chunk[:, 1:]

    fixed = np.random.default_rng(1)
    val = windows(val_ids, fixed.integers(0, len(val_ids) - window - 1, size=64))
    test = windows(test_ids, fixed.integers(0, len(test_ids) - window - 1, size=128))

    def batch(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return windows(train_ids, rng.integers(0, len(train_ids) - window - 1, size=32))

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        logits = model(xb)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
        return ce, int((logits.argmax(-1) == yb).sum()), yb.numel()

    return Problem(
        name=name,
        make_model=lambda: make_model(window),
        make_optimizer=make_optimizer,
        batch=batch,
        loss=loss,
        val=val,
        test=test,
        steps_per_decision=25,
        decisions=20,
        samples_per_step=32 * window,  # every position of a window is a next-character target
        train_size=len(train_ids),
    )


def charlm_problem() -> Problem:
    """A character-level GRU language model, AdamW at its PyTorch defaults (lr 1e-3, weight decay 1e-2)."""
    return char_lm_problem(
        "char-LM GRU (AdamW)",
        lambda window: CharGRU(len(CHAR_VOCAB)),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2),
    )


def transformer_problem() -> Problem:
    """A two-layer causal Transformer on the same characters, AdamW (lr 1e-3, weight decay 1e-2 on the
    matrices only)."""
    return char_lm_problem(
        "char-LM Transformer", lambda window: CharTransformer(len(CHAR_VOCAB), window), transformer_adamw
    )


PROBLEMS = {"digits": digits_problem, "charlm": charlm_problem, "transformer": transformer_problem}


# --------------------------------------------------------------------------------------------------
# One training run with one schedule.
@dataclass
class Run:
    problem: str
    schedule: str
    seed: int
    lr: list[float] = field(default_factory=list)  # per optimiser step
    val_loss: list[float] = field(default_factory=list)  # after each decision interval
    test_loss: float = math.nan
    test_accuracy: float = math.nan
    seconds: float = 0.0

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1]


@torch.no_grad()
def evaluate(problem: Problem, model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    model.eval()
    loss, correct, count = problem.loss(model, *split)
    model.train()
    return float(loss), correct / count


def train(
    problem: Problem,
    schedule: str,
    seed: int,
    bundle,
    lr_scale: float = 1.0,
    lr_max_rise: float | None = None,
    policy_decisions: int | None = None,
) -> Run:
    torch.manual_seed(seed)  # model initialisation (a script, not library code)
    rng = np.random.default_rng(seed)  # minibatch order
    model = problem.make_model()
    optimizer = problem.make_optimizer(model)
    for group in optimizer.param_groups:  # a grid point of the tuned baselines
        group["lr"] *= lr_scale
    total = problem.steps_per_decision * problem.decisions
    scheduler = None
    if schedule == "policy":
        scheduler = PolicyScheduler(
            optimizer,
            bundle,
            total_steps=problem.decisions,  # the step() calls: one per interval of K optimiser steps
            epochs=problem.epochs,
            lr_max_rise=lr_max_rise,
            decisions=policy_decisions,  # None: the policy decides at every call
        )
    elif schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    run = Run(problem.name, schedule if lr_scale == 1 else f"{schedule} x{lr_scale:g}", seed)
    start = time.perf_counter()
    for _ in range(problem.decisions):
        train_losses = []
        for _ in range(problem.steps_per_decision):
            x, y = problem.batch(rng)
            loss, _, _ = problem.loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.lr.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            train_losses.append(loss.item())
            if schedule == "cosine":
                scheduler.step()
        val_loss, _ = evaluate(problem, model, problem.val)
        run.val_loss.append(val_loss)
        if schedule == "policy":
            scheduler.step(val_loss, train_loss=float(np.mean(train_losses)))
    run.test_loss, run.test_accuracy = evaluate(problem, model, problem.test)
    run.seconds = time.perf_counter() - start
    return run


# --------------------------------------------------------------------------------------------------
# Report: a table and a figure.
def table(runs: list[Run]) -> str:
    lines = [
        f"{'problem':22s} {'schedule':12s} {'final val loss':>17s} {'test loss':>17s} {'test acc':>15s} "
        f"{'policy wins':>11s} {'s/run':>6s}"
    ]
    for problem in dict.fromkeys(r.problem for r in runs):
        policy = {r.seed: r for r in runs if r.problem == problem and r.schedule == "policy"}
        for schedule in dict.fromkeys(r.schedule for r in runs if r.problem == problem):
            rs = [r for r in runs if r.problem == problem and r.schedule == schedule]

            def stat(values: list[float], fmt: str = ".4f") -> str:
                if len(values) == 1:  # one seed: no spread to show
                    return f"{values[0]:{fmt}}"
                return f"{np.mean(values):{fmt}} ± {np.std(values):{fmt}}"

            wins = (
                "" if schedule == "policy" else f"{sum(policy[r.seed].test_loss < r.test_loss for r in rs)}/{len(rs)}"
            )
            lines.append(
                f"{problem:22s} {schedule:12s} {stat([r.final_val_loss for r in rs]):>17s} "
                f"{stat([r.test_loss for r in rs]):>17s} {stat([r.test_accuracy for r in rs], '.3f'):>15s} "
                f"{wins:>11s} {np.mean([r.seconds for r in rs]):6.1f}"
            )
    lines.append("policy wins: seeds on which the policy's test loss is lower than this schedule's")
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r.problem for r in runs))
    fig, axes = plt.subplots(len(problems), 2, figsize=(11, 3.6 * len(problems)), squeeze=False)
    colors = {"policy": "C3", "constant": "C0", "cosine": "C2"}
    for row, problem in zip(axes, problems):
        for r in (r for r in runs if r.problem == problem):
            label = r.schedule if r.seed == min(x.seed for x in runs) else None
            style = {"color": colors[r.schedule.split()[0]], "alpha": 0.7, "label": label}
            style["linestyle"] = "-" if " x" not in r.schedule else ":"
            row[0].plot(np.arange(1, len(r.lr) + 1), r.lr, **style)
            steps = np.arange(1, len(r.val_loss) + 1) * (len(r.lr) // len(r.val_loss))
            row[1].plot(steps, r.val_loss, **style)
        row[0].set(title=f"{problem}: learning rate", xlabel="optimiser step", ylabel="lr", yscale="log")
        # cosine ends at 0; show two decades below the initial learning rate, not the log-scale abyss
        row[0].set_ylim(bottom=min(r.lr[0] for r in runs if r.problem == problem) / 100)
        losses = np.concatenate([r.val_loss for r in runs if r.problem == problem])
        losses = losses[np.isfinite(losses) & (losses > 0)]
        spans_decades = losses.size and losses.max() / losses.min() > 3  # else a log axis magnifies noise
        row[1].set(
            title=f"{problem}: validation loss",
            xlabel="optimiser step",
            ylabel="validation loss",
            yscale="log" if spans_decades else "linear",
        )
        row[0].set_ylabel("learning rate")
        row[0].legend(fontsize="small")
        row[1].legend(fontsize="small")
    seeds = len({r.seed for r in runs})
    fig.suptitle(f"The policy against constant and cosine schedules, {seeds} seed{'s' if seeds > 1 else ''} each")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "--problems", nargs="+", choices=sorted(PROBLEMS), default=["digits", "charlm"], help="models to train"
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="runs per problem and schedule")
    parser.add_argument("--policy", default="default", help="policy bundle directory or shipped name")
    parser.add_argument("--out", type=Path, default=Path("runs/examples"), help="where the plot goes")
    parser.add_argument("--decisions", type=positive_int, default=None, help="override T (for a quick smoke run)")
    parser.add_argument(
        "--lr-grid",
        type=positive_float,
        nargs="+",
        default=[1.0],
        help="also run constant and cosine at these multiples of the initial lr (a tuned-baseline grid)",
    )
    parser.add_argument(
        "--lr-max-rise",
        type=positive_float,
        default=None,
        help="cap the policy's learning rate at 10**D times the initial one, D > 0 (default: the policy's own cap, "
        "if any, which a deployment can tighten or loosen but not remove)",
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (tiny models run best on one)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():  # found out only when the plot is saved, after every run
        parser.error(f"--out {str(args.out)!r} is a file; give a folder for the plot")
    torch.set_num_threads(args.threads)

    path = resolve_policy(args.policy)
    bundle = load_bundle(path)
    print(f"policy: {path}\n  {bundle.config.get('description', '(no description)')}\n")
    runs = []
    for key in args.problems:
        problem = PROBLEMS[key]()
        if args.decisions is not None:
            problem.decisions = args.decisions
        for seed in range(args.seeds):
            jobs = [("policy", 1.0)] + [(s, scale) for scale in args.lr_grid for s in SCHEDULES[1:]]
            for schedule, scale in jobs:
                run = train(problem, schedule, seed, bundle, lr_scale=scale, lr_max_rise=args.lr_max_rise)
                print(
                    f"{problem.name:22s} seed {seed} {run.schedule:12s} val {run.final_val_loss:.4f} "
                    f"test {run.test_loss:.4f} acc {run.test_accuracy:.3f} ({run.seconds:.1f} s)"
                )
                runs.append(run)
    print()
    print(table(runs))
    figure = args.out / "deploy_policy.png"
    plot(runs, figure)
    print(f"\nplot: {figure}")
    return runs


if __name__ == "__main__":
    sys.exit(run_script(main))
