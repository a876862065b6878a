r"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): max-min diversity selection.

The kept set should be as diverse as possible: DivPrune solves the Max-Min Diversity Problem
greedily, adding one token at a time, the one farthest (cosine distance) from the set so far.
"""

from __future__ import annotations

import math

import torch

from tokenprune.errors import BudgetError, ShapeError
from tokenprune.functional.assign import cosine_similarity

__all__ = ["divprune_keep_indices"]


def divprune_keep_indices(features: torch.Tensor, keep: int) -> torch.Tensor:
    r"""Greedy max-min diverse subset of ``keep`` tokens per image.

    With the cosine distance :math:`D_{ij} = 1 - \cos(f_i, f_j)`:

    1. the first token is the most isolated one, :math:`\arg\max_i \min_{j \ne i} D_{ij}`
       (the official code's second-smallest entry of each column of :math:`D`, the smallest
       being the token itself);
    2. then, with :math:`S` the tokens chosen so far, :math:`i^* = \arg\max_{i \notin S}
       \min_{s \in S} D_{s i}`, until ``keep`` tokens are chosen.

    Ties go to the lower index. Chosen tokens are excluded explicitly (the official code relies
    on their zero self-distance, which picks a token twice when features repeat). One
    :math:`N \times N` distance matrix per image, then ``keep`` steps of :math:`O(N)`.

    Args:
        features: Token features (DivPrune: the projected visual tokens).
        keep: Tokens per image ``K``.

    Returns:
        Kept indices, strictly increasing per row.

    Raises:
        ShapeError: If ``features`` is not 3-D.
        BudgetError: If ``keep`` is out of range.

    Shape:
        - features: :math:`(B, N, D)`
        - output: :math:`(B, K)`, long

    Examples:
        >>> f = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7]]])
        >>> divprune_keep_indices(f, 2)
        tensor([[0, 2]])
    """
    if features.ndim != 3:
        raise ShapeError(f"features must be (B, N, D), got {tuple(features.shape)}")
    b, n, _ = features.shape
    if not 1 <= keep <= n:
        raise BudgetError(f"keep={keep} is out of range for N={n} tokens; use 1 <= keep <= {n}")
    distance = 1.0 - cosine_similarity(features, features)  # (B, N, N)
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    isolation = distance.masked_fill(eye, math.inf).amin(dim=1)  # nearest-neighbour distance
    isolation = isolation.masked_fill(torch.isinf(isolation), 0.0)  # N = 1
    first = isolation.argmax(dim=1)
    chosen = [first]
    taken = torch.zeros(b, n, dtype=torch.bool, device=features.device)
    taken.scatter_(1, first.unsqueeze(1), True)
    rows = torch.arange(b, device=features.device)
    nearest = distance[rows, first]  # min distance of every token to the chosen set, (B, N)
    for _ in range(keep - 1):
        pick = nearest.masked_fill(taken, -math.inf).argmax(dim=1)
        chosen.append(pick)
        taken[rows, pick] = True
        nearest = torch.minimum(nearest, distance[rows, pick])
    return torch.stack(chosen, dim=1).sort(dim=-1).values
