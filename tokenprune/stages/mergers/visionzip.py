"""VisionZip merger: fold the dropped tokens into the contextual targets."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.functional.visionzip import visionzip_merge
from tokenprune.stages._common import block_keys, check_selection
from tokenprune.stages.base import Merger, StageConfig
from tokenprune.stages.selectors.visionzip import VISIONZIP_SPLIT
from tokenprune.types import PrunedTokens, Selection

__all__ = ["VisionZipMerger", "VisionZipMergerConfig"]


class VisionZipMergerConfig(StageConfig):
    """Configuration of :class:`VisionZipMerger`.

    Attributes:
        metric: What the similarity is measured on: ``keys`` (the head-averaged keys of vision
            block ``layer``, as VisionZip) or ``features`` (the visual tokens themselves).
        layer: Vision block whose keys are used; ``-2`` produces LLaVA-1.5's features.
        mode: ``add``: target plus the mean of its members (the official code); ``mean``: the
            plain mean of the target and its members.
    """

    name: Literal["visionzip_merge"] = "visionzip_merge"
    metric: Literal["keys", "features"] = "keys"
    layer: int = -2
    mode: Literal["add", "mean"] = "add"


class VisionZipMerger(Merger[VisionZipMergerConfig]):
    """Merge every dropped token into its most similar contextual target (VisionZip).

    After the ``visionzip`` selector, the dominant tokens pass unchanged and each contextual
    target absorbs the dropped tokens whose metric is most similar to its own (see
    :func:`tokenprune.functional.visionzip.visionzip_merge`). After any other selector (no
    VisionZip split in the stash for this selection), every kept token is a target. Weights:
    1 for a dominant token, ``1 + members`` for a target.

    Shape:
        - output: ``PrunedTokens.features`` :math:`(B, K, D)`

    Examples:
        >>> VisionZipMerger()
        VisionZipMerger(metric='keys', layer=-2, mode='add')
    """

    name: ClassVar[str] = "visionzip_merge"
    Config: ClassVar[type[StageConfig]] = VisionZipMergerConfig

    def required_capabilities(self) -> frozenset[Capability]:
        if self.config.metric == "keys":
            return frozenset({Capability.VISION_BLOCK})
        return frozenset()

    def vision_layers(self) -> frozenset[int]:
        return frozenset({self.config.layer}) if self.config.metric == "keys" else frozenset()

    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        check_selection(selection, ctx)
        keep_idx = selection.keep_idx
        split = ctx.stash.get(VISIONZIP_SPLIT)
        if split is not None and torch.equal(split.keep_idx, keep_idx):
            dominant = split.dominant
        else:
            dominant = torch.zeros(keep_idx.shape, dtype=torch.bool, device=keep_idx.device)
        features = ctx.visual.features
        metric = (
            block_keys(ctx, self.config.layer, head_mean=True)
            if self.config.metric == "keys"
            else features
        )
        merged, weights = visionzip_merge(
            features, metric, keep_idx, dominant, mode=self.config.mode
        )
        return PrunedTokens(features=merged, keep_idx=keep_idx, weights=weights)
