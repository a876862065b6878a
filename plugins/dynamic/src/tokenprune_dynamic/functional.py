r"""Pure-tensor functional core of dynamic ratio allocation.

Four functions, each stateless and batched, needing only torch and DeSAP's functional core:

- :func:`text_cue_strength`: how peaked a sample's text-vision relevance map is, in ``[0, 1]``;
- :func:`task_fractions`: the monotone map from that strength to the share of the budget filled
  by the task branch;
- :func:`dynamic_joint_select`: DeSAP's joint rank and prune (Eq. 5) with one split per sample;
- :func:`feature_diversity`: the information measure of a tile or frame used by
  :class:`~tokenprune_dynamic.allocation.InformationAllocation`.

Numerics: statistics are computed in at least float32 (float64 inputs stay float64). Ties in
the selection go to the lower token index, as in DeSAP.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenprune_desap import functional as desap

__all__ = [
    "dynamic_joint_select",
    "feature_diversity",
    "task_budgets",
    "task_fractions",
    "text_cue_strength",
]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_map(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, N), got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be (B, N) with N >= 1, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf)")


def text_cue_strength(relevance: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Strength of the text cue: one minus the normalised entropy of the relevance map.

    Each row of the task-relevance map :math:`r \in \mathbb{R}^N` is standardised, turned into
    a distribution over the tokens, and its entropy compared with the uniform one:

    .. math::
        z_i = \frac{r_i - \bar r}{\sigma_r}, \qquad
        p = \operatorname{softmax}(z / \tau), \qquad
        s = 1 - \frac{-\sum_i p_i \log p_i}{\log N}

    with :math:`\bar r` the mean and :math:`\sigma_r` the population standard deviation of the
    row. :math:`s \in [0, 1]`: 0 when the relevance is flat (a constant row, or ``N = 1``), close
    to 1 when a few tokens stand far above the rest (a question that points at something).
    Standardising makes ``s`` invariant to ``a * r + b`` for any ``a > 0``, so it does not
    depend on the scale of the relevance map (DeSAP's :math:`A_t` is of order
    :math:`1 / (d_1 d_2)`); only its shape counts.

    Args:
        relevance: Text-vision relevance per token, higher = more relevant (DeSAP: ``task``).
        temperature: Softmax temperature :math:`\tau > 0`; lower values make every map look
            more peaked.

    Returns:
        The strength per sample, in ``[0, 1]``, float32 (float64 for float64 input).

    Raises:
        ValueError: If ``relevance`` is not a finite floating ``(B, N)`` tensor with ``N >= 1``
            or ``temperature`` is not a finite number ``> 0``.

    Shape:
        - relevance: :math:`(B, N)`
        - output: :math:`(B,)`

    Examples:
        >>> import torch
        >>> flat = torch.ones(1, 8)
        >>> peaked = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])
        >>> text_cue_strength(torch.cat([flat, peaked]))
        tensor([0.0000, 0.4899])
        >>> bool(text_cue_strength(peaked, temperature=0.25) > text_cue_strength(peaked))
        True
    """
    _check_map("relevance", relevance)
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)) or not (
        temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    r = relevance.to(_compute_dtype(relevance))
    batch, n = r.shape
    if n == 1:
        return torch.zeros(batch, dtype=r.dtype, device=r.device)
    centred = r - r.mean(dim=1, keepdim=True)
    std = centred.pow(2).mean(dim=1, keepdim=True).sqrt()
    z = torch.where(std > 0, centred / torch.where(std > 0, std, 1.0), 0.0)
    log_p = torch.log_softmax(z / temperature, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    strength = (1.0 - entropy / math.log(n)).clamp(0.0, 1.0)
    # A constant row is uniform exactly; do not let rounding in the entropy call it a cue.
    return torch.where(std.squeeze(1) > 0, strength, 0.0)


def task_fractions(
    strength: Tensor,
    min_fraction: float,
    max_fraction: float,
    cue_low: float = 0.0,
    cue_high: float = 1.0,
) -> Tensor:
    r"""Map the text-cue strength to the share of the budget filled by the task branch.

    .. math::
        \alpha = a_{\min} + (a_{\max} - a_{\min})\,
                 \operatorname{clip}\!\Big(\frac{s - s_{lo}}{s_{hi} - s_{lo}},\ 0,\ 1\Big)

    A linear ramp between ``cue_low`` and ``cue_high``, flat outside: non-decreasing in ``s``,
    :math:`a_{\min}` at or below ``cue_low`` and :math:`a_{\max}` at or above ``cue_high``.
    ``min_fraction == max_fraction`` gives DeSAP's fixed split.

    Args:
        strength: Text-cue strength per sample, in ``[0, 1]`` (:func:`text_cue_strength`).
        min_fraction: :math:`a_{\min}`, the task share for the weakest cue, in ``[0, 1]``.
        max_fraction: :math:`a_{\max}`, the task share for the strongest cue,
            ``min_fraction <= max_fraction <= 1``.
        cue_low: :math:`s_{lo}`, the strength at which the ramp starts, in ``[0, 1)``.
        cue_high: :math:`s_{hi}`, the strength at which it ends, ``cue_low < cue_high <= 1``.

    Returns:
        The task share per sample, in ``[min_fraction, max_fraction]``.

    Raises:
        ValueError: If a bound is out of range or the bounds are in the wrong order.

    Shape:
        - strength: :math:`(B,)`
        - output: :math:`(B,)`

    Examples:
        >>> import torch
        >>> task_fractions(torch.tensor([0.0, 0.2, 0.5, 1.0]), 0.25, 0.75)
        tensor([0.2500, 0.3500, 0.5000, 0.7500])
        >>> task_fractions(torch.tensor([0.05, 0.2, 0.5]), 0.25, 0.75, cue_low=0.1, cue_high=0.3)
        tensor([0.2500, 0.5000, 0.7500])
    """
    for name, value in (("min_fraction", min_fraction), ("max_fraction", max_fraction)):
        if not 0.0 <= value <= 1.0:  # also rejects NaN
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if min_fraction > max_fraction:
        raise ValueError(
            f"min_fraction ({min_fraction}) is larger than max_fraction ({max_fraction}); swap "
            "them (set both equal for a fixed split)"
        )
    if not 0.0 <= cue_low < cue_high <= 1.0:
        raise ValueError(
            f"need 0 <= cue_low < cue_high <= 1, got cue_low={cue_low!r}, cue_high={cue_high!r}"
        )
    if not isinstance(strength, Tensor) or strength.ndim != 1:
        raise ValueError(f"strength must be a (B,) tensor, got {getattr(strength, 'shape', None)}")
    s = strength.to(_compute_dtype(strength))
    ramp = ((s - cue_low) / (cue_high - cue_low)).clamp(0.0, 1.0)
    return min_fraction + (max_fraction - min_fraction) * ramp


def task_budgets(k: int, fractions: Tensor) -> list[int]:
    r"""Tokens of the task branch per sample: DeSAP's rounding, one fraction per sample.

    .. math:: k_{1,b} = \lfloor k\,\alpha_b + \tfrac12 \rfloor

    (:func:`tokenprune_desap.functional.split_budget` applied row by row); the saliency branch
    gets :math:`k - k_{1,b}`.

    Args:
        k: Total kept tokens, ``k >= 0``.
        fractions: Task share per sample, in ``[0, 1]``.

    Returns:
        :math:`k_{1,b}` per sample.

    Raises:
        ValueError: If ``k`` is negative or a fraction is outside ``[0, 1]``.

    Shape:
        - fractions: :math:`(B,)`

    Examples:
        >>> import torch
        >>> task_budgets(16, torch.tensor([0.25, 0.5, 0.53]))
        [4, 8, 8]
    """
    if not isinstance(fractions, Tensor) or fractions.ndim != 1:
        raise ValueError(
            f"fractions must be a (B,) tensor, got {getattr(fractions, 'shape', None)}"
        )
    return [desap.split_budget(k, float(f))[0] for f in fractions.tolist()]


def dynamic_joint_select(
    task_scores: Tensor, saliency_scores: Tensor, k: int, fractions: Tensor
) -> Tensor:
    r"""DeSAP's joint rank and prune (Eq. 5) with a task share per sample.

    For sample :math:`b` with :math:`k_{1,b}` from :func:`task_budgets`:

    .. math::
        I_t = \operatorname{top-}k_{1,b}(A_t,\ V), \qquad
        I_s = \operatorname{top-}(k - k_{1,b})(A_s,\ V \setminus I_t), \qquad
        I = I_t \cup I_s

    Rows with the same :math:`k_{1,b}` are selected together by
    :func:`tokenprune_desap.functional.joint_rank_select` (so the ranking, the tie-break towards
    the lower index and the ascending output order are DeSAP's); with every fraction equal this
    is exactly ``joint_rank_select`` with that fraction.

    Args:
        task_scores: Task-relevance map :math:`A_t`.
        saliency_scores: Saliency map :math:`A_s`.
        k: Kept tokens per sample, ``1 <= k <= N``.
        fractions: Task share per sample, in ``[0, 1]`` (:func:`task_fractions`).

    Returns:
        Kept token indices (long), ascending per row, ``k`` unique per row.

    Raises:
        ValueError: On shape mismatch, ``k`` outside ``[1, N]`` or a fraction outside
            ``[0, 1]``.

    Shape:
        - task_scores, saliency_scores: :math:`(B, N)`
        - fractions: :math:`(B,)`
        - output: :math:`(B, K)` with :math:`K = k`

    Examples:
        >>> import torch
        >>> task = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3]] * 2)
        >>> saliency = torch.tensor([[0.9, 0.5, 0.1, 0.7, 0.2]] * 2)
        >>> dynamic_joint_select(task, saliency, 3, torch.tensor([1.0, 0.0]))
        tensor([[0, 2, 4],
                [0, 1, 3]])
    """
    _check_map("task_scores", task_scores)
    if not isinstance(saliency_scores, Tensor) or saliency_scores.shape != task_scores.shape:
        raise ValueError(
            f"saliency_scores must be (B, N) = {tuple(task_scores.shape)} to match task_scores, "
            f"got {tuple(getattr(saliency_scores, 'shape', ()))}"
        )
    tokens = task_scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= tokens:
        raise ValueError(f"k must be an int in [1, N] = [1, {tokens}], got {k!r}")
    if not isinstance(fractions, Tensor) or tuple(fractions.shape) != (task_scores.shape[0],):
        raise ValueError(
            f"fractions must be (B,) = ({task_scores.shape[0]},) to match task_scores, got "
            f"{tuple(getattr(fractions, 'shape', ()))}"
        )
    budgets = task_budgets(k, fractions)
    out = torch.empty(task_scores.shape[0], k, dtype=torch.long, device=task_scores.device)
    for k1 in sorted(set(budgets)):
        rows = torch.tensor(
            [b for b, v in enumerate(budgets) if v == k1], device=task_scores.device
        )
        # k * (k1 / k) is within one rounding step of k1, so split_budget gives back k1.
        out[rows] = desap.joint_rank_select(
            task_scores[rows], saliency_scores[rows.to(saliency_scores.device)], k, k1 / k
        )
    return out


def feature_diversity(features: Tensor) -> Tensor:
    r"""Diversity of a set of token features: the mean cosine distance over all pairs.

    .. math::
        D = \frac{1}{n^2} \sum_{i, j} \big(1 - \cos(x_i, x_j)\big)
          = 1 - \Big\lVert \frac{1}{n} \sum_i \hat x_i \Big\rVert^2,
        \qquad \hat x_i = x_i / \lVert x_i \rVert

    computed in :math:`O(n D)` through the right-hand side (the pairs include :math:`i = j`).
    :math:`D \in [0, 1]`: 0 when all tokens point the same way (a blank tile), 1 when their
    directions cancel out; rounding is clamped away. A zero row has no direction and counts as
    orthogonal to every token.

    Args:
        features: Token features of one part (a tile or a frame), or a batch of parts with the
            same number of tokens.

    Returns:
        The diversity of each part.

    Raises:
        ValueError: If ``features`` has fewer than 2 dimensions or no tokens.

    Shape:
        - features: :math:`(*, n, D)`
        - output: :math:`(*)`

    Examples:
        >>> import torch
        >>> feature_diversity(torch.ones(4, 3)).round(decimals=6)  # one direction
        tensor(0.)
        >>> feature_diversity(torch.eye(4))  # four orthogonal tokens
        tensor(0.7500)
    """
    if not isinstance(features, Tensor) or features.ndim < 2 or features.shape[-2] < 1:
        raise ValueError(
            "features must be (*, n, D) with n >= 1 tokens, got shape "
            f"{tuple(getattr(features, 'shape', ()))}"
        )
    unit = desap.l2_normalize(features, dim=-1)
    centre = unit.mean(dim=-2)
    return (1.0 - centre.pow(2).sum(dim=-1)).clamp(0.0, 1.0)
