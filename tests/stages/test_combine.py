"""The combine scorer (score fusion) and the uniform scorer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import pytest
import torch
from pydantic import ValidationError

from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.errors import ConfigError
from tokenprune.functional.combine import combine_scores
from tokenprune.plugin import Runtime
from tokenprune.stages.base import Scorer, StageConfig
from tokenprune.stages.scorers.cls_attention import ClsAttentionScorer
from tokenprune.stages.scorers.combine import CombineEntry, CombineScorer, CombineScorerConfig
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.scorers.uniform import UniformScorer
from tokenprune.testing import make_context


class _TwoMapsConfig(StageConfig):
    name: Literal["two_maps"] = "two_maps"


class _TwoMaps(Scorer[_TwoMapsConfig]):
    """A plugin-style scorer with two named maps."""

    name: ClassVar[str] = "two_maps"
    Config: ClassVar[type[StageConfig]] = _TwoMapsConfig

    def score(self, ctx: PruneContext) -> Mapping[str, torch.Tensor]:
        feats = ctx.visual.features
        return {"norm": feats.norm(dim=-1), "first": feats[..., 0]}


class _TwoMapsPlugin:
    from tokenprune.plugin import hookimpl

    @hookimpl
    def tokenprune_register_stages(self, registry: Any) -> None:
        registry.add(_TwoMaps)


def test_mixes_the_normalised_maps_with_their_weights() -> None:
    ctx = make_context(2, 16, 16, 4, seed=8)
    scorer = CombineScorer(
        scorers=[
            {"name": "cls_attention", "weight": 0.7, "config": {"layer": -1}},
            {"name": "random", "weight": 0.3, "config": {"seed": 5}},
        ],
        normalize="zscore",
    )
    parts = [ClsAttentionScorer(layer=-1).score(ctx), RandomScorer(seed=5).score(ctx)]
    want = combine_scores(parts, [0.7, 0.3], method="zscore")
    torch.testing.assert_close(scorer.score(ctx), want)
    assert scorer.required_capabilities() == {Capability.VISION_BLOCK, Capability.CLS_ATTENTION}
    assert scorer.vision_layers() == {-1}


def test_runtime_resolves_plugin_scorers_and_named_maps() -> None:
    runtime = Runtime(autoload=False)
    runtime.add_plugin(_TwoMapsPlugin(), name="two-maps")
    config = {
        "scorer": {
            "name": "combine",
            "normalize": "minmax",
            "scorers": [
                {"name": "two_maps", "map": "first", "weight": 2.0},
                {"name": "uniform"},
            ],
        },
        "selector": {"name": "topk"},
        "keep": 2,
    }
    pipeline = runtime.build_pipeline(config)
    assert isinstance(pipeline.scorer, CombineScorer)
    ctx = make_context(1, 8, 16, 2)
    got = pipeline.scorer.score(ctx)
    first = ctx.visual.features[..., 0]
    want = 2.0 * (first - first.min()) / (first.max() - first.min())
    torch.testing.assert_close(got, want)
    several = CombineScorer(
        CombineScorerConfig(scorers=(CombineEntry(name="two_maps"),)), stages=runtime.stages
    )
    with pytest.raises(ConfigError, match="set the entry's `map`"):
        several.score(ctx)
    wrong = CombineScorer(
        CombineScorerConfig(scorers=(CombineEntry(name="two_maps", map="x"),)),
        stages=runtime.stages,
    )
    with pytest.raises(ConfigError, match="`map`='x'"):
        wrong.score(ctx)


def test_direct_construction_finds_only_builtin_scorers() -> None:
    with pytest.raises(ConfigError, match=r"unknown scorer 'two_maps'.*'uniform'"):
        CombineScorer(scorers=[{"name": "two_maps"}])


def test_bad_entries_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"scorers\[0\] \('random'\) has invalid options: seed"):
        CombineScorer(scorers=[{"name": "random", "config": {"seed": "x"}}])
    with pytest.raises(ConfigError, match="unknown scorer 'topk'"):
        CombineScorer(scorers=[{"name": "topk"}], stages=Runtime(autoload=False).stages)
    with pytest.raises(ValidationError):
        CombineScorerConfig(scorers=())
    with pytest.raises(ValidationError, match="not inside `config`"):
        CombineEntry(name="random", config={"name": "random"})
    with pytest.raises(ValidationError):
        CombineEntry(name="random", weight=float("inf"))


def test_instances_can_be_passed_directly() -> None:
    config = CombineScorerConfig(scorers=(CombineEntry(name="anything"),))
    scorer = CombineScorer(config, instances=[UniformScorer()])
    assert isinstance(scorer.scorers[0], UniformScorer)
    with pytest.raises(ConfigError, match="one Scorer instance per entry"):
        CombineScorer(config, instances=[])


def test_uniform_scores_are_zero() -> None:
    ctx = make_context(2, 7, 16, 3)
    assert torch.equal(UniformScorer().score(ctx), torch.zeros(2, 7))
