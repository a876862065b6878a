"""Gathering tokens and seeded random scores."""

from __future__ import annotations

import torch

from tokenprune.errors import ShapeError

__all__ = ["gather_tokens", "random_scores"]


def gather_tokens(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather tokens by per-image indices.

    Args:
        features: Token features.
        indices: Long indices into the token dimension.

    Returns:
        The gathered tokens.

    Raises:
        ShapeError: If the batch sizes differ or an index is out of range.

    Shape:
        - features: :math:`(B, N, D)`
        - indices: :math:`(B, K)`
        - output: :math:`(B, K, D)`

    Examples:
        >>> x = torch.arange(6.0).view(1, 3, 2)
        >>> gather_tokens(x, torch.tensor([[0, 2]]))
        tensor([[[0., 1.],
                 [4., 5.]]])
    """
    if features.ndim != 3 or indices.ndim != 2 or features.shape[0] != indices.shape[0]:
        raise ShapeError(
            f"gather_tokens needs features (B, N, D) and indices (B, K) with the same B, got "
            f"{tuple(features.shape)} and {tuple(indices.shape)}"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= features.shape[1]):
        raise ShapeError(f"indices must lie in [0, {features.shape[1]}), got a value outside")
    return features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def random_scores(
    batch: int, num_tokens: int, *, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Uniform random scores from a private, seeded generator (the global RNG is untouched).

    The same ``seed`` gives the same scores on every call, so random pruning is reproducible.

    Shape:
        - output: :math:`(B, N)`, float32

    Examples:
        >>> a = random_scores(2, 5, seed=0); b = random_scores(2, 5, seed=0)
        >>> bool((a == b).all())
        True
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(batch, num_tokens, generator=generator).to(device)
