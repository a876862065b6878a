"""The one-call entry points: :func:`apply`, :func:`save_pipeline`, :func:`load_pipeline_config`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from tokenprune.adapters.base import PruneHandle
from tokenprune.config import PipelineConfig, save_config
from tokenprune.errors import ConfigError
from tokenprune.pipeline import Pipeline
from tokenprune.plugin.manager import Runtime

__all__ = ["apply", "load_pipeline_config", "save_pipeline"]


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
        pipeline: A :class:`Pipeline`, a validated config, a mapping, a YAML/TOML/JSON file, a
            directory holding a ``tokenprune.json`` (see :func:`save_pipeline`), or the name of
            a preset (``Runtime().presets.names()``).
        runtime: Plugin runtime to use; a fresh one (built-ins + installed plugins) if omitted.

    Returns:
        The installation handle.

    Raises:
        AdapterError: If no adapter supports the model.
        CapabilityError: If the pipeline needs something the model's adapter cannot provide.
        ConfigError: If the configuration is invalid, or a string is neither a path nor a
            preset (the message lists the presets).

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


def save_pipeline(
    pipeline_or_config: Pipeline | PipelineConfig | Mapping[str, Any],
    directory: str | Path,
    *,
    runtime: Runtime | None = None,
) -> Path:
    """Save a pipeline's configuration as ``directory/tokenprune.json``, e.g. next to a model.

    The file holds the configuration (:meth:`PipelineConfig.to_dict`) under ``pipeline`` and a
    small header with the tokenprune version and the file format. Share the directory, then
    ``tokenprune.apply(model, directory)`` or :func:`load_pipeline_config` reads it back; plugin
    modules the configuration names under ``plugins`` are imported then, and nothing else.

    Args:
        pipeline_or_config: A validated config, a mapping (validated first), or a
            :class:`Pipeline`: the config it was built from, or, for a pipeline built from stage
            instances, the configs of its stages and its budget.
        directory: Target directory; created if missing. An existing ``tokenprune.json`` is
            replaced.
        runtime: Runtime used to validate a mapping or a pipeline's stages; the pipeline's own
            runtime, else a fresh one, if omitted.

    Returns:
        The path of the written ``tokenprune.json``.

    Raises:
        ConfigError: If the configuration is invalid or ``directory`` is a file.

    Examples:
        >>> import tempfile, tokenprune
        >>> cfg = {"scorer": {"name": "random"}, "selector": {"name": "topk"}, "keep": 8}
        >>> with tempfile.TemporaryDirectory() as model_dir:
        ...     path = tokenprune.save_pipeline(cfg, model_dir)
        ...     tokenprune.load_pipeline_config(model_dir).keep, path.name
        (8, 'tokenprune.json')
    """
    config: PipelineConfig | Mapping[str, Any]
    if isinstance(pipeline_or_config, Pipeline):
        runtime = runtime or pipeline_or_config.runtime
        config = pipeline_or_config.config or _pipeline_dict(pipeline_or_config)
    else:
        config = pipeline_or_config
    if not isinstance(config, PipelineConfig):
        if not isinstance(config, Mapping):
            raise ConfigError(
                "save_pipeline needs a Pipeline, a PipelineConfig or a mapping, got "
                f"{type(config).__name__}"
            )
        if runtime is None:
            plugins = config.get("plugins", ())
            runtime = Runtime(plugins=plugins if isinstance(plugins, list | tuple) else ())
        config = runtime.parse_config(config)
    return save_config(config, directory)


def _pipeline_dict(pipeline: Pipeline) -> dict[str, Any]:
    """The configuration of a pipeline that was built from stage instances."""
    data: dict[str, Any] = {
        stage.role: stage.config.model_dump(mode="json") for stage in pipeline.stages
    }
    if pipeline.keep is not None:
        data["keep"] = pipeline.keep
    else:
        data["keep_ratio"] = pipeline.keep_ratio
    data["positions"] = pipeline.positions
    data["follow_up"] = pipeline.follow_up
    return data


def load_pipeline_config(path_or_dir: str | Path, runtime: Runtime | None = None) -> PipelineConfig:
    """Read a saved pipeline (a directory with ``tokenprune.json``), a config file or a preset.

    Args:
        path_or_dir: A directory written by :func:`save_pipeline`, a YAML/TOML/JSON file, or a
            preset name (see :func:`tokenprune.config.load_config` for the order).
        runtime: Runtime whose stages validate the config; a fresh one if omitted.

    Returns:
        The validated configuration; pass it to :func:`apply` or ``runtime.build_pipeline``.

    Raises:
        ConfigError: If nothing is found, the file is damaged, or the config is invalid.
        PluginError: If a plugin module the config names cannot be imported.
    """
    return (runtime or Runtime()).load_config(path_or_dir)
