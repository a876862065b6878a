"""Hook specifications: every extension point of tokenprune.

A plugin is a module (or object) with functions decorated by :data:`hookimpl` and named after
the specifications below. Packages publish plugins through the entry-point group
``tokenprune``; the built-in stages and adapters use exactly the same hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from tokenprune.adapters.base import ModelAdapter
    from tokenprune.context import PruneContext
    from tokenprune.pipeline import Pipeline
    from tokenprune.registry import AdapterRegistry, PresetRegistry, StageRegistry
    from tokenprune.types import PrunedTokens

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "tokenprune"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Decorator marking a function as a tokenprune hook specification (used by this module only)."""
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Decorator marking a plugin function as an implementation of a ``tokenprune_*`` hook.

Accepts pluggy's options (``tryfirst``, ``trylast``, ``wrapper``, ...)::

    from tokenprune.plugin import hookimpl

    @hookimpl
    def tokenprune_register_stages(registry):
        registry.add(MyScorer)
"""


@hookspec(historic=True)
def tokenprune_register_stages(registry: StageRegistry) -> None:
    """Register scorers, selectors and mergers.

    Called once per :class:`~tokenprune.plugin.Runtime` for every plugin, including plugins
    registered later (the hook is historic). Call ``registry.add(StageClass)`` for each stage;
    a name that is already taken raises :class:`~tokenprune.errors.RegistrationError` naming
    both providers.

    Args:
        registry: The runtime's stage registry.
    """


@hookspec(historic=True)
def tokenprune_register_adapters(registry: AdapterRegistry) -> None:
    """Register model adapters.

    Called once per runtime for every plugin, including later ones (historic). Call
    ``registry.add(AdapterClass)`` for each adapter.

    Args:
        registry: The runtime's adapter registry.
    """


@hookspec(historic=True)
def tokenprune_register_presets(registry: PresetRegistry) -> None:
    """Register named pipeline configurations (presets).

    Called once per runtime for every plugin, including later ones (historic). Call
    ``registry.add(name, mapping_or_path)`` for each preset; a name that is already taken raises
    :class:`~tokenprune.errors.RegistrationError`. A preset is validated when it is used, so it
    may name the stages of the plugin that registers it. ``tokenprune.apply(model, name)`` and
    ``Runtime.load_config(name)`` accept a preset name wherever a config file is accepted.

    Args:
        registry: The runtime's preset registry.
    """


@hookspec(firstresult=True)
def tokenprune_resolve_adapter(
    model: nn.Module, registry: AdapterRegistry
) -> type[ModelAdapter] | None:
    """Choose the adapter class for ``model``.

    The first implementation that returns a class wins; return ``None`` to let the others
    decide. The built-in implementation returns the first registered adapter whose
    ``supports(model)`` is true, and runs last (``trylast``), so a plugin can claim a model
    that a built-in adapter would also accept.

    Args:
        model: The model being pruned.
        registry: The runtime's adapter registry.

    Returns:
        An adapter class, or ``None``.
    """


@hookspec
def tokenprune_after_prune(ctx: PruneContext, pruned: PrunedTokens, pipeline: Pipeline) -> None:
    """Observe the result of each pruning call (logging, FLOP accounting, visualisation).

    Called after the merger, once per group of images pruned together, during ``forward`` or
    before the prefill of ``generate``. Observers must not modify ``ctx`` or ``pruned``; the
    return value is ignored.

    Args:
        ctx: The context the stages read.
        pruned: What the pipeline produced.
        pipeline: The pipeline that ran.
    """
