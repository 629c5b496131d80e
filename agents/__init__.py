"""agents: meta-agents, baseline schedules, policy bundles and the deployable scheduler."""

from __future__ import annotations

from agents.bundle import BUNDLE_FORMAT_VERSION, BundleError, PolicyBundle, load_bundle, save_bundle

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "BundleError",
    "PolicyBundle",
    "load_bundle",
    "save_bundle",
]
