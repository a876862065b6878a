"""Shape and value guards with messages that name the tensor and the expected shape."""

from __future__ import annotations

import torch

from tokenprune.errors import ShapeError

__all__ = ["check_features", "check_scores"]


def check_scores(
    scores: torch.Tensor, *, batch: int, num_tokens: int, name: str = "scores"
) -> None:
    """Check that ``scores`` is a finite floating-point ``(batch, num_tokens)`` tensor.

    Args:
        scores: Scores to check.
        batch: Expected batch size ``B``.
        num_tokens: Expected number of tokens ``N``.
        name: Name used in error messages.

    Raises:
        ShapeError: On a wrong shape, a non-floating dtype, or NaN/Inf values.

    Shape:
        - scores: :math:`(B, N)`

    Examples:
        >>> check_scores(torch.zeros(2, 5), batch=2, num_tokens=5)
    """
    if tuple(scores.shape) != (batch, num_tokens):
        raise ShapeError(
            f"{name} must be (B, N) = {(batch, num_tokens)}, got {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise ShapeError(f"{name} must be a floating-point tensor, got {scores.dtype}")
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise ShapeError(
            f"{name} contains {bad} NaN/Inf values; check the model's dtype (float16 overflow) "
            "and the scorer's inputs"
        )


def check_features(features: torch.Tensor, *, name: str = "features") -> None:
    """Check that ``features`` is a finite floating-point ``(B, N, D)`` tensor.

    Args:
        features: Token features to check.
        name: Name used in error messages.

    Raises:
        ShapeError: On a wrong rank, a non-floating dtype, or NaN/Inf values.

    Shape:
        - features: :math:`(B, N, D)`

    Examples:
        >>> check_features(torch.zeros(1, 4, 8))
    """
    if features.ndim != 3:
        raise ShapeError(f"{name} must be (B, N, D), got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ShapeError(f"{name} must be a floating-point tensor, got {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise ShapeError(
            f"{name} contains NaN/Inf values before pruning; the vision tower produced invalid "
            "activations (try float32 or bfloat16 instead of float16)"
        )
