"""Uniform scorer: every token equally worth keeping (for selectors that do not rank by score)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune.context import PruneContext
from tokenprune.stages.base import Scorer, StageConfig

__all__ = ["UniformScorer", "UniformScorerConfig"]


class UniformScorerConfig(StageConfig):
    """Configuration of :class:`UniformScorer` (no options)."""

    name: Literal["uniform"] = "uniform"


class UniformScorer(Scorer[UniformScorerConfig]):
    """Constant zero scores: no token is preferred.

    The scorer to pair with selectors that choose by their own criterion and ignore the scores
    (``divprune``, ``tome``, ``pool``), so the pipeline computes nothing it does not use. With
    ``topk`` it keeps the first ``K`` tokens (ties go to the lower index).

    Shape:
        - output: :math:`(B, N)`, float32

    Examples:
        >>> UniformScorer()
        UniformScorer()
    """

    name: ClassVar[str] = "uniform"
    Config: ClassVar[type[StageConfig]] = UniformScorerConfig

    def score(self, ctx: PruneContext) -> torch.Tensor:
        feats = ctx.visual.features
        return torch.zeros(feats.shape[0], feats.shape[1], device=feats.device)
