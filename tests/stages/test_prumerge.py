"""The prumerge selector and prumerge_merge merger."""

from __future__ import annotations

import torch

from tokenprune.capabilities import Capability
from tokenprune.functional.prumerge import (
    prumerge_adaptive_count,
    prumerge_keep_indices,
    prumerge_merge,
)
from tokenprune.pipeline import Pipeline
from tokenprune.plugin import Runtime
from tokenprune.stages.mergers.prumerge import PruMergeMerger
from tokenprune.stages.scorers.cls_attention import ClsAttentionScorer
from tokenprune.stages.selectors.prumerge import (
    PRUMERGE_ADAPTIVE,
    PruMergeSelector,
    PruMergeSelectorConfig,
)
from tokenprune.testing import check_stage, make_context


def test_plus_pipeline_matches_the_functional_core_and_reports_the_adaptive_count() -> None:
    ctx = make_context(2, 16, 16, 6, seed=5)
    pipeline = Pipeline(
        ClsAttentionScorer(layer=-1),
        PruMergeSelector(plus=True),
        PruMergeMerger(neighbours=4),
        keep=6,
    )
    out = pipeline(ctx)
    attention = ctx.cls_attention(-1)
    idx = prumerge_keep_indices(attention, 6, plus=True)
    assert torch.equal(out.keep_idx, idx)
    assert torch.equal(ctx.stash[PRUMERGE_ADAPTIVE], prumerge_adaptive_count(attention, plus=True))
    block = ctx.vision_block(-1)
    keys = block.k_proj(block.normed())[:, 1:]
    want, weights = prumerge_merge(ctx.visual.features, keys, attention, idx, neighbours=4)
    torch.testing.assert_close(out.features, want)
    torch.testing.assert_close(out.weights, weights)


def test_plain_prumerge_under_a_budget_is_the_top_k() -> None:
    ctx = make_context(3, 16, 16, 5, seed=2)
    scores = ctx.cls_attention(-1)
    selection = PruMergeSelector().select(scores, ctx)
    assert torch.equal(selection.keep_idx, scores.topk(5).indices.sort().values)
    assert ctx.stash[PRUMERGE_ADAPTIVE].shape == (3,)


def test_merger_reads_its_layer() -> None:
    merger = PruMergeMerger(layer=-3)
    assert merger.vision_layers() == {-3}
    assert merger.required_capabilities() == {Capability.VISION_BLOCK, Capability.CLS_ATTENTION}


def test_registered_and_buildable_from_a_config() -> None:
    pipeline = Runtime(autoload=False).build_pipeline(
        {
            "scorer": {"name": "cls_attention", "layer": -1},
            "selector": {"name": "prumerge", "plus": True},
            "merger": {"name": "prumerge_merge"},
            "keep_ratio": 0.111,
        }
    )
    assert isinstance(pipeline.selector, PruMergeSelector)
    assert pipeline.selector.config.plus
    assert pipeline.vision_layers() == {-1}


class _PlusSelector(PruMergeSelector):
    @classmethod
    def contract_config(cls) -> PruMergeSelectorConfig:
        return PruMergeSelectorConfig(plus=True)


def test_contract_of_prumerge_plus() -> None:
    check_stage(_PlusSelector)
