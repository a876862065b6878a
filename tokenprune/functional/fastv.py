"""FastV's functional core: the attention one query row pays to every key, heads averaged."""

from __future__ import annotations

import torch

from tokenprune.errors import ShapeError

__all__ = ["query_row_attention"]


def query_row_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
) -> torch.Tensor:
    r"""Head-averaged attention of one query row over all keys (FastV's token score).

    .. math::
        a_t = \frac{1}{H} \sum_{h=1}^{H}
              \mathrm{softmax}_t\left(s \, q_h \cdot k_{g(h), t} + m_t\right)

    with scale :math:`s` (``head_dim ** -0.5`` by default), grouped-query heads
    :math:`g(h) = \lfloor h / (H / H_{kv}) \rfloor` (each key head serves ``H / H_kv``
    consecutive query heads, as ``repeat_kv`` in transformers), and the mask :math:`m`: ``0`` for
    an allowed key and :math:`-\infty` for a masked one (a boolean mask, ``True`` = attend), or
    added as it is (a float mask, as eager attention adds it). Only this one row is computed, so
    the cost is :math:`O(T)` per head whatever attention kernel the model runs. The math runs in
    float32; the result is float32. Queries and keys must already carry their rotary embedding.

    Args:
        query: The query row of each sequence, per head.
        keys: The keys of each sequence, per key head.
        mask: Which keys the query may attend to: boolean (``True`` = attend) or additive float.
            ``None``: every key.
        scaling: Logit scale; ``head_dim ** -0.5`` if ``None``.

    Returns:
        The attention paid to each key, averaged over the ``H`` query heads.

    Raises:
        ShapeError: If the shapes do not fit together, ``H`` is not a multiple of ``H_kv``, or a
            row has no allowed key.

    Shape:
        - query: :math:`(B, H, d)`
        - keys: :math:`(B, H_{kv}, T, d)`
        - mask: :math:`(B, T)`
        - output: :math:`(B, T)`, rows summing to 1

    Examples:
        >>> q = torch.randn(2, 4, 8)
        >>> k = torch.randn(2, 2, 5, 8)
        >>> mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
        >>> a = query_row_attention(q, k, mask)
        >>> a.shape, bool(torch.allclose(a.sum(-1), torch.ones(2))), float(a[1, 3:].sum())
        (torch.Size([2, 5]), True, 0.0)
    """
    if query.ndim != 3 or keys.ndim != 4:
        raise ShapeError(
            f"query must be (B, H, d) and keys (B, H_kv, T, d), got {tuple(query.shape)} and "
            f"{tuple(keys.shape)}"
        )
    b, heads, dim = query.shape
    kb, kv_heads, t, kdim = keys.shape
    if kb != b or kdim != dim:
        raise ShapeError(
            f"keys {tuple(keys.shape)} do not fit the query {tuple(query.shape)} (batch and "
            "head_dim must agree)"
        )
    if kv_heads < 1 or heads % kv_heads:
        raise ShapeError(f"{heads} query heads are not a multiple of {kv_heads} key heads")
    if mask is not None and tuple(mask.shape) != (b, t):
        raise ShapeError(f"mask must be (B, T) = {(b, t)}, got {tuple(mask.shape)}")
    scale = dim**-0.5 if scaling is None else scaling
    grouped = query.float().view(b, kv_heads, heads // kv_heads, dim)
    logits = torch.einsum("bgrd,bgtd->bgrt", grouped, keys.float()).reshape(b, heads, t) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            if not bool(mask.any(-1).all()):
                raise ShapeError("a query row has no key it may attend to (mask all False)")
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        else:
            logits = logits + mask[:, None, :].float()
    result: torch.Tensor = logits.softmax(dim=-1).mean(dim=1)
    return result
