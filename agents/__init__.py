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

__all__ = [
    "BASELINE_SCHEDULES",
    "BUNDLE_FORMAT_VERSION",
    "BundleError",
    "ConstantSchedule",
    "CosineSchedule",
    "LRSchedule",
    "LinearDecay",
    "OneCycle",
    "PolicyBundle",
    "RandomPolicy",
    "ReduceLROnPlateau",
    "ReplaySchedule",
    "StepDecay",
    "load_bundle",
    "save_bundle",
    "schedule_decoder",
]
