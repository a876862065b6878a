"""A tiny plugin used by tests/test_config.py through the config's `plugins:` list.

It is imported by module name (``tokenprune_config_test_plugin``) after the test puts this folder
on ``sys.path``, exactly as a config names an installed plugin module.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune import Scorer, StageConfig, hookimpl
from tokenprune.context import PruneContext
from tokenprune.registry import StageRegistry


class LinearRampScorerConfig(StageConfig):
    """Configuration of :class:`LinearRampScorer`.

    Attributes:
        descending: Score earlier tokens higher instead of later ones.
    """

    name: Literal["linear_ramp"] = "linear_ramp"
    descending: bool = False


class LinearRampScorer(Scorer[LinearRampScorerConfig]):
    """Scores token ``i`` with ``i`` (or ``-i``), so top-k keeps the last (or first) tokens."""

    name: ClassVar[str] = "linear_ramp"
    Config: ClassVar[type[StageConfig]] = LinearRampScorerConfig

    def score(self, ctx: PruneContext) -> torch.Tensor:
        b, n = ctx.visual.batch_size, ctx.visual.num_tokens
        ramp = torch.arange(n, dtype=torch.float32).expand(b, n).clone()
        return -ramp if self.config.descending else ramp


@hookimpl
def tokenprune_register_stages(registry: StageRegistry) -> None:
    registry.add(LinearRampScorer)
