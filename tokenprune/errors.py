"""Exceptions raised by tokenprune.

Every error names the offending field or tensor and, where one exists, the fix. All of them derive
from :class:`TokenPruneError`, so ``except tokenprune.TokenPruneError`` catches everything the
library raises on purpose.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "BudgetError",
    "CapabilityError",
    "ConfigError",
    "PluginError",
    "RegistrationError",
    "ShapeError",
    "TokenPruneError",
]


class TokenPruneError(Exception):
    """Base class of every error raised by tokenprune."""


class ConfigError(TokenPruneError, ValueError):
    """A pipeline configuration is invalid (unknown name, misspelled field, bad value)."""


class BudgetError(ConfigError):
    """A token budget cannot be satisfied (``keep`` <= 0 or > N, ``keep_ratio`` outside (0, 1])."""


class ShapeError(TokenPruneError, ValueError):
    """A tensor has the wrong shape, dtype or contents (for example NaN scores)."""


class CapabilityError(TokenPruneError):
    """A stage needs something the model adapter cannot provide (for example [CLS] attention)."""


class AdapterError(TokenPruneError):
    """A model is unsupported, or its inputs do not match what the adapter expects."""


class RegistrationError(TokenPruneError):
    """A stage or adapter was registered twice, or with an invalid definition."""


class PluginError(TokenPruneError):
    """A plugin could not be loaded or raised while registering its parts."""
