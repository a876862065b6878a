"""Pool selector: one representative per spatial pooling window."""

from __future__ import annotations

from typing import ClassVar, Literal

from tokenprune.context import PruneContext
from tokenprune.errors import CapabilityError
from tokenprune.functional.pool import pool_windows
from tokenprune.stages._common import check_unused_scores
from tokenprune.stages.base import Scores, Selector, StageConfig
from tokenprune.types import Selection

__all__ = ["PoolSelector", "PoolSelectorConfig", "require_grid"]


def require_grid(ctx: PruneContext, stage: str) -> tuple[int, int]:
    """The patch grid of the visual tokens, or a :class:`CapabilityError` naming the stage."""
    grid = ctx.visual.grid
    if grid is None:
        raise CapabilityError(
            f"stage {stage!r} pools the patch grid, but these visual tokens have none "
            "(ctx.visual.grid is None: not one raster-ordered grid)"
        )
    return grid


class PoolSelectorConfig(StageConfig):
    """Configuration of :class:`PoolSelector` (no options)."""

    name: Literal["pool"] = "pool"


class PoolSelector(Selector[PoolSelectorConfig]):
    """Select the central token of each window of a ``K``-window pooling of the patch grid.

    The grid is cut into ``h' x w' = K`` non-overlapping windows (see
    :func:`tokenprune.functional.pool.pool_shape` for the choice of ``(h', w')``); the
    ``pool_merge`` merger averages each window. The scores are validated but not used: pair
    with the ``uniform`` scorer.

    Raises:
        CapabilityError: If the visual tokens have no grid.
        BudgetError: If no ``h' x w' = K`` fits the grid.

    Shape:
        - output: ``Selection.keep_idx`` :math:`(B, K)`

    Examples:
        >>> PoolSelector()
        PoolSelector()
    """

    name: ClassVar[str] = "pool"
    Config: ClassVar[type[StageConfig]] = PoolSelectorConfig

    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        check_unused_scores(scores, ctx, self.name)
        grid = require_grid(ctx, self.name)
        keep_idx, _ = pool_windows(grid, ctx.keep, device=ctx.visual.features.device)
        return Selection(keep_idx.expand(ctx.visual.batch_size, -1).contiguous())
