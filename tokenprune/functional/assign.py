"""Assigning tokens to kept tokens and averaging each group: the merge step of merging methods.

A merge that *partitions* the tokens (ToMe, spatial pooling, VisionZip's contextual tokens) is
fully described by an assignment: the output slot each original token belongs to. The output
token is then a (weighted) mean of its members, and its weight the members' total weight, so the
total weight over all outputs equals the total weight of the tokens that were assigned.
"""

from __future__ import annotations

import torch

from tokenprune.errors import ShapeError

__all__ = ["check_keep_indices", "cluster_mean", "cosine_similarity", "nearest_assignment"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the merging math runs in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_keep_indices(keep_idx: torch.Tensor, *, batch: int, num_tokens: int) -> None:
    """Check that ``keep_idx`` is a ``(batch, K)`` long tensor of increasing in-range indices.

    Args:
        keep_idx: Kept token indices.
        batch: Expected batch size ``B``.
        num_tokens: Number of tokens ``N`` the indices point into.

    Raises:
        ShapeError: On a wrong shape or dtype, an index outside ``[0, N)``, or a row that is not
            strictly increasing.

    Shape:
        - keep_idx: :math:`(B, K)`

    Examples:
        >>> check_keep_indices(torch.tensor([[0, 3]]), batch=1, num_tokens=4)
    """
    if keep_idx.ndim != 2 or keep_idx.dtype != torch.long or keep_idx.shape[0] != batch:
        raise ShapeError(
            f"keep_idx must be a (B, K) long tensor with B={batch}, got {keep_idx.dtype} "
            f"{tuple(keep_idx.shape)}"
        )
    if keep_idx.numel() and (int(keep_idx.min()) < 0 or int(keep_idx.max()) >= num_tokens):
        raise ShapeError(f"keep_idx has indices outside [0, {num_tokens})")
    if keep_idx.shape[1] > 1 and not bool((keep_idx[:, 1:] > keep_idx[:, :-1]).all()):
        raise ShapeError("keep_idx must be strictly increasing per row (sorted, no duplicates)")


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Batched cosine similarity of every row of ``a`` with every row of ``b``.

    .. math::
        S_{ij} = \frac{a_i \cdot b_j}{\max(\lVert a_i \rVert, \epsilon)\,
        \max(\lVert b_j \rVert, \epsilon)}

    with :math:`\epsilon = 10^{-12}` (a zero vector is orthogonal to everything). The math runs
    in float32, or float64 for float64 inputs.

    Shape:
        - a: :math:`(B, M, C)`
        - b: :math:`(B, L, C)`
        - output: :math:`(B, M, L)`

    Examples:
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
        >>> cosine_similarity(x, x)
        tensor([[[1., 0.],
                 [0., 1.]]])
    """
    dtype = compute_dtype(a.dtype)
    an = torch.nn.functional.normalize(a.to(dtype), dim=-1)
    bn = torch.nn.functional.normalize(b.to(dtype), dim=-1)
    return an @ bn.transpose(-1, -2)


def nearest_assignment(metric: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Assign every token to its most similar kept token (cosine similarity of ``metric``).

    Kept tokens are assigned to themselves; ties go to the kept token with the lower index.

    Args:
        metric: Per-token vectors whose cosine similarity decides the assignment.
        keep_idx: Kept token indices, strictly increasing per row.

    Returns:
        The position in ``keep_idx`` (``0 .. K-1``) of each token's kept token.

    Raises:
        ShapeError: If the shapes disagree or ``keep_idx`` is invalid.

    Shape:
        - metric: :math:`(B, N, C)`
        - keep_idx: :math:`(B, K)`
        - output: :math:`(B, N)`, long

    Examples:
        >>> m = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0]]])
        >>> nearest_assignment(m, torch.tensor([[0, 2]]))
        tensor([[0, 0, 1, 1]])
    """
    if metric.ndim != 3:
        raise ShapeError(f"metric must be (B, N, C), got {tuple(metric.shape)}")
    b, n, _ = metric.shape
    check_keep_indices(keep_idx, batch=b, num_tokens=n)
    kept = metric.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
    assignment = cosine_similarity(metric, kept).argmax(dim=-1)
    positions = torch.arange(keep_idx.shape[1], device=keep_idx.device).expand_as(keep_idx)
    return assignment.scatter(1, keep_idx, positions)


def cluster_mean(
    features: torch.Tensor,
    assignment: torch.Tensor,
    num_clusters: int,
    *,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Weighted mean of the tokens assigned to each output slot, and each slot's total weight.

    .. math::
        y_c = \frac{\sum_{j : a_j = c} w_j x_j}{\sum_{j : a_j = c} w_j}, \qquad
        s_c = \sum_{j : a_j = c} w_j

    A token assigned ``-1`` belongs to no slot (it is discarded); a slot without members gives
    zeros with weight 0. The sums run as one batched matrix product (deterministic on every
    device) in float32, or float64 for float64 inputs; the features come back in the input
    dtype.

    Args:
        features: Token features.
        assignment: Output slot of each token, in ``[0, num_clusters)``, or ``-1``.
        num_clusters: Number of output slots ``K``.
        weights: Weight of each token; all ones if omitted.

    Returns:
        ``(merged, total_weight)``.

    Raises:
        ShapeError: If the shapes disagree or an assignment is out of range.

    Shape:
        - features: :math:`(B, N, D)`
        - assignment: :math:`(B, N)`, long
        - weights: :math:`(B, N)`
        - output: :math:`(B, K, D)` and :math:`(B, K)`

    Examples:
        >>> x = torch.tensor([[[0.0], [2.0], [10.0]]])
        >>> merged, size = cluster_mean(x, torch.tensor([[0, 0, 1]]), 2)
        >>> merged.flatten().tolist(), size.flatten().tolist()
        ([1.0, 10.0], [2.0, 1.0])
    """
    if features.ndim != 3 or tuple(assignment.shape) != tuple(features.shape[:2]):
        raise ShapeError(
            f"cluster_mean needs features (B, N, D) and an assignment (B, N), got "
            f"{tuple(features.shape)} and {tuple(assignment.shape)}"
        )
    if assignment.numel() and (int(assignment.min()) < -1 or int(assignment.max()) >= num_clusters):
        raise ShapeError(f"assignment values must lie in [-1, {num_clusters})")
    dtype = compute_dtype(features.dtype)
    slots = torch.arange(num_clusters, device=features.device)
    onehot = (assignment.unsqueeze(1) == slots.view(1, -1, 1)).to(dtype)  # (B, K, N)
    if weights is not None:
        if tuple(weights.shape) != tuple(assignment.shape):
            raise ShapeError(
                f"weights must be (B, N) = {tuple(assignment.shape)}, got {tuple(weights.shape)}"
            )
        onehot = onehot * weights.to(dtype).unsqueeze(1)
    sums = onehot @ features.to(dtype)
    total = onehot.sum(dim=-1)
    merged = torch.where(total.unsqueeze(-1) > 0, sums / total.clamp_min(1e-30).unsqueeze(-1), 0.0)
    return merged.to(features.dtype), total.to(features.dtype)
