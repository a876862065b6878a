"""Pure-tensor functional core of DeSAP.

Every function here is stateless, batched and vectorised, and needs only torch (no transformers,
no tokenprune), so any model or pipeline can call it. The DeSAP stages wrap these functions; the
equation numbers refer to the paper (Ma et al., "Decoupled Similarity for Task-Aware Token Pruning
in Large Vision-Language Models", arXiv 2604.11240) and to the implementation spec
``docs/desap.md``.

Numerics: similarities, softmaxes and averages are computed in at least float32 (float64 inputs
stay float64) even when the inputs are bfloat16/float16. Score maps are returned in that compute
dtype; features (:func:`decoupled_attention`, :func:`nearest_merge`) are cast back to the input
dtype.

Tie-breaking is deterministic everywhere: among equal scores the lower token index wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final, Literal

import torch
from torch import Tensor

__all__ = [
    "AttentionEncoding",
    "Projection",
    "cls_attention",
    "decoupled_attention",
    "fcma_relevance",
    "joint_rank_branches",
    "joint_rank_select",
    "l2_normalize",
    "mean_received_attention",
    "nearest_merge",
    "split_budget",
    "text_filter_mask",
]

Projection = Callable[[Tensor], Tensor]
"""A token-wise linear map ``(B, T, C) -> (B, T, W)``, e.g. an ``nn.Linear``."""

AttentionEncoding = Literal["qq", "qk", "vv", "kk"]
"""Which projections form the attention logits ``X_a X_b^T`` of Eq. 2 (the value is always V)."""

_ENCODINGS: Final[tuple[str, ...]] = ("qq", "qk", "vv", "kk")
_INTEGER_DTYPES: Final[frozenset[torch.dtype]] = frozenset(
    {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64}
)


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _fmt(shape: tuple[int, ...] | torch.Size) -> str:
    items = [str(int(s)) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _check_ndim(name: str, x: Tensor, dims: str) -> None:
    """Raise unless ``x`` has as many dimensions as the comma-separated names in ``dims``."""
    ndim = len([d for d in dims.strip("()").split(",") if d.strip()])
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor {dims}, got shape {_fmt(x.shape)}")


def _check_shape(name: str, x: Tensor, dims: str, expected: tuple[int, ...], why: str) -> None:
    """Raise ``"<name> must be <dims> = <expected> <why>, got <shape>"`` on mismatch."""
    _check_ndim(name, x, dims)
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must be {dims} = {_fmt(expected)} {why}, got {_fmt(x.shape)}")


def _check_integer(name: str, x: Tensor) -> None:
    if x.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"{name} must hold integer indices, got dtype {x.dtype}")


def _check_num_heads(num_heads: int) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32; float64 if any input is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _split_heads(y: object, batch: int, tokens: int, name: str, num_heads: int) -> Tensor:
    """Check a projection output (B, T, W) and split heads: (B, H, T, W / H) in compute dtype."""
    if not isinstance(y, Tensor) or y.ndim != 3 or tuple(y.shape[:2]) != (batch, tokens):
        got = _fmt(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(
            f"{name} must map (B, T, C) to (B, T, W) = ({batch}, {tokens}, W), got {got}"
        )
    width = y.shape[-1]
    if width % num_heads != 0:
        raise ValueError(f"{name} output width {width} is not divisible by num_heads = {num_heads}")
    y = y.to(_compute_dtype(y))
    return y.view(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def _project(proj: Projection, x: Tensor, name: str, num_heads: int) -> Tensor:
    """Apply ``proj`` to ``x`` (B, T, C) and split heads: (B, H, T, W / H) in compute dtype."""
    return _split_heads(proj(x), x.shape[0], x.shape[1], name, num_heads)


def _descending_order(scores: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Sort each row by descending score (ties: lower index first; excluded entries last)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if exclude is not None:
        # A second stable sort on the exclusion flag moves excluded entries to the end while
        # keeping the score order (and the index tie-break) within both groups.
        flags = exclude.gather(-1, order).to(torch.uint8)
        order = order.gather(-1, torch.sort(flags, dim=-1, stable=True).indices)
    return order


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    r"""L2-normalise ``x`` along ``dim`` in (at least) float32.

    .. math:: \hat{x} = x / \max(\lVert x \rVert_2, \epsilon)

    Rows with norm below ``eps`` (e.g. all-zero padding) map to (near) zero instead of NaN.

    Args:
        x: Tensor of any shape.
        dim: Dimension to normalise.
        eps: Lower bound on the norm.

    Returns:
        The normalised tensor, float32 (float64 if ``x`` is float64).

    Shape:
        - x: :math:`(*)`
        - output: same as ``x``

    Examples:
        >>> import torch
        >>> l2_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    return torch.nn.functional.normalize(x.to(_compute_dtype(x)), p=2.0, dim=dim, eps=eps)


def split_budget(k: int, task_fraction: float = 0.5) -> tuple[int, int]:
    r"""Split a kept-token budget ``k`` into task and saliency parts ``(k1, k2)``.

    .. math:: k_1 = \lfloor k \cdot f + \tfrac12 \rfloor, \qquad k_2 = k - k_1

    i.e. ``k * task_fraction`` rounded half up, so an odd split favours the task branch (spec O14:
    with ``task_fraction = 0.5`` and odd ``k``, ``k1 = (k + 1) // 2``).

    Args:
        k: Total number of kept tokens, ``k >= 0``.
        task_fraction: Share of the budget for the task-relevance branch, in ``[0, 1]``.

    Returns:
        ``(k1, k2)`` with ``k1 + k2 == k``.

    Raises:
        ValueError: If ``k`` is negative or not an int, or ``task_fraction`` is outside
            ``[0, 1]``.

    Examples:
        >>> split_budget(64)
        (32, 32)
        >>> split_budget(7)
        (4, 3)
        >>> split_budget(10, task_fraction=0.25)
        (3, 7)
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    if not 0.0 <= task_fraction <= 1.0:  # also rejects NaN
        raise ValueError(f"task_fraction must be in [0, 1], got {task_fraction!r}")
    k1 = min(max(math.floor(k * task_fraction + 0.5), 0), k)
    return k1, k - k1


# --------------------------------------------------------------------------------------------
# Eq. 2 and Eq. 4: attention maps of the last vision block
# --------------------------------------------------------------------------------------------


def decoupled_attention(
    hidden: Tensor,
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    out_proj: Projection,
    num_heads: int,
    encoding: AttentionEncoding = "qq",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Decoupled attention component :math:`A_d` of the last vision block (Eq. 2).

    .. math::
        A_d = \mathrm{proj}\Big(\big\Vert_{h=1}^{H}
              \mathrm{softmax}\big(X_a^h {X_b^h}^\top / \sqrt{d}\big)\, V^h\Big)

    where :math:`X_a, X_b \in \{Q, K, V\}` are chosen by ``encoding`` (``"qq"``: the paper's
    default query-query attention), :math:`V = \mathrm{proj}_v(x)`, :math:`d` is the per-head
    dimension, heads are concatenated (:math:`\Vert`) and ``proj`` is ``out_proj``. No residual
    and no FFN are added (Eq. 1).

    The projections run in the dtype of ``hidden``; logits, softmax and the weighted sum of values
    are computed in float32 and cast back to the value projection's output dtype before
    ``out_proj``. The projections must be token-wise (as ``nn.Linear`` is) and the projection
    outputs are used unscaled (HF CLIP applies the attention scale inside the attention, not in
    ``q_proj``). With ``chunk_size`` the query rows are processed in chunks, so at most a
    :math:`(B, H, \text{chunk\_size}, T)` slice of the attention is held at once (for long
    sequences such as Qwen2.5-VL's); the result is the same.

    Args:
        hidden: Block input **already normalised** by the block's pre-attention LayerNorm,
            i.e. ``ln(S_v^{l-1})``, including any [CLS]/prefix tokens.
        q_proj: Query projection of the block.
        k_proj: Key projection (used by the ``"qk"`` and ``"kk"`` encodings only).
        v_proj: Value projection.
        out_proj: Attention output projection.
        num_heads: Number of attention heads ``H``.
        encoding: ``"qq"``, ``"qk"``, ``"vv"`` or ``"kk"`` (Table 4b).
        chunk_size: Query rows per chunk; ``None`` computes all rows at once.

    Returns:
        :math:`A_d` for every position, in the output dtype of ``out_proj``.

    Raises:
        ValueError: If ``hidden`` is not 3-D, ``num_heads`` or ``chunk_size`` is not a positive
            int, ``encoding`` is unknown, or a projection returns a wrong shape or a width not
            divisible by ``num_heads``.

    Shape:
        - hidden: :math:`(B, T, C)`
        - output: :math:`(B, T, C')` where :math:`C'` is ``out_proj``'s output width (``C``
          for a ViT block)

    Examples:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> lin = torch.nn.Linear(8, 8)
        >>> hidden = torch.randn(2, 5, 8)
        >>> decoupled_attention(hidden, lin, lin, lin, lin, num_heads=2).shape
        torch.Size([2, 5, 8])
        >>> identity = torch.nn.Identity()
        >>> x = torch.tensor([[[1.0], [2.0]]])  # 2 tokens, width 1, 1 head
        >>> decoupled_attention(x, identity, identity, identity, identity, num_heads=1)
        tensor([[[1.7311],
                 [1.8808]]])
    """
    _check_ndim("hidden", hidden, "(B, T, C)")
    _check_num_heads(num_heads)
    if encoding not in _ENCODINGS:
        raise ValueError(f"encoding must be one of {_ENCODINGS}, got {encoding!r}")
    _check_chunk_size(chunk_size)
    if hidden.shape[1] == 0:
        raise ValueError("hidden must hold at least one token, got shape " + _fmt(hidden.shape))
    projections: dict[str, tuple[Projection, str]] = {
        "q": (q_proj, "q_proj"),
        "k": (k_proj, "k_proj"),
        "v": (v_proj, "v_proj"),
    }
    batch, tokens = hidden.shape[0], hidden.shape[1]
    value_raw = v_proj(hidden)
    heads = {"v": _split_heads(value_raw, batch, tokens, "v_proj", num_heads)}
    for key in encoding:
        if key not in heads:
            proj, name = projections[key]
            heads[key] = _project(proj, hidden, name, num_heads)
    a, b, v = heads[encoding[0]], heads[encoding[1]], heads["v"]
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"encoding {encoding!r} needs equal per-head widths, got {a.shape[-1]} and "
            f"{b.shape[-1]}"
        )
    step = tokens if chunk_size is None else chunk_size
    # softmax(a b^T / sqrt(d)) v through the fused SDPA kernel (one query chunk at a time when
    # chunk_size is set), so the (B, H, T, T) map is never materialised in Python.
    context = torch.cat(  # (B, H, T, d_v); loop over chunks of query rows, not tokens
        [
            torch.nn.functional.scaled_dot_product_attention(a[:, :, start : start + step], b, v)
            for start in range(0, tokens, step)
        ],
        dim=2,
    )
    context = context.transpose(1, 2).reshape(batch, tokens, -1).to(value_raw.dtype)
    out = out_proj(context)
    if not isinstance(out, Tensor) or out.ndim != 3 or tuple(out.shape[:2]) != (batch, tokens):
        got = _fmt(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"out_proj must return (B, T, C') = ({batch}, {tokens}, C'), got {got}")
    return out


def cls_attention(
    hidden: Tensor,
    q_proj: Projection,
    k_proj: Projection,
    num_heads: int,
    num_prefix_tokens: int = 1,
) -> Tensor:
    r"""Salient-semantic map :math:`A_s`: head-averaged [CLS] attention over the patches (Eq. 4).

    .. math::
        A_s[i] = \frac{1}{H} \sum_{h=1}^{H}
                 \mathrm{softmax}_j\big(q^h_{cls} {K^h}^\top / \sqrt{d}\big)_{i},
        \qquad i \in \text{patches}

    Only the [CLS] query row (token 0) is computed, so the cost is :math:`O(T)` per head. The
    softmax runs over **all** ``T`` keys (as in the model); the result is then restricted to the
    patch columns (``num_prefix_tokens:``), without renormalisation (spec O6: the CLS->CLS entry
    is excluded from :math:`A_s`).

    Args:
        hidden: Input of the attention layer, already normalised by the block's pre-attention
            LayerNorm; token 0 is [CLS], tokens ``num_prefix_tokens:`` are patches.
        q_proj: Query projection (token-wise).
        k_proj: Key projection (token-wise).
        num_heads: Number of attention heads ``H``.
        num_prefix_tokens: Number of leading non-patch tokens ([CLS] plus any register tokens),
            at least 1. For towers without [CLS] use :func:`mean_received_attention`.

    Returns:
        :math:`A_s`, float32 (float64 for float64 projections).

    Raises:
        ValueError: If shapes are wrong, ``num_prefix_tokens < 1`` or no patch token is left.

    Shape:
        - hidden: :math:`(B, T, C)`
        - output: :math:`(B, N)` with :math:`N = T - \text{num\_prefix\_tokens}`

    Examples:
        >>> import torch
        >>> identity = torch.nn.Identity()
        >>> x = torch.tensor([[[1.0], [0.0], [2.0]]])  # [CLS], 2 patches; width 1, 1 head
        >>> cls_attention(x, identity, identity, num_heads=1)
        tensor([[0.0900, 0.6652]])
    """
    _check_ndim("hidden", hidden, "(B, T, C)")
    _check_num_heads(num_heads)
    tokens = hidden.shape[1]
    if (
        isinstance(num_prefix_tokens, bool)
        or not isinstance(num_prefix_tokens, int)
        or num_prefix_tokens < 1
    ):
        raise ValueError(
            f"num_prefix_tokens must be >= 1 (token 0 is the [CLS] query), got "
            f"{num_prefix_tokens}; use mean_received_attention for towers without [CLS]"
        )
    if tokens <= num_prefix_tokens:
        raise ValueError(
            f"hidden has {tokens} tokens, need more than num_prefix_tokens = {num_prefix_tokens}"
        )
    q = _project(q_proj, hidden[:, :1], "q_proj", num_heads)  # (B, H, 1, d)
    k = _project(k_proj, hidden, "k_proj", num_heads)  # (B, H, T, d)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q_proj and k_proj need equal widths, got {q.shape[-1] * num_heads} and "
            f"{k.shape[-1] * num_heads}"
        )
    q, k = q.to(_compute_dtype(q, k)), k.to(_compute_dtype(q, k))
    attn = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return attn.mean(dim=1)[:, 0, num_prefix_tokens:]


def mean_received_attention(
    hidden: Tensor,
    q_proj: Projection,
    k_proj: Projection,
    num_heads: int,
    chunk_size: int = 256,
    num_prefix_tokens: int = 0,
) -> Tensor:
    r"""Saliency for towers without [CLS]: attention each token receives, averaged over queries.

    .. math::
        A_s[j] = \frac{1}{T} \sum_{i=1}^{T} \frac{1}{H} \sum_{h=1}^{H}
                 \mathrm{softmax}\big(Q^h {K^h}^\top / \sqrt{d}\big)_{ij}

    i.e. the column mean of the head-averaged attention map (spec §3.5, used for Qwen2.5-VL).
    Queries are processed ``chunk_size`` rows at a time, so at most a
    :math:`(B, H, \text{chunk\_size}, T)` slice of the attention is held at once. All ``T``
    tokens act as queries; the first ``num_prefix_tokens`` columns are dropped from the output
    (without renormalisation). With ``num_prefix_tokens = 0`` each row of the output sums to 1.

    Args:
        hidden: Input of the attention layer, already normalised by its pre-attention norm.
        q_proj: Query projection (token-wise).
        k_proj: Key projection (token-wise).
        num_heads: Number of attention heads ``H``.
        chunk_size: Number of query rows per chunk (positive).
        num_prefix_tokens: Leading non-patch tokens to drop from the output.

    Returns:
        The received-attention map, float32 (float64 for float64 projections).

    Raises:
        ValueError: If shapes are wrong, ``chunk_size < 1``, ``num_prefix_tokens < 0`` or no
            token is left.

    Shape:
        - hidden: :math:`(B, T, C)`
        - output: :math:`(B, N)` with :math:`N = T - \text{num\_prefix\_tokens}`

    Examples:
        >>> import torch
        >>> identity = torch.nn.Identity()
        >>> x = torch.tensor([[[0.0], [0.0], [0.0], [0.0]]])  # uniform attention
        >>> mean_received_attention(x, identity, identity, num_heads=1, chunk_size=3)
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    _check_ndim("hidden", hidden, "(B, T, C)")
    _check_num_heads(num_heads)
    _check_chunk_size(chunk_size)
    if (
        isinstance(num_prefix_tokens, bool)
        or not isinstance(num_prefix_tokens, int)
        or num_prefix_tokens < 0
    ):
        raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
    batch, tokens = hidden.shape[0], hidden.shape[1]
    if tokens <= num_prefix_tokens:
        raise ValueError(
            f"hidden has {tokens} tokens, need more than num_prefix_tokens = {num_prefix_tokens}"
        )
    q = _project(q_proj, hidden, "q_proj", num_heads)  # (B, H, T, d)
    k = _project(k_proj, hidden, "k_proj", num_heads)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q_proj and k_proj need equal widths, got {q.shape[-1] * num_heads} and "
            f"{k.shape[-1] * num_heads}"
        )
    dtype = _compute_dtype(q, k)
    q, k = q.to(dtype), k.to(dtype)
    k_t = k.transpose(-1, -2) * q.shape[-1] ** -0.5
    received = torch.zeros(batch, tokens, dtype=dtype, device=hidden.device)
    for start in range(0, tokens, chunk_size):  # loop over chunks of queries, not tokens
        attn = torch.softmax(q[:, :, start : start + chunk_size] @ k_t, dim=-1)
        received += attn.sum(dim=(1, 2))
    return (received / (num_heads * tokens))[:, num_prefix_tokens:]


# --------------------------------------------------------------------------------------------
# Eq. 3: task relevance with fine-grained cross-modal alignment
# --------------------------------------------------------------------------------------------


def fcma_relevance(
    visual: Tensor,
    visual_global: Tensor,
    text: Tensor,
    text_mask: Tensor | None,
    text_global: Tensor,
    *,
    lam: float = 0.1,
    align: bool = True,
) -> Tensor:
    r"""Task-relevance map :math:`A_t` with fine-grained cross-modal alignment (Eq. 3).

    All inputs are L2-normalised here (idempotent, so pre-normalised inputs are fine), so every
    dot product is a cosine similarity. With :math:`V` the :math:`d_1` visual (patch) rows,
    :math:`S` the :math:`d_2` valid text rows, :math:`v_s` the visual global token ([CLS] row of
    :math:`A_d`) and :math:`q_t` the text global token ([EOS]):

    .. math::
        m = V S^\top,\quad \alpha = V q_t^\top,\quad \beta = S v_s^\top

        M^V_{ij} = \frac{\alpha_i}{d_1} \cdot
            \frac{\exp(\lambda \beta_j m_{ij})}{\sum_{k=1}^{d_2} \exp(\lambda \beta_k m_{ik})},
        \qquad
        M^T_{ij} = \frac{\beta_j}{d_2} \cdot
            \frac{\exp(\lambda \alpha_i m_{ij})}{\sum_{k=1}^{d_1} \exp(\lambda \alpha_k m_{kj})}

        A_t[i] = \frac{1}{d_2} \sum_{j=1}^{d_2} \big((M^V + M^T) \odot m\big)_{ij}

    The :math:`1/d_1`, :math:`1/d_2` placement follows spec §3.4 (open point O7). ``d2`` is the
    per-sample number of valid text tokens: padded text tokens (``text_mask`` False) are excluded
    from the softmax over text, from the mean over text, and from :math:`d_2`; their values never
    affect the result (they may even be NaN). With ``align=False`` the score is the plain mean
    cosine :math:`A_t[i] = \frac{1}{d_2}\sum_j m_{ij}` (the "De-Simi" ablation) and
    ``visual_global``, ``text_global`` and ``lam`` are ignored. All math is in float32.

    Args:
        visual: Visual tokens in the joint space (DeSAP: patch rows of :math:`A_d` after
            ``post_layernorm`` and ``visual_projection``).
        visual_global: Visual global token :math:`v_s` (the [CLS] row of the same tensor).
        text: Text tokens in the joint space, padded to a common length ``T``.
        text_mask: True for valid (non-padded) text tokens; ``None`` means all valid.
        text_global: Text global token :math:`q_t` (the [EOS] embedding).
        lam: Alignment sharpness :math:`\lambda` (paper: 0.1), keyword-only.
        align: Apply FCMA (Eq. 3); False gives the mean cosine similarity. Keyword-only.

    Returns:
        :math:`A_t`, float32 (float64 if any input is float64).

    Raises:
        ValueError: On shape mismatches, a non-finite ``lam``, or a sample without any valid
            text token.

    Shape:
        - visual: :math:`(B, N, E)`
        - visual_global: :math:`(B, E)`
        - text: :math:`(B, T, E)`
        - text_mask: :math:`(B, T)`, bool (or 0/1)
        - text_global: :math:`(B, E)`
        - output: :math:`(B, N)`

    Examples:
        >>> import torch
        >>> visual = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> text = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # second text token is padding
        >>> mask = torch.tensor([[True, False]])
        >>> v_s, q_t = torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]])
        >>> fcma_relevance(visual, v_s, text, mask, q_t, align=False)
        tensor([[1., 0.]])
        >>> fcma_relevance(visual, v_s, text, mask, q_t, lam=0.1)
        tensor([[0.8150, 0.0000]])
    """
    _check_ndim("visual", visual, "(B, N, E)")
    batch, _, width = visual.shape
    _check_ndim("text", text, "(B, T, E)")
    tokens = text.shape[1]
    _check_shape("text", text, "(B, T, E)", (batch, tokens, width), "to match visual (B, N, E)")
    if text_mask is None:
        mask = torch.ones(batch, tokens, dtype=torch.bool, device=text.device)
    else:
        _check_shape("text_mask", text_mask, "(B, T)", (batch, tokens), "to match text")
        mask = text_mask.to(torch.bool)
    if tokens == 0 or not bool(mask.any(dim=-1).all()):
        raise ValueError("text_mask must mark at least one valid text token in every sample")
    if align:
        _check_shape("visual_global", visual_global, "(B, E)", (batch, width), "to match visual")
        _check_shape("text_global", text_global, "(B, E)", (batch, width), "to match visual")
        if not math.isfinite(lam):
            raise ValueError(f"lam must be a finite float, got {lam!r}")

    valid = mask[:, None, :]  # (B, 1, T)
    d2 = mask.sum(dim=-1).to(_compute_dtype(visual, text))[:, None]  # (B, 1)
    v = l2_normalize(visual)
    s = l2_normalize(text.masked_fill(~mask[..., None], 0.0))  # padding -> exact zeros
    dtype = _compute_dtype(v, s)
    v, s = v.to(dtype), s.to(dtype)
    m = v @ s.transpose(1, 2)  # (B, N, T); zero in padded columns
    if not align:
        return m.sum(dim=-1) / d2

    d1 = visual.shape[1]
    alpha = (v @ l2_normalize(text_global).to(dtype)[..., None]).squeeze(-1)  # (B, N)
    beta = (s @ l2_normalize(visual_global).to(dtype)[..., None]).squeeze(-1)  # (B, T)
    # M^V: softmax over the valid text tokens of each visual row.
    logits_v = (lam * beta[:, None, :] * m).masked_fill(~valid, float("-inf"))
    m_v = alpha[..., None] * torch.softmax(logits_v, dim=-1) / d1
    # M^T: softmax over the visual tokens of each text column (padded columns are dropped below).
    logits_t = lam * alpha[..., None] * m
    m_t = beta[:, None, :] * torch.softmax(logits_t, dim=1) / d2[..., None]
    m_vt = ((m_v + m_t) * m).masked_fill(~valid, 0.0)
    return m_vt.sum(dim=-1) / d2


# --------------------------------------------------------------------------------------------
# Eq. 5: dual-information rank and prune
# --------------------------------------------------------------------------------------------


def _check_scores(task_scores: Tensor, saliency_scores: Tensor) -> tuple[int, int]:
    _check_ndim("task_scores", task_scores, "(B, N)")
    _check_shape(
        "saliency_scores",
        saliency_scores,
        "(B, N)",
        tuple(task_scores.shape),
        "to match task_scores",
    )
    return task_scores.shape[0], task_scores.shape[1]


def joint_rank_branches(
    task_scores: Tensor,
    saliency_scores: Tensor,
    k: int,
    task_fraction: float = 0.5,
) -> tuple[Tensor, Tensor]:
    r"""Return the two branches of Eq. 5, each in rank order (best first).

    .. math::
        I_t = \operatorname{top-}k_1(A_t,\ V), \qquad
        I_s = \operatorname{top-}k_2(A_s,\ V \setminus I_t)

    with ``(k1, k2) = split_budget(k, task_fraction)``. Ties are broken towards the lower token
    index (stable sort), so results are deterministic. NaN scores rank above every number
    (``torch.sort`` semantics); sanitise scores beforehand if they may contain NaN.

    Args:
        task_scores: Task-relevance map :math:`A_t` (higher = keep).
        saliency_scores: Saliency map :math:`A_s` (higher = keep).
        k: Total number of kept tokens, ``1 <= k <= N``.
        task_fraction: Share of ``k`` filled by the task branch first, in ``[0, 1]``.

    Returns:
        ``(task_idx, saliency_idx)``: disjoint long indices, each row in rank order.

    Raises:
        ValueError: On shape mismatch, ``k`` outside ``[1, N]`` or ``task_fraction`` outside
            ``[0, 1]``.

    Shape:
        - task_scores, saliency_scores: :math:`(B, N)`
        - task_idx: :math:`(B, k_1)`; saliency_idx: :math:`(B, k_2)`

    Examples:
        >>> import torch
        >>> task = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3]])
        >>> saliency = torch.tensor([[0.9, 0.5, 0.1, 0.7, 0.2]])
        >>> joint_rank_branches(task, saliency, k=4)
        (tensor([[0, 2]]), tensor([[3, 1]]))
    """
    batch, tokens = _check_scores(task_scores, saliency_scores)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= tokens:
        raise ValueError(f"k must be an int in [1, N] = [1, {tokens}], got {k!r}")
    k1, k2 = split_budget(k, task_fraction)
    task_idx = _descending_order(task_scores)[:, :k1]
    taken = torch.zeros(batch, tokens, dtype=torch.bool, device=task_scores.device)
    taken.scatter_(1, task_idx.to(taken.device), True)
    saliency_idx = _descending_order(saliency_scores, exclude=taken.to(saliency_scores.device))
    return task_idx, saliency_idx[:, :k2]


def joint_rank_select(
    task_scores: Tensor,
    saliency_scores: Tensor,
    k: int,
    task_fraction: float = 0.5,
) -> Tensor:
    r"""Dual-information rank and prune (Eq. 5): kept indices in ascending (raster) order.

    .. math::
        I_t = \{ i \in V \mid \mathrm{rank}(i; A_t, V) \le k_1 \},\quad
        I_s = \{ i \in V \setminus I_t \mid \mathrm{rank}(i; A_s, V \setminus I_t) \le k_2 \},
        \quad I = I_t \cup I_s

    The task branch is filled first with ``k1 = floor(k * task_fraction + 1/2)`` tokens (round
    half up, so with the default 0.5 and odd ``k``, ``k1 = (k + 1) // 2``), then the saliency
    branch with ``k2 = k - k1`` tokens among the rest; see :func:`split_budget`. The branches are
    disjoint by construction, so the output has exactly ``k`` unique indices. Ties go to the lower
    index. Output is sorted ascending (spec O10).

    Args:
        task_scores: Task-relevance map :math:`A_t`.
        saliency_scores: Saliency map :math:`A_s`.
        k: Total number of kept tokens, ``1 <= k <= N``.
        task_fraction: Share of ``k`` for the task branch, in ``[0, 1]`` (paper: 0.5).

    Returns:
        Kept token indices (long), ascending per row.

    Raises:
        ValueError: On shape mismatch, ``k`` outside ``[1, N]`` or ``task_fraction`` outside
            ``[0, 1]``.

    Shape:
        - task_scores, saliency_scores: :math:`(B, N)`
        - output: :math:`(B, K)` with :math:`K = k`

    Examples:
        >>> import torch
        >>> task = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3]])
        >>> saliency = torch.tensor([[0.9, 0.5, 0.1, 0.7, 0.2]])
        >>> joint_rank_select(task, saliency, k=3)
        tensor([[0, 2, 3]])
    """
    task_idx, saliency_idx = joint_rank_branches(task_scores, saliency_scores, k, task_fraction)
    keep = torch.cat([task_idx, saliency_idx.to(task_idx.device)], dim=1)
    return torch.sort(keep, dim=1).values


# --------------------------------------------------------------------------------------------
# merge and text filtering
# --------------------------------------------------------------------------------------------


def nearest_merge(
    features: Tensor,
    keep_idx: Tensor,
    similarity_features: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Merge every dropped token into its most cosine-similar kept token (spec §3.7).

    Each dropped token :math:`u` is assigned to the centre
    :math:`c(u) = \arg\max_{k} \cos(z_u, z_k)` over kept tokens :math:`k`, where :math:`z` is
    ``similarity_features`` if given, else ``features``. Kept tokens belong to their own cluster.
    Each kept token becomes the (weighted) mean of its cluster :math:`C_k = \{k\} \cup
    \{u : c(u) = k\}`:

    .. math::
        x'_k = \frac{\sum_{i \in C_k} w_i x_i}{\sum_{i \in C_k} w_i}, \qquad
        \text{size}_k = \sum_{i \in C_k} w_i

    with :math:`w_i = 1` by default (unweighted mean including the centre, spec O9). A cluster
    whose total weight is 0 keeps its centre's features. Ties in similarity go to the kept token
    with the lowest original index, so the result does not depend on the order of ``keep_idx``;
    outputs follow the order of ``keep_idx``. Similarities and sums are computed in float32.

    Args:
        features: Token features to merge (DeSAP: the projector input, spec O9).
        keep_idx: Indices of the kept tokens (cluster centres), unique per row, in ``[0, N)``.
        similarity_features: Optional features for the similarity (same ``B``, ``N``).
        weights: Optional non-negative per-token weights (e.g. ToMe token sizes).

    Returns:
        ``(merged, cluster_sizes)``: merged features in ``features.dtype`` and the total weight
        of each cluster (float32); with unit weights the sizes are counts summing to ``N``.

    Raises:
        ValueError: On shape mismatches, non-integer, out-of-range or duplicate ``keep_idx``,
            an empty ``keep_idx`` (``K = 0``) or negative/non-finite ``weights``.

    Shape:
        - features: :math:`(B, N, D)`
        - keep_idx: :math:`(B, K)`
        - similarity_features: :math:`(B, N, D')`
        - weights: :math:`(B, N)`
        - merged: :math:`(B, K, D)`; cluster_sizes: :math:`(B, K)`

    Examples:
        >>> import torch
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.8, 0.2], [2.0, 2.0]]])
        >>> merged, sizes = nearest_merge(x, torch.tensor([[0, 1]]))
        >>> merged
        tensor([[[1.2667, 0.7333],
                 [0.0000, 1.0000]]])
        >>> sizes
        tensor([[3., 1.]])
    """
    _check_ndim("features", features, "(B, N, D)")
    batch, tokens, dim = features.shape
    _check_ndim("keep_idx", keep_idx, "(B, K)")
    _check_integer("keep_idx", keep_idx)
    kept = keep_idx.shape[1]
    _check_shape("keep_idx", keep_idx, "(B, K)", (batch, kept), "to match features (B, N, D)")
    if not 1 <= kept <= tokens:
        raise ValueError(f"keep_idx must keep K in [1, N] = [1, {tokens}] tokens, got K = {kept}")
    keep_idx = keep_idx.to(device=features.device, dtype=torch.long)
    if bool(((keep_idx < 0) | (keep_idx >= tokens)).any()):
        raise ValueError(f"keep_idx values must be in [0, N) = [0, {tokens})")
    sorted_keep, perm = torch.sort(keep_idx, dim=1)
    if bool((sorted_keep[:, 1:] == sorted_keep[:, :-1]).any()):
        raise ValueError("keep_idx must not contain duplicate indices within a row")
    if similarity_features is None:
        similarity_features = features
    else:
        _check_ndim("similarity_features", similarity_features, "(B, N, D')")
        _check_shape(
            "similarity_features",
            similarity_features,
            "(B, N, D')",
            (batch, tokens, similarity_features.shape[2]),
            "to match features (B, N, D)",
        )
    dtype = _compute_dtype(features)
    if weights is None:
        w = torch.ones(batch, tokens, dtype=dtype, device=features.device)
    else:
        _check_shape("weights", weights, "(B, N)", (batch, tokens), "to match features")
        w = weights.to(device=features.device, dtype=_compute_dtype(features, weights))
        if not bool((torch.isfinite(w) & (w >= 0)).all()):
            raise ValueError("weights must be finite and non-negative")
        dtype = w.dtype

    # Slot of every token in the sorted kept list: kept tokens own their slot ...
    slots = torch.arange(kept, device=features.device).expand(batch, kept)
    assign = torch.empty(batch, tokens, dtype=torch.long, device=features.device)
    assign.scatter_(1, sorted_keep, slots)
    if kept < tokens:
        # ... dropped tokens (ascending, same count per row) go to their nearest centre.
        dropped = torch.ones(batch, tokens, dtype=torch.uint8, device=features.device)
        dropped.scatter_(1, sorted_keep, 0)
        drop_idx = torch.sort(dropped, dim=1, descending=True, stable=True).indices
        drop_idx = drop_idx[:, : tokens - kept]
        z = l2_normalize(similarity_features.to(features.device))
        width = z.shape[-1]
        centres = z.gather(1, sorted_keep[..., None].expand(batch, kept, width))
        others = z.gather(1, drop_idx[..., None].expand(batch, tokens - kept, width))
        # argmax returns the first maximum, i.e. the lowest slot = the lowest kept index.
        nearest = (others @ centres.transpose(1, 2)).argmax(dim=-1)
        assign.scatter_(1, drop_idx, nearest)

    x = features.to(dtype)
    sums = torch.zeros(batch, kept, dim, dtype=dtype, device=features.device)
    sums.scatter_add_(1, assign[..., None].expand(batch, tokens, dim), x * w[..., None])
    sizes = torch.zeros(batch, kept, dtype=dtype, device=features.device)
    sizes.scatter_add_(1, assign, w)
    centres_x = x.gather(1, sorted_keep[..., None].expand(batch, kept, dim))
    merged = torch.where(
        sizes[..., None] > 0, sums / sizes.clamp_min(torch.finfo(dtype).tiny)[..., None], centres_x
    )
    # Back from sorted slots to the caller's keep_idx order: slot s holds keep_idx[:, perm[:, s]].
    out = torch.empty_like(merged).scatter_(1, perm[..., None].expand(batch, kept, dim), merged)
    out_sizes = torch.empty_like(sizes).scatter_(1, perm, sizes)
    return out.to(features.dtype), out_sizes


def text_filter_mask(
    eos_attention: Tensor,
    text_mask: Tensor,
    eos_index: Tensor,
    top_n: int = 30,
) -> Tensor:
    r"""Keep [EOS] plus the ``top_n`` most attended other text tokens (CalibCLIP-style, spec O8).

    .. math::
        \text{keep}_j = [j = \text{eos}] \;\lor\;
        \big(\text{valid}_j \land j \ne \text{eos} \land
        \mathrm{rank}(j; a_{\text{eos}}) \le n\big)

    where :math:`a_{\text{eos}}` is the text encoder's last-layer [EOS]-row attention (averaged
    over heads by the caller) and the rank runs over the valid non-[EOS] tokens (ties -> lower
    index). If a sample has at most ``top_n`` valid non-[EOS] tokens, all its valid tokens are
    kept. Padded tokens are never kept. Use the result as ``text_mask`` for
    :func:`fcma_relevance`.

    Args:
        eos_attention: Attention from the [EOS] query to every text token.
        text_mask: True for valid (non-padded) text tokens.
        eos_index: Position of [EOS] in each sample; must be a valid token.
        top_n: Number of non-[EOS] tokens to keep (``>= 0``; paper example: 30).

    Returns:
        Boolean keep mask.

    Raises:
        ValueError: On shape mismatches, non-integer or out-of-range ``eos_index``, an
            ``eos_index`` that points at padding, or a negative ``top_n``.

    Shape:
        - eos_attention: :math:`(B, T)`
        - text_mask: :math:`(B, T)`
        - eos_index: :math:`(B,)`
        - output: :math:`(B, T)`, bool

    Examples:
        >>> import torch
        >>> attention = torch.tensor([[0.1, 0.5, 0.2, 0.05, 0.15, 0.0]])
        >>> mask = torch.tensor([[True, True, True, True, True, False]])
        >>> text_filter_mask(attention, mask, torch.tensor([4]), top_n=2)
        tensor([[False,  True,  True, False,  True, False]])
    """
    _check_ndim("eos_attention", eos_attention, "(B, T)")
    batch, tokens = eos_attention.shape
    _check_shape("text_mask", text_mask, "(B, T)", (batch, tokens), "to match eos_attention")
    _check_shape("eos_index", eos_index, "(B,)", (batch,), "to match eos_attention")
    _check_integer("eos_index", eos_index)
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise ValueError(f"top_n must be a non-negative int, got {top_n!r}")
    device = eos_attention.device
    eos = eos_index.to(device=device, dtype=torch.long)
    if bool(((eos < 0) | (eos >= tokens)).any()):
        raise ValueError(f"eos_index values must be in [0, T) = [0, {tokens})")
    valid = text_mask.to(device=device, dtype=torch.bool)
    is_eos = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    is_eos.scatter_(1, eos[:, None], True)
    if not bool(valid.gather(1, eos[:, None]).all()):
        raise ValueError("eos_index must point at a valid token (text_mask True)")
    candidates = valid & ~is_eos
    order = _descending_order(eos_attention, exclude=~candidates)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(tokens, device=device).expand(batch, tokens))
    return is_eos | (candidates & (ranks < top_n))
