"""Combine scorer: normalise the maps of several scorers and mix them with weights."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tokenprune import functional as F
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.errors import ConfigError
from tokenprune.functional.combine import combine_scores
from tokenprune.stages.base import Role, Scorer, Stage, StageConfig, StageLookup

if TYPE_CHECKING:
    from tokenprune.adapters.base import ModelAdapter

__all__ = ["CombineEntry", "CombineScorer", "CombineScorerConfig"]


class CombineEntry(BaseModel):
    """One scorer of a :class:`CombineScorer`.

    Attributes:
        name: Registered name of the scorer.
        weight: Its weight in the mix (any finite number; negative rewards low scores).
        config: The scorer's own options (its config without ``name``).
        map: Which named map to use when the scorer returns several.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    weight: float = Field(default=1.0, allow_inf_nan=False)
    config: dict[str, Any] = Field(default_factory=dict)
    map: str | None = None

    @field_validator("config")
    @classmethod
    def _no_name(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "name" in value:
            raise ValueError("give the scorer's name as the entry's `name`, not inside `config`")
        return value


class CombineScorerConfig(StageConfig):
    """Configuration of :class:`CombineScorer`.

    Attributes:
        scorers: The scorers to mix, at least one.
        normalize: Per-image normalisation of each map before mixing: ``rank`` (tie-averaged
            rank in [0, 1]), ``zscore`` or ``minmax`` (see
            :func:`tokenprune.functional.combine.normalize_scores`).
    """

    name: Literal["combine"] = "combine"
    scorers: tuple[CombineEntry, ...] = Field(min_length=1)
    normalize: Literal["rank", "zscore", "minmax"] = "rank"


class _BuiltinScorers:
    """Looks scorer names up among the scorers shipped in ``tokenprune.stages.scorers``."""

    def get(self, role: Role, name: str) -> type[Stage[Any]]:
        package = importlib.import_module("tokenprune.stages.scorers")
        found: list[str] = []
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for obj in vars(module).values():
                if (
                    isinstance(obj, type)
                    and issubclass(obj, Scorer)
                    and obj.__module__ == module.__name__
                ):
                    if obj.name == name and role == "scorer":
                        return obj
                    found.append(obj.name)
        raise ConfigError(
            f"unknown scorer {name!r} among the built-in scorers {sorted(found)}; plugin "
            "scorers are found when the pipeline is built by a runtime (Pipeline.from_config)"
        )


class CombineScorer(Scorer[CombineScorerConfig]):
    r"""Mix the normalised score maps of several scorers: :math:`s = \sum_m w_m \hat s^{(m)}`.

    Each entry names a registered scorer, its weight and its options, so a configuration can
    say "0.7 x text relevance + 0.3 x saliency" without code. Every map is normalised per image
    (``normalize``) before the weighted sum (see
    :func:`tokenprune.functional.combine.combine_scores`); a scorer that returns several named
    maps needs the entry's ``map``.

    Built by a runtime (:meth:`~tokenprune.Pipeline.from_config`), the names are looked up in
    the runtime's registry, so plugin scorers work. Built directly, they are looked up among
    the built-in scorers, or the scorer instances are passed as ``instances``.

    Args:
        config: The configuration (or keyword fields).
        instances: Ready scorer instances, one per entry (their names and configs are not
            re-checked); built from the config if omitted.
        stages: Where scorer names are looked up; the built-in scorers if omitted.

    Raises:
        ConfigError: If a name is unknown, is not a scorer, or its options are invalid.

    Shape:
        - output: :math:`(B, N)`

    Examples:
        >>> CombineScorer(scorers=[{"name": "random", "weight": 0.5}]).scorers
        (RandomScorer(seed=0),)
    """

    name: ClassVar[str] = "combine"
    Config: ClassVar[type[StageConfig]] = CombineScorerConfig

    def __init__(
        self,
        config: CombineScorerConfig | None = None,
        *,
        instances: Sequence[Scorer[Any]] | None = None,
        stages: StageLookup | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(config, **overrides)
        entries = self.config.scorers
        if instances is None:
            lookup: StageLookup = stages if stages is not None else _BuiltinScorers()
            instances = [self._build(i, entry, lookup) for i, entry in enumerate(entries)]
        elif len(instances) != len(entries) or not all(isinstance(s, Scorer) for s in instances):
            raise ConfigError(
                f"combine: pass one Scorer instance per entry ({len(entries)}), got "
                f"{len(instances)}"
            )
        self.scorers: tuple[Scorer[Any], ...] = tuple(instances)
        """The sub-scorers, one per entry of ``config.scorers``."""

    @classmethod
    def from_config(
        cls, config: StageConfig, *, stages: StageLookup | None = None
    ) -> CombineScorer:
        if not isinstance(config, CombineScorerConfig):
            raise ConfigError(f"combine needs a CombineScorerConfig, got {type(config).__name__}")
        return cls(config, stages=stages)

    @classmethod
    def contract_config(cls) -> CombineScorerConfig:
        """A two-scorer mix for the stage contract: [CLS] attention and random scores."""
        return CombineScorerConfig(
            scorers=(
                CombineEntry(name="cls_attention", weight=0.7, config={"layer": -1}),
                CombineEntry(name="random", weight=0.3),
            ),
        )

    @staticmethod
    def _build(index: int, entry: CombineEntry, lookup: StageLookup) -> Scorer[Any]:
        where = f"combine: scorers[{index}] ({entry.name!r})"
        stage_cls = lookup.get("scorer", entry.name)
        if not issubclass(stage_cls, Scorer):
            raise ConfigError(f"{where} is a {stage_cls.role}, not a scorer")
        try:
            sub_config = stage_cls.Config.model_validate({"name": entry.name, **entry.config})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<config>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ConfigError(f"{where} has invalid options: {problems}") from None
        return stage_cls.from_config(sub_config, stages=lookup)

    def required_capabilities(self) -> frozenset[Capability]:
        return frozenset().union(*(s.required_capabilities() for s in self.scorers))

    def vision_layers(self) -> frozenset[int]:
        return frozenset().union(*(s.vision_layers() for s in self.scorers))

    def check_model(self, adapter: ModelAdapter) -> None:
        for scorer in self.scorers:
            scorer.check_model(adapter)

    def score(self, ctx: PruneContext) -> torch.Tensor:
        maps = []
        for index, (entry, scorer) in enumerate(
            zip(self.config.scorers, self.scorers, strict=True)
        ):
            where = f"combine: scorers[{index}] ({entry.name!r})"
            result = scorer.score(ctx)
            if isinstance(result, torch.Tensor):
                chosen = result
            elif entry.map is not None:
                if entry.map not in result:
                    raise ConfigError(
                        f"{where}: `map`={entry.map!r} is not one of {sorted(result)}"
                    )
                chosen = result[entry.map]
            elif len(result) == 1:
                chosen = next(iter(result.values()))
            else:
                raise ConfigError(
                    f"{where} returned several score maps {sorted(result)}; set the entry's `map`"
                )
            F.check_scores(
                chosen,
                batch=ctx.visual.batch_size,
                num_tokens=ctx.visual.num_tokens,
                name=where,
            )
            maps.append(chosen)
        weights = [entry.weight for entry in self.config.scorers]
        return combine_scores(maps, weights, method=self.config.normalize)
