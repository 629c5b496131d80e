"""Offline datasets and their preprocessing.

Every dataset here is available without a network: scikit-learn's bundled sets, procedurally
generated teacher-network tasks and drawn glyph images, and character-level text taken from the
docstrings of Python's own standard library. Raw datasets are loaded once per process and cached in memory; the processed
splits of a task are cached too (keyed by the data part of its :class:`~hpo_env.tasks.TaskSpec`).

Preprocessing, in order: drop rows with non-finite values, (optionally) subsample and add label
noise, split into train/validation/test (stratified for classification, contiguous for text so that
no window of text leaks across splits), standardise features (and regression targets) with
statistics fitted on the training split only, and cap the evaluation splits so that evaluating a
model every decision stays cheap.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from hpo_env.tasks import TaskSpec

__all__ = [
    "CHAR_VOCAB",
    "SMALL_TABULAR_DATASETS",
    "TABULAR_DATASETS",
    "TEXT_CORPUS_VERSION",
    "DataSplits",
    "build_splits",
    "python_text_corpus",
]

#: Datasets bundled with scikit-learn, with their task type.
TABULAR_DATASETS: dict[str, str] = {
    "wine": "classification",
    "breast_cancer": "classification",
    "iris": "classification",
    "diabetes": "regression",
}

#: Generators of the small synthetic tables of the ``small_tabular`` family (scikit-learn's), with
#: their task type. None of them makes a meta-training or held-out task.
SMALL_TABULAR_DATASETS: dict[str, str] = {
    "friedman1": "regression",
    "blobs": "classification",
    "gaussian_quantiles": "classification",
}

#: Characters the text tasks model; everything else maps to a space.
CHAR_VOCAB = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:'\"!?-()\n"
_CHAR_INDEX = {c: i for i, c in enumerate(CHAR_VOCAB)}

#: Bumped whenever :func:`python_text_corpus` yields other text; text tasks' ids include it, so results
#: stored for the old text are not reused.
TEXT_CORPUS_VERSION = 2

# Pure-Python standard-library modules whose docstrings make the text corpus. They ship with every
# CPython, so the corpus needs no download (its exact text can differ slightly between versions).
_TEXT_MODULES = (
    "argparse",
    "textwrap",
    "difflib",
    "collections",
    "functools",
    "json",
    "statistics",
    "fractions",
    "string",
    "random",
    "pathlib",
    "subprocess",
    "logging",
    "dataclasses",
    "enum",
    "typing",
    "inspect",
    "shutil",
)

_MAX_VAL = 512
_MAX_TEST = 1024

# Glyphs are drawn on a 16x16 canvas and averaged down to 8x8 (as the digits were, from 32x32): each
# class draws this many variants of its figure, and each sample shifts one by up to this many pixels.
_GLYPH_CANVAS = 16
_GLYPH_VARIANTS = 24
_GLYPH_MAX_SHIFT = 2
_GLYPH_STROKES = 4


@dataclass(frozen=True)
class DataSplits:
    """The train/validation/test splits of one task, as CPU tensors.

    Attributes:
        x_train, x_val, x_test: inputs. Float ``(n, d)`` for vectors, ``(n, 1, 8, 8)`` for images,
            long ``(n, context)`` token ids for text.
        y_train, y_val, y_test: long class ids ``(n,)`` (classification) or float ``(n, out)``
            standardised targets (regression).
        task_type: ``"classification"`` or ``"regression"``.
        n_outputs: number of classes, or of regression targets.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task_type: str
    n_outputs: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# --------------------------------------------------------------------------------------------------
# raw sources (cached once per process)


@functools.cache
def _sklearn_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    loaders = {
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "iris": datasets.load_iris,
        "diabetes": datasets.load_diabetes,
        "digits": datasets.load_digits,
    }
    if name not in loaders:
        raise ValueError(f"unknown bundled dataset {name!r}; expected one of {sorted(loaders)}")
    bunch = loaders[name]()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target)


@functools.cache
def python_text_corpus() -> np.ndarray:
    """Token ids of the docstring corpus of Python's standard library (about 0.13M characters).

    The docstrings of each module in ``_TEXT_MODULES`` and of the classes and functions it defines,
    each text once: a constant or an imported module would bring its *type's* docstring (``int``'s,
    ``sys``'s...) again and again, and a text that recurs far apart lands on both sides of a task's
    contiguous train/validation/test split, so the evaluation splits would hold training text
    verbatim. (Version 2 of the corpus; :data:`TEXT_CORPUS_VERSION` is part of text tasks' ids.)
    """
    pieces: list[str] = []
    seen: set[str] = set()
    for module_name in _TEXT_MODULES:
        module = importlib.import_module(module_name)
        objects = [module] + [getattr(module, a) for a in sorted(vars(module)) if not a.startswith("_")]
        for obj in objects:
            if obj is not module and not (
                (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == module_name
            ):
                continue
            with warnings.catch_warnings():  # typing.io/typing.re warn when touched
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = obj.__doc__  # its own docstring, not one inherited from a base class
            if not isinstance(doc, str) or not (doc := inspect.cleandoc(doc)) or doc in seen:
                continue
            seen.add(doc)
            pieces.append(doc)
    text = "\n".join(pieces).lower()
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n\s*\n+", "\n", text)
    ids = np.fromiter((_CHAR_INDEX.get(c, _CHAR_INDEX[" "]) for c in text), dtype=np.int64)
    return ids


# --------------------------------------------------------------------------------------------------
# helpers


def _finite_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if y.dtype.kind == "f":
        keep &= np.isfinite(y.reshape(len(y), -1)).all(axis=1)
    return x[keep], y[keep]


def _split_indices(
    n: int, labels: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """60/20/20 split; stratified by ``labels`` when every class can be spread over the splits."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    stratify: np.ndarray | None = None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 5:
            stratify = labels
    seed = int(rng.integers(2**31 - 1))
    train, rest = train_test_split(idx, test_size=0.4, random_state=seed, stratify=stratify)
    rest_strat = None if stratify is None else stratify[rest]  # stratify is labels here
    val, test = train_test_split(rest, test_size=0.5, random_state=seed + 1, stratify=rest_strat)
    return np.sort(train), np.sort(val), np.sort(test)


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    flat = train.reshape(len(train), -1)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    return [((a.reshape(len(a), -1) - mean) / std).reshape(a.shape) for a in (train, *others)]


def _cap(x: np.ndarray, y: np.ndarray, cap: int, rng: np.random.Generator):
    if len(x) <= cap:
        return x, y
    keep = np.sort(rng.choice(len(x), size=cap, replace=False))
    return x[keep], y[keep]


def _noisy_labels(y: np.ndarray, n_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    if rate <= 0:
        return y
    y = y.copy()
    flip = rng.random(len(y)) < rate
    y[flip] = rng.integers(0, n_classes, size=int(flip.sum()))
    return y


def _teacher(spec: TaskSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str, int]:
    """Inputs ~ N(0, I) through a random two-layer tanh network."""
    n, d = spec.n_samples, spec.n_features
    classification = spec.family == "teacher_classification"
    out = spec.n_classes if classification else 1
    width = 32
    w1 = rng.normal(0, 1.5 / np.sqrt(d), size=(d, width))
    w2 = rng.normal(0, 1.0 / np.sqrt(width), size=(width, out))
    x = rng.normal(size=(n, d))
    f = np.tanh(x @ w1) @ w2
    if classification:
        y = np.argmax(f + 0.1 * rng.gumbel(size=f.shape), axis=1)
        return x, _noisy_labels(y, out, spec.label_noise, rng), "classification", out
    y = f + spec.label_noise * f.std() * rng.normal(size=f.shape)
    return x, y, "regression", 1


def _make_classification(spec: TaskSpec, rng: np.random.Generator):
    from sklearn.datasets import make_classification

    # sklearn needs n_classes * n_clusters_per_class <= 2**n_informative; raise n_informative where
    # half the features are too few for the class count (it never exceeds n_features: >= 5 here).
    n_informative = min(spec.n_features, max(2, spec.n_features // 2, math.ceil(math.log2(2 * spec.n_classes))))
    x, y = make_classification(
        n_samples=spec.n_samples,
        n_features=spec.n_features,
        n_informative=n_informative,
        n_redundant=min(2, spec.n_features - n_informative),
        n_classes=spec.n_classes,
        n_clusters_per_class=2,
        flip_y=spec.label_noise,
        class_sep=0.8,
        random_state=int(rng.integers(2**31 - 1)),
    )
    return x, y, "classification", spec.n_classes


def _subset(x: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator):
    if fraction >= 1.0:
        return x, y
    keep = np.sort(rng.choice(len(x), size=max(30, int(round(fraction * len(x)))), replace=False))
    return x[keep], y[keep]


def _tabular(spec: TaskSpec, rng: np.random.Generator):
    x, y = _sklearn_dataset(spec.dataset)
    x, y = _subset(x, y, spec.subset_fraction, rng)
    if TABULAR_DATASETS[spec.dataset] == "classification":
        n_classes = int(y.max()) + 1
        return x, _noisy_labels(y.astype(np.int64), n_classes, spec.label_noise, rng), "classification", n_classes
    return x, y.reshape(-1, 1), "regression", 1


def _small_tabular(spec: TaskSpec, rng: np.random.Generator):
    """A small synthetic table from one of scikit-learn's generators (:data:`SMALL_TABULAR_DATASETS`):
    Friedman's nonlinear regression #1 (5 informative features, the rest noise), overlapping Gaussian
    blobs (one per class), or classes cut from nested Gaussian quantile shells (a nonlinear boundary).
    Like the bundled tables of ``tabular``: a few hundred samples, so a run overfits unless its
    schedule holds back."""
    from sklearn.datasets import make_blobs, make_friedman1, make_gaussian_quantiles

    n, k, seed = spec.n_samples, spec.n_classes, int(rng.integers(2**31 - 1))
    if spec.dataset == "friedman1":
        x, y = make_friedman1(n_samples=n, n_features=spec.n_features, noise=0.0, random_state=seed)
        y = y + spec.label_noise * y.std() * rng.normal(size=y.shape)
        return x, y.reshape(-1, 1), "regression", 1
    if spec.dataset == "blobs":
        std = float(rng.uniform(2.0, 5.0))  # centres lie in [-10, 10]^d: from well apart to overlapping
        x, y = make_blobs(n_samples=n, n_features=spec.n_features, centers=k, cluster_std=std, random_state=seed)
    else:
        x, y = make_gaussian_quantiles(n_samples=n, n_features=spec.n_features, n_classes=k, random_state=seed)
    return x, _noisy_labels(y.astype(np.int64), k, spec.label_noise, rng), "classification", k


def _digits(spec: TaskSpec, rng: np.random.Generator):
    x, y = _sklearn_dataset("digits")
    x, y = _subset(x, y, spec.subset_fraction, rng)
    if spec.permute_pixels:
        x = x[:, rng.permutation(x.shape[1])]
    x = x.reshape(-1, 1, 8, 8) / 16.0
    return x, _noisy_labels(y.astype(np.int64), 10, spec.label_noise, rng), "classification", 10


def _glyph_ink(p0: np.ndarray, p1: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Anti-aliased pen strokes: segments ``p0 -> p1`` (``(m, strokes, 2)`` canvas coordinates) of
    ``width`` (``(m, 1)``) pixels, as ``(m, canvas, canvas)`` ink in ``[0, 1]``."""
    c = _GLYPH_CANVAS
    grid = np.stack(np.meshgrid(np.arange(c) + 0.5, np.arange(c) + 0.5, indexing="ij"), -1).reshape(-1, 2)
    d = p1 - p0
    rel = grid[None, None] - p0[:, :, None]
    t = np.clip((rel * d[:, :, None]).sum(-1) / np.maximum((d * d).sum(-1), 1e-9)[..., None], 0, 1)
    dist = np.linalg.norm(rel - t[..., None] * d[:, :, None], axis=-1).min(axis=1)
    return np.clip(width - dist + 0.5, 0, 1).reshape(-1, c, c)


def _glyphs(spec: TaskSpec, rng: np.random.Generator):
    """Procedurally drawn 8x8 glyphs, a vision task that is not the digits: each class is a random
    figure of 2-4 pen strokes; a sample is one of its class's redrawings (stroke ends jittered, stroke
    width varied), shifted by a few pixels, with pixel noise."""
    n, k, c, s, v = spec.n_samples, spec.n_classes, _GLYPH_CANVAS, _GLYPH_STROKES, _GLYPH_VARIANTS
    ends = rng.uniform(3, c - 3, size=(2, k, s, 2))
    unused = np.arange(s)[None] >= rng.integers(2, s + 1, size=(k, 1))
    ends[:, unused] = np.repeat(ends[:, :, :1], s, axis=2)[:, unused]  # redraw the first stroke: no new ink
    p0, p1 = ends[:, np.repeat(np.arange(k), v)] + rng.normal(0, 0.7, size=(2, k * v, s, 2))
    m = _GLYPH_MAX_SHIFT
    ink = np.pad(_glyph_ink(p0, p1, rng.uniform(0.6, 1.4, size=(k * v, 1))), ((0, 0), (m, m), (m, m)))
    y = rng.integers(0, k, size=n)
    variant = y * v + rng.integers(0, v, size=n)
    rows = rng.integers(0, 2 * m + 1, size=(n, 1)) + np.arange(c)
    cols = rng.integers(0, 2 * m + 1, size=(n, 1)) + np.arange(c)
    x = ink[variant[:, None, None], rows[:, :, None], cols[:, None, :]]
    x = x.reshape(n, c // 2, 2, c // 2, 2).mean(axis=(2, 4))  # 2x2 blocks: 16x16 -> 8x8
    x = np.clip(x + rng.normal(0, 0.05, size=x.shape), 0, 1)
    if spec.permute_pixels:
        x = x.reshape(n, -1)[:, rng.permutation(x[0].size)]
    return x.reshape(n, 1, c // 2, c // 2), _noisy_labels(y, k, spec.label_noise, rng), "classification", k


def _text_splits(spec: TaskSpec, rng: np.random.Generator) -> DataSplits:
    corpus = python_text_corpus()
    length = min(len(corpus), spec.n_samples + spec.context_length)
    start = int(rng.integers(0, len(corpus) - length + 1))
    ids = corpus[start : start + length]
    windows = np.lib.stride_tricks.sliding_window_view(ids, spec.context_length + 1)
    x, y = windows[:, :-1], windows[:, -1]
    # Contiguous splits with a gap of one context, so no training window overlaps an evaluation one.
    n = len(x)
    a, b = int(0.8 * n), int(0.9 * n)
    gap = spec.context_length
    parts = [(x[: a - gap], y[: a - gap]), (x[a : b - gap], y[a : b - gap]), (x[b:], y[b:])]
    (xtr, ytr), (xva, yva), (xte, yte) = parts
    xva, yva = _cap(xva, yva, _MAX_VAL, rng)
    xte, yte = _cap(xte, yte, _MAX_TEST, rng)
    t = lambda a: torch.as_tensor(np.array(a), dtype=torch.long)  # noqa: E731
    return DataSplits(t(xtr), t(ytr), t(xva), t(yva), t(xte), t(yte), "classification", len(CHAR_VOCAB))


_BUILDERS = {
    "teacher_regression": _teacher,
    "teacher_classification": _teacher,
    "make_classification": _make_classification,
    "tabular": _tabular,
    "small_tabular": _small_tabular,
    "digits_mlp": _digits,
    "digits_cnn": _digits,
    "glyphs_cnn": _glyphs,
}


@functools.lru_cache(maxsize=256)
def _build_splits_cached(key: tuple) -> DataSplits:
    spec = key[0]
    rng = np.random.default_rng(spec.data_seed)
    if spec.family == "charlm":
        return _text_splits(spec, rng)
    x, y, task_type, n_outputs = _BUILDERS[spec.family](spec, rng)
    x, y = _finite_rows(np.asarray(x, dtype=np.float64), np.asarray(y))
    if len(x) < 30:
        raise ValueError(f"task {spec.task_id} keeps only {len(x)} finite rows; at least 30 are needed")
    labels = y if task_type == "classification" else None
    tr, va, te = _split_indices(len(x), labels, rng)
    x_tr, x_va, x_te = _standardise(x[tr], x[va], x[te])
    y_tr, y_va, y_te = y[tr], y[va], y[te]
    if task_type == "regression":
        y_tr, y_va, y_te = _standardise(y_tr, y_va, y_te)
    x_va, y_va = _cap(x_va, y_va, _MAX_VAL, rng)
    x_te, y_te = _cap(x_te, y_te, _MAX_TEST, rng)
    if spec.family == "digits_mlp":
        x_tr, x_va, x_te = (a.reshape(len(a), -1) for a in (x_tr, x_va, x_te))

    def fx(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)

    def fy(a: np.ndarray) -> torch.Tensor:
        if task_type == "classification":
            return torch.as_tensor(a, dtype=torch.long)
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)

    return DataSplits(fx(x_tr), fy(y_tr), fx(x_va), fy(y_va), fx(x_te), fy(y_te), task_type, n_outputs)


def build_splits(spec: TaskSpec) -> DataSplits:
    """Build (or fetch from the in-memory cache) the preprocessed splits of a task's dataset."""
    return _build_splits_cached((spec.data_key,))
