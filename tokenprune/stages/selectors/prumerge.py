"""PruMerge / PruMerge+ selector: IQR outliers of [CLS] attention, fitted to a fixed budget."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune import functional as F
from tokenprune.context import PruneContext, StashKey
from tokenprune.functional.prumerge import prumerge_adaptive_count, prumerge_keep_indices
from tokenprune.stages.base import Scores, Selector, StageConfig, pick_score
from tokenprune.types import Selection

__all__ = ["PRUMERGE_ADAPTIVE", "PruMergeSelector", "PruMergeSelectorConfig"]

PRUMERGE_ADAPTIVE: StashKey[torch.Tensor] = StashKey("tokenprune.prumerge.adaptive")
"""Stash entry: the token count the paper's adaptive rule would keep per image, ``(B,)`` long."""


class PruMergeSelectorConfig(StageConfig):
    """Configuration of :class:`PruMergeSelector`.

    Attributes:
        plus: PruMerge+ (outliers plus spatially uniform tokens) instead of PruMerge.
        score: Which named score map holds the [CLS] attention when the scorer returns several.
    """

    name: Literal["prumerge"] = "prumerge"
    plus: bool = False
    score: str | None = None


class PruMergeSelector(Selector[PruMergeSelectorConfig]):
    """Keep the attention outliers of LLaVA-PruMerge (Shang et al., 2024), exactly ``K`` of them.

    The paper keeps a variable number of tokens: those whose [CLS] attention exceeds
    ``Q3 + 1.5 IQR``. Under tokenprune's fixed budget the outliers come first, ranked by
    attention, truncated to ``K``; the remaining slots are filled with the next-highest
    attention (PruMerge: this is the top ``K``) or, with ``plus``, with spatially uniform tokens
    (PruMerge+). See :func:`tokenprune.functional.prumerge.prumerge_keep_indices`. The count the
    adaptive rule would have kept is left in ``ctx.stash[PRUMERGE_ADAPTIVE]``.

    Pair with the ``cls_attention`` scorer (``layer: -1``, PruMerge's attention layer for
    LLaVA-1.5) and the ``prumerge_merge`` merger.

    Shape:
        - output: ``Selection.keep_idx`` :math:`(B, K)`

    Examples:
        >>> PruMergeSelector(plus=True)
        PruMergeSelector(plus=True, score=None)
    """

    name: ClassVar[str] = "prumerge"
    Config: ClassVar[type[StageConfig]] = PruMergeSelectorConfig

    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        s = pick_score(scores, self.config.score, self.name)
        F.check_scores(s, batch=ctx.visual.batch_size, num_tokens=ctx.visual.num_tokens)
        ctx.stash[PRUMERGE_ADAPTIVE] = prumerge_adaptive_count(s, plus=self.config.plus)
        return Selection(prumerge_keep_indices(s, ctx.keep, plus=self.config.plus))
