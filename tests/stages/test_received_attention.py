"""The ``received_attention`` scorer and ``PruneContext.received_attention``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tokenprune import functional as F
from tokenprune.capabilities import Capability
from tokenprune.errors import CapabilityError, ConfigError, ShapeError
from tokenprune.plugin import Runtime
from tokenprune.stages.scorers.received_attention import (
    ReceivedAttentionScorer,
    ReceivedAttentionScorerConfig,
)
from tokenprune.testing import check_stage, make_context


def test_config_defaults_to_the_last_block() -> None:
    scorer = ReceivedAttentionScorer()
    assert scorer.config == ReceivedAttentionScorerConfig(layer=-1)
    assert scorer.vision_layers() == frozenset({-1})
    assert scorer.requires == {Capability.VISION_BLOCK, Capability.RECEIVED_ATTENTION}


def test_registered_and_configurable_by_name() -> None:
    runtime = Runtime(autoload=False)
    assert runtime.stages.get("scorer", "received_attention") is ReceivedAttentionScorer
    cfg = runtime.parse_config(
        {
            "scorer": {"name": "received_attention", "layer": 3},
            "selector": {"name": "topk"},
            "keep": 4,
        }
    )
    assert cfg.scorer == ReceivedAttentionScorerConfig(layer=3)
    with pytest.raises(ConfigError, match="layr"):
        runtime.parse_config(
            {
                "scorer": {"name": "received_attention", "layr": 3},
                "selector": {"name": "topk"},
                "keep": 4,
            }
        )


def test_stage_contract() -> None:
    check_stage(ReceivedAttentionScorer)


@pytest.mark.parametrize("with_cls_block", [True, False])
def test_scores_are_the_functional_received_attention(with_cls_block: bool) -> None:
    ctx = make_context(3, 9, 8, 4, seed=1, with_cls_block=with_cls_block, num_layers=3)
    scores = ReceivedAttentionScorer(layer=1).score(ctx)
    block = ctx.blocks[1]
    want = F.received_attention(
        block.normed(),
        block.q_proj,
        block.k_proj,
        num_heads=block.num_heads,
        num_prefix_tokens=block.num_prefix_tokens,
    )
    torch.testing.assert_close(scores, want)
    assert scores.shape == (3, 9)
    assert ctx.received_attention(-2) is scores  # cached per call, negative index resolved


def test_uses_the_blocks_rotary_segments_and_groups() -> None:
    ctx = make_context(2, 4, 8, 2, seed=2, with_cls_block=False, num_layers=1)
    block = ctx.blocks[0]
    hidden = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(3))  # 4 groups of 4
    segments = torch.tensor([0] * 8 + [1] * 8)
    calls: list[int] = []

    def rotary(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(q.shape[1])
        return q.flip(-1), k.flip(-1)

    grouped = dataclasses.replace(
        block, hidden=hidden, rotary=rotary, segments=segments, group_size=4
    )
    ctx = dataclasses.replace(ctx, blocks={0: grouped})
    scores = ReceivedAttentionScorer(layer=0).score(ctx)
    want = F.received_attention(
        grouped.normed(),
        block.q_proj,
        block.k_proj,
        num_heads=block.num_heads,
        rotary=rotary,
        segments=segments,
        group_size=4,
    )
    torch.testing.assert_close(scores, want)
    assert calls == [16, 16]
    torch.testing.assert_close(scores.sum(-1), torch.full((2,), 2 / 4))  # 2 segments, mean of 4


def test_missing_capability_is_named() -> None:
    ctx = make_context(2, 4, 8, 2, seed=0)
    ctx = dataclasses.replace(ctx, capabilities=ctx.capabilities - {Capability.RECEIVED_ATTENTION})
    with pytest.raises(CapabilityError, match="received_attention"):
        ReceivedAttentionScorer().score(ctx)


def test_block_that_does_not_match_the_visual_tokens() -> None:
    ctx = make_context(2, 4, 8, 2, seed=0, num_layers=1)
    block = dataclasses.replace(ctx.blocks[0], group_size=2)
    ctx = dataclasses.replace(ctx, blocks={0: block})
    with pytest.raises(ShapeError, match="groups of 2"):
        ReceivedAttentionScorer(layer=0).score(ctx)
