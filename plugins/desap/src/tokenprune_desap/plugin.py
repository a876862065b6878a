"""The plugin module named by the ``tokenprune`` entry point of ``tokenprune-desap``."""

from __future__ import annotations

from tokenprune.plugin import hookimpl
from tokenprune_desap.merger import NearestMerger
from tokenprune_desap.scorer import DesapScorer
from tokenprune_desap.selector import DesapJointSelector

__all__ = ["tokenprune_register_stages"]


@hookimpl
def tokenprune_register_stages(registry) -> None:  # type: ignore[no-untyped-def]
    """Register the DeSAP scorer, joint selector and nearest-neighbour merger."""
    for stage in (DesapScorer, DesapJointSelector, NearestMerger):
        registry.add(stage)
