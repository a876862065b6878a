"""The plugin module named by the ``tokenprune`` entry point of ``tokenprune-dynamic``.

Registers the ``desap_dynamic`` selector and the presets ``dynamic-<name>`` (DeSAP's presets
with the dynamic split). The ``information`` allocation rule is not registered anywhere: an
allocation rule is an adapter option, passed as an object (see
:mod:`tokenprune_dynamic.allocation`).

Examples:
    >>> from tokenprune import Runtime
    >>> import tokenprune_desap.plugin, tokenprune_dynamic.plugin
    >>> runtime = Runtime([tokenprune_desap.plugin, tokenprune_dynamic.plugin], autoload=False)
    >>> "desap_dynamic" in runtime.stages.names("selector")
    True
    >>> "dynamic-llava-1.5-64" in runtime.presets
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenprune.plugin import hookimpl
from tokenprune_dynamic import presets
from tokenprune_dynamic.selector import DesapDynamicSelector

if TYPE_CHECKING:
    from tokenprune.plugin import PresetRegistry, StageRegistry

__all__ = ["PRESET_PREFIX", "tokenprune_register_presets", "tokenprune_register_stages"]

PRESET_PREFIX = "dynamic-"
"""Prefix of the presets in a runtime's preset registry (``dynamic-llava-1.5-64``)."""


@hookimpl
def tokenprune_register_stages(registry: StageRegistry) -> None:
    """Register the ``desap_dynamic`` selector."""
    registry.add(DesapDynamicSelector)


@hookimpl
def tokenprune_register_presets(registry: PresetRegistry) -> None:
    """Register DeSAP's presets with the dynamic split as ``dynamic-<name>``."""
    for name in presets.available():
        registry.add(f"{PRESET_PREFIX}{name}", presets.load(name))
