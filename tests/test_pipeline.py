from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import pytest
import torch

from tokenprune import functional as F
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.errors import BudgetError, CapabilityError, ConfigError, ShapeError
from tokenprune.pipeline import LlmStage, Pipeline
from tokenprune.plugin import Runtime, hookimpl
from tokenprune.stages.base import Merger, Scorer, Scores, Selector, StageConfig
from tokenprune.stages.mergers.drop import DropMerger
from tokenprune.stages.scorers.cls_attention import ClsAttentionScorer
from tokenprune.stages.scorers.fastv import FastVScorer
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.testing import make_context
from tokenprune.types import PrunedTokens, Selection, VisualTokens


def features(batch: int = 2, n: int = 16, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(seed))


def context(x: torch.Tensor, keep: int) -> PruneContext:
    return PruneContext(visual=VisualTokens(x), keep=keep)


# -- end to end on bare tensors ------------------------------------------------------------------


def test_random_topk_drop_end_to_end() -> None:
    x = features()
    pipeline = Pipeline(RandomScorer(seed=3), TopKSelector(), DropMerger(), keep=5)
    out = pipeline(context(x, pipeline.budget(16)))

    expected_idx = F.topk_keep_indices(F.random_scores(2, 16, seed=3), 5)
    assert torch.equal(out.keep_idx, expected_idx)
    assert out.features.shape == (2, 5, 8)
    for b in range(2):
        assert torch.equal(out.features[b], x[b, expected_idx[b]])
    assert torch.equal(out.weights, torch.ones(2, 5))


def test_pipeline_is_reproducible_and_seed_dependent() -> None:
    x = features()
    a = Pipeline(RandomScorer(seed=1), TopKSelector(), keep=4)(context(x, 4))
    b = Pipeline(RandomScorer(seed=1), TopKSelector(), keep=4)(context(x, 4))
    c = Pipeline(RandomScorer(seed=2), TopKSelector(), keep=4)(context(x, 4))
    assert torch.equal(a.keep_idx, b.keep_idx)
    assert not torch.equal(a.keep_idx, c.keep_idx)


def test_merger_defaults_to_drop() -> None:
    assert isinstance(Pipeline(RandomScorer(), TopKSelector(), keep=1).merger, DropMerger)


def test_full_budget_keeps_every_token_in_order() -> None:
    x = features(n=9)
    out = Pipeline(RandomScorer(), TopKSelector(), keep_ratio=1.0)(context(x, 9))
    assert torch.equal(out.features, x)
    assert out.keep_idx.tolist() == [list(range(9))] * 2


def test_from_config_builds_the_named_stages() -> None:
    runtime = Runtime(autoload=False)
    config = {
        "scorer": {"name": "random", "seed": 4},
        "selector": {"name": "topk"},
        "keep_ratio": 0.25,
        "positions": "original",
    }
    pipeline = Pipeline.from_config(config, runtime=runtime)
    assert isinstance(pipeline.scorer, RandomScorer)
    assert pipeline.scorer.config.seed == 4
    assert isinstance(pipeline.selector, TopKSelector)
    assert isinstance(pipeline.merger, DropMerger)
    assert pipeline.positions == "original"
    assert pipeline.runtime is runtime
    assert pipeline.budget(576) == 144
    assert repr(pipeline) == (
        "Pipeline(RandomScorer(seed=4), TopKSelector(score=None), DropMerger(), "
        "keep_ratio=0.25, positions='original')"
    )


def test_budget_and_constructor_validation() -> None:
    assert Pipeline(RandomScorer(), TopKSelector(), keep_ratio=0.111).budget(576) == 64
    assert Pipeline(RandomScorer(), TopKSelector(), keep=64).budget(576) == 64
    with pytest.raises(BudgetError, match="exactly one"):
        Pipeline(RandomScorer(), TopKSelector())
    with pytest.raises(BudgetError, match="exactly one"):
        Pipeline(RandomScorer(), TopKSelector(), keep=3, keep_ratio=0.5)
    with pytest.raises(BudgetError, match="must be in"):
        Pipeline(RandomScorer(), TopKSelector(), keep_ratio=1.5)
    with pytest.raises(BudgetError, match="out of range for N=10"):
        Pipeline(RandomScorer(), TopKSelector(), keep=11).budget(10)
    with pytest.raises(ValueError, match="positions must be 'contiguous' or 'original'"):
        Pipeline(RandomScorer(), TopKSelector(), keep=1, positions="shifted")  # type: ignore[arg-type]


def test_stages_must_have_the_right_roles() -> None:
    with pytest.raises(TypeError, match="expected a Scorer, got TopKSelector"):
        Pipeline(TopKSelector(), TopKSelector(), keep=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a Merger, got RandomScorer"):
        Pipeline(RandomScorer(), TopKSelector(), RandomScorer(), keep=1)  # type: ignore[arg-type]


def test_requires_and_vision_layers_are_unions_over_stages() -> None:
    pipeline = Pipeline(ClsAttentionScorer(layer=-3), TopKSelector(), keep=1)
    assert pipeline.requires == {Capability.VISION_BLOCK, Capability.CLS_ATTENTION}
    assert pipeline.vision_layers() == {-3}
    assert Pipeline(RandomScorer(), TopKSelector(), keep=1).requires == frozenset()


def test_cls_attention_pipeline_on_a_synthetic_context() -> None:
    ctx = make_context(2, 16, 8, 4, seed=0)
    out = Pipeline(ClsAttentionScorer(layer=-1), TopKSelector(), keep=4)(ctx)
    assert torch.equal(out.keep_idx, F.topk_keep_indices(ctx.cls_attention(-1), 4))


# -- check_compatible ----------------------------------------------------------------------------


class BareAdapter:
    """Stands in for a ModelAdapter class: no capabilities at all."""

    name: ClassVar[str] = "bare"
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    capability_hints: ClassVar[Mapping[Capability, str]] = {}


class HintingAdapter(BareAdapter):
    name: ClassVar[str] = "hinting"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.VISION_BLOCK})
    capability_hints: ClassVar[Mapping[Capability, str]] = {
        Capability.CLS_ATTENTION: "use the received_attention scorer instead"
    }


class FullAdapter(BareAdapter):
    name: ClassVar[str] = "full"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(Capability)


def test_check_compatible_names_the_missing_capability_and_stage() -> None:
    pipeline = Pipeline(ClsAttentionScorer(), TopKSelector(), keep=4)
    with pytest.raises(CapabilityError) as info:
        pipeline.check_compatible(BareAdapter)  # type: ignore[arg-type]
    message = str(info.value)
    assert "scorer 'cls_attention' requires capability" in message
    # Both are missing; the first in name order is reported.
    assert "requires capability 'cls_attention'" in message
    assert "adapter 'bare' does not provide" in message


def test_check_compatible_reports_the_adapters_hint() -> None:
    pipeline = Pipeline(ClsAttentionScorer(), TopKSelector(), keep=4)
    with pytest.raises(
        CapabilityError,
        match=r"requires capability 'cls_attention', which adapter 'hinting' does not provide; "
        r"use the received_attention scorer instead",
    ):
        pipeline.check_compatible(HintingAdapter)  # type: ignore[arg-type]


def test_check_compatible_passes_when_everything_is_provided() -> None:
    # No exception: everything the stages need is there (or they need nothing).
    Pipeline(ClsAttentionScorer(), TopKSelector(), keep=4).check_compatible(FullAdapter)  # type: ignore[arg-type]
    Pipeline(RandomScorer(), TopKSelector(), keep=1).check_compatible(BareAdapter)  # type: ignore[arg-type]


# -- observers -----------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[PruneContext, PrunedTokens, Pipeline]] = []

    @hookimpl
    def tokenprune_after_prune(
        self, ctx: PruneContext, pruned: PrunedTokens, pipeline: Pipeline
    ) -> None:
        self.calls.append((ctx, pruned, pipeline))


def test_after_prune_observer_is_called_once_per_call_with_the_result() -> None:
    recorder = Recorder()
    runtime = Runtime(autoload=False, plugins=[recorder])
    pipeline = Pipeline(RandomScorer(), TopKSelector(), keep=3, runtime=runtime)

    ctx1, ctx2 = context(features(seed=1), 3), context(features(seed=2), 3)
    out1 = pipeline(ctx1)
    assert len(recorder.calls) == 1
    out2 = pipeline(ctx2)
    assert len(recorder.calls) == 2
    assert recorder.calls[0][0] is ctx1
    assert recorder.calls[0][1] is out1
    assert recorder.calls[1][0] is ctx2
    assert recorder.calls[1][1] is out2
    assert all(p is pipeline for _, _, p in recorder.calls)


def test_pipelines_built_from_config_notify_the_runtimes_observers() -> None:
    recorder = Recorder()
    runtime = Runtime(autoload=False, plugins=[recorder])
    pipeline = runtime.build_pipeline(
        {"scorer": {"name": "random"}, "selector": {"name": "topk"}, "keep": 2}
    )
    out = pipeline(context(features(), 2))
    assert [pruned for _, pruned, _ in recorder.calls] == [out]


def test_no_observer_call_without_a_runtime() -> None:
    recorder = Recorder()
    Runtime(autoload=False, plugins=[recorder])  # registered elsewhere, not on this pipeline
    Pipeline(RandomScorer(), TopKSelector(), keep=2)(context(features(), 2))
    assert recorder.calls == []


def test_observer_is_not_called_when_a_stage_fails() -> None:
    recorder = Recorder()
    runtime = Runtime(autoload=False, plugins=[recorder])
    pipeline = Pipeline(RandomScorer(), ShortSelector(), keep=3, runtime=runtime)
    with pytest.raises(ShapeError):
        pipeline(context(features(), 3))
    assert recorder.calls == []


# -- broken stages -------------------------------------------------------------------------------


class _Config(StageConfig):
    name: Literal["broken"] = "broken"


class ShortSelector(Selector[_Config]):
    """Keeps one token too few."""

    name: ClassVar[str] = "broken"
    Config: ClassVar[type[StageConfig]] = _Config

    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        assert isinstance(scores, torch.Tensor)
        return Selection(F.topk_keep_indices(scores, ctx.keep - 1))


class OutOfRangeSelector(ShortSelector):
    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        n = ctx.visual.num_tokens
        return Selection(torch.arange(n - ctx.keep + 1, n + 1).expand(ctx.visual.batch_size, -1))


class WideScorer(Scorer[_Config]):
    name: ClassVar[str] = "broken"
    Config: ClassVar[type[StageConfig]] = _Config

    def score(self, ctx: PruneContext) -> Scores:
        return torch.zeros(ctx.visual.batch_size, ctx.visual.num_tokens + 1)


class NanMapScorer(WideScorer):
    def score(self, ctx: PruneContext) -> Scores:
        good = torch.zeros(ctx.visual.batch_size, ctx.visual.num_tokens)
        return {"task": good, "saliency": torch.full_like(good, float("nan"))}


class ExtraTokenMerger(Merger[_Config]):
    name: ClassVar[str] = "broken"
    Config: ClassVar[type[StageConfig]] = _Config

    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        idx = torch.cat([selection.keep_idx, selection.keep_idx[:, -1:] * 0], dim=1)
        feats = F.gather_tokens(ctx.visual.features, idx)
        return PrunedTokens(feats, idx, torch.ones(idx.shape))


class InfMerger(ExtraTokenMerger):
    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        out = DropMerger().merge(ctx, selection)
        return PrunedTokens(out.features * float("inf"), out.keep_idx, out.weights)


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        (
            (RandomScorer(), ShortSelector()),
            r"selector 'broken' kept \(2, 3\) tokens, expected \(B, K\) = \(2, 4\)",
        ),
        (
            (RandomScorer(), OutOfRangeSelector()),
            r"selector 'broken' returned indices outside \[0, 16\)",
        ),
        (
            (WideScorer(), TopKSelector()),
            r"broken scores must be \(B, N\) = \(2, 16\), got \(2, 17\)",
        ),
        ((NanMapScorer(), TopKSelector(score="task")), r"broken saliency contains 32 NaN/Inf"),
        (
            (RandomScorer(), TopKSelector(), ExtraTokenMerger()),
            r"merger 'broken' returned \(2, 5\) tokens, expected \(B, K\) = \(2, 4\)",
        ),
        ((RandomScorer(), TopKSelector(), InfMerger()), r"broken output contains NaN/Inf"),
    ],
    ids=["short-selection", "out-of-range", "wide-scores", "nan-map", "extra-token", "inf-merge"],
)
def test_pipeline_rejects_wrong_stage_results(stages: tuple[Any, ...], match: str) -> None:
    pipeline = Pipeline(*stages, keep=4)
    with pytest.raises(ShapeError, match=match):
        pipeline(context(features(), 4))


def test_pipeline_rejects_non_finite_input_features_before_scoring() -> None:
    x = features()
    x[1, 3, 0] = float("nan")
    with pytest.raises(ShapeError, match=r"visual features contains NaN/Inf"):
        Pipeline(WideScorer(), TopKSelector(), keep=4)(context(x, 4))


# -- multi-stage pipelines (LLM positions) -------------------------------------------------------
def _fastv(**budget: Any) -> Pipeline:
    return Pipeline(FastVScorer(), TopKSelector(), **(budget or {"keep_ratio": 0.5}))


def test_llm_only_pipeline_has_no_encoder_stage() -> None:
    pipeline = Pipeline.llm_only([LlmStage(2, _fastv())])
    assert not pipeline.has_encoder_stage
    assert pipeline.stages == ()
    assert pipeline.llm_layers == (2,)
    assert pipeline.requires == {Capability.LLM_ATTENTION}
    assert "encoder=None" in repr(pipeline)
    with pytest.raises(ConfigError, match="at least one LLM stage"):
        Pipeline.llm_only([])


def test_llm_stages_require_llm_attention_even_with_plain_stages() -> None:
    random_inside = Pipeline(RandomScorer(), TopKSelector(), keep=4)
    pipeline = Pipeline(RandomScorer(), TopKSelector(), keep=8, llm=[LlmStage(1, random_inside)])
    assert Capability.LLM_ATTENTION in pipeline.requires


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda s: s(0, _fastv()), ConfigError, "layer must be an int >= 1"),
        (lambda s: s(True, _fastv()), ConfigError, "layer must be an int >= 1"),
        (
            lambda s: s(2, Pipeline.llm_only([s(1, _fastv())])),
            ConfigError,
            "single position",
        ),
        (
            lambda s: s(2, Pipeline(ClsAttentionScorer(), TopKSelector(), keep=4)),
            ConfigError,
            "'cls_attention' at LLM layer 2 requires capability 'cls_attention'",
        ),
        (
            lambda s: Pipeline(
                RandomScorer(), TopKSelector(), keep=8, llm=[s(3, _fastv()), s(2, _fastv())]
            ),
            ConfigError,
            "strictly increasing",
        ),
        (
            lambda s: Pipeline(RandomScorer(), TopKSelector(), keep=8, llm=[s(2, _fastv(keep=9))]),
            BudgetError,
            r"llm.0.keep=9 keeps more tokens than arrive .* \(keep=8\)",
        ),
    ],
)
def test_llm_stage_errors(build: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build(LlmStage)


def test_llm_capture_stage_at_the_encoder_is_refused_by_check_compatible() -> None:
    from tokenprune.adapters.llava import LlavaAdapter

    with pytest.raises(ConfigError, match="exists only inside the language model"):
        _fastv().check_compatible(LlavaAdapter)


def test_multi_stage_config_round_trip_and_schema() -> None:
    runtime = Runtime(autoload=False)
    data = {
        "scorer": {"name": "cls_attention"},
        "selector": {"name": "topk"},
        "keep": 192,
        "llm": [{"layer": 2, "keep": 64}, {"layer": 8, "keep_ratio": 0.5}],
    }
    config = runtime.parse_config(data)
    assert runtime.parse_config(config.to_dict()) == config
    assert config.to_dict()["llm"][0] == {
        "layer": 2,
        "scorer": {"name": "fastv"},
        "selector": {"name": "topk"},
        "merger": {"name": "drop"},
        "keep": 64,
    }
    assert (
        "llm" not in runtime.parse_config({k: v for k, v in data.items() if k != "llm"}).to_dict()
    )
    schema = json.dumps(runtime.config_model().model_json_schema())
    assert '"fastv"' in schema
    assert '"llm"' in schema
    pipeline = runtime.build_pipeline(config)
    assert pipeline.llm_layers == (2, 8)
    assert [s.pipeline.budget(192) for s in pipeline.llm] == [64, 96]
