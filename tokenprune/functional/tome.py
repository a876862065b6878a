r"""Token Merging (Bolya et al., ICLR 2023, arXiv 2210.09461): bipartite soft matching.

ToMe merges similar tokens instead of dropping them: the tokens are split alternately into two
sets A and B, every A token is matched to its most similar B token, and the ``r`` most similar
pairs are merged by a size-weighted average. Repeating the step until ``K`` tokens remain gives
a partition of the ``N`` tokens into ``K`` groups; each output token is the mean of its group
(size-weighted averages compose into the plain mean of the original tokens).
"""

from __future__ import annotations

import torch

from tokenprune.errors import BudgetError, ShapeError
from tokenprune.functional.assign import compute_dtype

__all__ = ["tome_partition", "tome_round_sizes"]


def tome_round_sizes(num_tokens: int, keep: int, r: int | None = None) -> list[int]:
    r"""How many tokens each bipartite round merges to go from ``num_tokens`` to ``keep``.

    Round :math:`t` merges :math:`r_t = \min(r, n_t - K, \lfloor n_t / 2 \rfloor)` tokens, where
    :math:`n_t` tokens remain (ToMe caps ``r`` at the size of the smaller set), so ``r=None``
    (no cap) reaches ``K`` in the fewest rounds.

    Raises:
        BudgetError: If ``keep`` is out of range or ``r < 1``.

    Examples:
        >>> tome_round_sizes(576, 64)
        [288, 144, 72, 8]
        >>> tome_round_sizes(10, 6, r=3)
        [3, 1]
    """
    if not 1 <= keep <= num_tokens:
        raise BudgetError(
            f"keep={keep} is out of range for N={num_tokens} tokens; use 1 <= keep <= {num_tokens}"
        )
    if r is not None and r < 1:
        raise BudgetError(f"r must be at least 1, got {r}")
    sizes = []
    n = num_tokens
    while n > keep:
        step = min(n - keep, n // 2, r if r is not None else n)
        sizes.append(step)
        n -= step
    return sizes


def tome_partition(
    metric: torch.Tensor, keep: int, *, r: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Merge ``N`` tokens into ``keep`` groups by repeated bipartite soft matching.

    Each round, on the :math:`n` current tokens in raster order of their representatives:

    1. A = the tokens at even positions, B = the tokens at odd positions;
    2. every :math:`a \in A` is matched to :math:`b(a) = \arg\max_b \cos(m_a, m_b)` (ties to
       the first B token), with edge score :math:`\cos(m_a, m_{b(a)})`;
    3. the :math:`r_t` A tokens with the highest edge scores (ties to the first) merge into
       their match: sizes add, and the metric becomes the size-weighted mean
       :math:`m_b \leftarrow (s_b m_b + \sum_a s_a m_a) / (s_b + \sum_a s_a)`;
    4. the merged A tokens disappear; every other token keeps its place, so the order stays
       the raster order of the representatives.

    The representative of a group is its B-side survivor's original token (unmerged tokens
    represent themselves). ToMe concatenates ``[unmerged A; B]`` after a round, so its next
    split differs from this order-preserving one from the second round on.

    Args:
        metric: Per-token vectors whose cosine similarity drives the matching (ToMe: the keys
            averaged over heads).
        keep: Number of groups ``K``.
        r: Cap on the tokens merged per round (see :func:`tome_round_sizes`); ``None`` merges
            as many as ToMe allows.

    Returns:
        ``(keep_idx, assignment)``: the representatives' original indices, strictly
        increasing, and the group (position in ``keep_idx``) of every original token.

    Raises:
        ShapeError: If ``metric`` is not 3-D.
        BudgetError: If ``keep`` is out of range or ``r < 1``.

    Shape:
        - metric: :math:`(B, N, C)`
        - output: :math:`(B, K)` and :math:`(B, N)`, long

    Examples:
        >>> m = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
        >>> keep_idx, groups = tome_partition(m, 2)
        >>> keep_idx.tolist(), groups.tolist()
        ([[1, 3]], [[0, 0, 1, 1]])
    """
    if metric.ndim != 3:
        raise ShapeError(f"metric must be (B, N, C), got {tuple(metric.shape)}")
    b, n, _ = metric.shape
    rounds = tome_round_sizes(n, keep, r)
    device = metric.device
    current = metric.to(compute_dtype(metric.dtype))  # (B, n, C), merged metric
    size = torch.ones(b, n, dtype=current.dtype, device=device)
    rep = torch.arange(n, device=device).expand(b, n)  # representative of each current token
    owner = torch.arange(n, device=device).expand(b, n)  # current position of each token's group
    for merged in rounds:
        count = current.shape[1]
        a_pos = torch.arange(0, count, 2, device=device)
        b_pos = torch.arange(1, count, 2, device=device)
        normed = torch.nn.functional.normalize(current, dim=-1)
        score = normed[:, a_pos] @ normed[:, b_pos].transpose(1, 2)  # (B, |A|, |B|)
        best, match = score.max(dim=-1)
        edge = torch.sort(best, dim=-1, descending=True, stable=True).indices
        is_src = torch.zeros_like(best, dtype=torch.bool)
        is_src.scatter_(1, edge[:, :merged], True)
        # Size-weighted merge of the metric into the B tokens (a one-hot product: deterministic).
        onehot = match.unsqueeze(1) == torch.arange(len(b_pos), device=device).view(1, -1, 1)
        onehot = onehot & is_src.unsqueeze(1)  # (B, |B|, |A|)
        w = onehot.to(current.dtype) * size[:, a_pos].unsqueeze(1)
        b_size = size[:, b_pos] + w.sum(dim=-1)
        b_sum = size[:, b_pos].unsqueeze(-1) * current[:, b_pos] + w @ current[:, a_pos]
        current = current.clone()
        size = size.clone()
        current[:, b_pos] = b_sum / b_size.unsqueeze(-1)
        size[:, b_pos] = b_size
        # Drop the merged A tokens, keeping the order of the rest.
        survive = torch.ones(b, count, dtype=torch.bool, device=device)
        survive[:, a_pos] = ~is_src
        new_pos = survive.long().cumsum(dim=1) - 1  # (B, count), valid for survivors
        dst_pos = new_pos[:, b_pos].gather(1, match)  # where each A token's match lands
        new_pos[:, a_pos] = torch.where(is_src, dst_pos, new_pos[:, a_pos])
        owner = new_pos.gather(1, owner)
        order = torch.sort((~survive).long(), dim=1, stable=True).indices[:, : count - merged]
        current = current.gather(1, order.unsqueeze(-1).expand(-1, -1, current.shape[-1]))
        size = size.gather(1, order)
        rep = rep.gather(1, order)
    return rep.contiguous(), owner.contiguous()
