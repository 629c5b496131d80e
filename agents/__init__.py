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
from agents.bundle import BUNDLE_FORMAT_VERSION, BundleError, PolicyBundle, load_bundle, save_bundle
from agents.factory import ALGORITHMS, PRESETS, MetaAgentConfig, get_preset, make_meta_agent, make_meta_env

__all__ = [
    "ALGORITHMS",
    "BASELINE_SCHEDULES",
    "BUNDLE_FORMAT_VERSION",
    "BundleError",
    "ConstantSchedule",
    "CosineSchedule",
    "LRSchedule",
    "LinearDecay",
    "MetaAgentConfig",
    "OneCycle",
    "PRESETS",
    "PolicyBundle",
    "RandomPolicy",
    "ReduceLROnPlateau",
    "ReplaySchedule",
    "StepDecay",
    "get_preset",
    "load_bundle",
    "make_meta_agent",
    "make_meta_env",
    "save_bundle",
    "schedule_decoder",
]
