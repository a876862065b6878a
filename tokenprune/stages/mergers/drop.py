"""Drop merger: keep the selected tokens as they are."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune import functional as F
from tokenprune.context import PruneContext
from tokenprune.stages.base import Merger, StageConfig
from tokenprune.types import PrunedTokens, Selection

__all__ = ["DropMerger", "DropMergerConfig"]


class DropMergerConfig(StageConfig):
    """Configuration of :class:`DropMerger` (no options)."""

    name: Literal["drop"] = "drop"


class DropMerger(Merger[DropMergerConfig]):
    """Identity on the kept tokens; discarded tokens are simply dropped (each weight is 1).

    Shape:
        - output: ``PrunedTokens.features`` :math:`(B, K, D)`

    Examples:
        >>> DropMerger()
        DropMerger()
    """

    name: ClassVar[str] = "drop"
    Config: ClassVar[type[StageConfig]] = DropMergerConfig

    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        feats = F.gather_tokens(ctx.visual.features, selection.keep_idx)
        weights = torch.ones(selection.keep_idx.shape, dtype=feats.dtype, device=feats.device)
        return PrunedTokens(features=feats, keep_idx=selection.keep_idx, weights=weights)
