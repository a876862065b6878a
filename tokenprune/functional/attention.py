"""Attention quantities recomputed from a block's input, independent of the attention kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenprune.errors import ShapeError

__all__ = ["cls_attention"]


def cls_attention(
    normed: torch.Tensor,
    q_proj: Callable[[torch.Tensor], torch.Tensor],
    k_proj: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_heads: int,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    r"""Head-averaged attention of the [CLS] query over the patch tokens.

    .. math::
        a = \frac{1}{H} \sum_h \mathrm{softmax}\left(\frac{q_{cls,h} K_h^\top}{\sqrt{d}}\right)

    restricted to the patch columns (the softmax runs over all tokens, [CLS] included, as in the
    model). Only one query row is computed, so the cost is :math:`O(N)` per head and it does not
    matter whether the tower itself runs eager, SDPA or flash attention. The math runs in
    float32; the result is float32.

    Args:
        normed: Block input after the block's pre-attention LayerNorm, [CLS] first.
        q_proj: Query projection of the block.
        k_proj: Key projection of the block.
        num_heads: Number of heads ``H``.
        num_prefix_tokens: Leading non-patch tokens ([CLS], registers) excluded from the output.

    Returns:
        Attention from [CLS] to each patch, averaged over heads.

    Raises:
        ShapeError: If ``normed`` is not 3-D or the width is not divisible by ``num_heads``.

    Shape:
        - normed: :math:`(B, P + N, C)`
        - output: :math:`(B, N)`

    Examples:
        >>> x = torch.randn(2, 5, 8)
        >>> eye = torch.nn.Identity()
        >>> a = cls_attention(x, eye, eye, num_heads=2)
        >>> a.shape, bool(torch.all(a.sum(-1) <= 1.0 + 1e-6))
        (torch.Size([2, 4]), True)
    """
    if normed.ndim != 3:
        raise ShapeError(f"normed hidden state must be (B, T, C), got {tuple(normed.shape)}")
    b, t, c = normed.shape
    if c % num_heads:
        raise ShapeError(f"hidden width {c} is not divisible by num_heads={num_heads}")
    head_dim = c // num_heads
    q = q_proj(normed[:, :1]).float().view(b, num_heads, head_dim)
    if isinstance(k_proj, torch.nn.Linear) and k_proj.out_features == c:
        # Fold the key projection into the query: q_h . (W_h x + b_h) = (W_h^T q_h) . x + q_h . b_h,
        # O(T C H) instead of projecting every token (O(T C^2)).
        weight = k_proj.weight.float().view(num_heads, head_dim, -1)
        folded = torch.einsum("bhd,hdc->bhc", q, weight)
        logits = torch.einsum("btc,bhc->bht", normed.float(), folded)
        if k_proj.bias is not None:
            logits = logits + (q * k_proj.bias.float().view(num_heads, head_dim)).sum(-1)[..., None]
    else:
        k = k_proj(normed).float().view(b, t, num_heads, head_dim)
        logits = torch.einsum("bhd,bthd->bht", q, k)
    attn = (logits * head_dim**-0.5).softmax(dim=-1)[:, :, num_prefix_tokens:]
    result: torch.Tensor = attn.mean(dim=1)
    return result
