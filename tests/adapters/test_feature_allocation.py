"""Content-based allocation rules: ``weighted``, ``FeatureAllocation`` and the adapters' features.

A :class:`FeatureAllocation` receives the candidate tokens of every part; these tests check the
rounding helper, the contract checks, and that LLaVA-NeXT (tiles) and Video-LLaVA (frames, one
split per video) hand the rule exactly the tokens that are then pruned.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune import AdapterError, Pipeline, PruneContext
from tokenprune.adapters import FeatureAllocation, allocate, weighted
from tokenprune.adapters._allocation import needs_features, proportional, resolve_allocation
from tokenprune.adapters.llava_next import LlavaNextAdapter
from tokenprune.adapters.video_llava import VideoLlavaAdapter
from tokenprune.errors import BudgetError
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.testing import (
    llava_next_prompts,
    tiny_llava_next,
    tiny_video_llava,
    video_llava_prompts,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- weighted ------------------------------------------------------------------------------------
@settings(deadline=None, max_examples=60)
@given(
    parts=st.lists(st.tuples(st.integers(0, 30), st.floats(1e-3, 1e3)), min_size=1, max_size=8),
    fraction=st.floats(0, 1),
)
def test_weighted_meets_the_contract(parts: list[tuple[int, float]], fraction: float) -> None:
    counts = [c for c, _ in parts]
    budget = round(fraction * sum(counts))
    shares = allocate(counts, budget, lambda c, b: weighted(c, b, [w for _, w in parts]))
    assert sum(shares) == budget


@settings(deadline=None, max_examples=60)
@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=8), fraction=st.floats(0, 1))
def test_weighted_by_counts_is_proportional(counts: list[int], fraction: float) -> None:
    budget = round(fraction * sum(counts))
    assert weighted(counts, budget, [float(c) for c in counts]) == proportional(counts, budget)


def test_weighted_examples() -> None:
    assert weighted([16, 16, 16], 12, [1.0, 2.0, 1.0]) == [3, 6, 3]
    assert weighted([2, 16], 10, [3.0, 1.0]) == [2, 8]  # water-filling past the full part
    assert weighted([0, 8, 8], 4, [0.0, 1.0, 3.0]) == [0, 1, 3]  # an empty part's weight is free
    assert weighted([8, 8], 4, [1e-9, 1.0]) == [1, 3]  # minimum one token per non-empty part


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], "expected 2 weights"),
        ([1.0, 0.0], r"weight 0.0 of part 1 .* must be a finite number > 0"),
        ([1.0, float("nan")], "weight nan of part 1"),
        ([-1.0, 1.0], "weight -1.0 of part 0"),
    ],
)
def test_weighted_errors(weights: list[float], match: str) -> None:
    with pytest.raises(BudgetError, match=match):
        weighted([4, 4], 2, weights)


# -- FeatureAllocation through allocate ----------------------------------------------------------
class Recording(FeatureAllocation):
    """Shares by the mean feature norm of each part; records every call."""

    name = "recording"
    calls: ClassVar[list[list[torch.Tensor]]] = []

    def __call__(
        self, counts: Sequence[int], budget: int, features: Sequence[torch.Tensor]
    ) -> list[int]:
        Recording.calls.append([f.detach().clone() for f in features])
        norms = [float(f.norm(dim=-1).mean()) + 1e-6 if len(f) else 0.0 for f in features]
        return weighted(counts, budget, norms)


def test_feature_rules_need_features() -> None:
    rule = Recording()
    assert needs_features(rule)
    assert not needs_features("uniform")
    assert not needs_features(len)
    assert resolve_allocation(rule) == ("recording", rule)
    with pytest.raises(AdapterError, match=r"'recording' reads the parts' features.*got None"):
        allocate([2, 3], 2, rule)
    with pytest.raises(AdapterError, match=r"got \[\(2, 4\), \(2, 4\)\]"):
        allocate([2, 3], 2, rule, features=[torch.zeros(2, 4), torch.zeros(2, 4)])
    shares = allocate([2, 3], 2, rule, features=[torch.zeros(2, 4), torch.ones(3, 4)])
    assert shares == [1, 1]
    assert allocate([4, 4], 2, "uniform", features=[torch.zeros(4, 1)] * 2) == [1, 1]


def test_a_feature_rule_breaking_the_contract_is_named() -> None:
    class Greedy(FeatureAllocation):
        name = "greedy"

        def __call__(
            self, counts: Sequence[int], budget: int, features: Sequence[torch.Tensor]
        ) -> list[int]:
            return [budget] + [0] * (len(counts) - 1)

    with pytest.raises(AdapterError, match=r"rule 'greedy'.*at least one token"):
        allocate([4, 4], 2, Greedy(), features=[torch.zeros(4, 1)] * 2)


# -- the adapters hand the rule the tokens that are pruned ---------------------------------------
class SeenScorer(RandomScorer):
    """Random scores; records the visual tokens and budget of every pruning context."""

    seen: ClassVar[list[tuple[torch.Tensor, int]]] = []

    def score(self, ctx: PruneContext) -> torch.Tensor:
        SeenScorer.seen.extend((row.detach().clone(), ctx.keep) for row in ctx.visual.features)
        return super().score(ctx)


def _pruned_match_rule(shares_per_call: list[list[int]]) -> None:
    """Every part the rule saw is a pruned row, with the share the rule gave it (or skipped)."""
    pruned = list(SeenScorer.seen)
    for features, shares in zip(Recording.calls, shares_per_call, strict=True):
        for part, share in zip(features, shares, strict=True):
            hits = [i for i, (row, _) in enumerate(pruned) if torch.equal(row, part)]
            if share == 0:
                assert not hits
                continue
            assert hits, "the rule saw tokens that were not pruned"
            assert pruned.pop(hits[0])[1] == share
    assert not pruned, "some pruned parts were not shown to the rule"


def test_llava_next_tiles_reach_the_rule() -> None:
    model = tiny_llava_next()
    inputs = llava_next_prompts(model, [(1, 3), (2, 5)], [(40, 64), (64, 64)], seed=0)
    Recording.calls.clear()
    SeenScorer.seen.clear()
    pipeline = Pipeline(SeenScorer(), TopKSelector(), keep_ratio=0.25)
    adapter = LlavaNextAdapter(model, allocation=Recording())
    assert adapter.allocation_name == "recording"
    adapter.validate(pipeline)
    with torch.no_grad():
        adapter.prepare_inputs(pipeline, dict(inputs), "forward")
    assert [[len(f) for f in call] for call in Recording.calls] == [
        [16, 12, 12, 12, 12],  # (40, 64): unpadding cuts the grid tiles to 3 x 4
        [16, 16, 16, 16, 16],
    ]
    budgets = [pipeline.budget(64), pipeline.budget(80)]
    shares = [
        weighted([len(f) for f in call], b, [float(f.norm(dim=-1).mean()) + 1e-6 for f in call])
        for call, b in zip(Recording.calls, budgets, strict=True)
    ]
    _pruned_match_rule(shares)


def test_video_llava_splits_each_video_by_its_frames() -> None:
    model = tiny_video_llava()
    inputs = video_llava_prompts(
        model, [(1, 3), (2, 5)], images_per_row=[0, 0], videos_per_row=[1, 1], num_frames=4
    )
    Recording.calls.clear()
    SeenScorer.seen.clear()
    pipeline = Pipeline(SeenScorer(), TopKSelector(), keep=10)
    adapter = VideoLlavaAdapter(model, allocation=Recording())
    adapter.validate(pipeline)
    with torch.no_grad():
        out: dict[str, Any] = adapter.prepare_inputs(pipeline, dict(inputs), "forward")
    assert [[len(f) for f in call] for call in Recording.calls] == [[16] * 4] * 2
    shares = [
        weighted([16] * 4, 10, [float(f.norm(dim=-1).mean()) + 1e-6 for f in call])
        for call in Recording.calls
    ]
    _pruned_match_rule(shares)
    features = out["mm_encoder_outputs"]["video"].pooler_output
    assert tuple(features.shape[:2]) == (2, 10 + 4)  # 10 kept patches + 4 frame [CLS] per video
