"""The ``nearest_merge`` merger: fold each dropped token into its most similar kept token."""

from __future__ import annotations

from typing import ClassVar, Literal

from tokenprune import (
    Capability,
    CapabilityError,
    Merger,
    PruneContext,
    PrunedTokens,
    Selection,
    ShapeError,
    StageConfig,
)
from tokenprune_desap import functional as F

__all__ = ["NearestMerger", "NearestMergerConfig"]


class NearestMergerConfig(StageConfig):
    """Configuration of :class:`NearestMerger`.

    Attributes:
        space: Where cosine similarity is measured: ``features`` (the pruned features, the
            projector input for LLaVA; the spec's recommendation [O9]) or ``projected`` (after
            the model's projector).
        weighting: ``uniform``: unweighted mean of the centre and its assigned tokens (the
            paper's average merge). ``cls_attention``: weight every token by the [CLS]
            attention it receives in block ``saliency_layer``.
        saliency_layer: Block used by ``weighting: cls_attention``.
    """

    name: Literal["nearest_merge"] = "nearest_merge"
    space: Literal["features", "projected"] = "features"
    weighting: Literal["uniform", "cls_attention"] = "uniform"
    saliency_layer: int = -1


class NearestMerger(Merger[NearestMergerConfig]):
    """Cluster-merge: kept tokens are centres, each dropped token joins its nearest centre.

    Exactly ``K`` tokens come out; ``weights`` holds each cluster's total weight (its size
    under uniform weighting), so the merge preserves the weighted sum of every cluster.

    Shape:
        - output: ``PrunedTokens.features`` :math:`(B, K, D)`
    """

    name: ClassVar[str] = "nearest_merge"
    Config: ClassVar[type[StageConfig]] = NearestMergerConfig

    def required_capabilities(self) -> frozenset[Capability]:
        needs: set[Capability] = set()
        if self.config.space == "projected":
            needs.add(Capability.PROJECTOR)
        if self.config.weighting == "cls_attention":
            needs |= {Capability.VISION_BLOCK, Capability.CLS_ATTENTION}
        return frozenset(needs)

    def vision_layers(self) -> frozenset[int]:
        if self.config.weighting == "cls_attention":
            return frozenset({self.config.saliency_layer})
        return frozenset()

    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        features = ctx.visual.features
        similarity = None
        if self.config.space == "projected":
            ctx.require(Capability.PROJECTOR, self.name)
            if ctx.projector is None:
                raise CapabilityError(
                    "nearest_merge with space 'projected' needs the model's projector, which "
                    "this adapter did not provide; use space: features"
                )
            similarity = ctx.projector(features)
        weights = None
        if self.config.weighting == "cls_attention":
            weights = ctx.cls_attention(self.config.saliency_layer)
        try:
            merged, sizes = F.nearest_merge(
                features, selection.keep_idx, similarity_features=similarity, weights=weights
            )
        except ValueError as exc:
            raise ShapeError(f"nearest_merge: {exc}") from exc
        return PrunedTokens(features=merged, keep_idx=selection.keep_idx, weights=sizes)
