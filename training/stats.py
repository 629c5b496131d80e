"""Paired comparisons of final losses: win rates, loss ratios and bootstrap confidence intervals.

The benchmark compares a policy with a baseline on the same (task, seed) pairs. A diverged run
counts as an infinitely bad loss: it loses to any finished run and ties another diverged one.
Intervals come from a percentile bootstrap that resamples whole *groups* (tasks, whose seeds are
correlated) when groups are given, always from an explicit ``numpy.random.Generator``::

    >>> import numpy as np
    >>> policy, baseline = np.array([1.0, 2.0, np.nan]), np.array([2.0, 2.0, 1.0])
    >>> win_rate(policy, baseline)  # one win, one tie, one divergence
    0.5
    >>> float(median_ratio(policy, baseline))
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from hpo_env.checks import is_integer

__all__ = [
    "as_losses",
    "beats_all_rate",
    "bootstrap_ci",
    "divergence_rate",
    "headroom",
    "loss_ratios",
    "lr_level",
    "median_ratio",
    "paired_comparison",
    "win_indicators",
    "win_rate",
    "within_family_correlation",
]


def as_losses(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Losses as a float array with every non-finite value (a divergence) turned into ``+inf``."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.where(np.isfinite(x), x, np.inf)


def _paired(policy, baseline) -> tuple[np.ndarray, np.ndarray]:
    shapes = [np.shape(v) for v in (policy, baseline)]
    if any(len(shape) > 1 for shape in shapes):
        raise ValueError(f"paired comparisons take one loss per pair (1-D), got shapes {shapes[0]} and {shapes[1]}")
    p, b = as_losses(policy), as_losses(baseline)
    if p.shape != b.shape:
        raise ValueError(f"paired comparisons need equally many values, got {p.size} and {b.size}")
    if p.size == 0:
        raise ValueError("paired comparisons need at least one pair, got none")
    if (p < 0).any() or (b < 0).any():
        raise ValueError("paired comparisons take losses, which are >= 0; got negative values")
    return p, b


def win_indicators(policy, baseline) -> np.ndarray:
    """Per pair: 1 where the policy's loss is lower, 0.5 on a tie (two divergences included), else 0."""
    p, b = _paired(policy, baseline)
    return np.where(p < b, 1.0, np.where(p == b, 0.5, 0.0))


def win_rate(policy, baseline) -> float:
    """Fraction of pairs the policy wins (ties count half)."""
    return float(win_indicators(policy, baseline).mean())


def beats_all_rate(policy, baselines: Sequence) -> float:
    """Fraction of pairs where the policy's loss is strictly lower than every baseline's (no ties)."""
    wins = [win_indicators(policy, b) == 1 for b in baselines]
    if not wins:
        raise ValueError("beats_all_rate needs at least one baseline")
    return float(np.mean(np.logical_and.reduce(wins)))


def loss_ratios(policy, baseline) -> np.ndarray:
    """Per-pair ``policy / baseline`` final losses: ``inf`` where only the policy diverged, 0 where only
    the baseline did, 1 where both did."""
    p, b = _paired(policy, baseline)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = p / b
    both = np.isinf(p) & np.isinf(b)
    r[both] = 1.0
    r[np.isnan(r)] = 1.0  # 0 / 0: both reached a zero loss
    return r


def geomean_ratio(ratios) -> float:
    """Geometric mean of per-pair loss ratios (from :func:`loss_ratios`) over the pairs where neither side
    alone diverged (a ratio of 0 or inf has no log; divergences are counted by the divergence rates); NaN
    if there are none."""
    r = np.asarray(ratios, dtype=np.float64)
    finite = r[np.isfinite(r) & (r > 0)]
    return float(np.exp(np.mean(np.log(finite)))) if finite.size else float("nan")


def median_ratio(policy, baseline) -> float:
    """Median over pairs of ``policy / baseline`` final losses (below 1: the policy ends lower)."""
    return float(np.median(loss_ratios(policy, baseline)))


def lr_level(policy_lr, baseline_lr, families: Sequence[str] | np.ndarray | None = None) -> dict:
    """How hot the policy runs: per pair ``policy / baseline`` mean learning rate over the run.

    Returns the median ratio (above 1: the policy trains at a higher learning rate), the share of
    pairs where the policy's is higher, and how many pairs had both (pairs missing either, NaN, are
    left out; with none, the median and share are NaN). Given each pair's family, also the same
    per family, under ``by_family``.
    """
    p, b = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (policy_lr, baseline_lr))
    if p.shape != b.shape:
        raise ValueError(f"policy and baseline must have one learning rate per pair, got {p.shape} and {b.shape}")
    ok = np.isfinite(p) & np.isfinite(b) & (p > 0) & (b > 0)
    ratio = p[ok] / b[ok]
    level: dict[str, Any] = (
        {"median_ratio": float(np.median(ratio)), "share_higher": float(np.mean(ratio > 1)), "pairs": int(ratio.size)}
        if ratio.size
        else {"median_ratio": float("nan"), "share_higher": float("nan"), "pairs": 0}
    )
    if families is not None:
        fams = np.asarray(families)
        level["by_family"] = {f: lr_level(p[fams == f], b[fams == f]) for f in dict.fromkeys(fams.tolist())}
    return level


def within_family_correlation(x, y, families: Sequence[str] | np.ndarray) -> dict:
    """Pearson correlation of ``x`` and ``y`` (one value each per task) within each family, and pooled.

    Families differ in both (a CNN family trains at other learning rates than a tabular one), which
    would make a correlation over all tasks say more about the families than about a variable, so the
    pooled one is taken after subtracting each family's means. Tasks where either value is not finite
    are left out; a correlation of fewer than 3 tasks, or of a constant, is NaN. Returns ``r`` and
    ``tasks`` for the pool, and the same per family under ``by_family``.
    """
    xs, ys = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (x, y))
    fams = np.asarray(families).reshape(-1)
    if not xs.shape == ys.shape == fams.shape:
        raise ValueError(f"need one x, y and family per task, got {xs.size}, {ys.size} and {fams.size}")
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys, fams = xs[ok], ys[ok], fams[ok]

    def pearson(a: np.ndarray, b: np.ndarray) -> float:
        if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])

    by_family, dx, dy = {}, xs.copy(), ys.copy()
    for f in dict.fromkeys(fams.tolist()):
        m = fams == f
        by_family[f] = {"r": pearson(xs[m], ys[m]), "tasks": int(m.sum())}
        # A value constant within the family demeans to exactly 0, not to rounding leftovers that
        # would give a constant-in-every-family pool a spurious correlation instead of NaN.
        dx[m] = 0.0 if np.ptp(xs[m]) == 0 else xs[m] - xs[m].mean()
        dy[m] = 0.0 if np.ptp(ys[m]) == 0 else ys[m] - ys[m].mean()
    return {"r": pearson(dx, dy), "tasks": int(xs.size), "by_family": by_family}


HEADROOM_EDGES = (1.02, 1.10)


def headroom(
    policy, oracle, defaults: Sequence, groups: Sequence[str] | np.ndarray, edges: Sequence[float] = HEADROOM_EDGES
) -> list[dict]:
    """Where the targets are won or lost: pairs binned by how much a tuned schedule gains on their task.

    A task's *headroom* is the geometric mean over its pairs of ``best default / oracle`` final losses
    (the better of the ``defaults`` on each pair, over the ``oracle``'s loss on the same pair). Where
    it is near 1 the untuned defaults are already as good as the tuned oracle, and beating both is
    decided by the seed's noise; where it is large the learning rate has to move far from the default.
    Tasks are binned at ``edges`` (default: at most 2% behind the oracle or ahead of it, 2-10%, more than 10%); per bin:
    the number of tasks and pairs, the share of pairs where the policy beats every default and where
    the oracle does (how reachable the first target is there), and the median and geometric mean of
    ``policy / oracle`` (the geometric mean over pairs where neither alone diverged), and a label that says the
    bin in words. Empty bins are left out.
    """
    p, o = as_losses(policy), as_losses(oracle)
    ds = [as_losses(d) for d in defaults]
    groups = np.asarray(groups)
    if not ds or any(d.shape != p.shape for d in ds) or o.shape != p.shape or groups.shape != p.shape:
        raise ValueError("headroom needs one policy, oracle, group and (at least one) default loss per pair")
    if not edges or any(b <= a for a, b in zip([0.0, *edges], edges)):
        raise ValueError(f"headroom edges must be positive and increasing, e.g. (1.02, 1.10); got {tuple(edges)}")
    best_default = np.minimum.reduce(ds)
    with np.errstate(divide="ignore"):
        log_gap = np.log(loss_ratios(best_default, o))
    task_gap = {g: np.exp(np.mean(log_gap[groups == g])) for g in dict.fromkeys(groups.tolist())}
    per_pair = np.array([task_gap[g] for g in groups.tolist()])
    # A task where the defaults diverged on one seed and the oracle on another has no defined gap
    # (inf - inf); it goes with the tasks whose defaults fail.
    per_pair[np.isnan(per_pair)] = np.inf
    which = np.searchsorted(edges, per_pair)  # bin k holds edges[k-1] < gap <= edges[k]
    bounds = [0.0, *edges, np.inf]
    bins = []
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        idx = which == k
        if not idx.any():
            continue
        ratios = loss_ratios(p[idx], o[idx])
        geomean = geomean_ratio(ratios)
        label = (
            f"defaults at most {hi - 1:.0%} behind the oracle, or ahead of it"
            if lo == 0
            else f"defaults more than {lo - 1:.0%} behind the oracle"
            if hi == np.inf
            else f"defaults {lo - 1:.0%}-{hi - 1:.0%} behind the oracle"
        )
        bins.append(
            {
                "label": label,
                "headroom_low": lo,
                "headroom_high": None if hi == np.inf else hi,  # None: no upper edge (JSON has no inf)
                "tasks": len(set(groups[idx].tolist())),
                "pairs": int(idx.sum()),
                "policy_beats_all_defaults": beats_all_rate(p[idx], [d[idx] for d in ds]),
                "oracle_beats_all_defaults": beats_all_rate(o[idx], [d[idx] for d in ds]),
                "median_ratio": float(np.median(ratios)),
                "geomean_ratio": geomean,
            }
        )
    return bins


def divergence_rate(diverged: Sequence[bool] | np.ndarray) -> float:
    """Fraction of runs that diverged (NaN for no runs)."""
    d = np.asarray(diverged, dtype=bool).reshape(-1)
    return float(d.mean()) if d.size else float("nan")


def _median(x: np.ndarray) -> np.ndarray:
    return np.median(x, axis=-1)


def _mean(x: np.ndarray) -> np.ndarray:
    return np.mean(x, axis=-1)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] = _median,
    *,
    rng: np.random.Generator,
    groups: Sequence[object] | np.ndarray | None = None,
    n_boot: int = 2000,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic(values)``.

    Args:
        values: one value per observation (a per-pair ratio, a win indicator...).
        statistic: reduces the last axis of a ``(n_boot, m)`` array to ``(n_boot,)``, like
            ``lambda x: np.median(x, axis=-1)`` (the default).
        rng: the generator that draws the resamples (required: no hidden global state).
        groups: optional group label per value; whole groups are resampled (a cluster bootstrap),
            so correlated values (seeds of one task) are not counted as independent evidence.
        n_boot: number of resamples.
        confidence: coverage of the interval, in ``(0, 1)``.

    Returns:
        ``(low, high)``.

    Raises:
        TypeError: ``rng`` is not a ``numpy.random.Generator``.
        ValueError: no values, mismatched groups, or a bad ``n_boot`` or ``confidence``.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not is_integer(n_boot) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    n_boot = int(n_boot)
    if groups is None:
        samples = x[rng.integers(0, x.size, size=(n_boot, x.size))]
        stats = np.asarray(statistic(samples), dtype=np.float64)
    else:
        labels = np.asarray(groups, dtype=object).reshape(-1)
        if labels.size != x.size:
            raise ValueError(f"groups must label every value: got {labels.size} labels for {x.size} values")
        _, inverse = np.unique(labels.astype(str), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
        picks = rng.integers(0, len(members), size=(n_boot, len(members)))
        sizes = {len(m) for m in members}
        if len(sizes) == 1:  # equal groups: one vectorised gather
            table = np.stack(members)
            samples = x[table[picks].reshape(n_boot, -1)]
            stats = np.asarray(statistic(samples), dtype=np.float64)
        else:
            stats = np.array([statistic(x[np.concatenate([members[g] for g in row])][None])[0] for row in picks])
    if stats.shape != (n_boot,):
        raise ValueError(
            f"statistic must reduce the last axis of the ({n_boot}, m) resamples to ({n_boot},), got shape "
            f"{stats.shape}: use e.g. lambda x: np.median(x, axis=-1)"
        )
    tail = 100 * (1 - confidence) / 2
    # Linear interpolation between two infinite statistics (a median ratio over diverged runs) gives
    # inf - inf = NaN; there, take the order statistics themselves.
    method: Literal["linear", "inverted_cdf"] = "linear" if np.all(np.isfinite(stats)) else "inverted_cdf"
    low, high = np.percentile(stats, [tail, 100 - tail], method=method)
    return float(low), float(high)


def paired_comparison(
    policy,
    baseline,
    *,
    rng: np.random.Generator,
    groups: Sequence[object] | None = None,
    n_boot: int = 2000,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Win rate and median loss ratio of ``policy`` against ``baseline``, each with its interval."""
    wins = win_indicators(policy, baseline)
    ratios = loss_ratios(policy, baseline)
    kw: dict[str, Any] = dict(rng=rng, groups=groups, n_boot=n_boot, confidence=confidence)
    win_lo, win_hi = bootstrap_ci(wins, _mean, **kw)
    ratio_lo, ratio_hi = bootstrap_ci(ratios, _median, **kw)
    return {
        "pairs": int(wins.size),
        "win_rate": float(wins.mean()),
        "win_rate_low": win_lo,
        "win_rate_high": win_hi,
        "median_ratio": float(np.median(ratios)),
        "median_ratio_low": ratio_lo,
        "median_ratio_high": ratio_hi,
    }
