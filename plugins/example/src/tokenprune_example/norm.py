"""Feature-norm scorer: keep the visual tokens whose features have the largest L2 norm.

A scorer is a pure function on tensors (the *functional twin*, usable without tokenprune's
pipeline) plus a thin :class:`~tokenprune.Scorer` shell that reads its input from the
:class:`~tokenprune.PruneContext` and carries a frozen pydantic config.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune import PruneContext, Scorer, ShapeError, StageConfig

__all__ = ["FeatureNormScorer", "FeatureNormScorerConfig", "feature_norm_scores"]


def feature_norm_scores(features: torch.Tensor) -> torch.Tensor:
    r"""L2 norm of each token's feature vector.

    .. math::
        s_{b,n} = \lVert x_{b,n} \rVert_2 = \sqrt{\textstyle\sum_d x_{b,n,d}^2}

    The norm is computed in float32, so half-precision features with large activations do not
    overflow; the result is float32.

    Args:
        features: Visual token features.

    Returns:
        One score per token; higher means more worth keeping.

    Raises:
        ShapeError: If ``features`` is not a 3-D floating-point tensor.

    Shape:
        - features: :math:`(B, N, D)`
        - output: :math:`(B, N)`, float32

    Examples:
        >>> x = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
        >>> feature_norm_scores(x)
        tensor([[5., 1.]])
    """
    if features.ndim != 3:
        raise ShapeError(
            f"feature_norm_scores needs features of shape (B, N, D), got {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise ShapeError(f"features must be a floating-point tensor, got {features.dtype}")
    norms: torch.Tensor = torch.linalg.vector_norm(features.float(), ord=2, dim=-1)
    return norms


class FeatureNormScorerConfig(StageConfig):
    """Configuration of :class:`FeatureNormScorer` (no options besides the name).

    Attributes:
        name: Registry key; selects this scorer in a pipeline config
            (``scorer: {name: feature_norm}``).
    """

    name: Literal["feature_norm"] = "feature_norm"


class FeatureNormScorer(Scorer[FeatureNormScorerConfig]):
    """Score each visual token by the L2 norm of its features (see :func:`feature_norm_scores`).

    It reads only ``ctx.visual.features`` (for LLaVA, the vision-tower features the projector
    consumes), so it declares no required capabilities and works with every adapter.

    Shape:
        - output: :math:`(B, N)`, float32

    Examples:
        >>> from tokenprune import PruneContext, VisualTokens
        >>> features = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
        >>> ctx = PruneContext(visual=VisualTokens(features), keep=1)
        >>> FeatureNormScorer().score(ctx)
        tensor([[5., 1.]])
    """

    name: ClassVar[str] = "feature_norm"
    Config: ClassVar[type[StageConfig]] = FeatureNormScorerConfig

    def score(self, ctx: PruneContext) -> torch.Tensor:
        return feature_norm_scores(ctx.visual.features)
