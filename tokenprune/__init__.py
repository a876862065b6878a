"""tokenprune: training-free visual-token pruning for vision-language models.

Compose a Scorer -> Selector -> Merger pipeline, apply it to a Hugging Face VLM, and ``forward``
and ``generate`` run on fewer visual tokens::

    import tokenprune
    with tokenprune.apply(model, "configs/cls_attention_topk64.yaml"):  # or "visionzip-64"
        out = model.generate(**inputs, max_new_tokens=16)
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenprune.adapters.base import ModelAdapter, PruneHandle
    from tokenprune.api import apply, load_pipeline_config, save_pipeline
    from tokenprune.capabilities import Capability
    from tokenprune.config import PipelineConfig
    from tokenprune.context import PruneContext, Stash, StashKey, VisionBlock
    from tokenprune.errors import (
        AdapterError,
        BudgetError,
        CapabilityError,
        ConfigError,
        PluginError,
        RegistrationError,
        ShapeError,
        TokenPruneError,
    )
    from tokenprune.pipeline import Pipeline
    from tokenprune.plugin import Runtime, hookimpl
    from tokenprune.stages.base import Merger, Scorer, Selector, Stage, StageConfig
    from tokenprune.types import PrunedTokens, Selection, TextTokens, VisualTokens

try:
    __version__ = version("tokenprune")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

# Public name -> defining module. Importing ``tokenprune`` stays cheap (no torch); each name is
# imported on first access (PEP 562).
_LAZY: dict[str, str] = {
    "ModelAdapter": "tokenprune.adapters.base",
    "PruneHandle": "tokenprune.adapters.base",
    "apply": "tokenprune.api",
    "load_pipeline_config": "tokenprune.api",
    "save_pipeline": "tokenprune.api",
    "Capability": "tokenprune.capabilities",
    "PipelineConfig": "tokenprune.config",
    "PruneContext": "tokenprune.context",
    "Stash": "tokenprune.context",
    "StashKey": "tokenprune.context",
    "VisionBlock": "tokenprune.context",
    "AdapterError": "tokenprune.errors",
    "BudgetError": "tokenprune.errors",
    "CapabilityError": "tokenprune.errors",
    "ConfigError": "tokenprune.errors",
    "PluginError": "tokenprune.errors",
    "RegistrationError": "tokenprune.errors",
    "ShapeError": "tokenprune.errors",
    "TokenPruneError": "tokenprune.errors",
    "Pipeline": "tokenprune.pipeline",
    "Runtime": "tokenprune.plugin",
    "hookimpl": "tokenprune.plugin",
    "Merger": "tokenprune.stages.base",
    "Scorer": "tokenprune.stages.base",
    "Selector": "tokenprune.stages.base",
    "Stage": "tokenprune.stages.base",
    "StageConfig": "tokenprune.stages.base",
    "PrunedTokens": "tokenprune.types",
    "Selection": "tokenprune.types",
    "TextTokens": "tokenprune.types",
    "VisualTokens": "tokenprune.types",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenprune' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdapterError",
    "BudgetError",
    "Capability",
    "CapabilityError",
    "ConfigError",
    "Merger",
    "ModelAdapter",
    "Pipeline",
    "PipelineConfig",
    "PluginError",
    "PruneContext",
    "PruneHandle",
    "PrunedTokens",
    "RegistrationError",
    "Runtime",
    "Scorer",
    "Selection",
    "Selector",
    "ShapeError",
    "Stage",
    "StageConfig",
    "Stash",
    "StashKey",
    "TextTokens",
    "TokenPruneError",
    "VisionBlock",
    "VisualTokens",
    "__version__",
    "apply",
    "hookimpl",
    "load_pipeline_config",
    "save_pipeline",
]
