"""Pipeline configuration: a frozen pydantic model, loaded from YAML, TOML or JSON.

The stage fields are discriminated unions on ``name`` built from the registry of a
:class:`~tokenprune.plugin.Runtime`, so plugin stages validate exactly like built-in ones and a
misspelled field is an error naming the field.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from tokenprune.errors import ConfigError
from tokenprune.stages.base import StageConfig
from tokenprune.stages.mergers.drop import DropMergerConfig

if TYPE_CHECKING:
    from tokenprune.plugin.manager import Runtime
    from tokenprune.registry import StageRegistry

__all__ = ["PipelineConfig", "PositionPolicy", "build_config_model", "load_config", "parse_config"]

PositionPolicy = Literal["contiguous", "original"]


class PipelineConfig(BaseModel):
    """A complete pruning pipeline: three stages, a budget and a position policy.

    Attributes:
        scorer: Scorer configuration (``name`` picks the registered scorer).
        selector: Selector configuration.
        merger: Merger configuration; ``drop`` by default.
        keep: Tokens to keep per image (a count). Exactly one of ``keep``/``keep_ratio``.
        keep_ratio: Fraction of tokens to keep per image, in (0, 1]; rounded half up.
        positions: ``contiguous`` renumbers the pruned sequence 0..L'-1 (the usual choice of
            methods that prune before the LLM); ``original`` keeps each kept token's unpruned
            position id (gaps where tokens were removed).
        plugins: Plugin modules to import and register before the stages are looked up.

    Examples:
        >>> from tokenprune.plugin import Runtime
        >>> cfg = Runtime(autoload=False).parse_config(
        ...     {"scorer": {"name": "cls_attention"}, "selector": {"name": "topk"}, "keep": 64})
        >>> cfg.scorer.name, cfg.merger.name, cfg.keep
        ('cls_attention', 'drop', 64)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scorer: StageConfig
    selector: StageConfig
    merger: StageConfig = DropMergerConfig()
    keep: Annotated[int, Field(gt=0)] | None = None
    keep_ratio: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    positions: PositionPolicy = "contiguous"
    plugins: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_budget(self) -> PipelineConfig:
        if (self.keep is None) == (self.keep_ratio is None):
            raise ValueError("give exactly one of `keep` (a count) and `keep_ratio` (a fraction)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict that :func:`parse_config` reads back."""
        return self.model_dump(mode="json", exclude_none=True)


def _stage_union(configs: list[type[StageConfig]]) -> Any:
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[tuple(configs)], Field(discriminator="name")]  # noqa: UP007


def build_config_model(registry: StageRegistry) -> type[PipelineConfig]:
    """Create the :class:`PipelineConfig` subclass whose stage fields accept the registered stages.

    Args:
        registry: Stage registry of a runtime, after plugin discovery.

    Returns:
        A pydantic model class; its JSON schema documents every stage and option.
    """
    merger_default = DropMergerConfig() if "drop" in registry.names("merger") else ...
    model: type[PipelineConfig] = create_model(
        "PipelineConfig",
        __base__=PipelineConfig,
        scorer=(_stage_union(registry.config_classes("scorer")), ...),
        selector=(_stage_union(registry.config_classes("selector")), ...),
        merger=(_stage_union(registry.config_classes("merger")), merger_default),
    )
    return model


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<config>"
        lines.append(f"  {loc}: {e['msg']}")
    return "invalid pipeline config:\n" + "\n".join(lines)


def parse_config(data: Mapping[str, Any], runtime: Runtime) -> PipelineConfig:
    """Validate a mapping as a :class:`PipelineConfig` using ``runtime``'s stages.

    Plugins listed under ``plugins`` are registered with ``runtime`` first. Unknown stage names
    are reported with the available names; any other problem names the offending field.

    Raises:
        ConfigError: If the mapping is not a valid config.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"a pipeline config must be a mapping, got {type(data).__name__}")
    plugins = data.get("plugins", ())
    if isinstance(plugins, str) or not isinstance(plugins, list | tuple):
        raise ConfigError("`plugins` must be a list of module names")
    for plugin in plugins:
        runtime.add_plugin(str(plugin))
    for role in ("scorer", "selector", "merger"):
        section = data.get(role)
        if section is None:
            continue
        if not isinstance(section, Mapping) or "name" not in section:
            raise ConfigError(f"`{role}` must be a mapping with a `name` field")
        runtime.stages.get(role, str(section["name"]))  # raises with the available names
    try:
        return runtime.config_model().model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None


def load_config(path: str | Path, runtime: Runtime) -> PipelineConfig:
    """Read a pipeline config from a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file.

    Raises:
        ConfigError: If the file is missing, unparsable, or not a valid config.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(
                f"config file {str(path)!r}: unknown extension {suffix!r}; "
                "use .yaml, .toml or .json"
            )
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be parsed: {exc}") from None
    try:
        return parse_config(data if data is not None else {}, runtime)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
