"""The visionzip selector and visionzip_merge merger."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tokenprune.capabilities import Capability
from tokenprune.functional.visionzip import visionzip_keep_indices, visionzip_merge
from tokenprune.pipeline import Pipeline
from tokenprune.plugin import Runtime
from tokenprune.stages.mergers.visionzip import VisionZipMerger, VisionZipMergerConfig
from tokenprune.stages.scorers.cls_attention import ClsAttentionScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.stages.selectors.visionzip import (
    VISIONZIP_SPLIT,
    VisionZipSelector,
    VisionZipSelectorConfig,
)
from tokenprune.testing import check_stage, make_context


def test_pipeline_keeps_dominant_tokens_and_merges_the_rest_into_targets() -> None:
    ctx = make_context(2, 16, 16, 8, seed=3)
    pipeline = Pipeline(
        ClsAttentionScorer(layer=-1),
        VisionZipSelector(dominant_fraction=0.75),
        VisionZipMerger(layer=-1),
        keep=8,
    )
    out = pipeline(ctx)
    attention = ctx.cls_attention(-1)
    idx, dominant = visionzip_keep_indices(attention, 8, 2)  # 6 dominant + 2 contextual
    assert torch.equal(out.keep_idx, idx)
    assert torch.equal(ctx.stash[VISIONZIP_SPLIT].dominant, dominant)
    block = ctx.vision_block(-1)
    keys = block.k_proj(block.normed())[:, 1:].reshape(2, 16, 2, 8).mean(dim=2)
    want, weights = visionzip_merge(ctx.visual.features, keys, idx, dominant)
    torch.testing.assert_close(out.features, want)
    assert weights.sum().item() == 2 * 16
    assert torch.equal(out.weights, weights)


def test_after_another_selector_every_kept_token_is_a_target() -> None:
    ctx = make_context(2, 16, 16, 4, seed=1)
    out = Pipeline(
        ClsAttentionScorer(), TopKSelector(), VisionZipMerger(metric="features"), keep=4
    )(ctx)
    assert VISIONZIP_SPLIT not in ctx.stash
    assert out.weights.sum().item() == 2 * 16
    assert bool((out.weights > 1).any())


def test_merger_needs_vision_blocks_only_for_keys() -> None:
    assert VisionZipMerger().required_capabilities() == {Capability.VISION_BLOCK}
    assert VisionZipMerger().vision_layers() == {-2}
    assert VisionZipMerger(metric="features").required_capabilities() == frozenset()
    assert VisionZipMerger(metric="features").vision_layers() == frozenset()


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        VisionZipSelectorConfig(dominant_fraction=1.5)
    with pytest.raises(ValidationError):
        VisionZipMergerConfig(mode="sum")  # type: ignore[arg-type]


def test_registered_and_buildable_from_a_config() -> None:
    runtime = Runtime(autoload=False)
    pipeline = runtime.build_pipeline(
        {
            "scorer": {"name": "cls_attention", "layer": -2},
            "selector": {"name": "visionzip"},
            "merger": {"name": "visionzip_merge", "mode": "mean"},
            "keep": 64,
        }
    )
    assert isinstance(pipeline.selector, VisionZipSelector)
    assert isinstance(pipeline.merger, VisionZipMerger)
    assert pipeline.vision_layers() == {-2}


class _FeatureMeanMerger(VisionZipMerger):
    @classmethod
    def contract_config(cls) -> VisionZipMergerConfig:
        return VisionZipMergerConfig(metric="features", mode="mean")


def test_contract_of_the_non_default_merger_options() -> None:
    check_stage(_FeatureMeanMerger)
