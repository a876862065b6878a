"""The pool selector and pool_merge merger."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tokenprune.context import PruneContext
from tokenprune.errors import BudgetError, CapabilityError
from tokenprune.pipeline import Pipeline
from tokenprune.plugin import Runtime
from tokenprune.stages.mergers.pool import PoolMerger
from tokenprune.stages.scorers.uniform import UniformScorer
from tokenprune.stages.selectors.pool import PoolSelector
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.types import Selection, VisualTokens


def _ctx(batch: int, h: int, w: int, keep: int) -> PruneContext:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(batch, h * w, 3, generator=g)
    return PruneContext(visual=VisualTokens(features, grid=(h, w)), keep=keep)


def test_square_budget_is_average_pooling() -> None:
    ctx = _ctx(2, 6, 6, 4)
    out = Pipeline(UniformScorer(), PoolSelector(), PoolMerger(), keep=4)(ctx)
    image = ctx.visual.features.transpose(1, 2).reshape(2, 3, 6, 6)
    want = torch.nn.functional.avg_pool2d(image, 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.features, want)
    assert out.keep_idx.tolist() == [[7, 10, 25, 28]] * 2
    assert out.weights.tolist() == [[9.0] * 4] * 2


def test_other_selections_pool_around_the_nearest_kept_token() -> None:
    ctx = _ctx(1, 1, 5, 2)
    out = PoolMerger().merge(ctx, Selection(torch.tensor([[0, 3]])))
    x = ctx.visual.features[0]
    torch.testing.assert_close(out.features[0, 0], x[:2].mean(dim=0))
    torch.testing.assert_close(out.features[0, 1], x[2:].mean(dim=0))
    assert out.weights.tolist() == [[2.0, 3.0]]


def test_without_a_grid_or_with_an_impossible_budget() -> None:
    ctx = _ctx(1, 4, 4, 7)
    with pytest.raises(BudgetError, match="cannot pool"):
        PoolSelector().select(torch.zeros(1, 16), ctx)
    flat = dataclasses.replace(ctx, visual=VisualTokens(ctx.visual.features), keep=4)
    with pytest.raises(CapabilityError, match="grid"):
        PoolSelector().select(torch.zeros(1, 16), flat)
    with pytest.raises(CapabilityError, match="grid"):
        PoolMerger().merge(flat, TopKSelector().select(torch.rand(1, 16), flat))


def test_registered_and_buildable_from_a_config() -> None:
    pipeline = Runtime(autoload=False).build_pipeline(
        {
            "scorer": {"name": "uniform"},
            "selector": {"name": "pool"},
            "merger": {"name": "pool_merge"},
            "keep": 64,
        }
    )
    assert isinstance(pipeline.merger, PoolMerger)
    assert pipeline.requires == frozenset()
