"""The plugin module named by the ``tokenprune`` entry point of ``tokenprune-desap``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenprune.plugin import hookimpl
from tokenprune_desap import presets
from tokenprune_desap.merger import NearestMerger
from tokenprune_desap.scorer import DesapScorer
from tokenprune_desap.selector import DesapJointSelector

if TYPE_CHECKING:
    from tokenprune.plugin import PresetRegistry, StageRegistry

__all__ = ["PRESET_PREFIX", "tokenprune_register_presets", "tokenprune_register_stages"]

PRESET_PREFIX = "desap-"
"""Prefix of the DeSAP presets in a runtime's preset registry (``desap-llava-1.5-64``)."""


@hookimpl
def tokenprune_register_stages(registry: StageRegistry) -> None:
    """Register the DeSAP scorer, joint selector and nearest-neighbour merger."""
    for stage in (DesapScorer, DesapJointSelector, NearestMerger):
        registry.add(stage)


@hookimpl
def tokenprune_register_presets(registry: PresetRegistry) -> None:
    """Register the paper's settings (:mod:`tokenprune_desap.presets`) as ``desap-<name>``."""
    for name in presets.available():
        registry.add(f"{PRESET_PREFIX}{name}", presets.path(name))
