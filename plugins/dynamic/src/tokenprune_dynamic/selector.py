"""The ``desap_dynamic`` selector: DeSAP's joint ranker with the split set per sample."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from tokenprune import (
    PruneContext,
    Selection,
    Selector,
    StageConfig,
    StashKey,
)
from tokenprune_desap.selector import two_maps
from tokenprune_dynamic import functional as F

__all__ = [
    "TASK_FRACTIONS",
    "TEXT_CUE_STRENGTH",
    "DesapDynamicSelector",
    "DesapDynamicSelectorConfig",
]

TEXT_CUE_STRENGTH: StashKey[torch.Tensor] = StashKey("tokenprune_dynamic.text_cue_strength")
"""Where the selector leaves the ``(B,)`` text-cue strengths in ``ctx.stash`` (for observers)."""
TASK_FRACTIONS: StashKey[torch.Tensor] = StashKey("tokenprune_dynamic.task_fractions")
"""Where the selector leaves the ``(B,)`` task shares it used in ``ctx.stash``."""


class DesapDynamicSelectorConfig(StageConfig):
    r"""Configuration of :class:`DesapDynamicSelector`.

    The task share of sample :math:`b` is
    :math:`\alpha_b = a_{\min} + (a_{\max} - a_{\min})\,\mathrm{clip}((s_b - s_{lo}) /
    (s_{hi} - s_{lo}), 0, 1)` where :math:`s_b` is the text-cue strength of its relevance map
    (:func:`~tokenprune_dynamic.functional.text_cue_strength`).

    Attributes:
        min_task_fraction: :math:`a_{\min}`, the task share for the weakest text cue.
        max_task_fraction: :math:`a_{\max}`, the task share for the strongest text cue;
            ``min_task_fraction == max_task_fraction`` is DeSAP's fixed split.
        temperature: Softmax temperature :math:`\tau` of the cue strength.
        cue_low: :math:`s_{lo}`, strength at or below which the share is ``min_task_fraction``.
        cue_high: :math:`s_{hi}`, strength at or above which it is ``max_task_fraction``.
        task_key: Name of the task-relevance map (also the map the cue strength is read from).
        saliency_key: Name of the saliency map.
    """

    name: Literal["desap_dynamic"] = "desap_dynamic"
    min_task_fraction: float = Field(default=0.25, ge=0.0, le=1.0)
    max_task_fraction: float = Field(default=0.75, ge=0.0, le=1.0)
    temperature: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    cue_low: float = Field(default=0.0, ge=0.0, le=1.0)
    cue_high: float = Field(default=0.5, ge=0.0, le=1.0)
    task_key: str = "task"
    saliency_key: str = "saliency"

    @model_validator(mode="after")
    def _ordered(self) -> DesapDynamicSelectorConfig:
        if self.min_task_fraction > self.max_task_fraction:
            raise ValueError(
                f"min_task_fraction ({self.min_task_fraction}) is larger than max_task_fraction "
                f"({self.max_task_fraction}); swap them, or set both equal for DeSAP's fixed split"
            )
        if self.cue_low >= self.cue_high:
            raise ValueError(
                f"cue_low ({self.cue_low}) must be smaller than cue_high ({self.cue_high}); they "
                "are the text-cue strengths where the task share starts and stops rising"
            )
        return self


class DesapDynamicSelector(Selector[DesapDynamicSelectorConfig]):
    r"""DeSAP's joint ranker whose task/saliency split follows the strength of the text cue.

    Per sample: the text-cue strength :math:`s_b` of the task-relevance map, the task share
    :math:`\alpha_b` from it, then top-:math:`k_{1,b}` by task relevance and the remaining
    :math:`K - k_{1,b}` by saliency among the tokens left (DeSAP's Eq. 5, reused from
    :func:`tokenprune_desap.functional.joint_rank_select`). Works with any scorer that returns
    the two named maps (the ``desap`` scorer). The strengths and shares are left in
    ``ctx.stash`` under :data:`TEXT_CUE_STRENGTH` and :data:`TASK_FRACTIONS`.

    Shape:
        - output: ``Selection.keep_idx`` :math:`(B, K)`

    Examples:
        >>> import torch
        >>> from tokenprune.testing import make_context
        >>> ctx = make_context(2, 16, 8, keep=4)
        >>> task = torch.stack([torch.linspace(0, 1, 16), torch.ones(16)])  # ramp, flat
        >>> task[0, 3] = 20.0  # a token the question points at
        >>> saliency = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
        >>> selection = DesapDynamicSelector().select({"task": task, "saliency": saliency}, ctx)
        >>> ctx.stash[TASK_FRACTIONS]  # strong cue: 3 of 4 by relevance; flat: 1 of 4
        tensor([0.7500, 0.2500])
    """

    name: ClassVar[str] = "desap_dynamic"
    Config: ClassVar[type[StageConfig]] = DesapDynamicSelectorConfig

    @classmethod
    def contract_score_names(cls) -> tuple[str, str]:
        """The names of the two maps the default configuration reads (for the contract kit)."""
        return ("task", "saliency")

    def select(
        self, scores: torch.Tensor | Mapping[str, torch.Tensor], ctx: PruneContext
    ) -> Selection:
        cfg = self.config
        task, saliency = two_maps(
            scores, ctx, cfg.task_key, cfg.saliency_key, stage=self.name, finite=True
        )
        strength = F.text_cue_strength(task, cfg.temperature)
        fractions = F.task_fractions(
            strength, cfg.min_task_fraction, cfg.max_task_fraction, cfg.cue_low, cfg.cue_high
        )
        ctx.stash[TEXT_CUE_STRENGTH] = strength
        ctx.stash[TASK_FRACTIONS] = fractions
        return Selection(F.dynamic_joint_select(task, saliency, ctx.keep, fractions))
