"""Registries of stages and model adapters, filled by plugins through the registration hooks."""

from __future__ import annotations

import copy
import importlib.metadata
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, get_args

from tokenprune.errors import ConfigError, RegistrationError
from tokenprune.stages.base import Merger, Role, Scorer, Selector, Stage, StageConfig

if TYPE_CHECKING:
    from tokenprune.adapters.base import ModelAdapter

__all__ = [
    "AdapterRegistry",
    "Preset",
    "PresetRegistry",
    "Registration",
    "StageRegistry",
    "provider_of",
]

ROLES: tuple[Role, ...] = ("scorer", "selector", "merger")
_ROLE_BASES: dict[Role, type[Stage[Any]]] = {
    "scorer": Scorer,
    "selector": Selector,
    "merger": Merger,
}
T = TypeVar("T")


@cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def provider_of(module: str) -> str:
    """Name the installed distribution (``name version``) that ships ``module``.

    Falls back to the top-level package name for code that is not installed (a test module).

    Examples:
        >>> provider_of("tokenprune.stages.selectors.topk").startswith("tokenprune ")
        True
    """
    top = module.split(".")[0]
    for dist in _distributions().get(top, []):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - broken install
            continue
    return top


@dataclass(frozen=True)
class Registration(Generic[T]):
    """One registered stage or adapter and where it came from.

    Attributes:
        role: ``scorer``, ``selector``, ``merger`` or ``adapter``.
        name: Registry key.
        obj: The registered class.
        plugin: Name of the plugin whose hook registered it.
        provider: Distribution (``name version``) that ships the class.
    """

    role: str
    name: str
    obj: T
    plugin: str
    provider: str


class _Registry(Generic[T]):
    def __init__(self) -> None:
        self._items: dict[tuple[str, str], Registration[T]] = {}
        self.current_plugin: str = "<unknown>"
        # Module of the plugin being registered: the provider of what has no module of its own.
        self.current_module: str = "<unknown>"

    def _add(self, role: str, name: str, obj: T, module: str) -> None:
        key = (role, name)
        new = Registration(role, name, obj, self.current_plugin, provider_of(module))
        if key in self._items:
            old = self._items[key]
            raise RegistrationError(
                f"{role} {name!r} is registered twice: by plugin {old.plugin!r} "
                f"({old.provider}) and by plugin {new.plugin!r} ({new.provider}); uninstall one "
                "or block it with TOKENPRUNE_DISABLED_PLUGINS"
            )
        self._items[key] = new

    def __iter__(self) -> Iterator[Registration[T]]:
        return iter(sorted(self._items.values(), key=lambda r: (r.role, r.name)))

    def __len__(self) -> int:
        return len(self._items)

    def drop_plugin(self, plugin: str) -> None:
        """Forget everything a plugin registered (used when its registration failed midway)."""
        self._items = {k: v for k, v in self._items.items() if v.plugin != plugin}


class StageRegistry(_Registry[type[Stage[Any]]]):
    """All stages known to one :class:`~tokenprune.plugin.Runtime`, by role and name.

    Plugins receive it in ``tokenprune_register_stages`` and call :meth:`add`.
    """

    def add(self, stage: type[Stage[Any]]) -> None:
        """Register a stage class under its ``role`` and ``name``.

        Raises:
            RegistrationError: If the class is malformed or the name is already taken.
        """
        role = getattr(stage, "role", None)
        name = getattr(stage, "name", None)
        if (
            role not in ROLES
            or not isinstance(stage, type)
            or not issubclass(stage, _ROLE_BASES[role])
        ):
            raise RegistrationError(
                f"{stage!r} is not a Scorer, Selector or Merger subclass with a `role`"
            )
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"{stage.__qualname__} has no `name` class attribute")
        config = getattr(stage, "Config", None)
        if not (isinstance(config, type) and issubclass(config, StageConfig)):
            raise RegistrationError(f"{stage.__qualname__}.Config must subclass StageConfig")
        literal = get_args(config.model_fields["name"].annotation)
        if literal != (name,):
            raise RegistrationError(
                f"{stage.__qualname__}.Config.name must be Literal[{name!r}] to match the stage "
                f"name, got {config.model_fields['name'].annotation}"
            )
        self._add(role, name, stage, stage.__module__)

    def names(self, role: Role) -> list[str]:
        """Sorted names of the registered stages of one role."""
        return sorted(n for r, n in self._items if r == role)

    def get(self, role: Role, name: str) -> type[Stage[Any]]:
        """Return the stage class registered as ``role`` ``name``.

        Raises:
            ConfigError: If no such stage exists; the message lists the available names.
        """
        try:
            return self._items[(role, name)].obj
        except KeyError:
            available = ", ".join(self.names(role)) or "none"
            raise ConfigError(
                f"unknown {role} {name!r}; available: {available}. If it comes from a plugin, "
                "install that package or name its module under `plugins:` in the config"
            ) from None

    def config_classes(self, role: Role) -> list[type[StageConfig]]:
        """The ``Config`` classes of every stage of one role, sorted by name."""
        return [self._items[(role, n)].obj.Config for n in self.names(role)]


class AdapterRegistry(_Registry["type[ModelAdapter]"]):
    """All model adapters known to one runtime, by name."""

    def add(self, adapter: type[ModelAdapter]) -> None:
        """Register a :class:`~tokenprune.adapters.base.ModelAdapter` subclass under its name.

        Raises:
            RegistrationError: If it is not an adapter class or the name is already taken.
        """
        required = ("name", "supports", "install", "capabilities")
        if not isinstance(adapter, type) or not all(hasattr(adapter, a) for a in required):
            raise RegistrationError(f"{adapter!r} is not a ModelAdapter subclass")
        self._add("adapter", adapter.name, adapter, adapter.__module__)

    def names(self) -> list[str]:
        """Sorted adapter names."""
        return sorted(n for _, n in self._items)

    def get(self, name: str) -> type[ModelAdapter]:
        """Return the adapter registered as ``name``.

        Raises:
            ConfigError: If there is none; the message lists the available names.
        """
        try:
            return self._items[("adapter", name)].obj
        except KeyError:
            raise ConfigError(
                f"unknown adapter {name!r}; available: {', '.join(self.names()) or 'none'}"
            ) from None


Preset = Mapping[str, Any] | Path
"""A registered preset: the configuration mapping itself, or a YAML, TOML or JSON file."""

_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")


class PresetRegistry(_Registry[Preset]):
    """Named pipeline configurations, so ``tokenprune.apply(model, "visionzip-64")`` works.

    Plugins receive it in ``tokenprune_register_presets`` and call :meth:`add`; tokenprune's own
    presets (``tokenprune/presets/*.yaml``) are registered by the built-in plugin the same way.
    A preset is only looked up by name: it is validated when it is used, against the stages of
    the runtime that uses it.

    Examples:
        >>> from tokenprune.plugin import Runtime
        >>> presets = Runtime(autoload=False).presets
        >>> "cls_attention-64" in presets, presets.names()[:2]
        (True, ['cls_attention-64', 'divprune-64'])
    """

    def add(self, name: str, preset: Preset) -> None:
        """Register ``preset`` under ``name``.

        Args:
            name: Letters, digits and ``_ . + -``, starting with a letter or digit, and not
                ending in a config-file extension (so a name is never mistaken for a file).
            preset: The configuration as a mapping (copied), or the path of a ``.yaml``,
                ``.yml``, ``.toml`` or ``.json`` file (read when the preset is used).

        Raises:
            RegistrationError: If the name is malformed or taken, the mapping is not a mapping,
                or the file does not exist.
        """
        if (
            not isinstance(name, str)
            or not _PRESET_NAME.match(name)
            or name.lower().endswith(_CONFIG_SUFFIXES)
        ):
            raise RegistrationError(
                f"preset name {name!r} is invalid: use letters, digits and '_.+-', starting with "
                "a letter or digit and not ending in a file extension (e.g. 'visionzip-64')"
            )
        value: Preset
        if isinstance(preset, Mapping):
            value = copy.deepcopy(dict(preset))
        elif isinstance(preset, str | Path):
            value = Path(preset)
            if not value.is_file() or value.suffix.lower() not in _CONFIG_SUFFIXES:
                raise RegistrationError(
                    f"preset {name!r}: {str(value)!r} is not a .yaml, .yml, .toml or .json file"
                )
        else:
            raise RegistrationError(
                f"preset {name!r} must be a mapping or a config file path, got "
                f"{type(preset).__name__}"
            )
        self._add("preset", name, value, self.current_module)

    def __contains__(self, name: object) -> bool:
        return ("preset", name) in self._items

    def names(self) -> list[str]:
        """Sorted preset names."""
        return sorted(n for _, n in self._items)

    def get(self, name: str) -> Preset:
        """Return preset ``name``: a fresh copy of its mapping, or its file.

        Raises:
            ConfigError: If there is none; the message lists the available names.
        """
        try:
            value = self._items[("preset", name)].obj
        except KeyError:
            raise ConfigError(
                f"unknown preset {name!r}; available: {', '.join(self.names()) or 'none'}"
            ) from None
        return value if isinstance(value, Path) else copy.deepcopy(dict(value))
