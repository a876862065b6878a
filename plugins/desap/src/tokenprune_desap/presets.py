"""DeSAP configurations at the budgets the paper evaluates.

Examples:
    >>> sorted(available())[:3]
    ['llava-1.5-128', 'llava-1.5-192', 'llava-1.5-64']
    >>> load("llava-1.5-64")["keep"]
    64
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tokenprune import ConfigError

__all__ = ["available", "load", "path"]


def available() -> list[str]:
    """Names of the shipped presets."""
    root = resources.files(__package__).joinpath("presets")
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def path(name: str) -> Path:
    """File of preset ``name``.

    Raises:
        ConfigError: If there is no such preset; the message lists them.
    """
    candidate = Path(str(resources.files(__package__).joinpath("presets", f"{name}.yaml")))
    if not candidate.is_file():
        raise ConfigError(f"unknown DeSAP preset {name!r}; available: {', '.join(available())}")
    return candidate


def load(name: str) -> dict[str, Any]:
    """The preset as a mapping, ready for ``tokenprune.apply`` or ``Runtime.parse_config``."""
    data: dict[str, Any] = yaml.safe_load(path(name).read_text(encoding="utf-8"))
    return data
