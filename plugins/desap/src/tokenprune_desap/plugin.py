"""The plugin module named by the ``tokenprune`` entry point of ``tokenprune-desap``."""

from __future__ import annotations

from typing import Any, Protocol

from tokenprune.plugin import hookimpl
from tokenprune_desap.merger import NearestMerger
from tokenprune_desap.scorer import DesapScorer
from tokenprune_desap.selector import DesapJointSelector

__all__ = ["tokenprune_register_stages"]


class _StageRegistry(Protocol):
    """The part of tokenprune's stage registry this plugin uses (``registry.add``)."""

    def add(self, stage: type[Any], /) -> None: ...


@hookimpl
def tokenprune_register_stages(registry: _StageRegistry) -> None:
    """Register the DeSAP scorer, joint selector and nearest-neighbour merger."""
    for stage in (DesapScorer, DesapJointSelector, NearestMerger):
        registry.add(stage)
