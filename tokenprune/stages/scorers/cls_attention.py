"""[CLS]-attention scorer (the FasterVLM baseline)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.stages.base import Scorer, StageConfig

__all__ = ["ClsAttentionScorer", "ClsAttentionScorerConfig"]


class ClsAttentionScorerConfig(StageConfig):
    """Configuration of :class:`ClsAttentionScorer`.

    Attributes:
        layer: Vision block whose [CLS] attention is used (Python indexing, negative from the
            end). ``-2`` is the block that produces LLaVA-1.5's features (``hidden_states[-2]``),
            the FasterVLM choice.
    """

    name: Literal["cls_attention"] = "cls_attention"
    layer: int = -2


class ClsAttentionScorer(Scorer[ClsAttentionScorerConfig]):
    """Score each patch by the head-averaged attention the [CLS] token pays to it.

    The attention row is recomputed from the captured block input, so it works with the tower on
    SDPA or flash attention and costs one query row per head.

    Shape:
        - output: :math:`(B, N)`

    Examples:
        >>> from tokenprune.stages.scorers.cls_attention import ClsAttentionScorer
        >>> ClsAttentionScorer(layer=-1)
        ClsAttentionScorer(layer=-1)
    """

    name: ClassVar[str] = "cls_attention"
    Config: ClassVar[type[StageConfig]] = ClsAttentionScorerConfig
    requires: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.VISION_BLOCK, Capability.CLS_ATTENTION}
    )

    def vision_layers(self) -> frozenset[int]:
        return frozenset({self.config.layer})

    def score(self, ctx: PruneContext) -> torch.Tensor:
        return ctx.cls_attention(self.config.layer)
