"""Actions: bounded multiplicative changes of the controlled hyperparameters.

An action is a vector ``a`` in ``[-1, 1]^k``, one entry per controlled hyperparameter. Each entry moves
its hyperparameter in log space by at most ``max_log10_change`` decades, then clips it into bounds::

    lr <- clip(lr * 10 ** (a * max_log10_change), lower, upper)

A hyperparameter may move up more slowly than down (``max_log10_increase``, for positive actions):
a cautious policy that can cut a learning rate fast when a run goes wrong but raises it gradually.
It may also be capped relative to where the run started (``max_log10_above_initial``): with 1.5,
a learning rate never rises above 31.6x the optimiser's initial one, whatever its absolute bound.

``momentum`` moves ``1 - momentum`` instead (so it can approach 1 smoothly), with a positive action
still meaning *more* momentum. :class:`ActionDecoder` is the one implementation of this mapping; the
environment and the deployed :class:`~agents.PolicyScheduler` both call it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from hpo_env.checks import as_real_array, check_ordered, is_number

__all__ = ["CONTROLLABLE", "DEFAULT_HYPERPARAMETERS", "ActionDecoder", "HyperparameterSpec"]

#: Hyperparameters an action can control (``momentum`` is Adam's beta1 for Adam-type optimisers).
CONTROLLABLE = ("lr", "weight_decay", "momentum")


@dataclass(frozen=True)
class HyperparameterSpec:
    """One controlled hyperparameter.

    Attributes:
        name: ``"lr"``, ``"weight_decay"`` or ``"momentum"``.
        lower, upper: bounds of the value (``0 <= lower < upper < 1`` for momentum, else ``0 < lower < upper``).
        max_log10_change: the largest change one action makes, in decades of the (transformed) value.
        max_log10_increase: the largest *increase* one action makes (positive actions), if it differs
            from ``max_log10_change`` (None: the same; decreases always use ``max_log10_change``).
        max_log10_above_initial: the value never rises more than this many decades above the run's
            initial value (None: only ``upper`` caps it). The cap is ``min(upper, initial * 10**d)``.
    """

    name: str
    lower: float
    upper: float
    max_log10_change: float
    max_log10_increase: float | None = None
    max_log10_above_initial: float | None = None

    def __post_init__(self) -> None:
        if self.name not in CONTROLLABLE:
            raise ValueError(f"unknown hyperparameter {self.name!r}; controllable ones are {list(CONTROLLABLE)}")
        lo, hi = float(self.lower), float(self.upper)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"bounds of {self.name!r} must be finite, got ({lo}, {hi})")
        if self.name == "momentum":
            if not 0 <= lo < hi < 1:
                raise ValueError(f"momentum bounds must satisfy 0 <= lower < upper < 1, got ({lo}, {hi})")
        elif not 0 < lo < hi:
            raise ValueError(
                f"bounds of {self.name!r} must be positive and ordered (0 < lower < upper), got ({lo}, {hi}); "
                "actions are multiplicative, so a bound of 0 cannot be reached"
            )
        if not (self.max_log10_change > 0 and math.isfinite(self.max_log10_change)):
            raise ValueError(f"max_log10_change of {self.name!r} must be positive, got {self.max_log10_change}")
        up = self.max_log10_increase
        if up is not None and not (up > 0 and math.isfinite(up)):
            raise ValueError(f"max_log10_increase of {self.name!r} must be positive or None, got {up}")
        cap = self.max_log10_above_initial
        if cap is not None and not (cap > 0 and math.isfinite(cap)):
            raise ValueError(
                f"max_log10_above_initial of {self.name!r} must be a positive number of decades or None, got {cap}"
            )

    @property
    def max_log10_up(self) -> float:
        """The largest increase one action makes, in decades."""
        return self.max_log10_change if self.max_log10_increase is None else self.max_log10_increase

    def log_step(self, actions: np.ndarray) -> np.ndarray:
        """Decades moved by actions in ``[-1, 1]``."""
        a = np.asarray(actions, dtype=np.float64)
        return np.where(a > 0, a * self.max_log10_up, a * self.max_log10_change)

    def action_for(self, log_change: np.ndarray) -> np.ndarray:
        """The action in ``[-1, 1]`` that moves the value by ``log_change`` decades (the inverse of
        :meth:`log_step`, clipped where the change is larger than one action allows)."""
        d = np.asarray(log_change, dtype=np.float64)
        return np.clip(np.where(d > 0, d / self.max_log10_up, d / self.max_log10_change), -1.0, 1.0)

    @property
    def is_momentum(self) -> bool:
        return self.name == "momentum"

    def to_log(self, value: np.ndarray | float) -> np.ndarray:
        """Value in the space actions move it in: log10(v), or -log10(1 - v) for momentum."""
        value = np.asarray(value, dtype=np.float64)
        return -np.log10(1.0 - value) if self.is_momentum else np.log10(value)

    def from_log(self, u: np.ndarray) -> np.ndarray:
        return 1.0 - 10.0 ** (-u) if self.is_momentum else 10.0**u

    def clip(self, value: np.ndarray) -> np.ndarray:
        return np.clip(value, self.lower, self.upper)

    def upper_for(self, initial: np.ndarray | None) -> np.ndarray | float:
        """The upper bound of a run that started at ``initial``: ``upper``, or lower where
        ``max_log10_above_initial`` caps the value relative to the start."""
        if self.max_log10_above_initial is None:
            return self.upper
        if initial is None:
            raise ValueError(
                f"{self.name!r} is capped at {self.max_log10_above_initial} decades above its initial value, "
                "so decoding needs the run's initial values (pass initial=...)"
            )
        start = self.to_log(self.clip(np.asarray(initial, dtype=np.float64)))
        return np.minimum(self.upper, self.from_log(start + self.max_log10_above_initial))


#: Default bounds and step sizes of every controllable hyperparameter.
DEFAULT_HYPERPARAMETERS: dict[str, HyperparameterSpec] = {
    "lr": HyperparameterSpec("lr", 1e-5, 1.0, 0.25),
    "weight_decay": HyperparameterSpec("weight_decay", 1e-6, 0.3, 0.5),
    "momentum": HyperparameterSpec("momentum", 0.0, 0.99, 0.25),
}


class ActionDecoder:
    """Maps normalised actions to new hyperparameter values (the environment's and the scheduler's).

    Args:
        hyperparameters: names of the controlled hyperparameters, in action order.
        bounds: optional ``{name: (lower, upper)}`` overriding :data:`DEFAULT_HYPERPARAMETERS`.
        max_log10_change: optional step size, one number for all or ``{name: value}``.
        max_log10_increase: optional step size of increases only, ``{name: value}`` (default: the
            same as ``max_log10_change``).
        max_log10_above_initial: optional cap relative to the run's initial value, ``{name: decades}``
            (default: none; :meth:`decode` then needs ``initial``).

    Raises:
        ValueError: unknown or repeated names, bounds that are not positive or not ordered.
        TypeError: ``hyperparameters`` given as a set (its order, the actions', changes between processes).
    """

    def __init__(
        self,
        hyperparameters: Sequence[str] = ("lr", "weight_decay"),
        bounds: Mapping[str, tuple[float, float]] | None = None,
        max_log10_change: float | Mapping[str, float] | None = None,
        max_log10_increase: Mapping[str, float] | None = None,
        max_log10_above_initial: Mapping[str, float] | None = None,
    ) -> None:
        if isinstance(hyperparameters, str):
            hyperparameters = (hyperparameters,)
        check_ordered(hyperparameters, "hyperparameters")  # in action order
        names = tuple(hyperparameters)
        if not names:
            raise ValueError("at least one hyperparameter must be controlled")
        unknown = [n for n in names if n not in DEFAULT_HYPERPARAMETERS]
        if unknown:
            raise ValueError(
                f"unknown hyperparameters {unknown}; controllable ones are {list(DEFAULT_HYPERPARAMETERS)}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"hyperparameters must not repeat, got {list(names)}")

        def per_name(arg: str, values: Mapping | None, example: str) -> dict:
            if values is None:
                return {}
            if not isinstance(values, Mapping):
                raise ValueError(
                    f"{arg} must map controlled hyperparameters {list(names)} to values, e.g. {arg}={example}; "
                    f"got {values!r}"
                )
            extra = sorted(set(values) - set(names))
            if extra:
                raise ValueError(f"{arg} given for {extra}, which are not controlled ({list(names)})")
            for name, value in values.items():
                pair = arg == "bounds"
                if pair and not (isinstance(value, Sequence) and len(value) == 2 and all(map(is_number, value))):
                    raise ValueError(f"{arg}[{name!r}] must be a (lower, upper) pair, e.g. {example}; got {value!r}")
                if not pair and not is_number(value):
                    raise ValueError(f"{arg}[{name!r}] must be a number of decades, e.g. {example}; got {value!r}")
            return dict(values)

        bounds = per_name("bounds", bounds, "{'lr': (1e-5, 1.0)}")
        if isinstance(max_log10_change, Mapping) or max_log10_change is None:
            steps = per_name("max_log10_change", max_log10_change, "{'lr': 0.5} or 0.5")
        elif is_number(max_log10_change):
            steps = {n: max_log10_change for n in names}
        else:
            raise ValueError(
                f"max_log10_change must be a number of decades or {{name: decades}}, got {max_log10_change!r}"
            )
        ups = per_name("max_log10_increase", max_log10_increase, "{'lr': 0.25}")
        caps = per_name("max_log10_above_initial", max_log10_above_initial, "{'lr': 1.5}")
        specs = []
        for n in names:
            base = DEFAULT_HYPERPARAMETERS[n]
            lo, hi = bounds.get(n, (base.lower, base.upper))
            up, cap = ups.get(n), caps.get(n)
            step = float(steps.get(n, base.max_log10_change))
            specs.append(
                HyperparameterSpec(
                    n,
                    float(lo),
                    float(hi),
                    step,
                    None if up is None else float(up),
                    None if cap is None else float(cap),
                )
            )
        self.specs: tuple[HyperparameterSpec, ...] = tuple(specs)
        self.names: tuple[str, ...] = names

    @property
    def num_actions(self) -> int:
        return len(self.specs)

    def clip(self, values: np.ndarray) -> np.ndarray:
        """Clip ``(..., k)`` hyperparameter values into their bounds."""
        values = np.asarray(values, dtype=np.float64)
        return np.stack([s.clip(values[..., j]) for j, s in enumerate(self.specs)], axis=-1)

    @property
    def relative_caps(self) -> bool:
        """Whether some hyperparameter is capped relative to its initial value (decoding needs it)."""
        return any(s.max_log10_above_initial is not None for s in self.specs)

    def decode(self, actions: np.ndarray, current: np.ndarray, initial: np.ndarray | None = None) -> np.ndarray:
        """New values ``(..., k)`` from actions in ``[-1, 1]`` and the current values ``(..., k)``.

        Actions outside ``[-1, 1]`` are clipped (policies with Gaussian heads sample beyond).
        ``initial`` (the run's initial values, shaped like ``current``) is needed only when a
        hyperparameter has ``max_log10_above_initial``; otherwise only its shape is checked.

        Raises:
            ValueError: a non-finite action, a shape that does not end in ``k``, or a missing
                ``initial`` where a cap needs it.
        """
        actions = as_real_array(actions)
        current = np.asarray(current, dtype=np.float64)
        if actions.shape[-1:] != (self.num_actions,) or actions.shape != current.shape:
            raise ValueError(
                f"actions of shape {actions.shape} do not match {self.num_actions} controlled "
                f"hyperparameters {list(self.names)} with current values of shape {current.shape}"
            )
        if not np.all(np.isfinite(actions)):
            raise ValueError(f"actions must be finite, got {actions}")
        if initial is not None:
            initial = np.asarray(initial, dtype=np.float64)
            if initial.shape != current.shape:
                raise ValueError(f"initial values of shape {initial.shape} do not match current ones {current.shape}")
        actions = np.clip(actions, -1.0, 1.0)
        out = np.empty_like(current)
        for j, s in enumerate(self.specs):
            # Contiguous columns: numpy's vectorised log/pow loops round like its scalar ones only on
            # contiguous data, and a batch of slots must decode exactly as one slot at a time does.
            cur, act = np.ascontiguousarray(current[..., j]), np.ascontiguousarray(actions[..., j])
            u = s.to_log(s.clip(cur)) + s.log_step(act)
            upper = s.upper_for(None if initial is None else np.ascontiguousarray(initial[..., j]))
            out[..., j] = np.clip(s.from_log(u), s.lower, upper)
        return out

    def position(self, values: np.ndarray) -> np.ndarray:
        """Where each value lies between its bounds, in log space, mapped to ``[-1, 1]``."""
        values = self.clip(values)
        cols = []
        for j, s in enumerate(self.specs):
            lo, hi = s.to_log(s.lower), s.to_log(s.upper)
            cols.append(2.0 * (s.to_log(values[..., j]) - lo) / (hi - lo) - 1.0)
        return np.stack(cols, axis=-1)

    def log_change(self, values: np.ndarray, initial: np.ndarray) -> np.ndarray:
        """Decades each value moved from its initial value (in the action's log space)."""
        values, initial = self.clip(values), self.clip(initial)
        return np.stack(
            [s.to_log(values[..., j]) - s.to_log(initial[..., j]) for j, s in enumerate(self.specs)], axis=-1
        )

    def with_cap(self, name: str, decades: float | None) -> ActionDecoder:
        """A copy whose ``name`` may rise at most ``decades`` above its initial value (None: no such cap).

        Raises:
            ValueError: ``name`` is not controlled, or ``decades`` is not a positive number.
        """
        if name not in self.names:
            raise ValueError(f"cannot cap {name!r}: this decoder controls {list(self.names)}")
        config = self.to_config()
        spec = config["hyperparameters"][self.names.index(name)]
        spec.pop("max_log10_above_initial", None)
        if decades is not None:
            spec["max_log10_above_initial"] = float(decades)
        return ActionDecoder.from_config(config)

    # -- serialisation (policy bundles) ---------------------------------------------------------
    def to_config(self) -> dict:
        # optional fields only where set, so decoders without them keep the config (and hash) they had
        optional = ("max_log10_increase", "max_log10_above_initial")
        specs = [{k: v for k, v in asdict(s).items() if k not in optional or v is not None} for s in self.specs]
        return {"hyperparameters": specs}

    @classmethod
    def from_config(cls, config: Mapping) -> ActionDecoder:
        try:
            specs = config["hyperparameters"]
            return cls(
                [s["name"] for s in specs],
                bounds={s["name"]: (s["lower"], s["upper"]) for s in specs},
                max_log10_change={s["name"]: s["max_log10_change"] for s in specs},
                max_log10_increase={
                    s["name"]: s["max_log10_increase"] for s in specs if s.get("max_log10_increase") is not None
                },
                max_log10_above_initial={
                    s["name"]: s["max_log10_above_initial"]
                    for s in specs
                    if s.get("max_log10_above_initial") is not None
                },
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed action-decoder config {config!r}: {err}") from err

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActionDecoder) and self.specs == other.specs

    def __repr__(self) -> str:
        return f"ActionDecoder({list(self.specs)})"
