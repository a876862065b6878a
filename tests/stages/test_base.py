from __future__ import annotations

from typing import ClassVar, Literal

import pytest
import torch
from pydantic import ValidationError

from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.errors import ConfigError
from tokenprune.stages.base import Scorer, StageConfig, pick_score
from tokenprune.stages.mergers.drop import DropMerger
from tokenprune.stages.scorers.cls_attention import ClsAttentionScorer
from tokenprune.stages.scorers.random import RandomScorer, RandomScorerConfig
from tokenprune.stages.selectors.topk import TopKSelector, TopKSelectorConfig

# -- pick_score --------------------------------------------------------------------------------


def test_pick_score_passes_a_tensor_through() -> None:
    scores = torch.zeros(2, 3)
    assert pick_score(scores, None, "topk") is scores
    assert pick_score(scores, "ignored", "topk") is scores


def test_pick_score_takes_the_only_map_of_a_mapping() -> None:
    only = torch.ones(1, 4)
    assert pick_score({"saliency": only}, None, "topk") is only


def test_pick_score_takes_the_named_map() -> None:
    a, b = torch.zeros(1, 2), torch.ones(1, 2)
    assert pick_score({"task": a, "saliency": b}, "saliency", "topk") is b


def test_pick_score_several_maps_without_a_key_is_an_error() -> None:
    maps = {"task": torch.zeros(1, 2), "saliency": torch.ones(1, 2)}
    with pytest.raises(ConfigError, match=r"topk: .*several score maps \['saliency', 'task'\]"):
        pick_score(maps, None, "topk")
    with pytest.raises(ConfigError, match=r"set the selector's `score` field"):
        pick_score(maps, None, "topk")


def test_pick_score_unknown_key_lists_the_maps() -> None:
    maps = {"task": torch.zeros(1, 2)}
    with pytest.raises(ConfigError, match=r"mine: `score`='tsk' is not one of the maps \['task'\]"):
        pick_score(maps, "tsk", "mine")


# -- Stage construction --------------------------------------------------------------------------


def test_stage_builds_its_config_from_keyword_fields() -> None:
    stage = RandomScorer(seed=7)
    assert isinstance(stage.config, RandomScorerConfig)
    assert stage.config.seed == 7
    assert stage.config.name == "random"


def test_stage_takes_a_config_object() -> None:
    config = RandomScorerConfig(seed=5)
    assert RandomScorer(config).config is config


def test_stage_defaults() -> None:
    assert RandomScorer().config == RandomScorerConfig()
    assert TopKSelector().config.score is None


def test_stage_rejects_a_config_and_keyword_fields_together() -> None:
    with pytest.raises(ConfigError, match=r"RandomScorer: pass either a config or keyword fields"):
        RandomScorer(RandomScorerConfig(), seed=1)


def test_stage_rejects_another_stages_config() -> None:
    with pytest.raises(ConfigError, match=r"RandomScorer needs a RandomScorerConfig, got Top"):
        RandomScorer(TopKSelectorConfig())  # type: ignore[arg-type]


def test_stage_rejects_a_misspelled_keyword_field_naming_it() -> None:
    # Today this is pydantic's ValidationError; both it and ConfigError are ValueErrors.
    with pytest.raises(ValueError, match=r"sed"):
        RandomScorer(sed=3)


def test_stage_config_is_frozen() -> None:
    stage = RandomScorer(seed=1)
    with pytest.raises(ValidationError, match="frozen"):
        stage.config.seed = 2  # type: ignore[misc]


def test_stage_config_forbids_extra_fields() -> None:
    with pytest.raises(ValidationError, match="layr"):
        ClsAttentionScorer.Config(name="cls_attention", layr=1)  # type: ignore[call-arg]


def test_stage_class_attributes() -> None:
    assert (RandomScorer.role, RandomScorer.name) == ("scorer", "random")
    assert (TopKSelector.role, TopKSelector.name) == ("selector", "topk")
    assert (DropMerger.role, DropMerger.name) == ("merger", "drop")
    assert ClsAttentionScorer.requires == {Capability.VISION_BLOCK, Capability.CLS_ATTENTION}
    assert RandomScorer.requires == frozenset()


def test_stage_vision_layers_and_required_capabilities() -> None:
    assert RandomScorer().vision_layers() == frozenset()
    assert ClsAttentionScorer(layer=-3).vision_layers() == {-3}
    stage = ClsAttentionScorer()
    assert stage.required_capabilities() == ClsAttentionScorer.requires


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (RandomScorer(seed=3), "RandomScorer(seed=3)"),
        (TopKSelector(score="task"), "TopKSelector(score='task')"),
        (TopKSelector(), "TopKSelector(score=None)"),
        (DropMerger(), "DropMerger()"),
        (ClsAttentionScorer(), "ClsAttentionScorer(layer=-2)"),
    ],
)
def test_stage_repr_shows_the_config_without_the_name(stage: object, expected: str) -> None:
    assert repr(stage) == expected


def test_role_bases_are_abstract() -> None:
    class HalfScorerConfig(StageConfig):
        name: Literal["half"] = "half"

    class HalfScorer(Scorer[HalfScorerConfig]):
        name: ClassVar[str] = "half"
        Config: ClassVar[type[StageConfig]] = HalfScorerConfig

    with pytest.raises(TypeError, match="abstract"):
        HalfScorer()  # type: ignore[abstract]

    class WholeScorer(HalfScorer):
        def score(self, ctx: PruneContext) -> torch.Tensor:
            return torch.zeros(ctx.visual.batch_size, ctx.visual.num_tokens)

    assert repr(WholeScorer()) == "WholeScorer()"
