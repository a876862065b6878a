"""The stage contract kit itself: it passes good stages and names what is wrong with bad ones."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import pytest
import torch

from tokenprune import functional as F
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.errors import CapabilityError, ConfigError
from tokenprune.plugin import Runtime, hookimpl
from tokenprune.registry import StageRegistry
from tokenprune.stages.base import Merger, Scorer, Scores, Selector, StageConfig, pick_score
from tokenprune.stages.mergers.drop import DropMerger
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.testing import check_stage, make_context, registered_stages
from tokenprune.types import PrunedTokens, Selection

# -- test-local stages -------------------------------------------------------------------------


class _ScorerConfig(StageConfig):
    name: Literal["probe"] = "probe"


class _SelectorConfig(StageConfig):
    name: Literal["probe"] = "probe"


class _MergerConfig(StageConfig):
    name: Literal["probe"] = "probe"


class GoodScorer(Scorer[_ScorerConfig]):
    name: ClassVar[str] = "probe"
    Config: ClassVar[type[StageConfig]] = _ScorerConfig

    def score(self, ctx: PruneContext) -> Scores:
        return ctx.visual.features.norm(dim=-1)


class GlobalRngScorer(GoodScorer):
    def score(self, ctx: PruneContext) -> Scores:
        return torch.rand(ctx.visual.batch_size, ctx.visual.num_tokens)


class IntegerScorer(GoodScorer):
    def score(self, ctx: PruneContext) -> Scores:
        return torch.zeros(ctx.visual.batch_size, ctx.visual.num_tokens, dtype=torch.long)


class StatefulScorer(GoodScorer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = itertools.count()

    def score(self, ctx: PruneContext) -> Scores:
        return ctx.visual.features.norm(dim=-1) + next(self.calls)


class InPlaceScorer(GoodScorer):
    def score(self, ctx: PruneContext) -> Scores:
        return ctx.visual.features.mul_(2.0).norm(dim=-1)


class EmptyMappingScorer(GoodScorer):
    def score(self, ctx: PruneContext) -> Scores:
        return {}


class TransposedScorer(GoodScorer):
    """Reads the [CLS] attention of the last block; it must agree with N or raise."""

    requires: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.VISION_BLOCK, Capability.CLS_ATTENTION}
    )

    def vision_layers(self) -> frozenset[int]:
        return frozenset({-1})

    def score(self, ctx: PruneContext) -> Scores:
        return ctx.cls_attention(-1)


class CrashingTextScorer(GoodScorer):
    """Declares the text query but crashes with an AttributeError when it is missing."""

    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.TEXT_QUERY})

    def score(self, ctx: PruneContext) -> Scores:
        assert ctx.text is not None
        lengths = torch.tensor([float(len(t)) for t in ctx.text.texts])  # type: ignore[union-attr]
        return lengths[:, None].expand(-1, ctx.visual.num_tokens).clone()


class PoliteTextScorer(CrashingTextScorer):
    def score(self, ctx: PruneContext) -> Scores:
        ctx.require(Capability.TEXT_QUERY, self.name)
        text = ctx.require_text(self.name)
        if text.texts is None:
            raise CapabilityError("no question")
        return super().score(ctx)


class GoodSelector(Selector[_SelectorConfig]):
    name: ClassVar[str] = "probe"
    Config: ClassVar[type[StageConfig]] = _SelectorConfig

    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        s = pick_score(scores, None, self.name)
        F.check_scores(s, batch=ctx.visual.batch_size, num_tokens=ctx.visual.num_tokens)
        return Selection(F.topk_keep_indices(s, ctx.keep))


class ShortSelector(GoodSelector):
    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        idx = super().select(scores, ctx).keep_idx
        return Selection(idx[:, :-1])


class UncheckedSelector(GoodSelector):
    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        s = pick_score(scores, None, self.name)
        return Selection(F.topk_keep_indices(s.nan_to_num(0.0).reshape(s.shape[0], -1), ctx.keep))


class RandomTieSelector(GoodSelector):
    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        s = pick_score(scores, None, self.name)
        F.check_scores(s, batch=ctx.visual.batch_size, num_tokens=ctx.visual.num_tokens)
        jitter = torch.rand(s.shape, generator=torch.Generator().manual_seed(id(ctx) % 2**31))
        return Selection(F.topk_keep_indices(s + 1e-3 * jitter, ctx.keep))


class TwoMapSelector(GoodSelector):
    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        if not isinstance(scores, Mapping) or set(scores) != {"task", "saliency"}:
            raise ConfigError("needs the 'task' and 'saliency' maps")
        return super().select(scores["task"] + scores["saliency"], ctx)


class NamedTwoMapSelector(TwoMapSelector):
    @classmethod
    def contract_score_names(cls) -> tuple[str, ...]:
        return ("task", "saliency")


class GoodMerger(Merger[_MergerConfig]):
    name: ClassVar[str] = "probe"
    Config: ClassVar[type[StageConfig]] = _MergerConfig

    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        feats = F.gather_tokens(ctx.visual.features, selection.keep_idx)
        return PrunedTokens(feats, selection.keep_idx, torch.ones(selection.keep_idx.shape))


class IndexingMerger(GoodMerger):
    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        idx = selection.keep_idx
        if idx.shape[0] != ctx.visual.batch_size:
            raise ValueError("batch mismatch")
        return super().merge(ctx, selection)


class DoubleMerger(GoodMerger):
    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        out = super().merge(ctx, selection)
        return PrunedTokens(out.features.double(), out.keep_idx, out.weights)


class ReorderingMerger(GoodMerger):
    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        out = super().merge(ctx, selection)
        return PrunedTokens(out.features, out.keep_idx.flip(-1), out.weights)


class _RequiredConfig(StageConfig):
    name: Literal["probe"] = "probe"
    temperature: float


class RequiredFieldScorer(GoodScorer):
    Config: ClassVar[type[StageConfig]] = _RequiredConfig


class HookedRequiredFieldScorer(RequiredFieldScorer):
    @classmethod
    def contract_config(cls) -> StageConfig:
        return _RequiredConfig(temperature=0.5)


class _MisnamedConfig(StageConfig):
    name: Literal["other"] = "other"


class MisnamedScorer(GoodScorer):
    Config: ClassVar[type[StageConfig]] = _MisnamedConfig


# -- check_stage -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage_cls",
    [
        GoodScorer,
        GoodSelector,
        GoodMerger,
        PoliteTextScorer,
        TransposedScorer,
        NamedTwoMapSelector,
        HookedRequiredFieldScorer,
        RandomScorer,
        TopKSelector,
        DropMerger,
    ],
)
def test_check_stage_passes_good_stages(stage_cls: Any) -> None:
    check_stage(stage_cls)


@pytest.mark.parametrize(
    ("stage_cls", "message"),
    [
        (GlobalRngScorer, "changed the global torch RNG"),
        (IntegerScorer, "is torch.int64, not floating"),
        (StatefulScorer, "score() is not deterministic"),
        (InPlaceScorer, "modified its input ctx.visual.features in place"),
        (EmptyMappingScorer, "non-empty mapping of named (B, N) tensors"),
        (CrashingTextScorer, "without capability 'text_query' raised TypeError"),
        (ShortSelector, "keep_idx has shape (1, 0)"),
        (UncheckedSelector, "select() accepted scores of shape (B, N + 1) = (3, 17) silently"),
        (RandomTieSelector, "select() is not deterministic"),
        (TwoMapSelector, "define a classmethod contract_score_names()"),
        (IndexingMerger, "raised ValueError (batch mismatch); raise a tokenprune error"),
        (DoubleMerger, "features are torch.float64"),
        (ReorderingMerger, "keep_idx differs from the selection"),
        (RequiredFieldScorer, "define a classmethod contract_config()"),
        (MisnamedScorer, "Config.name must be Literal['probe']"),
    ],
)
def test_check_stage_names_the_broken_rule(stage_cls: Any, message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)) as info:
        check_stage(stage_cls)
    assert f"'probe' ({__name__}.{stage_cls.__qualname__})" in str(info.value)


def test_check_stage_rejects_a_class_that_is_not_a_stage() -> None:
    with pytest.raises(AssertionError, match="is not a Scorer, Selector or Merger subclass"):
        check_stage(int)  # type: ignore[arg-type]


def test_check_stage_uses_a_custom_context_factory() -> None:
    calls: list[tuple[int, int, int, int]] = []

    def factory(batch: int, num_tokens: int, dim: int, keep: int, *, seed: int) -> PruneContext:
        calls.append((batch, num_tokens, dim, keep))
        return make_context(batch, num_tokens, dim, keep, seed=seed, text=False)

    check_stage(GoodSelector, make_context=factory)
    assert {n for _, n, _, _ in calls} == {1, 2, 4, 7, 16}
    assert {(n, k) for _, n, _, k in calls} >= {(1, 1), (16, 1), (16, 8), (16, 16)}


def test_check_stage_rejects_a_factory_that_ignores_the_sizes() -> None:
    def factory(batch: int, num_tokens: int, dim: int, keep: int, *, seed: int) -> PruneContext:
        return make_context(batch, num_tokens + 1, dim, keep, seed=seed)

    with pytest.raises(AssertionError, match=r"asked for \(B, N, K\) = \(1, 4, 2\) but built"):
        check_stage(GoodScorer, make_context=factory)


# -- make_context ------------------------------------------------------------------------------


def test_make_context_shapes_and_capabilities() -> None:
    ctx = make_context(2, 12, 8, 5, seed=0, num_layers=3, text_length=4)
    assert ctx.visual.features.shape == (2, 12, 8)
    assert ctx.visual.grid == (3, 4)
    assert ctx.keep == 5
    assert ctx.capabilities == frozenset(Capability)
    assert ctx.num_layers == 3
    assert sorted(ctx.blocks) == [0, 1, 2]
    for index, block in ctx.blocks.items():
        assert block.index == index
        assert block.hidden.shape == (2, 13, 8)
        assert block.num_prefix_tokens == 1
        assert block.normed().shape == (2, 13, 8)
    # The visual tokens are the patches of the last block's input (LLaVA's hidden_states[-2]).
    assert torch.equal(ctx.visual.features, ctx.blocks[2].hidden[:, 1:])
    assert ctx.projector is not None
    assert ctx.projector(ctx.visual.features).shape == (2, 12, 16)
    assert ctx.text is not None
    assert ctx.text.texts is not None
    assert len(ctx.text.texts) == 2
    assert ctx.text.embeddings is not None
    assert ctx.text.embeddings.shape == (2, 4, 16)
    assert ctx.text.mask is not None
    assert ctx.text.mask.tolist() == [[True] * 4, [True, True, True, False]]
    assert ctx.cls_attention(-1).shape == (2, 12)


def test_make_context_is_seeded_and_leaves_the_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    a = make_context(2, 5, 8, 2, seed=3)
    b = make_context(2, 5, 8, 2, seed=3)
    c = make_context(2, 5, 8, 2, seed=4)
    assert torch.equal(before, torch.random.get_rng_state())
    assert torch.equal(a.visual.features, b.visual.features)
    assert torch.equal(a.cls_attention(-2), b.cls_attention(-2))
    assert not torch.equal(a.visual.features, c.visual.features)


def test_make_context_without_cls_or_text() -> None:
    ctx = make_context(1, 7, 8, 1, seed=0, with_cls_block=False, text=False)
    assert ctx.visual.grid == (1, 7)
    assert ctx.blocks[0].num_prefix_tokens == 0
    assert ctx.blocks[0].hidden.shape == (1, 7, 8)
    assert ctx.text is None
    assert Capability.CLS_ATTENTION not in ctx.capabilities
    assert Capability.TEXT_QUERY not in ctx.capabilities
    assert Capability.RECEIVED_ATTENTION in ctx.capabilities
    with pytest.raises(CapabilityError, match="cls_attention"):
        ctx.cls_attention(-1)
    with pytest.raises(CapabilityError, match="tokenprune_query"):
        ctx.require_text("probe")


def test_make_context_with_given_questions() -> None:
    ctx = make_context(2, 4, 8, 2, seed=0, text=["a?", "b?"], llm_dim=6)
    assert ctx.text is not None
    assert ctx.text.texts == ("a?", "b?")
    assert ctx.text.embeddings is not None
    assert ctx.text.embeddings.shape[-1] == 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_heads": 3}, "must divide dim"), ({"num_layers": 0}, "must be positive")],
)
def test_make_context_rejects_bad_arguments(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_context(1, 4, 8, 2, **kwargs)  # type: ignore[arg-type]


# -- registered_stages -------------------------------------------------------------------------


class _ProbePlugin:
    @hookimpl
    def tokenprune_register_stages(self, registry: StageRegistry) -> None:
        registry.add(GoodScorer)
        registry.add(GoodMerger)


def test_registered_stages_lists_a_runtimes_stages_sorted() -> None:
    runtime = Runtime(autoload=False, plugins=[_ProbePlugin()])
    stages = registered_stages(runtime)
    ids = [(s.role, s.name) for s in stages]
    assert ids == sorted(ids)
    assert GoodScorer in stages
    assert GoodMerger in stages
    assert TopKSelector in stages
