"""Pipeline configuration: a frozen pydantic model, loaded from YAML, TOML or JSON.

The stage fields are discriminated unions on ``name`` built from the registry of a
:class:`~tokenprune.plugin.Runtime`, so plugin stages validate exactly like built-in ones and a
misspelled field is an error naming the field.

Configurations are data: reading one never imports code, except the plugin modules it names
under ``plugins:`` (YAML is read with ``yaml.safe_load``, which builds no Python objects).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import os
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic_core import PydanticCustomError

from tokenprune.errors import BudgetError, ConfigError
from tokenprune.stages.base import StageConfig
from tokenprune.stages.mergers.drop import DropMergerConfig
from tokenprune.stages.scorers.fastv import FastVScorerConfig
from tokenprune.stages.selectors.topk import TopKSelectorConfig

if TYPE_CHECKING:
    from tokenprune.plugin.manager import Runtime
    from tokenprune.registry import StageRegistry
    from tokenprune.stages.base import Role

__all__ = [
    "SAVED_CONFIG_NAME",
    "SAVED_FORMAT",
    "FollowUpPolicy",
    "PipelineConfig",
    "PositionPolicy",
    "build_config_model",
    "load_config",
    "parse_config",
    "save_config",
]

PositionPolicy = Literal["contiguous", "original"]
FollowUpPolicy = Literal["reuse", "rescore"]

SAVED_CONFIG_NAME = "tokenprune.json"
"""File that :func:`save_config` writes into a directory (next to a model's own files)."""
SAVED_FORMAT = 1
"""Layout version of ``tokenprune.json``; files of a newer layout are refused with a clear error."""

_ROLES: tuple[Role, ...] = ("scorer", "selector", "merger")
_SUFFIXES = (".yaml", ".yml", ".toml", ".json")
_BUDGET_HINT = (
    "`keep` is a token count >= 1 and `keep_ratio` a fraction in (0, 1]; give exactly one"
)


FASTV_DEFAULT_KEEP_RATIO = 0.5
"""Budget of an LLM stage that gives neither ``keep`` nor ``keep_ratio``: FastV's R = 50 %."""


class LlmStageConfig(BaseModel):
    """One pruning position inside the language model: stages, a layer and a budget.

    Visual tokens are dropped before decoder layer ``layer``: layers ``0 .. layer - 1`` run on the
    sequence as it left the encoder position, layers ``layer ..`` on the shorter one (FastV's
    ``K``). The stages see the hidden states entering that layer and, through the
    ``llm_attention`` capability, the attention of layer ``layer - 1``. All defaults together are
    FastV's setting: ``K = 2``, keep 50 % (``{}`` is a valid entry).

    Attributes:
        layer: Decoder layer the tokens are dropped before, ``>= 1`` (and below the model's
            number of layers, checked when the pipeline is installed).
        scorer: Scorer configuration; ``fastv`` by default.
        selector: Selector configuration; ``topk`` by default.
        merger: Merger configuration; ``drop`` by default.
        keep: Visual tokens to keep per image at this position (a count, not above what arrives).
        keep_ratio: Fraction, in (0, 1], of the visual tokens of each image arriving at this
            position; rounded half up. :data:`FASTV_DEFAULT_KEEP_RATIO` if neither is given.

    Examples:
        >>> LlmStageConfig().layer, LlmStageConfig().keep_ratio, LlmStageConfig(keep=64).keep_ratio
        (2, 0.5, None)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: Annotated[int, Field(ge=1)] = 2
    scorer: StageConfig = FastVScorerConfig()
    selector: StageConfig = TopKSelectorConfig()
    merger: StageConfig = DropMergerConfig()
    keep: Annotated[int, Field(gt=0)] | None = None
    keep_ratio: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_budget(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("keep") is None and "keep_ratio" not in data:
            return {**data, "keep_ratio": FASTV_DEFAULT_KEEP_RATIO}
        return data

    @model_validator(mode="after")
    def _one_budget(self) -> LlmStageConfig:
        if (self.keep is None) == (self.keep_ratio is None):
            raise PydanticCustomError(
                "budget", "give exactly one of `keep` (a count) and `keep_ratio` (a fraction)"
            )
        return self


class PipelineConfig(BaseModel):
    """A complete pruning pipeline: the encoder stage and, optionally, stages inside the LLM.

    The top-level ``scorer``/``selector``/``merger`` and budget prune the visual tokens once,
    between the vision encoder and the language model (the encoder position). Entries of ``llm``
    prune again inside the language model, each before its decoder layer. A config without
    ``llm`` needs the encoder stage; a config with ``llm`` may leave it out entirely (no pruning
    at the encoder, e.g. plain FastV).

    Budgets are checked for consistency here: LLM layers strictly increase, and a count never
    exceeds the count of the position before it (a ratio is relative to the tokens that arrive,
    so it cannot). Whether the layers exist is checked when the pipeline is installed.

    Attributes:
        scorer: Scorer configuration (``name`` picks the registered scorer).
        selector: Selector configuration.
        merger: Merger configuration; ``drop`` by default.
        keep: Tokens to keep per image (a count). Exactly one of ``keep``/``keep_ratio``.
        keep_ratio: Fraction of tokens to keep per image, in (0, 1]; rounded half up.
        positions: ``contiguous`` renumbers the pruned sequence 0..L'-1 (the usual choice of
            methods that prune before the LLM); ``original`` keeps each kept token's unpruned
            position id (gaps where tokens were removed). Tokens dropped inside the LLM always
            keep their position ids (RoPE was applied before).
        follow_up: What a follow-up turn on the same image does when ``generate`` continues from
            the cache of an earlier turn: ``reuse`` keeps the first turn's selection (only the
            new tokens run); ``rescore`` prunes the image again, guided by the new question, and
            prefills from the image on.
        llm: Pruning positions inside the language model, in increasing ``layer`` order.
        plugins: Plugin modules to import and register before the stages are looked up.

    Examples:
        >>> from tokenprune.plugin import Runtime
        >>> runtime = Runtime(autoload=False)
        >>> cfg = runtime.parse_config(
        ...     {"scorer": {"name": "cls_attention"}, "selector": {"name": "topk"}, "keep": 64})
        >>> cfg.scorer.name, cfg.merger.name, cfg.keep
        ('cls_attention', 'drop', 64)
        >>> fastv = runtime.parse_config({"llm": [{"layer": 2, "keep_ratio": 0.5}]})
        >>> fastv.has_encoder_stage, fastv.llm[0].scorer.name
        (False, 'fastv')
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scorer: StageConfig | None = None
    selector: StageConfig | None = None
    merger: StageConfig = DropMergerConfig()
    keep: Annotated[int, Field(gt=0)] | None = None
    keep_ratio: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    positions: PositionPolicy = "contiguous"
    follow_up: FollowUpPolicy = "reuse"
    llm: tuple[LlmStageConfig, ...] = ()
    plugins: tuple[str, ...] = ()

    @property
    def has_encoder_stage(self) -> bool:
        """Whether the visual tokens are pruned at the encoder position."""
        return self.scorer is not None

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        given = [f for f in ("scorer", "selector") if getattr(self, f) is not None]
        budget = self.keep is not None or self.keep_ratio is not None
        if self.llm and not given and not budget:
            return self._check_llm_stages()
        for missing in sorted({"scorer", "selector"} - set(given)):
            hint = "" if self.llm else "; or list pruning stages inside the LLM under `llm`"
            raise PydanticCustomError(
                "stage_missing",
                "{field}: Field required (the encoder stage needs `scorer`, `selector` and a "
                "budget{hint})",
                {"field": missing, "hint": hint},
            )
        if (self.keep is None) == (self.keep_ratio is None):
            raise PydanticCustomError(
                "budget", "give exactly one of `keep` (a count) and `keep_ratio` (a fraction)"
            )
        return self._check_llm_stages()

    def _check_llm_stages(self) -> PipelineConfig:
        before, label = self.keep, "keep"
        for i, stage in enumerate(self.llm):
            if i and stage.layer <= self.llm[i - 1].layer:
                raise PydanticCustomError(
                    "llm_layers",
                    "{field}: {layer} does not come after llm.{j}.layer={previous}; list the LLM "
                    "stages in strictly increasing `layer` order",
                    {
                        "field": f"llm.{i}.layer",
                        "j": i - 1,
                        "layer": stage.layer,
                        "previous": self.llm[i - 1].layer,
                    },
                )
            if stage.keep is None:
                continue
            if before is not None and stage.keep > before:
                raise PydanticCustomError(
                    "budget_order",
                    "{field}: {keep} keeps more tokens than arrive from the position before it "
                    "({label}={before}); budgets never increase from one position to the next: "
                    "lower {field} or give a keep_ratio",
                    {
                        "field": f"llm.{i}.keep",
                        "keep": stage.keep,
                        "label": label,
                        "before": before,
                    },
                )
            before, label = stage.keep, f"llm.{i}.keep"
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict that :func:`parse_config` reads back."""
        data = self.model_dump(mode="json", exclude_none=True)
        if not data.get("llm"):
            data.pop("llm", None)
        return data


def _stage_union(configs: list[type[StageConfig]]) -> Any:
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[tuple(configs)], Field(discriminator="name")]  # noqa: UP007


def _default(registry: StageRegistry, role: Role, config: StageConfig) -> Any:
    return config if config.name in registry.names(role) else ...


def build_config_model(registry: StageRegistry) -> type[PipelineConfig]:
    """Create the :class:`PipelineConfig` subclass whose stage fields accept the registered stages.

    Args:
        registry: Stage registry of a runtime, after plugin discovery.

    Returns:
        A pydantic model class; its JSON schema documents every stage and option.
    """
    scorers: Any = _stage_union(registry.config_classes("scorer"))
    selectors: Any = _stage_union(registry.config_classes("selector"))
    mergers: Any = _stage_union(registry.config_classes("merger"))
    drop = _default(registry, "merger", DropMergerConfig())
    llm_stage: Any = create_model(
        "LlmStageConfig",
        __base__=LlmStageConfig,
        scorer=(scorers, _default(registry, "scorer", FastVScorerConfig())),
        selector=(selectors, _default(registry, "selector", TopKSelectorConfig())),
        merger=(mergers, drop),
    )
    model: type[PipelineConfig] = create_model(
        "PipelineConfig",
        __base__=PipelineConfig,
        scorer=(scorers | None, None),
        selector=(selectors | None, None),
        merger=(mergers, drop),
        llm=(tuple[llm_stage, ...], ()),
    )
    return model


def _field_hint(loc: tuple[int | str, ...], data: Mapping[str, Any], runtime: Runtime) -> str:
    """For an unknown field: the closest allowed name and the allowed names, if they are known."""
    *parent, field = loc
    fields: list[str] | None = None
    top = list(PipelineConfig.model_fields)
    if len(parent) >= 2 and parent[0] == "llm" and isinstance(parent[1], int):
        entries = data.get("llm")
        entry = entries[parent[1]] if isinstance(entries, list | tuple) else None
        data = entry if isinstance(entry, Mapping) else {}
        parent = parent[2:]
        top = list(LlmStageConfig.model_fields)
    if not parent:
        fields = top
    elif parent[0] in _ROLES and len(parent) <= 2:
        section = data.get(str(parent[0]))
        name = section.get("name") if isinstance(section, Mapping) else None
        if len(parent) == 1 or parent[1] == name:
            try:
                stage = runtime.stages.get(parent[0], str(name))
            except ConfigError:
                return ""
            fields = [f for f in stage.Config.model_fields if f != "name"]
    if fields is None:
        return ""
    close = difflib.get_close_matches(str(field), fields, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"{hint} (allowed: {', '.join(fields) or 'no options'})"


def _validation_error(
    err: ValidationError, data: Mapping[str, Any], runtime: Runtime
) -> ConfigError:
    """One line per problem, naming the field; a :class:`BudgetError` if only the budget is bad."""
    lines = []
    budget_only = order_only = True
    for e in err.errors():
        loc = tuple(e["loc"])
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            message += _field_hint(loc, data, runtime)
        if not loc and "field" in e.get("ctx", {}):  # a model-level check naming its field
            loc, message = (e["ctx"]["field"],), message.split(": ", 1)[1]
        lines.append(f"  {'.'.join(str(p) for p in loc) or '<config>'}: {message}")
        field = loc[2:3] if loc[:1] == ("llm",) else loc[:1]
        budget_only &= e["type"] in ("budget", "budget_order") or field in (
            ("keep",),
            ("keep_ratio",),
        )
        order_only &= e["type"] == "budget_order"
    text = "invalid pipeline config:\n" + "\n".join(lines)
    if budget_only:
        return BudgetError(text if order_only else f"{text}\n  ({_BUDGET_HINT})")
    return ConfigError(text)


def parse_config(data: Mapping[str, Any], runtime: Runtime) -> PipelineConfig:
    """Validate a mapping as a :class:`PipelineConfig` using ``runtime``'s stages.

    Plugins listed under ``plugins`` are registered with ``runtime`` first. Unknown stage names
    are reported with the available names; any other problem names the offending field (a
    misspelled field also gets the closest allowed name).

    Raises:
        BudgetError: If only the budget is invalid (``keep`` < 1, ``keep_ratio`` outside
            (0, 1] or not finite, both or neither given).
        ConfigError: If the mapping is not a valid config.
        PluginError: If a module named under ``plugins`` cannot be imported.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"a pipeline config must be a mapping, got {type(data).__name__}")
    plugins = data.get("plugins", ())
    if isinstance(plugins, str) or not isinstance(plugins, list | tuple):
        raise ConfigError("`plugins` must be a list of module names")
    for plugin in plugins:
        runtime.add_plugin(str(plugin))
    llm = data.get("llm", ())
    if isinstance(llm, str | Mapping) or not isinstance(llm, list | tuple):
        raise ConfigError("`llm` must be a list of LLM stages (mappings with a `layer`)")
    sections: list[tuple[str, Any, Role]] = [(role, data.get(role), role) for role in _ROLES]
    for i, entry in enumerate(llm):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"`llm.{i}` must be a mapping (an LLM stage), got {entry!r}")
        sections += [(f"llm.{i}.{role}", entry.get(role), role) for role in _ROLES]
    for where, section, role in sections:
        if section is None:
            continue
        if not isinstance(section, Mapping) or "name" not in section:
            raise ConfigError(f"`{where}` must be a mapping with a `name` field")
        runtime.stages.get(role, str(section["name"]))  # raises with the available names
    try:
        return runtime.config_model().model_validate(dict(data))
    except ValidationError as err:
        raise _validation_error(err, data, runtime) from None


def load_config(path: str | Path, runtime: Runtime) -> PipelineConfig:
    """Read a pipeline config from a file, a saved directory, or a preset name.

    ``path`` is tried as, in this order:

    1. a directory: its ``tokenprune.json``, as written by :func:`save_config`
       (:func:`tokenprune.save_pipeline`), for instance next to a model's own files;
    2. a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file (a ``.json`` file may also be a saved
       ``tokenprune.json``);
    3. the name of a preset registered with ``runtime`` (``runtime.presets``), when ``path`` is
       a string.

    Args:
        path: File, directory or preset name.
        runtime: Runtime whose stages and presets are used.

    Raises:
        ConfigError: If nothing is found (the message lists the presets), the file cannot be
            read, or the config is invalid; a :class:`BudgetError` if only the budget is.
        PluginError: If a module named under ``plugins`` cannot be imported.
    """
    source = Path(path)
    if source.is_dir():
        saved = source / SAVED_CONFIG_NAME
        if not saved.is_file():
            raise ConfigError(
                f"directory {str(source)!r} has no {SAVED_CONFIG_NAME}; write one with "
                f"tokenprune.save_pipeline(config, {str(source)!r}), or pass a config file"
            )
        return _load_file(saved, runtime)
    if source.is_file():
        return _load_file(source, runtime)
    if isinstance(path, str) and path in runtime.presets:
        return _load_preset(path, runtime)
    presets = ", ".join(runtime.presets.names()) or "none"
    raise ConfigError(
        f"config {str(source)!r} does not exist as a file or directory, and it is not a preset "
        f"name (presets: {presets}); pass a .yaml/.toml/.json file, a directory saved with "
        "tokenprune.save_pipeline, or one of the presets"
    )


def _load_preset(name: str, runtime: Runtime) -> PipelineConfig:
    preset = runtime.presets.get(name)
    try:
        if isinstance(preset, Path):
            return _load_file(preset, runtime)
        return parse_config(preset, runtime)
    except ConfigError as exc:
        raise type(exc)(f"preset {name!r}: {exc}") from None


def _load_file(path: Path, runtime: Runtime) -> PipelineConfig:
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
        fix = (
            "the file is damaged or truncated; write it again with tokenprune.save_pipeline"
            if path.name == SAVED_CONFIG_NAME
            else "fix its syntax"
        )
        raise ConfigError(f"config file {str(path)!r} cannot be parsed ({exc}); {fix}") from None
    data = _unwrap_saved(data, path)
    try:
        return parse_config(data if data is not None else {}, runtime)
    except ConfigError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def _version() -> str:
    try:
        return importlib.metadata.version("tokenprune")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree
        return "0.0.0"


def _unwrap_saved(data: Any, path: Path) -> Any:
    """The ``pipeline`` of a saved ``tokenprune.json``; any other data is returned as it is."""
    if not isinstance(data, Mapping) or "tokenprune" not in data:
        return data
    header = data["tokenprune"]
    if not isinstance(header, Mapping) or set(data) != {"tokenprune", "pipeline"}:
        raise ConfigError(
            f"{path}: a saved pipeline holds a `tokenprune` header mapping and a `pipeline`, "
            f"got the keys {sorted(data)}; write it again with tokenprune.save_pipeline"
        )
    layout = header.get("format")
    if isinstance(layout, bool) or not isinstance(layout, int) or not 1 <= layout <= SAVED_FORMAT:
        raise ConfigError(
            f"{path} was saved by tokenprune {header.get('version', '?')} in format {layout!r}; "
            f"tokenprune {_version()} reads formats 1 to {SAVED_FORMAT}: upgrade tokenprune"
        )
    return data["pipeline"]


def save_config(config: PipelineConfig, directory: str | Path) -> Path:
    """Write ``config`` to ``directory/tokenprune.json``, creating the directory if needed.

    The file holds a small header (``{"tokenprune": {"version": ..., "format": 1}}``) and the
    config as :meth:`PipelineConfig.to_dict` gives it, under ``pipeline``. It is written to a
    temporary file first and then renamed, so an interrupted save never leaves a truncated file.
    :func:`load_config` reads the directory (or the file) back.

    Args:
        config: A validated configuration.
        directory: Where to write; typically a model's own directory.

    Returns:
        The path of the written file.
    """
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"cannot save into {str(folder)!r}: it exists and is not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "tokenprune": {"version": _version(), "format": SAVED_FORMAT},
        "pipeline": config.to_dict(),
    }
    target = folder / SAVED_CONFIG_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{SAVED_CONFIG_NAME}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=2)
            stream.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
