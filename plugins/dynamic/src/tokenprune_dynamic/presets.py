"""Dynamic-split variants of every DeSAP preset (``tokenprune_desap.presets``).

Each preset is DeSAP's, with the ``desap_joint`` selector replaced by ``desap_dynamic`` at its
defaults, so a preset pair differs in nothing but the split.

Examples:
    >>> "llava-1.5-64" in available()
    True
    >>> config = load("llava-1.5-64")
    >>> config["selector"]["name"], config["keep"], config["scorer"]["name"]
    ('desap_dynamic', 64, 'desap')
"""

from __future__ import annotations

from typing import Any

from tokenprune import ConfigError
from tokenprune_desap import presets as desap_presets

__all__ = ["SELECTOR", "available", "load"]

SELECTOR: dict[str, Any] = {"name": "desap_dynamic"}
"""The selector that replaces ``desap_joint`` (its defaults; see the method page)."""


def available() -> list[str]:
    """Names of the presets: the same as DeSAP's."""
    return desap_presets.available()


def load(name: str) -> dict[str, Any]:
    """DeSAP's preset ``name`` with the dynamic selector, ready for ``tokenprune.apply``.

    Raises:
        ConfigError: If DeSAP has no such preset; the message lists them.
    """
    if name not in desap_presets.available():
        raise ConfigError(f"unknown dynamic preset {name!r}; available: {', '.join(available())}")
    config = desap_presets.load(name)
    config["selector"] = dict(SELECTOR)
    return config
