"""DivPrune selector: the most diverse subset of tokens (greedy max-min cosine distance)."""

from __future__ import annotations

from typing import ClassVar, Literal

from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.functional.divprune import divprune_keep_indices
from tokenprune.stages._common import check_unused_scores, projected_features
from tokenprune.stages.base import Scores, Selector, StageConfig
from tokenprune.types import Selection

__all__ = ["DivPruneSelector", "DivPruneSelectorConfig"]


class DivPruneSelectorConfig(StageConfig):
    """Configuration of :class:`DivPruneSelector`.

    Attributes:
        space: Where distances are measured: ``projected`` (the visual tokens after the
            model's projector, in the language model's embedding space, as DivPrune) or
            ``features`` (the pruned features themselves, the projector's input for LLaVA).
    """

    name: Literal["divprune"] = "divprune"
    space: Literal["projected", "features"] = "projected"


class DivPruneSelector(Selector[DivPruneSelectorConfig]):
    """Keep a maximally diverse subset of ``K`` tokens (DivPrune, Alvar et al., CVPR 2025).

    Greedy max-min selection on the cosine distance of the token features: first the most
    isolated token, then repeatedly the token farthest from everything kept so far (see
    :func:`tokenprune.functional.divprune.divprune_keep_indices`).

    DivPrune does not rank tokens by a score: the scores are validated (a broken scorer is
    still reported) but otherwise ignored. Pair it with the ``uniform`` scorer, which computes
    nothing.

    Shape:
        - output: ``Selection.keep_idx`` :math:`(B, K)`

    Examples:
        >>> DivPruneSelector()
        DivPruneSelector(space='projected')
    """

    name: ClassVar[str] = "divprune"
    Config: ClassVar[type[StageConfig]] = DivPruneSelectorConfig

    def required_capabilities(self) -> frozenset[Capability]:
        if self.config.space == "projected":
            return frozenset({Capability.PROJECTOR})
        return frozenset()

    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        check_unused_scores(scores, ctx, self.name)
        features = (
            projected_features(ctx, self.name)
            if self.config.space == "projected"
            else ctx.visual.features
        )
        return Selection(divprune_keep_indices(features, ctx.keep))
