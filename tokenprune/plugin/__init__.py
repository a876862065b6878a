"""Plugin machinery: hook markers, the hook specifications and the :class:`Runtime`."""

from __future__ import annotations

from tokenprune.plugin.manager import (
    ENV_DISABLE_AUTOLOAD,
    ENV_DISABLED_PLUGINS,
    PluginInfo,
    PluginWarning,
    Runtime,
)
from tokenprune.plugin.spec import hookimpl, hookspec
from tokenprune.registry import AdapterRegistry, PresetRegistry, StageRegistry

__all__ = [
    "AdapterRegistry",
    "PresetRegistry",
    "StageRegistry",
    "ENV_DISABLED_PLUGINS",
    "ENV_DISABLE_AUTOLOAD",
    "PluginInfo",
    "PluginWarning",
    "Runtime",
    "hookimpl",
    "hookspec",
]
