"""Pool merger: the mean of each spatial pooling window."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenprune.context import PruneContext
from tokenprune.errors import BudgetError
from tokenprune.functional.assign import cluster_mean
from tokenprune.functional.pool import pool_windows, spatial_nearest_assignment
from tokenprune.stages._common import check_selection
from tokenprune.stages.base import Merger, StageConfig
from tokenprune.stages.selectors.pool import require_grid
from tokenprune.types import PrunedTokens, Selection

__all__ = ["PoolMerger", "PoolMergerConfig"]


class PoolMergerConfig(StageConfig):
    """Configuration of :class:`PoolMerger` (no options)."""

    name: Literal["pool_merge"] = "pool_merge"


class PoolMerger(Merger[PoolMergerConfig]):
    """Average-pool the patch grid around the kept tokens.

    When the selection is the ``pool`` selector's (one central token per window), each output
    is the mean of its window: plain spatial average pooling to ``K`` tokens. For any other
    selection, every token joins the spatially nearest kept token (ties to the lower index) and
    each output is the mean of its cell. Weights are the number of tokens averaged, summing to
    ``N``.

    Raises:
        CapabilityError: If the visual tokens have no grid.

    Shape:
        - output: ``PrunedTokens.features`` :math:`(B, K, D)`

    Examples:
        >>> PoolMerger()
        PoolMerger()
    """

    name: ClassVar[str] = "pool_merge"
    Config: ClassVar[type[StageConfig]] = PoolMergerConfig

    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        check_selection(selection, ctx)
        grid = require_grid(ctx, self.name)
        keep_idx = selection.keep_idx
        b, k = keep_idx.shape
        assignment = spatial_nearest_assignment(grid, keep_idx)
        try:
            window_idx, windows = pool_windows(grid, k, device=keep_idx.device)
        except BudgetError:
            pass  # no K-window pooling of this grid: the selection is not the pool selector's
        else:
            is_pool = (keep_idx == window_idx).all(dim=1, keepdim=True)
            assignment = torch.where(is_pool, windows.expand(b, -1), assignment)
        merged, sizes = cluster_mean(ctx.visual.features, assignment, k)
        return PrunedTokens(features=merged, keep_idx=keep_idx, weights=sizes)
