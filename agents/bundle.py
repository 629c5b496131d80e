"""Policy bundles: a trained meta-agent with everything needed to run it elsewhere.

A bundle is a directory::

    my_policy/
        model.zip      the SB3 model (RecurrentPPO, or PPO for the frame-stacked control)
        obs_norm.json  observation-normalisation statistics (VecNormalize's running mean/var)
        config.json    controlled hyperparameters and bounds, feature-set version, env settings,
                       how it was trained (command, seed, timesteps, package version)

:func:`save_bundle` writes it atomically (into a temporary sibling, then renamed), so a crash never
leaves half a bundle. :func:`load_bundle` validates it and raises :class:`BundleError` (a
``ValueError``) naming the file and the fix on a missing file, a corrupted file, or a
feature-set/format mismatch. :meth:`PolicyBundle.predict` follows SB3's protocol and applies the
bundle's normalisation (and frame stacking) itself, so callers pass raw observations from
:class:`~hpo_env.ObservationBuilder`.

An *ensemble bundle* (:func:`save_ensemble`, or ``hpo-ensemble OUT MEMBER MEMBER ...``) holds several
bundles trained on the same action decoder and feature set and acts with the mean of their actions::

    my_ensemble/
        config.json    "kind": "ensemble", the members' relative paths, the shared decoder
        members/0/     a complete bundle (model.zip, obs_norm.json, config.json)
        members/1/     ...

:func:`load_bundle` reads both kinds; an :class:`EnsembleBundle` has the same ``decoder``, ``config``,
``initial_state`` and ``predict`` as a :class:`PolicyBundle`, so every consumer (the
:class:`~agents.PolicyScheduler`, ``hpo-bench``, the training callbacks' evaluation) takes either.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpo_env import FEATURE_SET_VERSION, OBS_BOUND, OPTIONAL_FEATURES, ActionDecoder, ObservationBuilder, check_device
from hpo_env import __version__ as HPO_VERSION
from hpo_env.checks import is_integer, is_number

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "BundleError",
    "ENSEMBLE_FORMAT_VERSION",
    "EnsembleBundle",
    "PolicyBundle",
    "load_bundle",
    "policy_signature",
    "save_bundle",
    "save_ensemble",
]

BUNDLE_FORMAT_VERSION = 1  # a single policy
# A single policy whose decoder caps a value relative to the run's start: an older hpo-meta would drop
# the cap silently, so the version makes it refuse the bundle instead.
CAPPED_BUNDLE_FORMAT_VERSION = 2
ENSEMBLE_FORMAT_VERSION = 2  # an ensemble (older hpo-meta refuses it by this version, clearly)
MODEL_FILE = "model.zip"
NORM_FILE = "obs_norm.json"
CONFIG_FILE = "config.json"
MEMBERS_DIR = "members"
POLICY_KIND = "policy"
ENSEMBLE_KIND = "ensemble"


class BundleError(ValueError):
    """A policy bundle is missing, corrupted, or incompatible with this version of hpo-meta."""


@dataclass
class PolicyBundle:
    """A loaded policy: the SB3 model plus what it needs to see observations as in training.

    Attributes:
        model: the SB3 algorithm (``RecurrentPPO`` or ``PPO``).
        decoder: the action decoder it was trained with (controlled hyperparameters, bounds).
        config: the bundle's JSON config.
        obs_mean, obs_var: normalisation statistics (None: observations are used raw).
        clip_obs, epsilon: VecNormalize's clipping and epsilon.
        frame_stack: frames stacked for the MLP control (1 for recurrent policies).
        path: where it was loaded from (None if built in memory).
        gradient_features: the policy observes the gradient features (``grad_cosine``, ``grad_norm``),
            so whoever runs it must measure the gradients (the environment and the scheduler do).
        epochs_feature: the policy observes each run's planned number of epochs (``log_epochs``), so
            whoever runs it must say it (the environment knows; a scheduler takes ``epochs=``).
    """

    model: Any
    decoder: ActionDecoder
    config: dict = field(default_factory=dict)
    obs_mean: np.ndarray | None = None
    obs_var: np.ndarray | None = None
    clip_obs: float = OBS_BOUND
    epsilon: float = 1e-8
    frame_stack: int = 1
    path: Path | None = None
    gradient_features: bool = False
    epochs_feature: bool = False

    @property
    def is_recurrent(self) -> bool:
        return hasattr(self.model.policy, "lstm_actor")

    @property
    def feature_options(self) -> dict[str, bool]:
        """The optional feature groups it observes, as :class:`~hpo_env.ObservationBuilder` keywords."""
        return {option: getattr(self, option) for option in OPTIONAL_FEATURES}

    @property
    def obs_dim(self) -> int:
        return ObservationBuilder(self.decoder, **self.feature_options).dim

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """Apply the saved normalisation (as VecNormalize does at evaluation time)."""
        obs = np.asarray(obs, dtype=np.float32)
        if self.obs_mean is None:
            return obs
        # float64 statistics, as VecNormalize keeps them: the result is bit-identical to what the
        # policy saw in training (float32 statistics shift the last bits and so the actions).
        mean = np.asarray(self.obs_mean, dtype=np.float64)
        var = np.asarray(self.obs_var, dtype=np.float64)
        out = (obs - mean) / np.sqrt(var + self.epsilon)
        return np.clip(out, -self.clip_obs, self.clip_obs).astype(np.float32)

    def initial_state(self, n_envs: int = 1) -> Any:
        """The policy state before the first decision: LSTM states, or the frame-stack buffer."""
        if self.is_recurrent:
            return None
        if self.frame_stack > 1:
            return np.zeros((n_envs, self.frame_stack * self.obs_dim), dtype=np.float32)
        return None

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """SB3's ``predict`` on *raw* observations ``(n, obs_dim)``: normalises, stacks, acts."""
        obs = np.asarray(observation, dtype=np.float32)
        single = obs.ndim == 1
        if obs.ndim not in (1, 2) or obs.shape[-1] != self.obs_dim:
            raise ValueError(
                f"the policy takes raw observations of shape ({self.obs_dim},) or (n, {self.obs_dim}), got shape "
                f"{obs.shape}: build them with hpo_env.ObservationBuilder(bundle.decoder, **bundle.feature_options)"
            )
        if obs.size == 0:
            raise ValueError(f"the policy needs at least one observation, got shape {obs.shape}")
        bad = np.flatnonzero(~np.isfinite(obs).all(axis=0) if obs.ndim == 2 else ~np.isfinite(obs))
        if bad.size:
            names = ObservationBuilder(self.decoder, **self.feature_options).feature_names()
            raise ValueError(
                f"non-finite observation features {[names[i] for i in bad]}: the policy acts on finite features "
                "(a diverged run's losses are for the scheduler to handle, not the policy)"
            )
        obs = self.normalize(obs.reshape(-1, self.obs_dim))
        n = len(obs)
        starts = np.ones(n, bool) if episode_start is None else np.asarray(episode_start, bool).reshape(-1)
        if starts.size != n:
            raise ValueError(f"episode_start must hold one flag per observation ({n}), got {starts.size}")
        if self.frame_stack > 1 and not self.is_recurrent:
            stacked = self.initial_state(n) if state is None else np.array(state, dtype=np.float32, copy=True)
            d = self.obs_dim
            stacked[starts] = 0.0  # SB3's StackedObservations zero-fills at an episode start
            stacked[:, :-d] = stacked[:, d:]
            stacked[:, -d:] = obs
            action, _ = self.model.predict(stacked, deterministic=deterministic)
            new_state = stacked
        else:
            action, new_state = self.model.predict(obs, state=state, episode_start=starts, deterministic=deterministic)
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        return (action[0] if single else action), new_state


def _decoder_difference(a: ActionDecoder, b: ActionDecoder) -> str:
    """What differs between two decoders, in a few words: the hyperparameters, or each differing setting."""
    if a.names != b.names:
        return f"hyperparameters {list(a.names)} against {list(b.names)}"
    diffs = []
    for spec_a, spec_b in zip(a.to_config()["hyperparameters"], b.to_config()["hyperparameters"]):
        for key in sorted(set(spec_a) | set(spec_b)):
            if spec_a.get(key) != spec_b.get(key):
                diffs.append(f"{spec_a['name']} {key} {spec_a.get(key)} against {spec_b.get(key)}")
    return "; ".join(diffs) or "the same settings, in another form"


@dataclass
class EnsembleBundle:
    """Several policies acting as one: the mean of their actions (in the decoder's [-1, 1] space).

    Every member sees the same raw observations (each with its own normalisation) and keeps its own
    LSTM state; the state of the ensemble is the list of its members' states. With
    ``deterministic=False`` each member samples and the samples are averaged, which narrows the
    exploration noise by about ``sqrt(len(members))``.

    Attributes:
        members: the member bundles (at least two), all with the same decoder.
        config: the ensemble's JSON config.
        path: where it was loaded from (None if built in memory).
    """

    members: list[PolicyBundle]
    config: dict = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise BundleError(f"an ensemble needs at least two member policies, got {len(self.members)}")
        first = self.members[0].decoder
        for i, member in enumerate(self.members[1:], start=1):
            if member.decoder != first:
                raise BundleError(
                    f"ensemble member {i} controls {member.decoder.to_config()}, member 0 controls "
                    f"{first.to_config()} ({_decoder_difference(first, member.decoder)}): members must be trained "
                    "with the same hyperparameters and bounds"
                )
            for option in OPTIONAL_FEATURES:
                if getattr(member, option) != getattr(self.members[0], option):
                    raise BundleError(
                        f"ensemble member {i} has {option}={getattr(member, option)}, member 0 has "
                        f"{getattr(self.members[0], option)}: members must observe the same features"
                    )

    @property
    def decoder(self) -> ActionDecoder:
        return self.members[0].decoder

    @property
    def obs_dim(self) -> int:
        return self.members[0].obs_dim

    @property
    def gradient_features(self) -> bool:
        return self.members[0].gradient_features

    @property
    def epochs_feature(self) -> bool:
        return self.members[0].epochs_feature

    @property
    def feature_options(self) -> dict[str, bool]:
        return self.members[0].feature_options

    @property
    def is_recurrent(self) -> bool:
        return any(m.is_recurrent for m in self.members)

    def initial_state(self, n_envs: int = 1) -> list[Any]:
        """The members' initial states, as a list."""
        return [m.initial_state(n_envs) for m in self.members]

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, list[Any]]:
        """SB3's ``predict`` on raw observations: the members' mean action, and their new states."""
        if state is None:
            states = [None] * len(self.members)
        elif isinstance(state, list) and len(state) == len(self.members):
            states = state
        else:
            raise ValueError(
                f"an ensemble of {len(self.members)} policies needs its state as a list of {len(self.members)} "
                f"member states (from its initial_state or predict), got {type(state).__name__}"
                + (f" of length {len(state)}" if isinstance(state, (list, tuple)) else "")
            )
        actions, new_states = [], []
        for member, member_state in zip(self.members, states):
            action, new_state = member.predict(observation, member_state, episode_start, deterministic)
            actions.append(action)
            new_states.append(new_state)
        return np.asarray(np.mean(actions, axis=0, dtype=np.float64), dtype=np.float32), new_states


def policy_signature(policy: Any) -> str:
    """What kind of policy state ``policy`` keeps, as a string (e.g. ``"ensemble[recurrent, recurrent]"``).

    A saved policy state (:meth:`PolicyScheduler.state_dict`) only fits a policy of the same signature.
    """
    if isinstance(policy, EnsembleBundle):
        return "ensemble[" + ", ".join(policy_signature(m) for m in policy.members) + "]"
    if isinstance(policy, PolicyBundle):
        return "recurrent" if policy.is_recurrent else f"mlp over {policy.frame_stack} frames"
    return type(policy).__name__


def _write_atomically(path: Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory with ``fill(tmp)`` in a temporary sibling, then swap it in for ``path``.

    Only a bundle (a directory with a config.json) or an empty directory is ever replaced, so a
    mistyped output path cannot delete a folder of other work.
    """
    if path.exists() and not (path.is_dir() and ((path / CONFIG_FILE).is_file() or not any(path.iterdir()))):
        raise BundleError(
            f"{str(path)!r} exists and is not a policy bundle (no {CONFIG_FILE}); refusing to replace it: "
            "choose a new directory, or remove it yourself"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not tempfile.mkdtemp, which makes the folder private) so the bundle gets the usual permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir()
    old = path.with_name(f".{path.name}.old")
    moved = False  # whether the previous bundle sits at `old` and not yet replaced
    try:
        fill(tmp)
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            moved = True
        tmp.rename(path)
        moved = False
    except BaseException:
        if moved and not path.exists():  # interrupted between the two renames: put the previous bundle back
            old.rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def feature_options_of(
    model: Any,
    decoder: ActionDecoder,
    frame_stack: int = 1,
    gradient_features: bool | None = None,
    epochs_feature: bool | None = None,
) -> dict[str, bool]:
    """The optional feature groups (:class:`~hpo_env.ObservationBuilder` keywords) of an SB3 model's
    observations: each width fits exactly one set. Given values must agree with the model.

    Raises:
        BundleError: no feature set of ``decoder`` gives the model's width.
    """
    width = int(np.prod(model.observation_space.shape)) // max(int(frame_stack), 1)
    given = {"gradient_features": gradient_features, "epochs_feature": epochs_feature}
    combinations = (dict(zip(OPTIONAL_FEATURES, on)) for on in itertools.product((False, True), repeat=len(given)))
    fits = [
        options
        for options in combinations
        if ObservationBuilder(decoder, **options).dim == width
        and all(given[k] in (None, v) for k, v in options.items())
    ]
    if not fits:
        raise BundleError(
            f"the model observes {width} features per frame, which no feature set of {list(decoder.names)} with "
            f"{ {k: v for k, v in given.items() if v is not None} or 'any optional features' } gives: pass the "
            "decoder and options of the environment it was trained on"
        )
    return fits[0]


def save_bundle(
    path: str | os.PathLike,
    model: Any,
    decoder: ActionDecoder,
    *,
    obs_rms: Any = None,
    clip_obs: float = OBS_BOUND,
    epsilon: float = 1e-8,
    frame_stack: int = 1,
    config: Mapping[str, Any] | None = None,
    gradient_features: bool | None = None,
    epochs_feature: bool | None = None,
) -> Path:
    """Write a bundle directory atomically; returns its path.

    Args:
        path: the bundle directory (replaced if it exists).
        model: a trained SB3 ``RecurrentPPO`` or ``PPO``.
        decoder: the :class:`ActionDecoder` of the environment it was trained on.
        obs_rms: VecNormalize's ``obs_rms`` (anything with ``mean`` and ``var``), or None.
        clip_obs, epsilon: VecNormalize's settings.
        frame_stack: frames stacked by ``VecFrameStack`` (after normalisation), 1 for none.
        config: extra JSON-serialisable settings (environment, training command, seed, timesteps...).
            Keys that describe the saved files (format version, algorithm, features, decoder...) are
            written from the arguments, so a loaded bundle's config can be passed back as it is.
        gradient_features: the policy was trained on observations with the gradient features
            (default: read from the width of the model's observations).
        epochs_feature: the policy was trained on observations with the epochs feature (default:
            read from the width of the model's observations).

    Raises:
        BundleError: the model's observations fit no feature set of ``decoder``, or not the one given, or
            ``frame_stack``, ``clip_obs``, ``epsilon`` or ``obs_rms`` are such that no bundle could load.
    """
    path = Path(path)
    # What load_bundle would refuse is refused here, before anything is written.
    if not all(hasattr(model, name) for name in ("save", "observation_space", "policy")):
        raise BundleError(
            f"model must be a trained SB3 RecurrentPPO or PPO (hpo-train's), got {type(model).__name__}: pass the "
            "model itself (a bundle's is load_bundle(path).model)"
        )
    if not is_integer(frame_stack) or frame_stack < 1:
        raise BundleError(f"frame_stack must be a positive integer (1: no stacking), got {frame_stack!r}")
    for name, value in (("clip_obs", clip_obs), ("epsilon", epsilon)):
        if not (is_number(value) and math.isfinite(value) and value > 0):
            raise BundleError(f"{name} must be a finite number > 0 (VecNormalize's), got {value!r}")
    options = feature_options_of(model, decoder, frame_stack, gradient_features, epochs_feature)
    builder = ObservationBuilder(decoder, **options)
    if obs_rms is not None:
        mean, var = np.asarray(obs_rms.mean, dtype=np.float64), np.asarray(obs_rms.var, dtype=np.float64)
        if mean.shape != (builder.dim,) or var.shape != (builder.dim,):
            raise BundleError(
                f"obs_rms has shapes {mean.shape} and {var.shape}, expected ({builder.dim},): the statistics of "
                "another environment's observations (pass the VecNormalize of the model's own environment)"
            )
        if not (np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all()):
            raise BundleError("obs_rms holds non-finite means or variances, or negative variances")
    written = {
        "format_version": CAPPED_BUNDLE_FORMAT_VERSION if decoder.relative_caps else BUNDLE_FORMAT_VERSION,
        "kind": POLICY_KIND,
        "feature_set_version": FEATURE_SET_VERSION,
        "hpo_meta_version": HPO_VERSION,
        "algorithm": type(model).__name__,
        "frame_stack": int(frame_stack),
        "obs_dim": builder.dim,
        "feature_names": builder.feature_names(),
        **options,
        "action_decoder": decoder.to_config(),
    }
    full_config = {**written, **{k: v for k, v in dict(config or {}).items() if k not in written}}

    def fill(tmp: Path) -> None:
        model.save(tmp / MODEL_FILE)
        norm = None
        if obs_rms is not None:
            norm = {
                "mean": np.asarray(obs_rms.mean, dtype=np.float64).tolist(),
                "var": np.asarray(obs_rms.var, dtype=np.float64).tolist(),
                "count": float(getattr(obs_rms, "count", 0.0)),
                "clip_obs": float(clip_obs),
                "epsilon": float(epsilon),
            }
        (tmp / NORM_FILE).write_text(json.dumps(norm, indent=1))
        _write_config(tmp, full_config)

    return _write_atomically(path, fill)


def save_ensemble(
    path: str | os.PathLike, members: Sequence[str | os.PathLike], *, config: Mapping[str, Any] | None = None
) -> Path:
    """Write an ensemble bundle of saved bundles (copied into it) atomically; returns its path.

    Args:
        path: the ensemble directory (replaced if it exists, unlike ``hpo-ensemble`` without ``--force``;
            must not be one of the members).
        members: at least two bundle directories with the same controlled hyperparameters, bounds
            and feature set (each is loaded and validated first).
        config: extra JSON-serialisable settings (description, benchmark summary...).

    Raises:
        BundleError: fewer than two members, a member is invalid or is itself an ensemble, or the
            members control different hyperparameters.
    """
    path = Path(path)
    if isinstance(members, (str, os.PathLike)):
        raise BundleError(f"members must be a list of bundle directories, got one path {str(members)!r}")
    sources = [Path(m) for m in members]
    if len(sources) < 2:
        raise BundleError(f"an ensemble needs at least two member bundles, got {len(sources)}")
    seen: dict[Path, Path] = {}
    for src in sources:
        if src.resolve() in seen:
            raise BundleError(
                f"{str(src)!r} and {str(seen[src.resolve()])!r} are the same bundle: an ensemble of a policy with "
                "itself is that policy; list each member once"
            )
        seen[src.resolve()] = src
    for src in sources:
        if src.resolve() == path.resolve() or path.resolve() in src.resolve().parents:
            raise BundleError(
                f"the ensemble {str(path)!r} would replace its own member {str(src)!r}: write it to another directory"
            )
    loaded: list[PolicyBundle] = []
    for src in sources:
        member = load_bundle(src)
        if isinstance(member, EnsembleBundle):
            raise BundleError(f"{str(src)!r} is an ensemble; list its members instead of nesting ensembles")
        loaded.append(member)
    ensemble = EnsembleBundle(loaded)  # checks that the members share one decoder
    names = [f"{MEMBERS_DIR}/{i}" for i in range(len(sources))]
    full_config = {
        "format_version": ENSEMBLE_FORMAT_VERSION,
        "kind": ENSEMBLE_KIND,
        "feature_set_version": FEATURE_SET_VERSION,
        "hpo_meta_version": HPO_VERSION,
        "combine": "mean_action",
        "members": names,
        "member_sources": [str(src) for src in sources],
        "obs_dim": ensemble.obs_dim,
        "action_decoder": ensemble.decoder.to_config(),
        **dict(config or {}),
    }

    def fill(tmp: Path) -> None:
        for src, name in zip(sources, names):
            dest = tmp / name
            dest.mkdir(parents=True)
            for file in (MODEL_FILE, NORM_FILE, CONFIG_FILE):
                shutil.copyfile(src / file, dest / file)
        _write_config(tmp, full_config)

    return _write_atomically(path, fill)


def _write_config(directory: Path, config: Mapping[str, Any]) -> None:
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))


def _ships(name: str) -> bool:
    """Whether a policy of that name ships with hpo-meta (:func:`agents.default_policy_path`)."""
    from agents.scheduler import default_policy_path  # (the scheduler module imports this one)

    try:
        default_policy_path(name)
    except ValueError:
        return False
    return True


def load_bundle(path: str | os.PathLike, device: str = "cpu") -> PolicyBundle | EnsembleBundle:
    """Load and validate a bundle directory (a single policy, or an ensemble of saved bundles).

    Raises:
        BundleError: the directory or a file is missing, a file is corrupted, or the bundle was
            made for another feature set or format (retrain, or install the matching hpo-meta).
    """
    path = Path(path)
    if not path.is_dir():
        previous = path.with_name(f".{path.name}.old")
        hint = (
            f"; a save was interrupted while replacing it, and the previous bundle is intact at {str(previous)!r}"
            if previous.is_dir()
            else "; for a shipped policy by name use agents.load_bundle(agents.default_policy_path("
            f"{path.name!r})) or PolicyScheduler.from_pretrained({path.name!r}, ...)"
            if str(path) == path.name and _ships(path.name)
            else ""
        )
        raise BundleError(
            f"no policy bundle at {str(path)!r}: expected a directory holding {MODEL_FILE}, {NORM_FILE} and "
            f"{CONFIG_FILE}{hint}"
        )
    if not (path / CONFIG_FILE).is_file():
        if (path / "settings.json").is_file() and ((path / "bundle").is_dir() or (path / "checkpoints").is_dir()):
            raise BundleError(
                f"{str(path)!r} is an hpo-train run folder, not a policy bundle: pass {str(path / 'bundle')!r} "
                f"(the final policy) or {str(path / 'best_bundle')!r} (the best held-out evaluation)"
            )
        inside = sorted(str(found.parent) for found in path.glob(f"*/*/{CONFIG_FILE}") if found.parent.name == "bundle")
        if inside:  # a --logdir of runs
            more = f" (and {len(inside) - 1} more)" if len(inside) > 1 else ""
            raise BundleError(
                f"{str(path)!r} holds hpo-train runs, not a policy bundle: pass one run's bundle, e.g. "
                f"{inside[0]!r}{more}"
            )
        if (path / MODEL_FILE).is_file() and (path / "vecnormalize.pkl").is_file():  # hpo-train's checkpoints/step_*
            run = path.parent.parent
            raise BundleError(
                f"{str(path)!r} is an hpo-train checkpoint, not a policy bundle: pass the run's {str(run / 'bundle')!r} "
                f"(its final policy) or {str(run / 'best_bundle')!r}, or make a bundle of its late checkpoints with "
                f"hpo-average {str(run)!r} --last N"
            )
        if (path / MODEL_FILE).is_file() or (path / NORM_FILE).is_file():
            raise BundleError(
                f"policy bundle {str(path)!r} is missing {CONFIG_FILE}; re-save it with agents.save_bundle"
            )
        raise BundleError(
            f"{str(path)!r} is not a policy bundle: a bundle is a directory holding {MODEL_FILE}, {NORM_FILE} and "
            f"{CONFIG_FILE}, as hpo-train writes to RUN/bundle and agents.save_bundle writes (or pass 'default', "
            "the shipped policy)"
        )
    config = _read_json(path / CONFIG_FILE)
    if not isinstance(config, dict):
        raise BundleError(f"{path / CONFIG_FILE} must hold a JSON object, got {type(config).__name__}")
    kind = config.get("kind", POLICY_KIND)
    readable = {
        POLICY_KIND: (BUNDLE_FORMAT_VERSION, CAPPED_BUNDLE_FORMAT_VERSION),
        ENSEMBLE_KIND: (ENSEMBLE_FORMAT_VERSION,),
    }
    if not isinstance(kind, str) or kind not in readable:
        raise BundleError(
            f"{path / CONFIG_FILE} has an unknown bundle kind {kind!r}; this hpo-meta reads {sorted(readable)}"
        )
    _check_versions(path, config, readable[kind])
    if kind == ENSEMBLE_KIND:
        return _load_ensemble(path, config, device)
    for name in (MODEL_FILE, NORM_FILE):
        if not (path / name).is_file():
            raise BundleError(f"policy bundle {str(path)!r} is missing {name}; re-save it with agents.save_bundle")
    try:
        decoder = ActionDecoder.from_config(config["action_decoder"])
    except (KeyError, ValueError) as err:
        raise BundleError(f"{path / CONFIG_FILE} has no valid 'action_decoder': {err}") from err
    options = {name: config.get(name, False) for name in OPTIONAL_FEATURES}
    for name, value in options.items():
        if not isinstance(value, bool):
            raise BundleError(f"{path / CONFIG_FILE} has {name}={value!r}, expected true or false")
    obs_dim = ObservationBuilder(decoder, **options).dim
    if config.get("obs_dim") != obs_dim:
        raise BundleError(
            f"{path / CONFIG_FILE} says obs_dim={config.get('obs_dim')!r}, its decoder and feature options "
            f"(gradient_features, epochs_feature) imply {obs_dim}"
        )
    norm = _read_json(path / NORM_FILE)
    obs_mean = obs_var = None
    clip_obs, epsilon = OBS_BOUND, 1e-8
    if norm is not None:
        try:
            obs_mean = np.asarray(norm["mean"], dtype=np.float64)
            obs_var = np.asarray(norm["var"], dtype=np.float64)
            clip_obs, epsilon = float(norm["clip_obs"]), float(norm["epsilon"])
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{path / NORM_FILE} is corrupted: {err}") from err
        if obs_mean.shape != (obs_dim,) or obs_var.shape != (obs_dim,):
            raise BundleError(
                f"{path / NORM_FILE} holds statistics of shapes {obs_mean.shape} and {obs_var.shape}, "
                f"expected ({obs_dim},) each"
            )
        if not (np.all(np.isfinite(obs_mean)) and np.all(np.isfinite(obs_var)) and np.all(obs_var >= 0)):
            raise BundleError(f"{path / NORM_FILE} is corrupted: its mean must be finite and its var finite and >= 0")
        if not (0 < clip_obs < math.inf and 0 < epsilon < math.inf):
            raise BundleError(
                f"{path / NORM_FILE} is corrupted: clip_obs={clip_obs} and epsilon={epsilon} must be positive "
                "finite numbers"
            )
    algorithm = config.get("algorithm", "RecurrentPPO")
    if not isinstance(algorithm, str):
        raise BundleError(f"{path / CONFIG_FILE} has algorithm={algorithm!r}, expected 'RecurrentPPO' or 'PPO'")
    frame_stack = config.get("frame_stack", 1)
    if isinstance(frame_stack, bool) or not isinstance(frame_stack, int) or frame_stack < 1:
        raise BundleError(f"{path / CONFIG_FILE} has frame_stack={frame_stack!r}, expected a positive integer")
    model = _load_model(path / MODEL_FILE, algorithm, device)
    expected = obs_dim * (frame_stack if config.get("algorithm") == "PPO" else 1)
    if tuple(model.observation_space.shape) != (expected,):
        raise BundleError(
            f"{path / MODEL_FILE} expects observations of shape {model.observation_space.shape}, "
            f"but the bundle's features give ({expected},)"
        )
    return PolicyBundle(model, decoder, config, obs_mean, obs_var, clip_obs, epsilon, frame_stack, path, **options)


def _check_versions(path: Path, config: Mapping[str, Any], format_versions: tuple[int, ...]) -> None:
    if config.get("format_version") not in format_versions:
        raise BundleError(
            f"policy bundle {str(path)!r} has format version {config.get('format_version')!r} (written by hpo-meta "
            f"{config.get('hpo_meta_version', '?')}), but hpo-meta {HPO_VERSION} reads versions "
            f"{list(format_versions)} for a bundle of kind {config.get('kind', POLICY_KIND)!r}: install the "
            "hpo-meta that wrote it, or re-save the policy with this one"
        )
    if str(config.get("feature_set_version")) != FEATURE_SET_VERSION:
        raise BundleError(
            f"policy bundle {str(path)!r} was trained on feature set {config.get('feature_set_version')!r}, "
            f"but this hpo-meta builds feature set {FEATURE_SET_VERSION!r}: retrain the policy or install "
            f"hpo-meta {config.get('hpo_meta_version', '?')}"
        )


def _load_ensemble(path: Path, config: dict, device: str) -> EnsembleBundle:
    names = config.get("members")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BundleError(f"{path / CONFIG_FILE} is an ensemble but has no list of 'members' (relative paths)")
    members = []
    for name in names:
        member_path = (path / name).resolve()
        if path.resolve() not in member_path.parents:
            raise BundleError(f"{path / CONFIG_FILE} names member {name!r} outside the ensemble's directory")
        if not member_path.is_dir():
            raise BundleError(
                f"ensemble {str(path)!r} is missing its member {name!r}; rebuild it with hpo-ensemble "
                "(agents.save_ensemble)"
            )
        try:
            member = load_bundle(member_path, device=device)
        except BundleError as err:
            raise BundleError(
                f"ensemble {str(path)!r}, member {name!r}: {err} (or rebuild the ensemble with hpo-ensemble)"
            ) from err
        if isinstance(member, EnsembleBundle):
            raise BundleError(f"ensemble {str(path)!r} nests another ensemble at {name!r}; ensembles do not nest")
        members.append(member)
    ensemble = EnsembleBundle(members, config, path)
    try:
        declared = ActionDecoder.from_config(config["action_decoder"])
    except (KeyError, ValueError) as err:
        raise BundleError(f"{path / CONFIG_FILE} has no valid 'action_decoder': {err}") from err
    if declared != ensemble.decoder:
        raise BundleError(
            f"{path / CONFIG_FILE} declares {declared.to_config()}, but its members control "
            f"{ensemble.decoder.to_config()}; re-save it with agents.save_ensemble"
        )
    return ensemble


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{file} is corrupted (not valid JSON: {err}); re-save the bundle") from err


def _load_model(file: Path, algorithm: str, device: str) -> Any:
    from sb3_contrib import RecurrentPPO
    from stable_baselines3 import PPO

    classes: dict[str, type[RecurrentPPO] | type[PPO]] = {"RecurrentPPO": RecurrentPPO, "PPO": PPO}
    if algorithm not in classes:
        raise BundleError(f"unknown algorithm {algorithm!r} in bundle config; expected one of {list(classes)}")
    try:
        check_device(device)
    except ValueError as err:
        raise BundleError(str(err)) from err
    try:
        with global_state_untouched():
            return classes[algorithm].load(file, device=device)
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, RuntimeError, OSError) as err:
        raise BundleError(f"{file} is corrupted and cannot be loaded as a {algorithm} model: {err}") from err


@contextlib.contextmanager
def global_state_untouched() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global generators on exit, and build in float32.

    SB3's ``load`` re-seeds all three with the seed the model was trained with (``set_random_seed``) and
    building the network draws from torch's: without this, loading a policy would make every seed of the
    user's own training loop (data order, dropout, initialisation) the same run (``hpo-train``'s
    :func:`training.train.train` keeps them for the same reason). The network is built
    in float32 whatever the user's default dtype (``torch.set_default_dtype(torch.float64)`` would
    otherwise give float64 weights that refuse the float32 observations).
    """
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 (the legacy global state is what SB3 seeds)
    dtype = torch.get_default_dtype()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        torch.set_default_dtype(torch.float32)
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_default_dtype(dtype)
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


def main(argv: Sequence[str] | None = None) -> int:
    """``hpo-ensemble OUT MEMBER MEMBER ...``: combine saved bundles into one ensemble bundle."""
    parser = argparse.ArgumentParser(
        prog="hpo-ensemble",
        description="Combine policy bundles (same hyperparameters and bounds) into one ensemble bundle that "
        "acts with the mean of its members' actions. Use the result anywhere a bundle goes: "
        "PolicyScheduler.from_pretrained(OUT, ...), hpo-bench --policy OUT.",
    )
    parser.add_argument("out", help="the ensemble bundle directory to write (a new one, unless --force)")
    parser.add_argument(
        "members", nargs="+", help="two or more policy bundle directories (or names of shipped policies)"
    )
    parser.add_argument("--description", default=None, help="a line saying what the ensemble is")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    config = {} if args.description is None else {"description": args.description}
    out = Path(args.out)
    if out.exists() and not args.force:
        what = "a policy bundle" if (out / CONFIG_FILE).is_file() else "a file" if out.is_file() else "a directory"
        parser.exit(
            2,
            f"hpo-ensemble: error: {args.out!r} exists ({what}); the first argument is the ensemble to write: "
            "choose a new directory, or pass --force to replace it\n",
        )
    from agents.scheduler import resolve_policy
    from training.cli import readable_warnings

    try:
        with readable_warnings("hpo-ensemble"):
            path = save_ensemble(out, [resolve_policy(m) for m in args.members], config=config)
    except ValueError as err:  # BundleError included, and resolve_policy's unknown name
        parser.exit(2, f"hpo-ensemble: error: {err}\n")
    print(f"wrote an ensemble of {len(args.members)} policies to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
