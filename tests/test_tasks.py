from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from agents import MetaAgentConfig
from hpo_env import FAMILIES, SPLITS, ActionDecoder, TaskDistribution, TaskSpec, build_splits, check_families
from hpo_env.data import CHAR_VOCAB
from hpo_env.tasks import DEFAULT_HPARAMS, DEFAULT_LR_SPREAD
from training.benchmark import BenchmarkConfig


def test_splits_partition_families():
    train, validation, test = set(SPLITS["train"]), set(SPLITS["validation"]), set(SPLITS["test"])
    assert train and validation and test
    assert not train & test and not train & validation, "held-out families must not be trained on"
    assert not validation & test, "choices made while training must not see the benchmark's families"
    # Every family is in exactly one split.
    assert set(FAMILIES) == set(SPLITS["all"]) == train | validation | test


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # the reference MLP
def test_small_tabular_covers_its_generators_with_small_learnable_tables():
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier

    dist = TaskDistribution.default("validation")
    rng = np.random.default_rng(0)
    specs = [dist.sample_family("small_tabular", rng) for _ in range(60)]
    assert {s.dataset for s in specs} == {"friedman1", "blobs", "gaussian_quantiles"}
    assert all(100 <= s.n_samples <= 600 for s in specs), "small, like the bundled tables of `tabular`"
    by_name = {s.dataset: s for s in specs}
    assert by_name["friedman1"].task_type == "regression"
    for spec in by_name.values():
        data = build_splits(spec.replace(n_samples=600, label_noise=0.0))
        x_tr, x_va, y_tr, y_va = data.x_train.numpy(), data.x_val.numpy(), data.y_train.numpy(), data.y_val.numpy()
        if data.task_type == "regression":
            assert data.n_outputs == 1 and data.y_train.shape == (len(x_tr), 1)
            # Friedman #1 has a linear part (a linear model explains some of it) and a nonlinear one.
            assert 0.3 < Ridge().fit(x_tr, y_tr).score(x_va, y_va) < 0.95
            continue
        assert data.n_outputs == spec.n_classes == int(data.y_train.max()) + 1
        linear = LogisticRegression(max_iter=2000).fit(x_tr, y_tr).score(x_va, y_va)
        mlp = MLPClassifier((64,), max_iter=1000, random_state=0).fit(x_tr, y_tr).score(x_va, y_va)
        if spec.dataset == "blobs":
            assert linear > 0.7, linear  # blobs are linearly separable up to their overlap
        else:  # nested shells: a linear model stays near chance, a small MLP learns them
            assert linear < 1.5 / spec.n_classes and mlp > linear + 0.2, (linear, mlp)
    with pytest.raises(ValueError, match=">= 5 features"):
        by_name["friedman1"].replace(n_features=4)


def test_glyphs_are_a_reproducible_learnable_vision_task():
    from sklearn.linear_model import LogisticRegression

    from hpo_env.data import _build_splits_cached

    spec = (
        TaskDistribution(["glyphs_cnn"])
        .sample(np.random.default_rng(1))
        .replace(n_samples=1500, n_classes=5, label_noise=0.0, permute_pixels=False)
    )
    data = build_splits(spec)
    assert data.x_train.shape[1:] == (1, 8, 8) and data.n_outputs == 5
    assert torch.bincount(data.y_train, minlength=5).min() > 0.1 * len(data.y_train)
    _build_splits_cached.cache_clear()
    same = build_splits(spec)
    assert same is not data and torch.equal(same.x_train, data.x_train) and torch.equal(same.y_val, data.y_val)
    other = build_splits(spec.replace(data_seed=spec.data_seed + 1))
    assert not torch.equal(other.x_train[:10], data.x_train[:10]), "the data seed draws new glyphs"
    # Classes are figures a linear model separates far above chance (0.2), but not perfectly: the
    # shifts, jittered strokes and pixel noise leave work for a CNN.
    flat = lambda x: x.reshape(len(x), -1).numpy()  # noqa: E731
    clf = LogisticRegression(max_iter=2000).fit(flat(data.x_train), data.y_train.numpy())
    accuracy = clf.score(flat(data.x_val), data.y_val.numpy())
    assert 0.5 < accuracy < 1.0, accuracy


@pytest.mark.parametrize("split", ["train", "validation", "test", "all"])
def test_distribution_samples_only_its_families(split):
    dist = TaskDistribution.default(split)
    rng = np.random.default_rng(0)
    seen = {dist.sample(rng).family for _ in range(200)}
    assert seen == set(SPLITS[split])


def test_sampling_and_task_dicts_say_what_they_need():
    dist = TaskDistribution.default("all")
    with pytest.raises(TypeError, match=r"numpy.random.Generator, e.g. np.random.default_rng\(42\), got int"):
        dist.sample(42)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; choose from \['sgd', 'adamw'\]"):
        dist.sample_family("tabular", np.random.default_rng(0), optimizer="adam")
    spec = dist.sample(np.random.default_rng(0))
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\], missing keys \[\]"):
        TaskSpec.from_dict({**spec.to_dict(), "bogus": 1})


def test_sampling_is_reproducible_and_varied():
    dist = TaskDistribution.default("all")
    a = [dist.sample(np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    specs = [dist.sample(np.random.default_rng(s)) for s in range(20)]
    assert len({s.task_id for s in specs}) == 20


def test_task_spec_round_trips_through_dict(small_mlp_spec):
    assert TaskSpec.from_dict(small_mlp_spec.to_dict()) == small_mlp_spec


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"family": "nope"}, "family"),
        ({"dataset": "mnist"}, "dataset"),
        ({"arch": "cnn"}, "arch"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"total_steps": 0}, "total_steps"),
        ({"steps_per_action": 0}, "steps_per_action"),
        ({"total_steps": 42}, "multiple of steps_per_action"),
        ({"total_steps": 5}, "at least two decisions"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"hidden": ()}, "hidden"),
        ({"hidden": "64"}, r"hidden='64' is invalid: expected a tuple of integer layer widths"),
        ({"hidden": 64}, "hidden=64 is invalid"),
        ({"hidden": (64.9,)}, "hidden"),
        ({"permute_pixels": "no"}, "permute_pixels='no' is invalid: expected True or False"),
        ({"batch_size": 32.0}, "batch_size=32.0 is invalid: expected an integer"),
        ({"total_steps": True}, "total_steps"),
        ({"lr": "0.01"}, "lr='0.01' is invalid: expected a number"),
        ({"weight_decay": float("inf")}, "weight_decay=inf is invalid: expected a finite number"),
        ({"seed": -1}, r"seed=-1 is invalid: expected an integer in \[0, 2\*\*63\)"),
        ({"data_seed": 2**70}, "data_seed"),
    ],
)
def test_bad_task_specs_raise_clear_errors(small_mlp_spec, changes, match):
    with pytest.raises(ValueError, match=match):
        small_mlp_spec.replace(**changes)


def test_lr_spread_widens_only_the_initial_learning_rate():
    def decades(dist, n=400):
        rng = np.random.default_rng(3)
        specs = [dist.sample(rng) for _ in range(n)]
        return specs, np.array([np.log10(s.lr / DEFAULT_HPARAMS[s.optimizer]["lr"]) for s in specs])

    base, d_base = decades(TaskDistribution.default("train"))
    same, _ = decades(TaskDistribution.default("train", lr_spread=DEFAULT_LR_SPREAD))
    assert same == base  # the default spread draws exactly the tasks the benchmark has always used
    wide, d_wide = decades(TaskDistribution.default("train", lr_spread=1.5))
    assert np.abs(d_base).max() <= 0.5 and np.abs(d_wide).max() <= 1.5 and np.abs(d_wide).max() > 1.2
    # Same random stream: everything but the learning rate is unchanged.
    assert [s.replace(lr=1.0) for s in wide] == [s.replace(lr=1.0) for s in base]
    assert "lr_spread=1.5" in repr(TaskDistribution.default("train", lr_spread=1.5))
    with pytest.raises(ValueError, match=r"lr_spread must lie in \[0, 3\]"):
        TaskDistribution.default("train", lr_spread=-1)
    # A centre shifts the range (seventeenth round: 10^U(-0.5, 1.5) around the default), same stream.
    shifted, d_shift = decades(TaskDistribution.default("train", lr_spread=1.0, lr_center=0.5))
    assert d_shift.min() >= -0.5 - 1e-9 and d_shift.max() <= 1.5 + 1e-9 and np.median(d_shift) > 0.3
    assert [s.replace(lr=1.0) for s in shifted] == [s.replace(lr=1.0) for s in base]
    assert decades(TaskDistribution.default("train", lr_center=0.0))[0] == base  # 0: exactly the default draws
    assert "lr_center=0.5" in repr(TaskDistribution.default("train", lr_center=0.5))
    with pytest.raises(ValueError, match=r"lr_center must lie in \[-3, 3\]"):
        TaskDistribution.default("train", lr_center=4)


def test_lr_gain_is_hidden_task_variety_that_leaves_plain_tasks_as_they_were():
    rng = np.random.default_rng(5)
    base = [TaskDistribution.default("train").sample(rng) for _ in range(50)]
    rng = np.random.default_rng(5)
    gained = [TaskDistribution.default("train", lr_gain_spread=0.5).sample(rng) for _ in range(50)]
    gains = np.log10([s.lr_gain for s in gained])
    assert np.abs(gains).max() <= 0.5 and gains.min() < -0.3 and gains.max() > 0.3
    # Drawn after the task: the first task is the same one with a gain (later ones differ, the stream moved on).
    assert gained[0].replace(lr_gain=1.0) == base[0] and gained[0].task_id != base[0].task_id
    assert all(s.lr_gain == 1.0 for s in base)
    # A plain task hashes as it did before the field existed (this id is the earlier code's), so
    # benchmark stores keep their keys.
    assert base[0].task_id == "digits_mlp/digits/a5c756c81a"
    assert base[0].data_key == gained[0].data_key  # the gain never changes the data
    assert "lr_gain_spread=0.5" in repr(TaskDistribution.default("train", lr_gain_spread=0.5))
    assert TaskSpec.from_dict(gained[0].to_dict()) == gained[0]
    with pytest.raises(ValueError, match=r"lr_gain_spread must lie in \[0, 2\]"):
        TaskDistribution.default("train", lr_gain_spread=3)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr_gain"):
            base[0].replace(lr_gain=bad)


def test_specs_that_would_fail_inside_the_data_builders_are_refused():
    dist = TaskDistribution.default("all")
    cls = dist.sample_family("make_classification", np.random.default_rng(0))
    with pytest.raises(ValueError, match="at most 2\\*\\*n_features / 2 = 2 classes for 2 features"):
        cls.replace(n_features=2, n_classes=3)
    text = dist.sample_family("charlm", np.random.default_rng(0))
    with pytest.raises(ValueError, match="context_length=60 is invalid.*validation split"):
        text.replace(n_samples=500, context_length=60)
    assert np.int64(7) == cls.replace(seed=np.int64(7)).seed and type(cls.replace(seed=np.int64(7)).seed) is int


@pytest.mark.parametrize("family", FAMILIES)
def test_a_data_field_the_family_does_not_read_is_refused(family):
    """A spec that sets a data field its family ignores (features of a bundled table, pixels of text)
    would get a new task id for the same task; it is refused, saying which fields the family reads."""
    from hpo_env.tasks import _DATA_DEFAULTS, _FAMILY_FIELDS

    spec = TaskDistribution.default("all").sample_family(family, np.random.default_rng(0))
    unread = [name for name in _DATA_DEFAULTS if name not in _FAMILY_FIELDS[family]]
    assert unread  # every family ignores some of them
    for name in unread:
        value = True if name == "permute_pixels" else 0.5 if name in ("label_noise", "subset_fraction") else 7
        with pytest.raises(ValueError, match=rf"TaskSpec\.{name}=.* has no effect on family '{family}'.* default"):
            spec.replace(**{name: value})
    for name in _FAMILY_FIELDS[family]:  # the fields it reads stay settable
        assert getattr(spec.replace(**{name: getattr(spec, name)}), name) == getattr(spec, name)
    if family == "small_tabular":  # its regression table has no classes
        regression = TaskDistribution.default("all").sample_family(family, np.random.default_rng(0))
        while regression.dataset != "friedman1":
            regression = TaskDistribution.default("all").sample_family(family, np.random.default_rng(regression.seed))
        assert regression.n_classes == 0
        with pytest.raises(ValueError, match="n_classes=3 has no effect on the regression dataset 'friedman1'"):
            regression.replace(n_classes=3)
    if family == "tabular":  # label noise flips class labels: the regression table has none
        rng = np.random.default_rng(0)
        tables = [TaskDistribution.default("all").sample_family(family, rng) for _ in range(40)]
        diabetes = [t for t in tables if t.dataset == "diabetes"]
        assert diabetes and all(t.label_noise == 0.0 for t in diabetes)
        assert all(t.label_noise > 0 for t in tables if t.dataset != "diabetes")
        with pytest.raises(ValueError, match="label_noise=0.05 has no effect on the regression table 'diabetes'"):
            diabetes[0].replace(label_noise=0.05)


def test_one_family_by_name():
    assert TaskDistribution("tabular").families == ("tabular",)


@pytest.mark.parametrize(
    "make",
    [
        lambda names: TaskDistribution(names),
        lambda names: TaskDistribution(["tabular"], optimizers={"sgd", "adamw"}),
        lambda names: check_families(names, "--families"),
        lambda names: BenchmarkConfig(policy="p", families=names),
        lambda names: MetaAgentConfig(task_families=names),
        lambda names: ActionDecoder({"lr", "weight_decay"}),
        lambda names: MetaAgentConfig(hyperparameters={"lr", "weight_decay"}),
    ],
)
def test_a_set_of_names_is_refused_as_its_order_changes_between_processes(make):
    """A seed draws family number k (and sets the hyperparameter of action entry k): with a set of
    strings, whose order follows PYTHONHASHSEED, the same seed would give another run in another process."""
    with pytest.raises(TypeError, match="must be a list or tuple, got a set .*order changes between Python processes"):
        make({"tabular", "digits_mlp", "charlm"})
    assert TaskDistribution({"tabular": 1, "charlm": 2}.keys()).families == ("tabular", "charlm")  # ordered: taken


def test_bad_distributions_raise():
    with pytest.raises(ValueError, match="unknown or empty task families"):
        TaskDistribution(["imagenet"])
    with pytest.raises(ValueError, match="unknown or empty optimizers"):
        TaskDistribution(["tabular"], optimizers=["lion"])
    with pytest.raises(ValueError, match="unknown split"):
        TaskDistribution.default("heldout")


def test_distribution_arguments_of_the_wrong_kind_raise_saying_what_was_given():
    # A repeated family or optimiser would silently double its share of the draws (as check_families says).
    with pytest.raises(ValueError, match=r"families must not repeat, got \['tabular', 'tabular'\]"):
        TaskDistribution(["tabular", "tabular"])
    with pytest.raises(ValueError, match=r"optimizers must not repeat, got \['sgd', 'sgd'\]"):
        TaskDistribution(["tabular"], optimizers=["sgd", "sgd"])
    # A set's order (and so what a seed draws) changes between processes; None is no list of names.
    for families in (None, 3):
        with pytest.raises(
            TypeError, match=rf"families must be a name or an ordered list .*, got {re.escape(repr(families))}"
        ):
            TaskDistribution(families)
    with pytest.raises(TypeError, match=r"families must be a list or tuple, got a set \['charlm', 'tabular'\]"):
        TaskDistribution({"tabular", "charlm"})
    with pytest.raises(TypeError, match="--families must be a list or tuple, got a set"):
        check_families({"tabular", "charlm"}, "--families")
    # Spreads are numbers: "1" was parsed silently, None and "abc" failed inside float() with Python's message.
    for value in ("1", None, True):
        with pytest.raises(TypeError, match=rf"lr_spread must be a number of decades, got {re.escape(repr(value))}"):
            TaskDistribution(["tabular"], lr_spread=value)
    with pytest.raises(TypeError, match="lr_center must be a number of decades, got 'abc'"):
        TaskDistribution(["tabular"], lr_center="abc")
    # NumPy numbers and any ordered iterable of names pass.
    dist = TaskDistribution((f for f in ["tabular", "charlm"]), lr_spread=np.float32(1.0), lr_gain_spread=np.int64(1))
    assert dist.families == ("tabular", "charlm") and dist.lr_spread == 1.0 and dist.lr_gain_spread == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_clean_standardised_splits(family):
    spec = TaskDistribution.default("all").sample_family(family, np.random.default_rng(3))
    data = build_splits(spec)
    assert len(data.x_train) > len(data.x_val) > 0 and len(data.x_test) > 0
    assert build_splits(spec) is data, "splits are cached in memory"
    if family == "charlm":
        assert data.x_train.dtype == torch.long
        assert int(data.x_train.max()) < len(CHAR_VOCAB)
        return
    for x in (data.x_train, data.x_val, data.x_test):
        assert torch.isfinite(x).all()
    flat = data.x_train.reshape(len(data.x_train), -1)
    assert flat.mean(0).abs().max() < 1e-4, "standardised with training statistics"
    if data.task_type == "classification":
        train_share = torch.bincount(data.y_train, minlength=data.n_outputs) / len(data.y_train)
        val_share = torch.bincount(data.y_val, minlength=data.n_outputs) / len(data.y_val)
        assert (train_share - val_share).abs().max() < 0.1, "splits are stratified"


def test_tabular_covers_all_bundled_datasets():
    dist = TaskDistribution.default("test")
    rng = np.random.default_rng(0)
    names = {dist.sample_family("tabular", rng).dataset for _ in range(60)}
    assert names == {"wine", "breast_cancer", "iris", "diabetes"}


def test_preprocessing_drops_non_finite_rows():
    from hpo_env.data import _finite_rows

    x = np.array([[1.0, 2.0], [np.nan, 1.0], [3.0, np.inf], [4.0, 5.0]])
    y = np.array([0, 1, 0, 1])
    xf, yf = _finite_rows(x, y)
    np.testing.assert_array_equal(xf, [[1.0, 2.0], [4.0, 5.0]])
    np.testing.assert_array_equal(yf, [0, 1])
    xr, yr = _finite_rows(np.ones((3, 1)), np.array([[1.0], [np.nan], [2.0]]))
    assert len(xr) == len(yr) == 2


def test_text_tasks_evaluate_on_text_they_did_not_train_on(monkeypatch):
    """Each docstring once: texts that recur (a type's docstring fetched through every constant of that
    type) would put training text verbatim into the validation and test splits of a contiguous split."""
    from hpo_env.data import python_text_corpus

    ids = python_text_corpus().astype(np.uint8)
    assert len(ids) > 100_000  # enough for the longest text tasks (40k characters)
    n = len(ids)
    train = ids[: int(0.8 * n)].tobytes()
    for held_out in (ids[int(0.8 * n) : int(0.9 * n)], ids[int(0.9 * n) :]):
        spans = [held_out[j : j + 48].tobytes() for j in range(0, len(held_out) - 48, 7)]
        assert np.mean([s in train for s in spans]) < 0.01  # 0.2% and 0% (it was 33% and 58%)
    # A text task's id names the corpus version, so results stored for the old text are not reused;
    # other tasks' ids do not change.
    import hpo_env.tasks as tasks_module

    text = TaskDistribution(["charlm"]).sample(np.random.default_rng(0))
    tabular = TaskDistribution(["tabular"]).sample(np.random.default_rng(0))
    ids = (text.task_id, tabular.task_id)
    monkeypatch.setattr(tasks_module, "TEXT_CORPUS_VERSION", 1)
    fresh = [TaskSpec.from_dict(spec.to_dict()) for spec in (text, tabular)]  # (ids are cached per spec)
    assert fresh[0].task_id != ids[0] and fresh[1].task_id == ids[1]


@pytest.mark.parametrize("context_length", [1, 4, 8])
def test_text_splits_share_no_character_position(monkeypatch, context_length):
    """A text task's windows (context and target) of different splits cover disjoint stretches of the
    corpus: with the corpus replaced by the positions themselves, no position is in two splits."""
    import hpo_env.data as data_module

    monkeypatch.setattr(data_module, "python_text_corpus", lambda: np.arange(200_000, dtype=np.int64))
    spec = (
        TaskDistribution(["charlm"])
        .sample(np.random.default_rng(1))
        .replace(context_length=context_length, n_samples=2_000)
    )
    splits = data_module._text_splits(spec, np.random.default_rng(spec.data_seed))
    covered = []
    for x, y in ((splits.x_train, splits.y_train), (splits.x_val, splits.y_val), (splits.x_test, splits.y_test)):
        assert (x[:, 1:] - x[:, :-1] == 1).all() and (y - x[:, -1] == 1).all(), "a window is a contiguous stretch"
        covered.append(set(x.flatten().tolist()) | set(y.tolist()))
    train, val, test = covered
    assert not train & val and not train & test and not val & test
