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

__all__ = ["DesapJointSelector", "DesapJointSelectorConfig"]


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
        keys = (cfg.task_key, cfg.saliency_key)
        if isinstance(scores, torch.Tensor) or not set(keys) <= set(scores):
            got = "one unnamed map" if isinstance(scores, torch.Tensor) else sorted(scores)
            raise ConfigError(
                f"desap_joint needs two named score maps {cfg.task_key!r} and "
                f"{cfg.saliency_key!r} (e.g. from the desap scorer), got {got}; set "
                "`task_key`/`saliency_key` to match your scorer"
            )
        expected = (ctx.visual.batch_size, ctx.visual.num_tokens)
        for key in keys:
            value = scores[key]
            if tuple(value.shape) != expected:
                raise ShapeError(
                    f"desap_joint: score map {key!r} must be (B, N) = {expected}, got "
                    f"{tuple(value.shape)}"
                )
            if bool(torch.isnan(value).any()):
                raise ShapeError(f"desap_joint: score map {key!r} contains NaN values")
        if not 1 <= ctx.keep <= expected[1]:
            raise BudgetError(f"desap_joint: cannot keep K={ctx.keep} of N={expected[1]} tokens")
        idx = F.joint_rank_select(
            scores[cfg.task_key], scores[cfg.saliency_key], ctx.keep, cfg.task_fraction
        )
        return Selection(idx)
