"""Received-attention scorer: saliency for vision towers without a [CLS] token."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.stages.base import Scorer, StageConfig

__all__ = ["ReceivedAttentionScorer", "ReceivedAttentionScorerConfig"]


class ReceivedAttentionScorerConfig(StageConfig):
    """Configuration of :class:`ReceivedAttentionScorer`.

    Attributes:
        layer: Vision block whose attention map is used (Python indexing, negative from the
            end). ``-1``, the last block, is a full-attention block in Qwen2.5-VL (its window
            blocks only see a local window).
    """

    name: Literal["received_attention"] = "received_attention"
    layer: int = -1


class ReceivedAttentionScorer(Scorer[ReceivedAttentionScorerConfig]):
    """Score each visual token by the attention it receives, averaged over heads and queries.

    The saliency substitute for towers without [CLS] (Qwen2.5-VL): the column mean of the
    block's head-averaged attention map, recomputed from the captured block input with the
    block's rotary embedding and attention segments (see
    :func:`tokenprune.functional.received_attention`), and averaged over the patches that form
    one visual token (Qwen2.5-VL's 2x2 merge groups).

    Shape:
        - output: :math:`(B, N)`

    Examples:
        >>> ReceivedAttentionScorer(layer=-1)
        ReceivedAttentionScorer(layer=-1)
    """

    name: ClassVar[str] = "received_attention"
    Config: ClassVar[type[StageConfig]] = ReceivedAttentionScorerConfig
    requires: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.VISION_BLOCK, Capability.RECEIVED_ATTENTION}
    )

    def vision_layers(self) -> frozenset[int]:
        return frozenset({self.config.layer})

    def score(self, ctx: PruneContext) -> torch.Tensor:
        return ctx.received_attention(self.config.layer)
