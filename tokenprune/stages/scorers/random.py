"""Seeded random scorer: the lower bound every method must beat."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune import functional as F
from tokenprune.context import PruneContext
from tokenprune.stages.base import Scorer, StageConfig

__all__ = ["RandomScorer", "RandomScorerConfig"]


class RandomScorerConfig(StageConfig):
    """Configuration of :class:`RandomScorer`.

    Attributes:
        seed: Seed of the private generator; the same seed gives the same scores on every call.
    """

    name: Literal["random"] = "random"
    seed: int = 0


class RandomScorer(Scorer[RandomScorerConfig]):
    """Uniform random scores from a private ``torch.Generator`` (the global RNG is untouched).

    Shape:
        - output: :math:`(B, N)`

    Examples:
        >>> RandomScorer(seed=3)
        RandomScorer(seed=3)
    """

    name: ClassVar[str] = "random"
    Config: ClassVar[type[StageConfig]] = RandomScorerConfig

    def score(self, ctx: PruneContext) -> torch.Tensor:
        feats = ctx.visual.features
        return F.random_scores(
            feats.shape[0], feats.shape[1], seed=self.config.seed, device=feats.device
        )
