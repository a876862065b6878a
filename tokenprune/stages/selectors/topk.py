"""Top-k selector."""

from __future__ import annotations

from typing import ClassVar, Literal

from tokenprune import functional as F
from tokenprune.context import PruneContext
from tokenprune.stages.base import Scores, Selector, StageConfig, pick_score
from tokenprune.types import Selection

__all__ = ["TopKSelector", "TopKSelectorConfig"]


class TopKSelectorConfig(StageConfig):
    """Configuration of :class:`TopKSelector`.

    Attributes:
        score: Which named score map to rank by when the scorer returns several.
    """

    name: Literal["topk"] = "topk"
    score: str | None = None


class TopKSelector(Selector[TopKSelectorConfig]):
    """Keep the ``K`` highest-scoring tokens per image, in their original order.

    Ties go to the lower index, so the selection is deterministic.

    Shape:
        - output: ``Selection.keep_idx`` :math:`(B, K)`

    Examples:
        >>> TopKSelector()
        TopKSelector(score=None)
    """

    name: ClassVar[str] = "topk"
    Config: ClassVar[type[StageConfig]] = TopKSelectorConfig

    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        s = pick_score(scores, self.config.score, self.name)
        F.check_scores(s, batch=ctx.visual.batch_size, num_tokens=ctx.visual.num_tokens)
        return Selection(F.topk_keep_indices(s, ctx.keep))
