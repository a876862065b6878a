"""The tome selector and tome_merge merger."""

from __future__ import annotations

import torch

from tokenprune.capabilities import Capability
from tokenprune.functional.assign import cluster_mean
from tokenprune.functional.tome import tome_partition
from tokenprune.pipeline import Pipeline
from tokenprune.plugin import Runtime
from tokenprune.stages.mergers.tome import ToMeMerger
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.scorers.uniform import UniformScorer
from tokenprune.stages.selectors.tome import TOME_PARTITION, ToMeSelector, ToMeSelectorConfig
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.testing import check_stage, make_context


def test_pipeline_averages_the_tome_groups() -> None:
    ctx = make_context(2, 16, 16, 5, seed=6)
    out = Pipeline(UniformScorer(), ToMeSelector(layer=-1), ToMeMerger(layer=-1), keep=5)(ctx)
    block = ctx.vision_block(-1)
    keys = block.k_proj(block.normed())[:, 1:].reshape(2, 16, 2, 8).mean(dim=2)
    keep_idx, assignment = tome_partition(keys, 5)
    assert torch.equal(out.keep_idx, keep_idx)
    assert torch.equal(ctx.stash[TOME_PARTITION].assignment, assignment)
    want, sizes = cluster_mean(ctx.visual.features, assignment, 5)
    torch.testing.assert_close(out.features, want)
    assert torch.equal(out.weights, sizes)
    assert out.weights.sum().item() == 2 * 16


def test_after_another_selector_dropped_tokens_join_their_most_similar_kept_token() -> None:
    ctx = make_context(2, 16, 16, 4, seed=6)
    out = Pipeline(RandomScorer(), TopKSelector(), ToMeMerger(metric="features"), keep=4)(ctx)
    assert TOME_PARTITION not in ctx.stash
    assert out.weights.sum().item() == 2 * 16


def test_capabilities_follow_the_metric() -> None:
    assert ToMeSelector().required_capabilities() == {Capability.VISION_BLOCK}
    assert ToMeSelector(metric="features").required_capabilities() == frozenset()
    assert ToMeMerger(metric="features").vision_layers() == frozenset()


def test_registered_and_buildable_from_a_config() -> None:
    pipeline = Runtime(autoload=False).build_pipeline(
        {
            "scorer": {"name": "uniform"},
            "selector": {"name": "tome", "r": 8},
            "merger": {"name": "tome_merge"},
            "keep": 64,
        }
    )
    assert isinstance(pipeline.selector, ToMeSelector)
    assert pipeline.selector.config.r == 8


class _FeatureSelector(ToMeSelector):
    @classmethod
    def contract_config(cls) -> ToMeSelectorConfig:
        return ToMeSelectorConfig(metric="features", r=1)


def test_contract_with_features_and_small_rounds() -> None:
    check_stage(_FeatureSelector)
