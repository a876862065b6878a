"""The plugin module named by the ``tokenprune`` entry point of ``tokenprune-example``.

tokenprune imports this module when a :class:`~tokenprune.Runtime` is created (unless plugin
autoload is disabled or ``example`` is listed in ``TOKENPRUNE_DISABLED_PLUGINS``) and calls every
function here that is marked with :data:`~tokenprune.plugin.hookimpl` and named after a hook
specification. Listing ``tokenprune_example.plugin`` under ``plugins:`` in a pipeline config
loads it explicitly.

Examples:
    >>> from tokenprune import Runtime
    >>> import tokenprune_example.plugin
    >>> runtime = Runtime([tokenprune_example.plugin], autoload=False)
    >>> "feature_norm" in runtime.stages.names("scorer")
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenprune.plugin import hookimpl
from tokenprune_example.norm import FeatureNormScorer

if TYPE_CHECKING:
    from tokenprune.registry import StageRegistry

__all__ = ["tokenprune_register_stages"]


@hookimpl
def tokenprune_register_stages(registry: StageRegistry) -> None:
    """Add :class:`~tokenprune_example.norm.FeatureNormScorer` as the scorer ``feature_norm``."""
    registry.add(FeatureNormScorer)
