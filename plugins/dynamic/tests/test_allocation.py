"""The ``information`` allocation rule: weights against the pairwise reference, the allocation
contract, errors, and LLaVA-NeXT / Video-LLaVA runs with the dynamic selector."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tokenprune import ConfigError, Pipeline, PruneContext
from tokenprune.adapters import allocate
from tokenprune.adapters.llava_next import LlavaNextAdapter
from tokenprune.adapters.video_llava import VideoLlavaAdapter
from tokenprune.testing import (
    llava_next_prompts,
    tiny_llava_next,
    tiny_video_llava,
    video_llava_prompts,
)
from tokenprune_desap.merger import NearestMerger
from tokenprune_desap.scorer import DesapScorer
from tokenprune_dynamic import DesapDynamicSelector, InformationAllocation

ref = importlib.import_module("tokenprune_dynamic_tests_reference")  # loaded by conftest


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _parts(counts: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i, c in enumerate(counts):
        base = torch.randn(1, 6, generator=g)
        spread = 0.05 + 2.0 * (i % 3)  # from nearly one direction to very varied
        parts.append(base + spread * torch.randn(c, 6, generator=g))
    return parts


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("floor", [0.05, 0.5])
def test_shares_equal_reference(seed: int, floor: float) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    counts = [int(c) for c in torch.randint(0, 20, (5,), generator=g)]
    counts[seed % 5] = max(counts[seed % 5], 1)
    parts = _parts(counts, seed)
    rule = InformationAllocation(floor=floor)
    weights = [
        c * max(ref.feature_diversity(p), floor) if c else 0.0
        for c, p in zip(counts, parts, strict=True)
    ]
    for w, expected in zip(rule.weights(parts), weights, strict=True):
        assert w == pytest.approx(expected, abs=1e-5)
    for budget in range(sum(counts) + 1):
        shares = allocate(counts, budget, rule, features=parts)  # checks the contract
        assert shares == ref.information_shares(counts, budget, rule.weights(parts))


def test_more_diverse_parts_get_more() -> None:
    noise = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    blank = torch.ones(16, 8) + 1e-3 * noise
    busy = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    shares = allocate([16, 16, 16], 12, InformationAllocation(), features=[blank, busy, busy])
    # quotas [0.3, 5.8, 5.8] -> [0, 6, 6]; the blank tile then takes one token from the first 6
    assert shares == [1, 5, 6]
    # Equal diversity gives the count-proportional split.
    same = allocate([16, 8], 6, InformationAllocation(), features=[busy, busy[:8]])
    assert same == allocate([16, 8], 6, "proportional")


@pytest.mark.parametrize("floor", [0.0, -1.0, 1.5, float("nan")])
def test_floor_errors(floor: float) -> None:
    with pytest.raises(ConfigError, match=r"floor must be in \(0, 1\]"):
        InformationAllocation(floor=floor)


def _pipeline(keep_ratio: float) -> Pipeline:
    return Pipeline(
        DesapScorer(text_source="llm_embeddings"),
        DesapDynamicSelector(),
        NearestMerger(),
        keep_ratio=keep_ratio,
    )


class Spy(InformationAllocation):
    """Records the shares it hands out."""

    shares: list[list[int]]

    def __call__(self, counts: Any, budget: int, features: Any) -> list[int]:
        out = super().__call__(counts, budget, features)
        self.shares.append(out)
        return out


def test_llava_next_forward_and_generate_with_information_allocation() -> None:
    model: Any = tiny_llava_next()
    batch = llava_next_prompts(model, [(1, 3), (2, 5)], [(40, 64), (64, 64)], seed=0)
    length = batch["input_ids"].shape[1]
    rule = Spy()
    object.__setattr__(rule, "shares", [])
    adapter = LlavaNextAdapter(model, allocation=rule)
    with adapter.install(_pipeline(0.25)), torch.no_grad():
        out = model(**batch)
        generated = model.generate(**batch, max_new_tokens=2)
    assert torch.isfinite(out.logits).all()
    assert out.logits.shape[1] < length
    assert torch.equal(generated[:, :length], batch["input_ids"])
    assert [sum(s) for s in rule.shares[:2]] == [16, 20]  # 0.25 of 64 and of 80 candidates
    assert all(min(s) >= 1 for s in rule.shares)


def test_video_llava_with_information_allocation() -> None:
    model: Any = tiny_video_llava()
    batch = video_llava_prompts(
        model, [(1, 3), (2, 5)], images_per_row=[0, 0], videos_per_row=[1, 1], num_frames=4
    )
    rule = Spy()
    object.__setattr__(rule, "shares", [])
    seen: list[int] = []

    class Counting(DesapDynamicSelector):
        def select(self, scores: Any, ctx: PruneContext) -> Any:
            seen.append(ctx.keep * ctx.visual.batch_size)
            return super().select(scores, ctx)

    pipeline = Pipeline(
        DesapScorer(text_source="llm_embeddings"), Counting(), NearestMerger(), keep=10
    )
    with VideoLlavaAdapter(model, allocation=rule).install(pipeline), torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.logits).all()
    assert len(rule.shares) == 2  # one split per video
    assert [sum(s) for s in rule.shares] == [10, 10]
    assert sum(seen) == 20
