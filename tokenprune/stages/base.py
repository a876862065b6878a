"""Base classes of the three pipeline roles: Scorer -> Selector -> Merger.

A stage is a thin, stateless shell around a functional core: it reads a
:class:`~tokenprune.context.PruneContext`, never the model, and carries a frozen pydantic
``Config`` whose ``name`` literal is the key the stage is registered under.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.errors import ConfigError
from tokenprune.types import PrunedTokens, Selection

if TYPE_CHECKING:
    from tokenprune.adapters.base import ModelAdapter

__all__ = [
    "Merger",
    "Role",
    "Scorer",
    "Scores",
    "Selector",
    "Stage",
    "StageConfig",
    "StageLookup",
]

Role = Literal["scorer", "selector", "merger"]
Scores = torch.Tensor | Mapping[str, torch.Tensor]
"""What a scorer returns: one ``(B, N)`` map, or several named maps (e.g. DeSAP's two)."""


class StageConfig(BaseModel):
    """Base of every stage configuration: frozen, and unknown fields are errors.

    Subclasses narrow ``name`` to a ``Literal`` holding the stage's registry key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str


ConfigT = TypeVar("ConfigT", bound=StageConfig)
StageT = TypeVar("StageT", bound="Stage[Any]")


class StageLookup(Protocol):
    """Resolves a stage class by role and name (a runtime's ``StageRegistry`` is one).

    Handed to :meth:`Stage.from_config` so that a stage composing other stages (the ``combine``
    scorer) can build them by name without importing the registry.
    """

    def get(self, role: Role, name: str) -> type[Stage[Any]]:
        """Return the stage class registered as ``role`` ``name`` (raise if there is none)."""
        ...


class Stage(ABC, Generic[ConfigT]):
    """Common behaviour of all stages.

    Class attributes:
        role: ``"scorer"``, ``"selector"`` or ``"merger"`` (set by the role base classes).
        name: Registry key; equal to the default of ``Config.name``.
        Config: The stage's pydantic configuration class.
        requires: Capabilities the stage needs from the model adapter.
    """

    role: ClassVar[Role]
    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    requires: ClassVar[frozenset[Capability]] = frozenset()

    def __init__(self, config: ConfigT | None = None, **overrides: Any) -> None:
        if config is not None and overrides:
            raise ConfigError(f"{type(self).__name__}: pass either a config or keyword fields")
        if config is None:
            try:
                config = self.Config(name=self.name, **overrides)  # type: ignore[assignment]
            except ValidationError as err:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
                )
                raise ConfigError(f"{type(self).__name__}: invalid options: {problems}") from None
        if not isinstance(config, self.Config):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}"
            )
        self.config: ConfigT = config

    @classmethod
    def from_config(
        cls: type[StageT], config: StageConfig, *, stages: StageLookup | None = None
    ) -> StageT:
        """Build the stage from its config; :meth:`~tokenprune.Pipeline.from_config` calls this.

        The default is ``cls(config)``. A stage that composes other stages by name overrides it
        and resolves their names through ``stages`` (the runtime's registry when built by a
        pipeline, so plugin stages are found too).

        Args:
            config: The stage's configuration.
            stages: Where stage names are looked up; ``None`` outside a runtime.
        """
        return cls(config)

    def required_capabilities(self) -> frozenset[Capability]:
        """Capabilities this stage instance needs; ``requires`` unless the config changes them."""
        return self.requires

    def vision_layers(self) -> frozenset[int]:
        """Vision blocks whose input this stage reads (so the adapter captures them)."""
        return frozenset()

    def check_model(self, adapter: ModelAdapter) -> None:
        """Validate the stage against the model when the pipeline is installed.

        Called by :meth:`~tokenprune.Pipeline.check_compatible` after the capability check, so
        a mismatch (for example a text encoder not paired with the model's vision tower) fails
        before any forward pass. The default accepts every model.
        """

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items() if k != "name")
        return f"{type(self).__name__}({fields})"


class Scorer(Stage[ConfigT]):
    """Scores every visual token; higher means more worth keeping."""

    role: ClassVar[Role] = "scorer"

    @abstractmethod
    def score(self, ctx: PruneContext) -> Scores:
        """Return a ``(B, N)`` score map, or a mapping of named ``(B, N)`` maps."""


class Selector(Stage[ConfigT]):
    """Chooses exactly ``ctx.keep`` tokens per image from the scores."""

    role: ClassVar[Role] = "selector"

    @abstractmethod
    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        """Return the kept indices, ``(B, K)``, strictly increasing per row."""


class Merger(Stage[ConfigT]):
    """Builds the ``K`` output tokens from the kept tokens (and, optionally, the dropped ones)."""

    role: ClassVar[Role] = "merger"

    @abstractmethod
    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        """Return exactly ``K`` tokens per image."""


def pick_score(scores: Scores, key: str | None, stage: str) -> torch.Tensor:
    """Return the one score map a single-map selector should use.

    Args:
        scores: What the scorer returned.
        key: Name of the map to use when the scorer returned several.
        stage: Name of the calling stage, for error messages.

    Raises:
        ConfigError: If several maps were returned and ``key`` does not name one of them.
    """
    if isinstance(scores, torch.Tensor):
        return scores
    if key is None:
        if len(scores) == 1:
            return next(iter(scores.values()))
        raise ConfigError(
            f"{stage}: the scorer returned several score maps {sorted(scores)}; set the "
            "selector's `score` field to the one to use"
        )
    if key not in scores:
        raise ConfigError(f"{stage}: `score`={key!r} is not one of the maps {sorted(scores)}")
    return scores[key]
