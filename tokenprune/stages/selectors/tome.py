"""ToMe selector: bipartite soft matching merges the tokens into K groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext, StashKey
from tokenprune.functional.tome import tome_partition
from tokenprune.stages._common import block_keys, check_unused_scores
from tokenprune.stages.base import Scores, Selector, StageConfig
from tokenprune.types import Selection

__all__ = ["TOME_PARTITION", "ToMePartition", "ToMeSelector", "ToMeSelectorConfig"]


@dataclass(frozen=True)
class ToMePartition:
    """The groups found by :class:`ToMeSelector`.

    Attributes:
        keep_idx: The representatives (the selection it describes).
        assignment: Group (position in ``keep_idx``) of every original token.

    Shape:
        - keep_idx: :math:`(B, K)`
        - assignment: :math:`(B, N)`
    """

    keep_idx: torch.Tensor
    assignment: torch.Tensor


TOME_PARTITION: StashKey[ToMePartition] = StashKey("tokenprune.tome.partition")
"""Stash entry through which the ``tome`` selector hands its groups to ``tome_merge``."""


class ToMeSelectorConfig(StageConfig):
    """Configuration of :class:`ToMeSelector`.

    Attributes:
        metric: What the matching compares: ``keys`` (the head-averaged keys of vision block
            ``layer``, as ToMe) or ``features`` (the visual tokens themselves).
        layer: Vision block whose keys are used; ``-2`` produces LLaVA-1.5's features.
        r: Most tokens merged per bipartite round; ``None``: as many as ToMe allows (half of
            the remaining tokens), the fewest rounds.
    """

    name: Literal["tome"] = "tome"
    metric: Literal["keys", "features"] = "keys"
    layer: int = -2
    r: int | None = Field(default=None, ge=1)


class ToMeSelector(Selector[ToMeSelectorConfig]):
    """Group the tokens by ToMe's bipartite soft matching (Bolya et al., ICLR 2023).

    Rounds of bipartite soft matching (alternate A/B split, each A token matched to its most
    similar B token, the ``r`` best pairs merged by size-weighted average) run until ``K``
    groups remain (see :func:`tokenprune.functional.tome.tome_partition`). The selection is the
    groups' representatives (the surviving token of each group, in raster order); the groups
    themselves go to ``ctx.stash[TOME_PARTITION]`` for the ``tome_merge`` merger, which
    averages them.

    The scores are validated but not used: pair with the ``uniform`` scorer.

    Shape:
        - output: ``Selection.keep_idx`` :math:`(B, K)`

    Examples:
        >>> ToMeSelector(metric="features")
        ToMeSelector(metric='features', layer=-2, r=None)
    """

    name: ClassVar[str] = "tome"
    Config: ClassVar[type[StageConfig]] = ToMeSelectorConfig

    def required_capabilities(self) -> frozenset[Capability]:
        if self.config.metric == "keys":
            return frozenset({Capability.VISION_BLOCK})
        return frozenset()

    def vision_layers(self) -> frozenset[int]:
        return frozenset({self.config.layer}) if self.config.metric == "keys" else frozenset()

    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        check_unused_scores(scores, ctx, self.name)
        metric = (
            block_keys(ctx, self.config.layer, head_mean=True)
            if self.config.metric == "keys"
            else ctx.visual.features
        )
        keep_idx, assignment = tome_partition(metric, ctx.keep, r=self.config.r)
        ctx.stash[TOME_PARTITION] = ToMePartition(keep_idx=keep_idx, assignment=assignment)
        return Selection(keep_idx)
