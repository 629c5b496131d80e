"""Task specifications, task families and the task distribution.

A *task* is one inner training problem: a dataset (and its variation), a model architecture, an
optimiser with its initial hyperparameters, a batch size and a step budget. :class:`TaskSpec`
describes one task completely (so a spec plus the inner trainer reproduces a run bit for bit), and
:class:`TaskDistribution` samples specs from a set of *families* with a caller-provided generator.

Families are split into meta-training and held-out (evaluation) families, so evaluation measures
generalisation to kinds of problems the meta-agent never trained on::

    >>> import numpy as np
    >>> dist = TaskDistribution.default(split="train")
    >>> spec = dist.sample(np.random.default_rng(0))
    >>> spec.family in dist.families
    True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpo_env.checks import check_ordered, is_number
from hpo_env.data import SMALL_TABULAR_DATASETS, TABULAR_DATASETS, TEXT_CORPUS_VERSION

__all__ = [
    "ARCHITECTURES",
    "DECISIONS_PER_RUN",
    "DEFAULT_LR_SPREAD",
    "FAMILIES",
    "OPTIMIZERS",
    "SPLITS",
    "TaskDistribution",
    "TaskSpec",
    "check_families",
]

#: Inner optimisers the trainer implements (with PyTorch's update rules).
OPTIMIZERS = ("sgd", "adamw")
#: Inner model architectures.
ARCHITECTURES = ("mlp", "cnn", "charmlp")
ACTIVATIONS = ("relu", "tanh", "gelu")
#: A task's initial learning rate is the optimiser's default times ``10 ** U(-spread, spread)``; the
#: built-in splits (and so every benchmark task) use this spread, meta-training may widen it.
DEFAULT_LR_SPREAD = 0.5
#: Decisions per run of every sampled task (``total_steps / steps_per_action``): the horizons a policy is
#: meta-trained on, and the range a deployed PolicyScheduler warns outside of.
DECISIONS_PER_RUN = (10, 15, 20, 25, 30)

# family -> (allowed datasets, allowed architectures)
_FAMILY_DATA: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "teacher_regression": (("teacher",), ("mlp",)),
    "teacher_classification": (("teacher",), ("mlp",)),
    "make_classification": (("make_classification",), ("mlp",)),
    "tabular": (tuple(TABULAR_DATASETS), ("mlp",)),
    "digits_mlp": (("digits",), ("mlp",)),
    "digits_cnn": (("digits",), ("cnn",)),
    "charlm": (("python_text",), ("charmlp",)),
    "glyphs_cnn": (("glyphs",), ("cnn",)),
    "small_tabular": (tuple(SMALL_TABULAR_DATASETS), ("mlp",)),
}
#: The data fields each family reads (hpo_env.data; ``embedding_dim`` and ``context_length`` also
#: shape the char model). A spec may not set another data field off its default: it would change the
#: task's id and say something about the task that is not true (``_DATA_DEFAULTS``, below TaskSpec).
_FAMILY_FIELDS: dict[str, tuple[str, ...]] = {
    "teacher_regression": ("n_samples", "n_features", "label_noise"),
    "teacher_classification": ("n_samples", "n_features", "n_classes", "label_noise"),
    "make_classification": ("n_samples", "n_features", "n_classes", "label_noise"),
    "tabular": ("subset_fraction", "label_noise"),
    "digits_mlp": ("subset_fraction", "label_noise", "permute_pixels"),  # its sampler leaves pixels in place
    "digits_cnn": ("subset_fraction", "label_noise", "permute_pixels"),
    "charlm": ("n_samples", "context_length", "embedding_dim"),
    "glyphs_cnn": ("n_samples", "n_classes", "label_noise", "permute_pixels"),
    "small_tabular": ("n_samples", "n_features", "n_classes", "label_noise"),
}
#: All task families.
FAMILIES: tuple[str, ...] = tuple(_FAMILY_DATA)
#: Families per split. Whole families are held out of meta-training: ``"test"`` for the benchmark, and
#: ``"validation"`` for choices made while training (``hpo-train``'s periodic evaluation and the
#: ``best_bundle/`` it selects), so that no choice is made on the families the benchmark reports. The
#: validation families stand in for the test ones: small synthetic tables for the bundled ones, CNNs on
#: drawn glyphs for those on the digits. Meta-training on ``glyphs_cnn`` is opt-in
#: (``TaskDistribution(families)``, ``hpo-train --families``): its CNNs make a meta-training run on CPU
#: about 1.9x slower, and with one seed it helped ``digits_cnn`` and hurt ``tabular``
#: (benchmarks/reports/levers.md, thirteenth round); ``hpo-train`` warns that such a run's evaluations
#: then measure trained-on tasks.
SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("teacher_regression", "teacher_classification", "make_classification", "digits_mlp", "charlm"),
    "validation": ("small_tabular", "glyphs_cnn"),
    "test": ("tabular", "digits_cnn"),
    "all": FAMILIES,
}

# Default initial hyperparameters of each optimiser (PyTorch's defaults where it has sensible ones).
#: The momentum of meta-training's SGD tasks is drawn from this range (AdamW's beta1 is 0.9).
SGD_MOMENTUM_RANGE = (0.8, 0.95)

DEFAULT_HPARAMS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.01, "weight_decay": 1e-4, "momentum": 0.9},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2, "momentum": 0.9},
}


#: TaskSpec fields that must be integers, and those that must be finite numbers.
_INT_FIELDS = (
    "data_seed", "batch_size", "total_steps", "steps_per_action", "seed",
    "embedding_dim", "n_samples", "n_features", "n_classes", "context_length",
)  # fmt: skip
_FLOAT_FIELDS = ("lr", "weight_decay", "momentum", "label_noise", "subset_fraction", "lr_gain")


@dataclass(frozen=True)
class TaskSpec:
    """Complete description of one inner training problem.

    Attributes:
        family: task family (one of :data:`FAMILIES`).
        dataset: dataset within the family (``"teacher"``, ``"wine"``, ``"digits"``, ...).
        data_seed: seed of everything random about the data (teacher weights, subsets, noise, splits).
        n_samples: number of samples to generate (synthetic), or characters of text (charlm).
        n_features: input features of synthetic data.
        n_classes: classes of synthetic classification data.
        label_noise: label-flip rate (classification) or relative target noise (``teacher_regression`` and
            ``small_tabular``'s ``friedman1``); 0 for ``tabular``'s regression table ``diabetes``, which has none.
        subset_fraction: fraction of a bundled dataset to keep.
        permute_pixels: apply a fixed random pixel permutation to images (a harder vision variant).
        context_length: characters of context for text tasks.
        arch: model architecture (one of :data:`ARCHITECTURES`).
        hidden: hidden layer widths (MLP and char model) or conv channels (CNN, two entries).
        activation: hidden activation, ``"relu"``, ``"tanh"`` or ``"gelu"``.
        embedding_dim: character embedding width (charmlp).
        optimizer: ``"sgd"`` (with momentum) or ``"adamw"``.
        lr, weight_decay, momentum: initial hyperparameters. ``momentum`` is Adam's beta1 for AdamW.
        batch_size: minibatch size.
        total_steps: inner optimiser steps of the whole run.
        steps_per_action: inner steps between two decisions; must divide ``total_steps``.
        seed: seed of the model initialisation and the minibatch order.
        lr_gain: a hidden factor on the learning rate: the inner optimiser steps with ``lr_gain * lr``
            while every observation, action and report uses ``lr``. 1 (every benchmark task and every
            deployment) is plain training; meta-training may draw it
            (:class:`TaskDistribution`'s ``lr_gain_spread``) so that where a task's best learning rate
            lies is not given away by the value alone.
    """

    family: str
    dataset: str
    data_seed: int
    arch: str
    hidden: tuple[int, ...]
    optimizer: str
    lr: float
    batch_size: int
    total_steps: int
    steps_per_action: int
    seed: int
    weight_decay: float = 0.0
    momentum: float = 0.9
    activation: str = "relu"
    embedding_dim: int = 0
    n_samples: int = 0
    n_features: int = 0
    n_classes: int = 0
    label_noise: float = 0.0
    subset_fraction: float = 1.0
    permute_pixels: bool = False
    context_length: int = 0
    lr_gain: float = 1.0

    def __post_init__(self) -> None:
        def bad(field: str, value: object, expected: str) -> ValueError:
            return ValueError(f"TaskSpec.{field}={value!r} is invalid: expected {expected}")

        if self.family not in _FAMILY_DATA:
            raise bad("family", self.family, f"one of {list(FAMILIES)}")
        datasets, archs = _FAMILY_DATA[self.family]
        if self.dataset not in datasets:
            raise bad("dataset", self.dataset, f"one of {list(datasets)} for family {self.family!r}")
        if self.arch not in archs:
            raise bad("arch", self.arch, f"one of {list(archs)} for family {self.family!r}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", self.optimizer, f"one of {list(OPTIMIZERS)}")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", self.activation, f"one of {list(ACTIVATIONS)}")
        # Types first: a float batch size or a string learning rate would otherwise fail deep inside torch.
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise bad(name, value, "an integer")
            object.__setattr__(self, name, int(value))  # numpy integers hash like Python ones in task_id
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not is_number(value):
                raise bad(name, value, "a number")
            if not np.isfinite(value):
                raise bad(name, value, "a finite number")
            object.__setattr__(self, name, float(value))
        for name in ("data_seed", "seed"):
            if not 0 <= getattr(self, name) < 2**63:
                raise bad(name, getattr(self, name), "an integer in [0, 2**63)")
        hidden = self.hidden
        if (
            isinstance(hidden, (str, bytes))
            or not isinstance(hidden, (tuple, list, np.ndarray))
            or any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) for h in hidden)
        ):
            raise bad("hidden", hidden, "a tuple of integer layer widths, e.g. (64,) or (128, 64)")
        object.__setattr__(self, "hidden", tuple(int(h) for h in hidden))
        if not self.hidden or min(self.hidden) < 1:
            raise bad("hidden", self.hidden, "a non-empty tuple of positive widths")
        if not isinstance(self.permute_pixels, (bool, np.bool_)):
            raise bad("permute_pixels", self.permute_pixels, "True or False")
        object.__setattr__(self, "permute_pixels", bool(self.permute_pixels))
        for name, default in _DATA_DEFAULTS.items():
            if name not in _FAMILY_FIELDS[self.family] and getattr(self, name) != default:
                reads = ", ".join(_FAMILY_FIELDS[self.family])
                raise ValueError(
                    f"TaskSpec.{name}={getattr(self, name)!r} has no effect on family {self.family!r}, whose data "
                    f"reads only {reads}: leave {name} at its default {default!r}"
                )
        if self.dataset == "friedman1" and self.n_classes != 0:  # the one regression table of small_tabular
            raise ValueError(
                f"TaskSpec.n_classes={self.n_classes!r} has no effect on the regression dataset 'friedman1': "
                "leave n_classes at its default 0"
            )
        if self.family == "tabular" and TABULAR_DATASETS[self.dataset] == "regression" and self.label_noise != 0:
            raise ValueError(
                f"TaskSpec.label_noise={self.label_noise!r} has no effect on the regression table {self.dataset!r}: the "
                "bundled tables' label noise flips class labels, and this one has none. Leave label_noise at 0"
            )
        if self.arch == "cnn" and len(self.hidden) != 2:
            raise bad("hidden", self.hidden, "two conv channel counts (c1, c2) for the CNN")
        for name in ("batch_size", "total_steps", "steps_per_action"):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "a positive integer")
        if self.total_steps % self.steps_per_action:
            raise bad(
                "total_steps",
                self.total_steps,
                f"a multiple of steps_per_action={self.steps_per_action} (one decision covers "
                "steps_per_action inner steps)",
            )
        if self.total_steps // self.steps_per_action < 2:
            raise bad("total_steps", self.total_steps, "at least two decisions (2 * steps_per_action)")
        if not self.lr > 0:
            raise bad("lr", self.lr, "a positive finite learning rate")
        if not self.lr_gain > 0:
            raise bad("lr_gain", self.lr_gain, "a positive finite factor on the learning rate (1: none)")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", self.weight_decay, "a non-negative number")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", self.momentum, "a number in [0, 1)")
        if not 0 <= self.label_noise <= 1:
            raise bad("label_noise", self.label_noise, "a number in [0, 1]")
        if not 0 < self.subset_fraction <= 1:
            raise bad("subset_fraction", self.subset_fraction, "a fraction in (0, 1]")
        if self.dataset in ("teacher", "make_classification") and (self.n_samples < 50 or self.n_features < 2):
            raise bad("n_samples/n_features", (self.n_samples, self.n_features), ">= 50 samples, >= 2 features")
        if self.dataset == "glyphs" and self.n_samples < 50:
            raise bad("n_samples", self.n_samples, ">= 50 samples")
        if self.family == "small_tabular":
            need = 5 if self.dataset == "friedman1" else 1  # Friedman #1 reads 5 features, the rest are noise
            if self.n_samples < 50 or self.n_features < need:
                raise bad(
                    "n_samples/n_features", (self.n_samples, self.n_features), f">= 50 samples, >= {need} features"
                )
        if self.dataset in ("teacher", "make_classification", "glyphs", "blobs", "gaussian_quantiles") and (
            self.task_type == "classification"
        ):
            if self.n_classes < 2:
                raise bad("n_classes", self.n_classes, ">= 2 classes for classification")
        if self.dataset == "make_classification":
            # scikit-learn's generator places 2 clusters per class on the vertices of a hypercube in the
            # informative dimensions, at most n_features of them (see hpo_env.data).
            if 2 * self.n_classes > 2**self.n_features:
                raise bad(
                    "n_classes",
                    self.n_classes,
                    f"at most 2**n_features / 2 = {2 ** (self.n_features - 1)} classes for {self.n_features} features",
                )
        if self.arch == "charmlp" and (self.context_length < 1 or self.embedding_dim < 1 or self.n_samples < 500):
            raise bad(
                "context_length/embedding_dim/n_samples",
                (self.context_length, self.embedding_dim, self.n_samples),
                "context_length >= 1, embedding_dim >= 1 and n_samples >= 500 for text tasks",
            )
        if self.arch == "charmlp" and self.context_length >= 0.1 * self.n_samples - 10:
            # Contiguous splits with a gap of one context before validation (see hpo_env.data).
            raise bad(
                "context_length",
                self.context_length,
                f"fewer than 0.1 * n_samples - 10 = {0.1 * self.n_samples - 10:g} characters, so that the "
                "validation split (10% of the text, less one context as a gap) keeps at least 10 windows",
            )

    # ------------------------------------------------------------------------------------------
    @property
    def num_decisions(self) -> int:
        """Decisions (environment steps plus the initial chunk) in one run: total / per-action."""
        return self.total_steps // self.steps_per_action

    @property
    def task_type(self) -> str:
        if self.family == "teacher_regression" or "regression" in (
            TABULAR_DATASETS.get(self.dataset),
            SMALL_TABULAR_DATASETS.get(self.dataset),
        ):
            return "regression"
        return "classification"

    @functools.cached_property  # a frozen spec's fields never change; environments report it every step
    def task_id(self) -> str:
        """A short, stable identifier: family, dataset and a hash of every field (``lr_gain`` only where it
        is not 1, so that the ids of plain tasks, and the results stored under them, predate it), and for
        text tasks the version of the corpus their text comes from."""
        values = dataclasses.astuple(self)
        if self.lr_gain == 1.0:
            values = tuple(v for f, v in zip(dataclasses.fields(self), values) if f.name != "lr_gain")
        if self.dataset == "python_text" and TEXT_CORPUS_VERSION > 1:  # the text changed, not the spec
            values = (*values, ("text_corpus", TEXT_CORPUS_VERSION))
        digest = hashlib.sha1(repr(values).encode()).hexdigest()[:10]
        return f"{self.family}/{self.dataset}/{digest}"

    @property
    def data_key(self) -> TaskSpec:
        """This spec with everything but the data fields reset: specs sharing data share a cache entry."""
        return dataclasses.replace(
            self,
            arch=_FAMILY_DATA[self.family][1][0],
            hidden=(1, 1),
            optimizer="sgd",
            lr=1.0,
            batch_size=1,
            total_steps=2,
            steps_per_action=1,
            seed=0,
            weight_decay=0.0,
            momentum=0.0,
            activation="relu",
            embedding_dim=self.embedding_dim and 1,
            lr_gain=1.0,
        )

    def replace(self, **changes: Any) -> TaskSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if unknown or missing:
            raise ValueError(
                f"not a TaskSpec dict (as TaskSpec.to_dict() writes): unknown keys {unknown}, missing keys {missing}"
            )
        data = dict(data)
        if "hidden" in data:
            data["hidden"] = tuple(data["hidden"])
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# family samplers: (rng, optimizer) -> TaskSpec


#: The data fields of every family, with their defaults (TaskSpec checks the fields a family does not read).
_DATA_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(TaskSpec) if any(f.name in fs for fs in _FAMILY_FIELDS.values())
}


def _check_rng(rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator, e.g. np.random.default_rng(42), got {type(rng).__name__}"
        )


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _int_log_uniform(rng: np.random.Generator, low: int, high: int) -> int:
    return int(round(_log_uniform(rng, low, high)))


def _common(
    rng: np.random.Generator, optimizer: str, lr_spread: float = DEFAULT_LR_SPREAD, lr_center: float = 0.0
) -> dict:
    defaults = DEFAULT_HPARAMS[optimizer]
    decisions = int(rng.choice(DECISIONS_PER_RUN))
    steps_per_action = int(rng.choice([10, 20]))
    return dict(
        optimizer=optimizer,
        # Initial hyperparameters vary around the optimiser's default, as users' starting points do.
        lr=float(defaults["lr"] * 10 ** (rng.uniform(-lr_spread, lr_spread) + lr_center)),
        weight_decay=float(defaults["weight_decay"] * 10 ** rng.uniform(-1, 0.5)),
        momentum=float(rng.uniform(*SGD_MOMENTUM_RANGE)) if optimizer == "sgd" else 0.9,
        batch_size=int(rng.choice([32, 64, 128])),
        total_steps=decisions * steps_per_action,
        steps_per_action=steps_per_action,
        seed=int(rng.integers(2**31 - 1)),
        data_seed=int(rng.integers(2**31 - 1)),
        activation=str(rng.choice(["relu", "tanh", "gelu"])),
    )


def _mlp_hidden(rng: np.random.Generator, widths: Sequence[int] = (16, 32, 64, 128)) -> tuple[int, ...]:
    depth = int(rng.integers(1, 3))
    return tuple(int(rng.choice(widths)) for _ in range(depth))


def _cnn_channels(rng: np.random.Generator) -> tuple[int, int]:
    """The two conv layers' channel counts of a CNN task (the same choices for every image family)."""
    return int(rng.choice([4, 8, 16])), int(rng.choice([8, 16, 32]))


def _teacher_regression(rng, optimizer, lr_spread=DEFAULT_LR_SPREAD, lr_center=0.0):
    return TaskSpec(
        family="teacher_regression",
        dataset="teacher",
        arch="mlp",
        hidden=_mlp_hidden(rng),
        n_samples=_int_log_uniform(rng, 300, 3000),
        n_features=int(rng.integers(4, 33)),
        label_noise=float(rng.uniform(0.0, 0.3)),
        **_common(rng, optimizer, lr_spread, lr_center),
    )


def _teacher_classification(rng, optimizer, lr_spread=DEFAULT_LR_SPREAD, lr_center=0.0):
    return TaskSpec(
        family="teacher_classification",
        dataset="teacher",
        arch="mlp",
        hidden=_mlp_hidden(rng),
        n_samples=_int_log_uniform(rng, 300, 3000),
        n_features=int(rng.integers(4, 33)),
        n_classes=int(rng.integers(2, 11)),
        label_noise=float(rng.uniform(0.0, 0.2)),
        **_common(rng, optimizer, lr_spread, lr_center),
    )


def _make_classification(rng, optimizer, lr_spread=DEFAULT_LR_SPREAD, lr_center=0.0):
    return TaskSpec(
        family="make_classification",
        dataset="make_classification",
        arch="mlp",
        hidden=_mlp_hidden(rng),
        n_samples=_int_log_uniform(rng, 300, 3000),
        n_features=int(rng.integers(5, 41)),
        n_classes=int(rng.integers(2, 7)),
        label_noise=float(rng.uniform(0.0, 0.1)),
        **_common(rng, optimizer, lr_spread, lr_center),
    )


def _tabular(rng, optimizer, lr_spread=DEFAULT_LR_SPREAD, lr_center=0.0):
    dataset = str(rng.choice(list(TABULAR_DATASETS)))
    hidden = _mlp_hidden(rng)
    subset_fraction = float(rng.uniform(0.5, 1.0))
    noise = float(rng.uniform(0.0, 0.1))  # drawn for every table, so that the draws after it do not move
    return TaskSpec(
        family="tabular",
        dataset=dataset,
        arch="mlp",
        hidden=hidden,
        subset_fraction=subset_fraction,
        label_noise=noise if TABULAR_DATASETS[dataset] == "classification" else 0.0,  # diabetes: no labels to flip
        **_common(rng, optimizer, lr_spread, lr_center),
    )


def _small_tabular(rng, optimizer, lr_spread=DEFAULT_LR_SPREAD, lr_center=0.0):
    dataset = str(rng.choice(list(SMALL_TABULAR_DATASETS)))
    if dataset == "friedman1":  # regression: label_noise is the target noise, relative to its spread
        n_features, n_classes, noise = int(rng.integers(5, 16)), 0, float(rng.uniform(0.2, 0.8))
    elif dataset == "blobs":
        n_features, n_classes, noise = int(rng.integers(4, 17)), int(rng.integers(2, 6)), float(rng.uniform(0.0, 0.1))
    else:  # gaussian_quantiles: shells are learnable from a few hundred samples in a few dimensions only
        n_features, n_classes, noise = int(rng.integers(2, 7)), int(rng.integers(2, 4)), float(rng.uniform(0.0, 0.1))
    return TaskSpec(
        family="small_tabular",
        dataset=dataset,
        arch="mlp",
        hidden=_mlp_hidden(rng),
        n_samples=_int_log_uniform(rng, 100, 600),
        n_features=n_features,
        n_classes=n_classes,
        label_noise=noise,
        **_common(rng, optimizer, lr_spread, lr_center),
    )


def _digits_mlp(rng, optimizer, lr_spread=DEFAULT_LR_SPREAD, lr_center=0.0):
    return TaskSpec(
        family="digits_mlp",
        dataset="digits",
        arch="mlp",
        hidden=_mlp_hidden(rng, (32, 64, 128)),
        subset_fraction=float(rng.uniform(0.3, 1.0)),
        label_noise=float(rng.uniform(0.0, 0.2)),
        **_common(rng, optimizer, lr_spread, lr_center),
    )


def _digits_cnn(rng, optimizer, lr_spread=DEFAULT_LR_SPREAD, lr_center=0.0):
    return TaskSpec(
        family="digits_cnn",
        dataset="digits",
        arch="cnn",
        hidden=_cnn_channels(rng),
        subset_fraction=float(rng.uniform(0.3, 1.0)),
        label_noise=float(rng.uniform(0.0, 0.2)),
        permute_pixels=bool(rng.random() < 0.3),
        **_common(rng, optimizer, lr_spread, lr_center),
    )


def _glyphs_cnn(rng, optimizer, lr_spread=DEFAULT_LR_SPREAD, lr_center=0.0):
    return TaskSpec(
        family="glyphs_cnn",
        dataset="glyphs",
        arch="cnn",
        hidden=_cnn_channels(rng),
        n_samples=_int_log_uniform(rng, 300, 3000),
        n_classes=int(rng.integers(2, 11)),
        label_noise=float(rng.uniform(0.0, 0.2)),
        permute_pixels=bool(rng.random() < 0.3),
        **_common(rng, optimizer, lr_spread, lr_center),
    )


def _charlm(rng, optimizer, lr_spread=DEFAULT_LR_SPREAD, lr_center=0.0):
    return TaskSpec(
        family="charlm",
        dataset="python_text",
        arch="charmlp",
        hidden=(int(rng.choice([64, 128])),),
        embedding_dim=int(rng.choice([8, 16])),
        context_length=int(rng.choice([4, 8])),
        n_samples=_int_log_uniform(rng, 5000, 40000),
        **_common(rng, optimizer, lr_spread, lr_center),
    )


_SAMPLERS: dict[str, Callable[[np.random.Generator, str, float, float], TaskSpec]] = {
    "teacher_regression": _teacher_regression,
    "teacher_classification": _teacher_classification,
    "make_classification": _make_classification,
    "tabular": _tabular,
    "small_tabular": _small_tabular,
    "digits_mlp": _digits_mlp,
    "digits_cnn": _digits_cnn,
    "charlm": _charlm,
    "glyphs_cnn": _glyphs_cnn,
}
assert set(_SAMPLERS) == set(FAMILIES)


def check_families(families: Sequence[str], label: str) -> tuple[str, ...]:
    """``families`` as a tuple for meta-training, refusing an empty list, unknown names and repeats (tasks
    are drawn from each family equally often, so a repeat would silently double its share), and a set (a
    TypeError: its order, which decides the draws, changes between processes); ``label``
    names the setting in the message (``"--families"``)."""
    check_ordered(families, label)
    families = tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown:
        raise ValueError(
            f"{label} has unknown or no families {unknown or list(families)}; choose from {list(FAMILIES)}"
        )
    if len(set(families)) != len(families):
        raise ValueError(
            f"{label} must not repeat, got {list(families)}: tasks are drawn from each family equally often, so a "
            "repeated name would double its share"
        )
    return families


class TaskDistribution:
    """A distribution over tasks: a uniform choice of family, then that family's own sampler.

    Args:
        families: the families to sample from (see :data:`FAMILIES`).
        optimizers: inner optimisers to sample from (see :data:`OPTIMIZERS`).
        name: a label for logs and bundle configs.
        lr_spread: initial learning rates are the optimiser's default times ``10 ** U(-lr_spread,
            lr_spread)`` (decades; default :data:`DEFAULT_LR_SPREAD`). A wider spread in meta-training
            shows the agent more runs that start too high or too low.
        lr_center: shifts that range by ``lr_center`` decades: ``10 ** (lr_center + U(-lr_spread,
            lr_spread))`` (default 0). Centred on where the families' best rates lie (about +0.5 for the
            meta-training families), about half the runs start above their best rate and must be cut.
        lr_gain_spread: each task also draws a hidden factor ``10 ** U(-lr_gain_spread, lr_gain_spread)``
            on its learning rate (:attr:`TaskSpec.lr_gain`; decades, default 0: none). The optimiser then
            steps with a rate the observations do not show, so a task's best *observed* rate varies by
            that factor: a meta-agent cannot learn one absolute rate per family and must read the run.
            Drawn after the task, so 0 leaves every draw as it was.

    Raises:
        ValueError: an unknown or repeated family or optimiser, an empty list, or a spread, centre or gain
            spread outside ``[0, 3]``, ``[-3, 3]`` and ``[0, 2]``.
        TypeError: ``families`` or ``optimizers`` is not a name or an ordered list of names (a set), or a
            spread or centre is not a number.
    """

    def __init__(
        self,
        families: Sequence[str] = SPLITS["train"],
        *,
        optimizers: Sequence[str] = OPTIMIZERS,
        name: str = "custom",
        lr_spread: float = DEFAULT_LR_SPREAD,
        lr_center: float = 0.0,
        lr_gain_spread: float = 0.0,
    ) -> None:
        check_ordered(families, "families")  # a seed draws family number k
        check_ordered(optimizers, "optimizers")
        for arg, names, choices in (("families", families, FAMILIES), ("optimizers", optimizers, OPTIMIZERS)):
            if not isinstance(names, Iterable):
                raise TypeError(f"{arg} must be a name or an ordered list of names from {list(choices)}, got {names!r}")
        families = (families,) if isinstance(families, str) else tuple(families)  # one family by name
        optimizers = (optimizers,) if isinstance(optimizers, str) else tuple(optimizers)
        unknown = [f for f in families if f not in _SAMPLERS]
        if not families or unknown:
            raise ValueError(f"unknown or empty task families {unknown or families!r}; choose from {list(FAMILIES)}")
        bad_opt = [o for o in optimizers if o not in OPTIMIZERS]
        if not optimizers or bad_opt:
            raise ValueError(f"unknown or empty optimizers {bad_opt or optimizers!r}; choose from {list(OPTIMIZERS)}")
        for arg, names in (("families", families), ("optimizers", optimizers)):
            if len(set(names)) != len(names):
                raise ValueError(
                    f"{arg} must not repeat, got {list(names)}: each is drawn equally often, so a repeated name "
                    "would double its share"
                )
        for arg, value in (("lr_spread", lr_spread), ("lr_center", lr_center), ("lr_gain_spread", lr_gain_spread)):
            if not is_number(value):
                raise TypeError(f"{arg} must be a number of decades, got {value!r} ({type(value).__name__})")
        lr_spread = float(lr_spread)
        if not 0 <= lr_spread <= 3:
            raise ValueError(
                f"lr_spread must lie in [0, 3] decades around the optimiser's default learning rate, got {lr_spread}"
            )
        self.families = families
        self.optimizers = optimizers
        self.name = name
        lr_center = float(lr_center)
        if not -3 <= lr_center <= 3:
            raise ValueError(
                f"lr_center must lie in [-3, 3] decades from the optimiser's default learning rate, got {lr_center}"
            )
        lr_gain_spread = float(lr_gain_spread)
        if not 0 <= lr_gain_spread <= 2:
            raise ValueError(
                f"lr_gain_spread must lie in [0, 2] decades (a hidden factor 10**U(-s, s) on each task's learning"
                f" rate; 0: none), got {lr_gain_spread}"
            )
        self.lr_spread = lr_spread
        self.lr_center = lr_center
        self.lr_gain_spread = lr_gain_spread

    @classmethod
    def default(
        cls,
        split: str = "train",
        *,
        lr_spread: float = DEFAULT_LR_SPREAD,
        lr_center: float = 0.0,
        lr_gain_spread: float = 0.0,
    ) -> TaskDistribution:
        """The built-in distribution of a split: ``"train"``, ``"validation"`` (the families held out for
        choices made while meta-training), ``"test"`` (those held out for the benchmark) or ``"all"``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return cls(SPLITS[split], name=split, lr_spread=lr_spread, lr_center=lr_center, lr_gain_spread=lr_gain_spread)

    def sample(self, rng: np.random.Generator) -> TaskSpec:
        """Draw one task. All randomness comes from ``rng``."""
        _check_rng(rng)
        family = self.families[int(rng.integers(len(self.families)))]
        optimizer = self.optimizers[int(rng.integers(len(self.optimizers)))]
        return self._with_gain(_SAMPLERS[family](rng, optimizer, self.lr_spread, self.lr_center), rng)

    def _with_gain(self, spec: TaskSpec, rng: np.random.Generator) -> TaskSpec:
        if not self.lr_gain_spread:
            return spec
        return spec.replace(lr_gain=float(10 ** rng.uniform(-self.lr_gain_spread, self.lr_gain_spread)))

    def sample_family(self, family: str, rng: np.random.Generator, optimizer: str | None = None) -> TaskSpec:
        """Draw one task of a given family (used by benchmarks for per-family tables)."""
        if family not in _SAMPLERS:
            raise ValueError(f"unknown task family {family!r}; choose from {list(FAMILIES)}")
        _check_rng(rng)
        if optimizer is not None and optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose from {list(OPTIMIZERS)}")
        optimizer = optimizer or self.optimizers[int(rng.integers(len(self.optimizers)))]
        return self._with_gain(_SAMPLERS[family](rng, optimizer, self.lr_spread, self.lr_center), rng)

    def __repr__(self) -> str:
        spread = "" if self.lr_spread == DEFAULT_LR_SPREAD else f", lr_spread={self.lr_spread}"
        spread += "" if self.lr_center == 0 else f", lr_center={self.lr_center}"
        spread += "" if self.lr_gain_spread == 0 else f", lr_gain_spread={self.lr_gain_spread}"
        return f"TaskDistribution(name={self.name!r}, families={self.families}, optimizers={self.optimizers}{spread})"


class ToyTaskDistribution(TaskDistribution):
    """A fast synthetic regression task (for tests and demos): small teacher data and a small MLP."""

    def __init__(self) -> None:
        super().__init__(("teacher_regression",), optimizers=("sgd",), name="toy")

    def sample(self, rng: np.random.Generator) -> TaskSpec:
        return TaskSpec(
            family="teacher_regression",
            dataset="teacher",
            arch="mlp",
            hidden=(32,),
            n_samples=400,
            n_features=8,
            label_noise=0.1,
            optimizer="sgd",
            lr=float(0.02 * 10 ** rng.uniform(-0.3, 0.3)),
            weight_decay=1e-4,
            momentum=0.9,
            batch_size=32,
            total_steps=60,
            steps_per_action=6,
            seed=int(rng.integers(2**31 - 1)),
            data_seed=int(rng.integers(2**31 - 1)),
            activation="tanh",
        )
