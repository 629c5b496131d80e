"""agents: meta-agents, baseline schedules, policy bundles and the deployable scheduler."""

from __future__ import annotations

from agents.baselines import (
    BASELINE_SCHEDULES,
    ConstantSchedule,
    CosineSchedule,
    LinearDecay,
    LRSchedule,
    OneCycle,
    RandomPolicy,
    ReduceLROnPlateau,
    ReplaySchedule,
    StepDecay,
    schedule_decoder,
)
from agents.bundle import (
    BUNDLE_FORMAT_VERSION,
    ENSEMBLE_FORMAT_VERSION,
    BundleError,
    EnsembleBundle,
    PolicyBundle,
    load_bundle,
    policy_signature,
    save_bundle,
    save_ensemble,
)
from agents.factory import ALGORITHMS, PRESETS, MetaAgentConfig, get_preset, make_meta_agent, make_meta_env
from agents.scheduler import PolicyScheduler, default_policy_path, resolve_policy

__all__ = [
    "ALGORITHMS",
    "BASELINE_SCHEDULES",
    "BUNDLE_FORMAT_VERSION",
    "ENSEMBLE_FORMAT_VERSION",
    "BundleError",
    "ConstantSchedule",
    "EnsembleBundle",
    "CosineSchedule",
    "LRSchedule",
    "LinearDecay",
    "MetaAgentConfig",
    "OneCycle",
    "PRESETS",
    "PolicyBundle",
    "PolicyScheduler",
    "RandomPolicy",
    "ReduceLROnPlateau",
    "ReplaySchedule",
    "StepDecay",
    "default_policy_path",
    "resolve_policy",
    "get_preset",
    "load_bundle",
    "policy_signature",
    "make_meta_agent",
    "make_meta_env",
    "save_bundle",
    "save_ensemble",
    "schedule_decoder",
]
