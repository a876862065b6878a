"""Attention each token receives: the saliency substitute for vision towers without [CLS]."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenprune.errors import ShapeError

__all__ = ["Rotary", "received_attention"]

Rotary = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Rotary position embedding applied to queries and keys, ``(q, k) -> (q', k')``, both
:math:`(B, T, H, d)` (heads split, before the attention logits)."""


def received_attention(
    normed: torch.Tensor,
    q_proj: Callable[[torch.Tensor], torch.Tensor],
    k_proj: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_heads: int,
    num_prefix_tokens: int = 0,
    rotary: Rotary | None = None,
    segments: torch.Tensor | None = None,
    group_size: int = 1,
    chunk_size: int = 256,
    scale: float | None = None,
) -> torch.Tensor:
    r"""Head-averaged attention each token receives, averaged over the queries that see it.

    For a token :math:`j` in attention segment :math:`S(j)` (all tokens when ``segments`` is
    ``None``):

    .. math::
        r_j = \frac{1}{H\,|S(j)|} \sum_h \sum_{i \in S(j)}
              \operatorname{softmax}_{j' \in S(i)}\left(s\, q_{i,h} \cdot k_{j',h}\right)_j

    i.e. the column mean of the head-averaged attention map, where tokens attend only within
    their own segment (Qwen2.5-VL's ``cu_seqlens``: one segment per image, or per window in
    window-attention blocks). ``rotary`` is applied to the split heads before the logits, as the
    model does. The prefix tokens act as queries but are dropped from the output; then each run
    of ``group_size`` consecutive tokens is averaged into one value (Qwen2.5-VL: the 4 patches
    of a 2x2 merge group, giving one score per language-model token).

    Queries are processed ``chunk_size`` rows at a time, so at most a
    :math:`(B, H, \text{chunk\_size}, |S|)` slice of attention is held at once, never the full
    map. The math runs in float32 (float64 for float64 inputs).

    Args:
        normed: Block input after the block's pre-attention norm, prefix tokens first.
        q_proj: Query projection (token-wise, output width ``H * d``).
        k_proj: Key projection (token-wise, output width ``H * d``).
        num_heads: Number of heads ``H``.
        num_prefix_tokens: Leading non-patch tokens ([CLS], registers) left out of the output.
        rotary: Rotary embedding applied to the split queries and keys, or ``None``.
        segments: Segment id of every token; tokens attend only to tokens with the same id.
        group_size: Consecutive tokens averaged into one output value.
        chunk_size: Query rows per chunk (positive).
        scale: Logit scale; ``d ** -0.5`` by default.

    Returns:
        Received attention per token (per group), float32 or float64.

    Raises:
        ShapeError: If shapes do not fit (widths not divisible by ``num_heads``, ``segments`` of
            the wrong length, token count not divisible by ``group_size``) or an argument is out
            of range.

    Shape:
        - normed: :math:`(B, P + N, C)`
        - segments: :math:`(P + N,)`
        - output: :math:`(B, N / \text{group\_size})`

    Examples:
        >>> x = torch.zeros(1, 4, 2)  # constant keys: uniform attention
        >>> eye = torch.nn.Identity()
        >>> received_attention(x, eye, eye, num_heads=1, chunk_size=3)
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
        >>> received_attention(x, eye, eye, num_heads=1, segments=torch.tensor([0, 0, 0, 1]))
        tensor([[0.3333, 0.3333, 0.3333, 1.0000]])
        >>> received_attention(x, eye, eye, num_heads=1, group_size=2)
        tensor([[0.2500, 0.2500]])
    """
    if normed.ndim != 3:
        raise ShapeError(f"normed hidden state must be (B, T, C), got {tuple(normed.shape)}")
    if num_heads < 1 or chunk_size < 1 or group_size < 1 or num_prefix_tokens < 0:
        raise ShapeError(
            "num_heads, chunk_size and group_size must be positive and num_prefix_tokens "
            f"non-negative, got {num_heads}, {chunk_size}, {group_size}, {num_prefix_tokens}"
        )
    b, t, _ = normed.shape
    n = t - num_prefix_tokens
    if n < 1 or n % group_size:
        raise ShapeError(
            f"{t} tokens minus {num_prefix_tokens} prefix tokens must be a positive multiple of "
            f"group_size={group_size}"
        )
    if segments is not None and tuple(segments.shape) != (t,):
        raise ShapeError(
            f"segments must hold one id per token, shape ({t},), got {tuple(segments.shape)}"
        )
    q = _heads(q_proj(normed), b, t, num_heads, "q_proj")
    k = _heads(k_proj(normed), b, t, num_heads, "k_proj")
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"q_proj and k_proj widths differ: {q.shape[-1]} vs {k.shape[-1]}")
    if rotary is not None:
        q, k = rotary(q, k)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    q = q.to(dtype).transpose(1, 2)  # (B, H, T, d)
    k = k.to(dtype).transpose(1, 2)
    if scale is None:
        scale = q.shape[-1] ** -0.5

    received = torch.zeros(b, t, dtype=dtype, device=normed.device)
    if segments is None:
        received = _segment_received(q, k, scale, chunk_size)
    else:
        for seg in torch.unique(segments):
            idx = torch.nonzero(segments == seg).flatten().to(normed.device)
            received[:, idx] = _segment_received(q[:, :, idx], k[:, :, idx], scale, chunk_size)
    out = received[:, num_prefix_tokens:]
    return out.view(b, n // group_size, group_size).mean(dim=-1)


def _heads(x: torch.Tensor, b: int, t: int, num_heads: int, name: str) -> torch.Tensor:
    if x.ndim != 3 or tuple(x.shape[:2]) != (b, t) or x.shape[-1] % num_heads:
        raise ShapeError(
            f"{name} must return (B, T, H * d) = ({b}, {t}, {num_heads} * d), got {tuple(x.shape)}"
        )
    return x.view(b, t, num_heads, x.shape[-1] // num_heads)


def _segment_received(
    q: torch.Tensor, k: torch.Tensor, scale: float, chunk_size: int
) -> torch.Tensor:
    """Column mean over queries and heads of ``softmax(q k^T)`` for one segment, in chunks."""
    heads, tokens = q.shape[1], q.shape[2]
    k_t = k.transpose(-1, -2) * scale
    total = torch.zeros(q.shape[0], tokens, dtype=q.dtype, device=q.device)
    for start in range(0, tokens, chunk_size):
        attn = torch.softmax(q[:, :, start : start + chunk_size] @ k_t, dim=-1)
        total += attn.sum(dim=(1, 2))
    return total / (heads * tokens)
