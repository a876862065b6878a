"""FastV scorer: the attention the last prompt token pays to each visual token inside the LLM."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.stages.base import Scorer, StageConfig

__all__ = ["FastVScorer", "FastVScorerConfig"]


class FastVScorerConfig(StageConfig):
    """Configuration of :class:`FastVScorer` (no options).

    The layer is a property of the pruning position (``llm: [{layer: K, ...}]``), not of the
    scorer: the scorer reads the attention of decoder layer ``K - 1``, the last layer that ran on
    the unpruned sequence.
    """

    name: Literal["fastv"] = "fastv"


class FastVScorer(Scorer[FastVScorerConfig]):
    r"""Score each visual token by the attention the last prompt token pays to it (FastV).

    .. math::
        s_i = \frac{1}{H} \sum_h \mathrm{softmax}\left(
              \frac{q_{\text{last},h} K_h^\top}{\sqrt{d}} + m\right)_{v_i}

    in decoder layer ``K - 1`` of the language model, where :math:`v_i` is the sequence position
    of visual token :math:`i` and :math:`m` the model's attention mask (causal, padding). The
    adapter recomputes that one query row from the layer's input (see
    :func:`tokenprune.functional.query_row_attention`), so it works under SDPA. The scorer only
    runs at a pruning position inside the language model (listed under ``llm:`` in a config);
    pair it with the ``topk`` selector and the ``drop`` merger.

    Reference: Liang Chen et al., *An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play
    Inference Acceleration for Large Vision-Language Models*, ECCV 2024, arXiv:2403.06764.

    Shape:
        - output: :math:`(B, N)`

    Examples:
        >>> from tokenprune.testing import make_context
        >>> ctx = make_context(2, 9, 8, 3)
        >>> FastVScorer().score(ctx).shape
        torch.Size([2, 9])
    """

    name: ClassVar[str] = "fastv"
    Config: ClassVar[type[StageConfig]] = FastVScorerConfig
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.LLM_ATTENTION})

    def score(self, ctx: PruneContext) -> torch.Tensor:
        return ctx.llm_attention()
