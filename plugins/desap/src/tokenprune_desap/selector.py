"""The ``desap_joint`` selector: task branch first, then saliency among the rest (Eq. 5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import Field

from tokenprune import (
    BudgetError,
    ConfigError,
    PruneContext,
    Selection,
    Selector,
    ShapeError,
    StageConfig,
)
from tokenprune_desap import functional as F

__all__ = ["DesapJointSelector", "DesapJointSelectorConfig", "two_maps"]


class DesapJointSelectorConfig(StageConfig):
    """Configuration of :class:`DesapJointSelector`.

    Attributes:
        task_fraction: Share of the budget filled by the task branch. ``k1 = round-half-up(K *
            task_fraction)``, ``k2 = K - k1``; with 0.5 an odd ``K`` gives the extra token to the
            task branch.
        task_key: Name of the task-relevance score map.
        saliency_key: Name of the saliency score map.
    """

    name: Literal["desap_joint"] = "desap_joint"
    task_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    task_key: str = "task"
    saliency_key: str = "saliency"


class DesapJointSelector(Selector[DesapJointSelectorConfig]):
    """Top-``k1`` by task relevance, then top-``k2`` by saliency among the tokens left.

    Works with any scorer that returns the two named maps. Branches are disjoint by
    construction; kept indices come back in raster order.

    Shape:
        - output: ``Selection.keep_idx`` :math:`(B, K)`
    """

    name: ClassVar[str] = "desap_joint"
    Config: ClassVar[type[StageConfig]] = DesapJointSelectorConfig

    @classmethod
    def contract_score_names(cls) -> tuple[str, str]:
        """The names of the two maps the default configuration reads (for the contract kit)."""
        return ("task", "saliency")

    def select(
        self, scores: torch.Tensor | Mapping[str, torch.Tensor], ctx: PruneContext
    ) -> Selection:
        cfg = self.config
        task, saliency = two_maps(
            scores, ctx, cfg.task_key, cfg.saliency_key, stage=self.name, finite=False
        )
        idx = F.joint_rank_select(task, saliency, ctx.keep, cfg.task_fraction)
        return Selection(idx)


def two_maps(
    scores: torch.Tensor | Mapping[str, torch.Tensor],
    ctx: PruneContext,
    task_key: str,
    saliency_key: str,
    *,
    stage: str,
    finite: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check and return the task-relevance and saliency maps a two-branch selector reads.

    Args:
        scores: What the scorer returned.
        ctx: The pruning context (batch size, token count and budget).
        task_key: Name of the task-relevance map.
        saliency_key: Name of the saliency map.
        stage: Selector name, for messages.
        finite: Refuse infinite values too (otherwise only NaN).

    Returns:
        ``(task, saliency)``.

    Raises:
        ConfigError: If the two named maps are not there.
        ShapeError: If a map is not a floating ``(B, N)`` tensor or holds NaN (or inf).
        BudgetError: If ``ctx.keep`` is outside ``[1, N]``.

    Shape:
        - output: two :math:`(B, N)` maps
    """
    if isinstance(scores, torch.Tensor) or not {task_key, saliency_key} <= set(scores):
        got = "one unnamed map" if isinstance(scores, torch.Tensor) else sorted(scores)
        raise ConfigError(
            f"{stage} needs two named score maps {task_key!r} and {saliency_key!r} (e.g. from "
            f"the desap scorer), got {got}; set `task_key`/`saliency_key` to match your scorer"
        )
    expected = (ctx.visual.batch_size, ctx.visual.num_tokens)
    for key in (task_key, saliency_key):
        value = scores[key]
        if tuple(value.shape) != expected or not value.is_floating_point():
            raise ShapeError(
                f"{stage}: score map {key!r} must be a floating (B, N) = {expected} tensor, got "
                f"{value.dtype} {tuple(value.shape)}"
            )
        bad = ~torch.isfinite(value) if finite else torch.isnan(value)
        if bool(bad.any()):
            what = "NaN or inf" if finite else "NaN"
            raise ShapeError(f"{stage}: score map {key!r} contains {what} values")
    if not 1 <= ctx.keep <= expected[1]:
        raise BudgetError(f"{stage}: cannot keep K={ctx.keep} of N={expected[1]} tokens")
    return scores[task_key], scores[saliency_key]
