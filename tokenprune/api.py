"""The one-call entry point: :func:`apply`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from tokenprune.adapters.base import PruneHandle
from tokenprune.config import PipelineConfig
from tokenprune.pipeline import Pipeline
from tokenprune.plugin.manager import Runtime

__all__ = ["apply"]


def apply(
    model: nn.Module,
    pipeline: Pipeline | PipelineConfig | Mapping[str, Any] | str | Path,
    *,
    runtime: Runtime | None = None,
) -> PruneHandle:
    """Install a pruning pipeline on ``model``; ``forward`` and ``generate`` then see fewer tokens.

    Use the result as a context manager, or keep it and call ``remove()``; either way the model
    is restored exactly.

    Args:
        model: A supported model instance (see ``tokenprune list``).
        pipeline: A :class:`Pipeline`, a validated config, a mapping, or a YAML/TOML/JSON path.
        runtime: Plugin runtime to use; a fresh one (built-ins + installed plugins) if omitted.

    Returns:
        The installation handle.

    Raises:
        AdapterError: If no adapter supports the model.
        CapabilityError: If the pipeline needs something the model's adapter cannot provide.
        ConfigError: If the configuration is invalid.

    Examples:
        >>> import tokenprune
        >>> from tokenprune.testing import tiny_llava, llava_prompts
        >>> model = tiny_llava()
        >>> cfg = {"scorer": {"name": "cls_attention"}, "selector": {"name": "topk"}, "keep": 4}
        >>> with tokenprune.apply(model, cfg):
        ...     out = model(**llava_prompts(model, [(2, 3)]))
        >>> out.logits.shape[1]  # 1 + 2 + 4 image tokens + 3
        10
    """
    if runtime is None:
        plugins = pipeline.plugins if isinstance(pipeline, PipelineConfig) else ()
        runtime = Runtime(plugins=plugins)
    if isinstance(pipeline, str | Path):
        pipeline = runtime.load_config(pipeline)
    if not isinstance(pipeline, Pipeline):
        pipeline = runtime.build_pipeline(pipeline)
    adapter = runtime.resolve_adapter(model)(model)
    return adapter.install(pipeline)
