"""VisionZip selector: dominant tokens by [CLS] attention plus uniform contextual targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from tokenprune import functional as F
from tokenprune.context import PruneContext, StashKey
from tokenprune.functional.visionzip import visionzip_counts, visionzip_keep_indices
from tokenprune.stages.base import Scores, Selector, StageConfig, pick_score
from tokenprune.types import Selection

__all__ = ["VISIONZIP_SPLIT", "VisionZipSelector", "VisionZipSelectorConfig", "VisionZipSplit"]


@dataclass(frozen=True)
class VisionZipSplit:
    """Which kept tokens are dominant, as chosen by :class:`VisionZipSelector`.

    Attributes:
        keep_idx: The selection it describes.
        dominant: ``True`` for dominant tokens, ``False`` for contextual targets.

    Shape:
        - keep_idx, dominant: :math:`(B, K)`
    """

    keep_idx: torch.Tensor
    dominant: torch.Tensor


VISIONZIP_SPLIT: StashKey[VisionZipSplit] = StashKey("tokenprune.visionzip.split")
"""Stash entry through which the ``visionzip`` selector tells ``visionzip_merge`` the split."""


class VisionZipSelectorConfig(StageConfig):
    """Configuration of :class:`VisionZipSelector`.

    Attributes:
        dominant_fraction: Share of the budget given to dominant tokens, rounded half up; the
            rest are contextual tokens. ``54/64`` is the paper's 54 + 10 of 64 (108 + 20 of
            128, 162 + 30 of 192).
        score: Which named score map holds the [CLS] attention when the scorer returns several.
    """

    name: Literal["visionzip"] = "visionzip"
    dominant_fraction: float = Field(default=54 / 64, ge=0.0, le=1.0)
    score: str | None = None


class VisionZipSelector(Selector[VisionZipSelectorConfig]):
    """Keep the dominant tokens and the contextual targets of VisionZip (Yang et al., CVPR 2025).

    With ``D = round(K * dominant_fraction)`` and ``C = K - D``: the ``D`` tokens with the
    highest scores ([CLS] attention: pair with the ``cls_attention`` scorer, ``layer: -2``) are
    dominant; of the others, ``C`` tokens at a uniform stride in raster order are the
    contextual targets (see :func:`tokenprune.functional.visionzip.visionzip_keep_indices`).
    Which kept tokens are dominant is left in ``ctx.stash[VISIONZIP_SPLIT]`` for the
    ``visionzip_merge`` merger, which folds the dropped tokens into the targets.

    Shape:
        - output: ``Selection.keep_idx`` :math:`(B, K)`

    Examples:
        >>> VisionZipSelector()
        VisionZipSelector(dominant_fraction=0.84375, score=None)
    """

    name: ClassVar[str] = "visionzip"
    Config: ClassVar[type[StageConfig]] = VisionZipSelectorConfig

    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        s = pick_score(scores, self.config.score, self.name)
        F.check_scores(s, batch=ctx.visual.batch_size, num_tokens=ctx.visual.num_tokens)
        _, contextual = visionzip_counts(ctx.keep, self.config.dominant_fraction)
        keep_idx, dominant = visionzip_keep_indices(s, ctx.keep, contextual)
        ctx.stash[VISIONZIP_SPLIT] = VisionZipSplit(keep_idx=keep_idx, dominant=dominant)
        return Selection(keep_idx)
