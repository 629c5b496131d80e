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
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpo_env import FEATURE_SET_VERSION, OBS_BOUND, ActionDecoder, ObservationBuilder
from hpo_env import __version__ as HPO_VERSION

__all__ = ["BUNDLE_FORMAT_VERSION", "BundleError", "PolicyBundle", "load_bundle", "save_bundle"]

BUNDLE_FORMAT_VERSION = 1
MODEL_FILE = "model.zip"
NORM_FILE = "obs_norm.json"
CONFIG_FILE = "config.json"


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

    @property
    def is_recurrent(self) -> bool:
        return hasattr(self.model.policy, "lstm_actor")

    @property
    def obs_dim(self) -> int:
        return ObservationBuilder(self.decoder).dim

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
        obs = self.normalize(obs.reshape(-1, self.obs_dim))
        n = len(obs)
        starts = np.ones(n, bool) if episode_start is None else np.asarray(episode_start, bool).reshape(n)
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
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full_config = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "feature_set_version": FEATURE_SET_VERSION,
        "hpo_meta_version": HPO_VERSION,
        "algorithm": type(model).__name__,
        "frame_stack": int(frame_stack),
        "obs_dim": ObservationBuilder(decoder).dim,
        "feature_names": ObservationBuilder(decoder).feature_names(),
        "action_decoder": decoder.to_config(),
        **dict(config or {}),
    }
    # mkdir (not tempfile.mkdtemp, which makes the folder private) so the bundle gets the usual permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir()
    try:
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
        (tmp / CONFIG_FILE).write_text(json.dumps(full_config, indent=2, sort_keys=True, default=str))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_bundle(path: str | os.PathLike, device: str = "cpu") -> PolicyBundle:
    """Load and validate a bundle directory.

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
            else ""
        )
        raise BundleError(
            f"no policy bundle at {str(path)!r}: expected a directory holding {MODEL_FILE}, {NORM_FILE} and "
            f"{CONFIG_FILE}{hint}"
        )
    for name in (CONFIG_FILE, MODEL_FILE, NORM_FILE):
        if not (path / name).is_file():
            raise BundleError(f"policy bundle {str(path)!r} is missing {name}; re-save it with agents.save_bundle")
    config = _read_json(path / CONFIG_FILE)
    if not isinstance(config, dict):
        raise BundleError(f"{path / CONFIG_FILE} must hold a JSON object, got {type(config).__name__}")
    if config.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"policy bundle {str(path)!r} has format version {config.get('format_version')!r}, this hpo-meta "
            f"reads version {BUNDLE_FORMAT_VERSION}"
        )
    if str(config.get("feature_set_version")) != FEATURE_SET_VERSION:
        raise BundleError(
            f"policy bundle {str(path)!r} was trained on feature set {config.get('feature_set_version')!r}, "
            f"but this hpo-meta builds feature set {FEATURE_SET_VERSION!r}: retrain the policy or install "
            f"hpo-meta {config.get('hpo_meta_version', '?')}"
        )
    try:
        decoder = ActionDecoder.from_config(config["action_decoder"])
    except (KeyError, ValueError) as err:
        raise BundleError(f"{path / CONFIG_FILE} has no valid 'action_decoder': {err}") from err
    obs_dim = ObservationBuilder(decoder).dim
    if config.get("obs_dim") != obs_dim:
        raise BundleError(f"{path / CONFIG_FILE} says obs_dim={config.get('obs_dim')}, its decoder implies {obs_dim}")
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
        if obs_mean.shape != (obs_dim,) or obs_var.shape != (obs_dim,) or not np.all(np.isfinite(obs_var)):
            raise BundleError(
                f"{path / NORM_FILE} holds statistics of shape {obs_mean.shape}, expected ({obs_dim},) finite values"
            )
    model = _load_model(path / MODEL_FILE, config.get("algorithm", "RecurrentPPO"), device)
    frame_stack = int(config.get("frame_stack", 1))
    expected = obs_dim * (frame_stack if config.get("algorithm") == "PPO" else 1)
    if tuple(model.observation_space.shape) != (expected,):
        raise BundleError(
            f"{path / MODEL_FILE} expects observations of shape {model.observation_space.shape}, "
            f"but the bundle's features give ({expected},)"
        )
    return PolicyBundle(model, decoder, config, obs_mean, obs_var, clip_obs, epsilon, frame_stack, path)


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{file} is corrupted (not valid JSON: {err}); re-save the bundle") from err


def _load_model(file: Path, algorithm: str, device: str) -> Any:
    from sb3_contrib import RecurrentPPO
    from stable_baselines3 import PPO

    classes = {"RecurrentPPO": RecurrentPPO, "PPO": PPO}
    if algorithm not in classes:
        raise BundleError(f"unknown algorithm {algorithm!r} in bundle config; expected one of {list(classes)}")
    try:
        return classes[algorithm].load(file, device=device)
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, RuntimeError, OSError) as err:
        raise BundleError(f"{file} is corrupted and cannot be loaded as a {algorithm} model: {err}") from err
