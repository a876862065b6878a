"""PruMerge merger: each kept token absorbs its key-nearest tokens, weighted by attention."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.functional.prumerge import prumerge_merge
from tokenprune.stages._common import block_keys, check_selection
from tokenprune.stages.base import Merger, StageConfig
from tokenprune.types import PrunedTokens, Selection

__all__ = ["PruMergeMerger", "PruMergeMergerConfig"]


class PruMergeMergerConfig(StageConfig):
    """Configuration of :class:`PruMergeMerger`.

    Attributes:
        layer: Vision block whose keys give the neighbours and whose [CLS] attention gives the
            weights. ``-1``, the last block, whose input is LLaVA-1.5's features, is PruMerge's
            (``layers[23]`` of CLIP ViT-L/336).
        neighbours: Tokens absorbed by each kept token (the paper's ``k`` = 32).
        metric: ``keys`` (the block's full-width keys, as PruMerge) or ``features``.
    """

    name: Literal["prumerge_merge"] = "prumerge_merge"
    layer: int = -1
    neighbours: int = Field(default=32, ge=1)
    metric: Literal["keys", "features"] = "keys"


class PruMergeMerger(Merger[PruMergeMergerConfig]):
    """Update each kept token with its ``k`` most key-similar tokens (LLaVA-PruMerge).

    ``y_i = x_i + sum_j a_j x_j`` over the ``k`` other tokens with the most similar keys, with
    ``a_j`` their [CLS] attention in block ``layer``; the weight is ``1 + sum_j a_j`` (see
    :func:`tokenprune.functional.prumerge.prumerge_merge`). Works after any selector.

    Shape:
        - output: ``PrunedTokens.features`` :math:`(B, K, D)`

    Examples:
        >>> PruMergeMerger()
        PruMergeMerger(layer=-1, neighbours=32, metric='keys')
    """

    name: ClassVar[str] = "prumerge_merge"
    Config: ClassVar[type[StageConfig]] = PruMergeMergerConfig
    requires: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.VISION_BLOCK, Capability.CLS_ATTENTION}
    )

    def vision_layers(self) -> frozenset[int]:
        return frozenset({self.config.layer})

    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        check_selection(selection, ctx)
        attention = ctx.cls_attention(self.config.layer)
        features = ctx.visual.features
        keys = (
            block_keys(ctx, self.config.layer, head_mean=False)
            if self.config.metric == "keys"
            else features
        )
        merged, weights = prumerge_merge(
            features, keys, attention, selection.keep_idx, neighbours=self.config.neighbours
        )
        return PrunedTokens(features=merged, keep_idx=selection.keep_idx, weights=weights)
