"""ToMe merger: size-weighted average of each group of merged tokens."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.functional.assign import cluster_mean, nearest_assignment
from tokenprune.stages._common import block_keys, check_selection
from tokenprune.stages.base import Merger, StageConfig
from tokenprune.stages.selectors.tome import TOME_PARTITION
from tokenprune.types import PrunedTokens, Selection

__all__ = ["ToMeMerger", "ToMeMergerConfig"]


class ToMeMergerConfig(StageConfig):
    """Configuration of :class:`ToMeMerger`.

    Attributes:
        metric: Similarity used after a selector other than ``tome``: ``keys`` (head-averaged
            keys of vision block ``layer``) or ``features``.
        layer: Vision block whose keys are used.
    """

    name: Literal["tome_merge"] = "tome_merge"
    metric: Literal["keys", "features"] = "keys"
    layer: int = -2


class ToMeMerger(Merger[ToMeMergerConfig]):
    """Replace each kept token by the size-weighted mean of the tokens merged into it (ToMe).

    After the ``tome`` selector the groups come from its bipartite soft matching, and each
    output is the mean of its group, its weight the group size (ToMe's size-weighted average,
    composed over the rounds). After any other selector, one bipartite step with the dropped
    tokens as set A and the kept tokens as set B merges every dropped token into its most
    similar kept token. The weights always sum to ``N``.

    Shape:
        - output: ``PrunedTokens.features`` :math:`(B, K, D)`

    Examples:
        >>> ToMeMerger(metric="features")
        ToMeMerger(metric='features', layer=-2)
    """

    name: ClassVar[str] = "tome_merge"
    Config: ClassVar[type[StageConfig]] = ToMeMergerConfig

    def required_capabilities(self) -> frozenset[Capability]:
        if self.config.metric == "keys":
            return frozenset({Capability.VISION_BLOCK})
        return frozenset()

    def vision_layers(self) -> frozenset[int]:
        return frozenset({self.config.layer}) if self.config.metric == "keys" else frozenset()

    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        check_selection(selection, ctx)
        keep_idx = selection.keep_idx
        partition = ctx.stash.get(TOME_PARTITION)
        if partition is not None and torch.equal(partition.keep_idx, keep_idx):
            assignment = partition.assignment
        else:
            metric = (
                block_keys(ctx, self.config.layer, head_mean=True)
                if self.config.metric == "keys"
                else ctx.visual.features
            )
            assignment = nearest_assignment(metric, keep_idx)
        merged, sizes = cluster_mean(ctx.visual.features, assignment, keep_idx.shape[1])
        return PrunedTokens(features=merged, keep_idx=keep_idx, weights=sizes)
