"""tokenprune: training-free visual-token pruning for vision-language models.

Compose a Scorer -> Selector -> Merger pipeline, apply it to a Hugging Face VLM, and ``forward``
and ``generate`` run on fewer visual tokens::

    import tokenprune
    with tokenprune.apply(model, "configs/cls_attention_topk64.yaml"):
        out = model.generate(**inputs, max_new_tokens=16)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from tokenprune.adapters.base import ModelAdapter, PruneHandle
from tokenprune.api import apply
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
]
