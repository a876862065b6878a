"""LLaVA-NeXT adapter: tile budgets, newline policy, packed layout, per-tile [CLS] attention.

Tiny model: 32 px tiles with patch 8 (16 patches per tile) and the 1x2, 2x1 and 2x2 grids. Image
sizes used below: (64, 64) gives 5 full tiles (80 patches + 8 newlines), (40, 64) gives a base
tile and 4 grid tiles cut by unpadding to 3x4 patches (64 + 6), (32, 64) a 1x2 grid (48 + 4),
(32, 32) a 1x2 grid whose grid tiles keep 4x2 patches each (32 + 4).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tokenprune import AdapterError, Pipeline, PruneContext
from tokenprune.adapters._allocation import ALLOCATIONS, allocate, proportional, uniform
from tokenprune.adapters.llava_next import LlavaNextAdapter, NewlinePolicy
from tokenprune.errors import BudgetError
from tokenprune.plugin.manager import Runtime
from tokenprune.stages.scorers.cls_attention import ClsAttentionScorer
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.testing import IMAGE_TOKEN_ID, llava_next_prompts, tiny_llava_next

P = 16  # patches per tile


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads cost more in synchronisation than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_llava_next()


class RecordingScorer(RandomScorer):
    """Random scores; records what each pruning context looked like."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def score(self, ctx: PruneContext) -> torch.Tensor:
        RecordingScorer.seen.append(
            {
                "n": ctx.visual.num_tokens,
                "keep": ctx.keep,
                "batch": ctx.visual.batch_size,
                "grid": ctx.visual.grid,
            }
        )
        return super().score(ctx)


class ClsRecordingScorer(ClsAttentionScorer):
    """[CLS]-attention scores; records them."""

    seen: ClassVar[list[torch.Tensor]] = []

    def score(self, ctx: PruneContext) -> torch.Tensor:
        scores = super().score(ctx)
        ClsRecordingScorer.seen.extend(scores)
        return scores


def batch(
    model: nn.Module, sizes: Sequence[tuple[int, int]], seed: int = 0
) -> dict[str, torch.Tensor]:
    lengths = [(1 + i, 3 + 2 * i) for i in range(len(sizes))]
    return llava_next_prompts(model, lengths, list(sizes), seed=seed)


def prepared(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    pipeline: Pipeline,
    **options: Any,
) -> dict[str, Any]:
    """What the adapter hands to the model's forward (no forward pass)."""
    adapter = LlavaNextAdapter(model, **options)
    adapter.validate(pipeline)
    with torch.no_grad():
        return adapter.prepare_inputs(pipeline, dict(inputs), "forward")


def kept_positions(
    model: nn.Module, inputs: dict[str, torch.Tensor], out: dict[str, Any]
) -> list[torch.Tensor]:
    """Packed positions of each image's kept tokens, read from ``original`` position ids."""
    result = []
    for row in range(inputs["input_ids"].shape[0]):
        start = int(torch.nonzero(inputs["input_ids"][row] == IMAGE_TOKEN_ID)[0])
        cols = out["input_ids"][row] == IMAGE_TOKEN_ID
        result.append(out["position_ids"][row, cols] - start)
    return result


# -- allocation rules ----------------------------------------------------------------------------
@settings(deadline=None, max_examples=60)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    fraction=st.floats(0, 1),
    rule=st.sampled_from(sorted(ALLOCATIONS)),
)
def test_allocation_contract(counts: list[int], fraction: float, rule: str) -> None:
    budget = round(fraction * sum(counts))
    shares = allocate(counts, budget, rule)  # checks the contract itself
    assert sum(shares) == budget
    assert all(0 <= s <= c for s, c in zip(shares, counts, strict=True))
    nonempty = [c > 0 for c in counts]
    if budget >= sum(nonempty):
        assert all(s >= 1 for s, ne in zip(shares, nonempty, strict=True) if ne)


@settings(deadline=None, max_examples=60)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=8), fraction=st.floats(0, 1))
def test_proportional_is_within_one_of_the_exact_quota(counts: list[int], fraction: float) -> None:
    budget = round(fraction * sum(counts))
    shares = proportional(counts, budget)
    quotas = [budget * c / sum(counts) for c in counts]
    if min(quotas) >= 1:  # then the minimum-one fix-up never moves a token
        assert max(abs(s - q) for s, q in zip(shares, quotas, strict=True)) < 1


def test_allocation_examples() -> None:
    assert proportional([16, 12, 12, 12, 12], 32) == [8, 6, 6, 6, 6]
    assert proportional([16, 16, 16, 16, 16], 10) == [2, 2, 2, 2, 2]
    assert proportional([16, 8, 8], 3) == [1, 1, 1]
    assert proportional([16, 8, 8], 2) == [1, 1, 0]  # budget below the number of tiles
    assert uniform([16, 8, 8], 30) == [14, 8, 8]  # full tiles hand their surplus on
    assert uniform([16, 16, 16, 16], 6) == [2, 2, 1, 1]


def test_allocation_errors() -> None:
    with pytest.raises(BudgetError, match="cannot be split"):
        allocate([4, 4], 9, "proportional")
    with pytest.raises(AdapterError, match="unknown allocation rule 'fair'"):
        allocate([4, 4], 2, "fair")

    def bad(counts: Sequence[int], budget: int) -> list[int]:
        return [0] * len(counts)

    with pytest.raises(AdapterError, match=r"rule 'bad'.*sum to the budget"):
        allocate([4, 4], 2, bad)


# -- budgets on the model ------------------------------------------------------------------------
def test_tile_budgets_follow_the_allocation_rule(model: nn.Module) -> None:
    RecordingScorer.seen.clear()
    inputs = batch(model, [(40, 64)])  # counts [16, 12, 12, 12, 12], N = 64
    pipeline = Pipeline(RecordingScorer(), TopKSelector(), keep=20)
    prepared(model, inputs, pipeline)
    # proportional: 20 * [16, 12, 12, 12, 12] / 64 = [5, 3.75 x 4] -> [5, 4, 4, 4, 3]
    seen = sorted((s["n"], s["keep"], s["batch"], s["grid"]) for s in RecordingScorer.seen)
    assert seen == [(12, 3, 1, (3, 4)), (12, 4, 3, (3, 4)), (16, 5, 1, (4, 4))]

    RecordingScorer.seen.clear()
    prepared(model, inputs, pipeline, allocation="uniform")  # [4, 4, 4, 4, 4]
    seen = sorted((s["n"], s["keep"], s["batch"]) for s in RecordingScorer.seen)
    assert seen == [(12, 4, 4), (16, 4, 1)]


def test_custom_allocation_function(model: nn.Module) -> None:
    def base_heavy(counts: Sequence[int], budget: int) -> list[int]:
        """Half the budget to the base tile, the rest proportionally to the grid tiles."""
        base = min(counts[0], max(1, budget // 2))
        return [base, *proportional(list(counts[1:]), budget - base)]

    RecordingScorer.seen.clear()
    inputs = batch(model, [(64, 64)])
    pipeline = Pipeline(RecordingScorer(), TopKSelector(), keep=20)
    out = prepared(model, inputs, pipeline, allocation=base_heavy, newlines="kept_rows")
    seen = sorted((s["n"], s["keep"], s["batch"]) for s in RecordingScorer.seen)
    assert seen == [(16, 2, 2), (16, 3, 2), (16, 10, 1)]  # base 10, grid [3, 3, 2, 2]
    tokens = out["mm_encoder_outputs"]["image"].pooler_output[0]
    newline = model.model.image_newline
    assert int((tokens != newline).any(-1).sum()) == 20


def test_allocation_option_errors(model: nn.Module) -> None:
    with pytest.raises(AdapterError, match="unknown allocation rule"):
        LlavaNextAdapter(model, allocation="by_area")
    with pytest.raises(AdapterError, match="newlines='some'"):
        LlavaNextAdapter(model, newlines="some")  # type: ignore[arg-type]
    pipeline = Pipeline(RandomScorer(), TopKSelector(), keep=8)

    def greedy(counts: Sequence[int], budget: int) -> list[int]:
        return [budget] + [0] * (len(counts) - 1)

    with pytest.raises(AdapterError, match=r"rule 'greedy'.*at least one token"):
        prepared(model, batch(model, [(64, 64)]), pipeline, allocation=greedy)


def test_budget_below_the_tile_count(model: nn.Module) -> None:
    RecordingScorer.seen.clear()
    inputs = batch(model, [(64, 64)])
    out = prepared(model, inputs, Pipeline(RecordingScorer(), TopKSelector(), keep=2))
    assert [(s["n"], s["keep"], s["batch"]) for s in RecordingScorer.seen] == [(16, 1, 2)]
    assert int((out["input_ids"] == IMAGE_TOKEN_ID).sum()) == 2 + 8  # 2 tokens + 8 newlines


# -- newlines and layout -------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["all", "kept_rows"])
@pytest.mark.parametrize("keep_ratio", [0.05, 0.25, 0.6])
def test_newline_policy_and_packed_layout(
    model: nn.Module, policy: NewlinePolicy, keep_ratio: float
) -> None:
    sizes = [(64, 64), (40, 64), (32, 32)]
    inputs = batch(model, sizes)
    pipeline = Pipeline(
        RandomScorer(seed=3), TopKSelector(), keep_ratio=keep_ratio, positions="original"
    )
    out = prepared(model, inputs, pipeline, newlines=policy)
    adapter = LlavaNextAdapter(model)
    layouts = adapter.layouts(torch.tensor(sizes))
    with torch.no_grad():
        full = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
    features = out["mm_encoder_outputs"]["image"].pooler_output
    for layout, positions, unpruned, pruned in zip(
        layouts, kept_positions(model, inputs, out), full, features, strict=True
    ):
        # coherent layout: the unpruned packed sequence with the pruned tokens removed
        assert bool((positions[1:] > positions[:-1]).all()), "kept tokens out of packed order"
        torch.testing.assert_close(pruned, unpruned[positions], rtol=0, atol=1e-6)
        is_newline = layout.source[positions] < 0
        tokens = positions[~is_newline]
        assert tokens.numel() == pipeline.budget(sum(layout.counts()))
        newlines = positions[is_newline]
        all_newlines = layout.newline_positions
        if policy == "all":
            assert torch.equal(newlines, all_newlines)
        else:
            rows_with_tokens = set(layout.row[tokens].tolist())
            expected = [p for p in all_newlines.tolist() if int(layout.row[p]) in rows_with_tokens]
            assert newlines.tolist() == expected
            # every kept newline ends a row that still has a token: never two in a row
            seq = is_newline.tolist()
            assert not any(a and b for a, b in itertools.pairwise(seq))
            assert not seq or not seq[0]


def test_full_budget_keeps_the_model_layout(model: nn.Module) -> None:
    inputs = batch(model, [(64, 64), (40, 64)])
    for policy in ("all", "kept_rows"):
        pipeline = Pipeline(RandomScorer(), TopKSelector(), keep_ratio=1.0)
        out = prepared(model, inputs, pipeline, newlines=policy)
        assert torch.equal(out["input_ids"], inputs["input_ids"])


def test_different_image_sizes_in_one_batch(model: nn.Module) -> None:
    RecordingScorer.seen.clear()
    sizes = [(64, 64), (40, 64), (32, 64), (32, 32)]
    inputs = batch(model, sizes)
    pipeline = Pipeline(RecordingScorer(seed=1), TopKSelector(), keep_ratio=0.5)
    runtime = Runtime(autoload=False)
    assert runtime.resolve_adapter(model) is LlavaNextAdapter
    with LlavaNextAdapter(model).install(pipeline), torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # N per image: 80, 64, 48, 32 -> keep 40, 32, 24, 16, plus all newlines
    kept = [40 + 8, 32 + 6, 24 + 4, 16 + 4]
    text = [1 + 1 + 3, 1 + 2 + 5, 1 + 3 + 7, 1 + 4 + 9]
    assert logits.shape[1] == max(k + t for k, t in zip(kept, text, strict=True))
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    groups = {(s["n"], s["grid"]) for s in RecordingScorer.seen}
    assert groups == {(16, (4, 4)), (12, (3, 4)), (8, (4, 2))}


def test_errors_name_the_fix(model: nn.Module) -> None:
    inputs = batch(model, [(64, 64)])
    del inputs["image_sizes"]
    pipeline = Pipeline(RandomScorer(), TopKSelector(), keep=4)
    with pytest.raises(AdapterError, match="needs image_sizes"):
        prepared(model, inputs, pipeline)
    full = tiny_llava_next()
    full.config.vision_feature_select_strategy = "full"
    with pytest.raises(AdapterError, match="vision_feature_select_strategy='full'"):
        LlavaNextAdapter(full).install(pipeline)
    with pytest.raises(AdapterError, match="vision layer 5 does not exist"):
        LlavaNextAdapter(model).install(
            Pipeline(ClsAttentionScorer(layer=5), TopKSelector(), keep=4)
        )


def test_labels_are_shortened_with_the_prompt(model: nn.Module) -> None:
    inputs = batch(model, [(64, 64), (40, 64)])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    pipeline = Pipeline(RandomScorer(), TopKSelector(), keep_ratio=0.25)
    with LlavaNextAdapter(model).install(pipeline), torch.no_grad():
        out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)


# -- per-tile [CLS] attention --------------------------------------------------------------------
def test_cls_attention_per_tile_matches_eager() -> None:
    eager = tiny_llava_next(attn_implementation="eager")
    sizes = [(64, 64), (40, 64), (32, 32)]
    inputs = batch(eager, sizes)
    adapter = LlavaNextAdapter(eager)
    layouts = adapter.layouts(torch.tensor(sizes))
    tiles = torch.cat([inputs["pixel_values"][i, : lay.num_tiles] for i, lay in enumerate(layouts)])
    with torch.no_grad():
        attentions = eager.model.vision_tower(tiles, output_attentions=True).attentions
    expected = attentions[0][:, :, 0, 1:].mean(1)  # block -2 of 2 = block 0, (tiles, P)
    candidates = []
    for i, layout in enumerate(layouts):
        first = sum(lay.num_tiles for lay in layouts[:i])
        for t in range(layout.num_tiles):
            candidates.append(expected[first + t, layout.tile_patches(t)])

    ClsRecordingScorer.seen.clear()
    pipeline = Pipeline(ClsRecordingScorer(layer=-2), TopKSelector(), keep_ratio=1.0)
    adapter.validate(pipeline)
    with torch.no_grad():
        adapter.prepare_inputs(pipeline, dict(inputs), "forward")
    seen = ClsRecordingScorer.seen
    assert len(seen) == len(candidates) == 5 + 5 + 3
    unmatched = list(range(len(candidates)))
    for row in seen:
        match = [
            j
            for j in unmatched
            if candidates[j].shape == row.shape
            and torch.allclose(candidates[j], row, rtol=0, atol=1e-6)
        ]
        assert match, "a tile's [CLS] attention does not match eager attention"
        unmatched.remove(match[0])


def test_random_image_sizes_round_trip(model: nn.Module) -> None:
    rng = random.Random(0)
    sizes = [(rng.randint(8, 96), rng.randint(8, 96)) for _ in range(4)]
    inputs = batch(model, sizes, seed=2)
    pipeline = Pipeline(RandomScorer(), TopKSelector(), keep_ratio=0.3, positions="original")
    out = prepared(model, inputs, pipeline, newlines="kept_rows")
    layouts = LlavaNextAdapter(model).layouts(torch.tensor(sizes))
    for layout, positions in zip(layouts, kept_positions(model, inputs, out), strict=True):
        tokens = positions[layout.source[positions] >= 0]
        assert tokens.numel() == pipeline.budget(sum(layout.counts()))
