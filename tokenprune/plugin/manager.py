"""The plugin runtime: one pluggy manager with its registries, never a module global."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from tokenprune.errors import AdapterError, PluginError, RegistrationError
from tokenprune.plugin import spec
from tokenprune.plugin.builtin import BUILTIN_PLUGINS
from tokenprune.registry import AdapterRegistry, PresetRegistry, StageRegistry, provider_of

if TYPE_CHECKING:
    from torch import nn

    from tokenprune.adapters.base import ModelAdapter
    from tokenprune.config import PipelineConfig
    from tokenprune.pipeline import Pipeline

__all__ = ["ENV_DISABLE_AUTOLOAD", "ENV_DISABLED_PLUGINS", "PluginInfo", "PluginWarning", "Runtime"]

ENV_DISABLE_AUTOLOAD = "TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD"
"""Set to a non-empty value other than ``0`` to skip entry-point plugins."""
ENV_DISABLED_PLUGINS = "TOKENPRUNE_DISABLED_PLUGINS"
"""Comma-separated plugin (entry-point) names that must not be loaded."""


class PluginWarning(UserWarning):
    """A plugin failed to load or to register its parts; the other plugins are unaffected."""


@dataclass(frozen=True)
class PluginInfo:
    """A plugin known to a runtime.

    Attributes:
        name: Plugin name (entry-point name, or module name for built-ins and named plugins).
        provider: Distribution (``name version``) that ships it.
        source: ``builtin``, ``entrypoint`` or ``named``.
    """

    name: str
    provider: str
    source: str


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "False")


class Runtime:
    """A plugin manager with its own stage, adapter and preset registries.

    Discovery order: the built-in plugin, then entry points of the group ``tokenprune``
    (unless disabled), then the plugins named here or in a config's ``plugins:`` list. Each
    runtime is independent, so two runtimes in one process never share state.

    Args:
        plugins: Extra plugins: module names to import, or plugin objects.
        autoload: Load entry-point plugins; ``None`` reads ``TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD``.
        disabled: Plugin names to block, in addition to ``TOKENPRUNE_DISABLED_PLUGINS``.

    Examples:
        >>> rt = Runtime(autoload=False)
        >>> "topk" in rt.stages.names("selector")
        True
    """

    def __init__(
        self,
        plugins: Iterable[str | object] = (),
        *,
        autoload: bool | None = None,
        disabled: Iterable[str] = (),
    ) -> None:
        self.pm = pluggy.PluginManager(spec.PROJECT_NAME)
        self.pm.add_hookspecs(spec)
        self.stages = StageRegistry()
        self.adapters = AdapterRegistry()
        self.presets = PresetRegistry()
        self.plugins: list[PluginInfo] = []
        self.failures: list[PluginError] = []
        self._config_model: tuple[tuple[Any, ...], type[PipelineConfig]] | None = None
        env_blocked = os.environ.get(ENV_DISABLED_PLUGINS, "")
        self.disabled = {n.strip() for n in env_blocked.split(",") if n.strip()} | set(disabled)
        # Start the historic calls first: each plugin registered below is then applied on its
        # own, so its parts are attributed to it and a failure cannot affect the others.
        self.pm.hook.tokenprune_register_stages.call_historic(kwargs={"registry": self.stages})
        self.pm.hook.tokenprune_register_adapters.call_historic(kwargs={"registry": self.adapters})
        self.pm.hook.tokenprune_register_presets.call_historic(kwargs={"registry": self.presets})
        for name, module in BUILTIN_PLUGINS.items():
            self._register(importlib.import_module(module), name, "builtin")
        if autoload if autoload is not None else not _env_flag(ENV_DISABLE_AUTOLOAD):
            self._load_entrypoints()
        for plugin in plugins:
            self.add_plugin(plugin)

    # -- loading ---------------------------------------------------------------------------
    def _load_entrypoints(self) -> None:
        for ep in sorted(
            importlib.metadata.entry_points(group=spec.PROJECT_NAME), key=lambda e: e.name
        ):
            if ep.name in self.disabled or self.pm.has_plugin(ep.name):
                continue
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
            try:
                plugin = ep.load()
            except Exception as exc:  # any import failure is reported, not fatal
                self._fail(ep.name, dist, exc)
                continue
            self._register(plugin, ep.name, "entrypoint", provider=dist)

    def add_plugin(self, plugin: str | object, name: str | None = None) -> None:
        """Register one more plugin: a module name to import, or a plugin object.

        Its registration hooks run immediately. Adding a plugin that is already registered is a
        no-op.

        Raises:
            PluginError: If a named module cannot be imported.
        """
        if isinstance(plugin, str):
            name = name or plugin
            if name in self.disabled or self.pm.has_plugin(name):
                return
            try:
                plugin = importlib.import_module(plugin)
            except ImportError as exc:
                raise PluginError(
                    f"plugin module {name!r} cannot be imported ({exc}); install the package "
                    "that provides it"
                ) from exc
        name = name or getattr(plugin, "__name__", None) or type(plugin).__qualname__
        if self.pm.is_registered(plugin) or self.pm.has_plugin(name):
            return
        self._register(plugin, name, "named")

    def _register(
        self, plugin: object, name: str, source: str, provider: str | None = None
    ) -> None:
        module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
        if provider is None:
            provider = provider_of(module)
        registries = (self.stages, self.adapters, self.presets)
        for registry in registries:
            registry.current_plugin, registry.current_module = name, module
        try:
            self.pm.register(plugin, name=name)
        except RegistrationError:
            self._unregister(plugin, name)
            raise
        except Exception as exc:  # isolate a broken plugin
            self._unregister(plugin, name)
            self._fail(name, provider, exc)
            return
        finally:
            for registry in registries:
                registry.current_plugin = registry.current_module = "<unknown>"
        self.plugins.append(PluginInfo(name, provider, source))

    def _unregister(self, plugin: object, name: str) -> None:
        if self.pm.is_registered(plugin):
            self.pm.unregister(plugin, name=name)
        self.stages.drop_plugin(name)
        self.adapters.drop_plugin(name)
        self.presets.drop_plugin(name)

    def _fail(self, name: str, provider: str, exc: Exception) -> None:
        error = PluginError(
            f"plugin {name!r} ({provider}) failed to load: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        self.failures.append(error)
        warnings.warn(str(error), PluginWarning, stacklevel=3)

    # -- using -----------------------------------------------------------------------------
    @property
    def hook(self) -> Any:
        """The pluggy hook relay (``runtime.hook.tokenprune_after_prune(...)``)."""
        return self.pm.hook

    def resolve_adapter(self, model: nn.Module) -> type[ModelAdapter]:
        """Return the adapter class for ``model``.

        Raises:
            AdapterError: If no registered adapter supports the model's class.
        """
        found = self.pm.hook.tokenprune_resolve_adapter(model=model, registry=self.adapters)
        if found is None:
            supported = ", ".join(
                f"{r.name} ({', '.join(r.obj.model_classes)})" for r in self.adapters
            )
            raise AdapterError(
                f"unsupported model class {type(model).__name__}: no adapter accepts it. "
                f"Supported: {supported or 'none'}. Install a plugin that adds an adapter for it"
            )
        return found  # type: ignore[no-any-return]

    def config_model(self) -> type[PipelineConfig]:
        """The pipeline-config model with stage unions built from this runtime's registry.

        Built once per set of registered stages, so configs parsed by one runtime compare equal.
        """
        from tokenprune.config import build_config_model

        key = tuple((r.role, r.name, r.obj) for r in self.stages)
        if self._config_model is None or self._config_model[0] != key:
            self._config_model = (key, build_config_model(self.stages))
        return self._config_model[1]

    def parse_config(self, data: Mapping[str, Any]) -> PipelineConfig:
        """Validate a mapping as a pipeline config (loading the plugins it names first)."""
        from tokenprune.config import parse_config

        return parse_config(data, self)

    def load_config(self, path: str | Path) -> PipelineConfig:
        """Read and validate a config: a YAML/TOML/JSON file, a saved directory or a preset name.

        See :func:`tokenprune.config.load_config`.
        """
        from tokenprune.config import load_config

        return load_config(path, self)

    def build_pipeline(self, config: PipelineConfig | Mapping[str, Any]) -> Pipeline:
        """Build a :class:`~tokenprune.pipeline.Pipeline` from a config or a mapping."""
        from tokenprune.pipeline import Pipeline

        return Pipeline.from_config(config, runtime=self)
