from __future__ import annotations

import dataclasses

import pytest
import torch

from tokenprune import functional as F
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext, Stash, StashKey
from tokenprune.errors import CapabilityError, ShapeError
from tokenprune.testing import make_context
from tokenprune.types import TextTokens, VisualTokens

COUNT: StashKey[int] = StashKey("test.count")
NAMES: StashKey[list[str]] = StashKey("test.names")

# -- Stash -------------------------------------------------------------------------------------


def test_stash_stores_values_by_typed_key() -> None:
    stash = Stash()
    assert COUNT not in stash
    assert stash.get(COUNT) is None
    assert stash.get(COUNT, 7) == 7
    stash[COUNT] = 3
    assert COUNT in stash
    assert stash[COUNT] == 3
    assert stash.get(COUNT, 7) == 3


def test_stash_missing_key_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        Stash()[COUNT]


def test_stash_keys_are_distinct_objects_even_with_equal_names() -> None:
    twin: StashKey[int] = StashKey("test.count")
    stash = Stash()
    stash[COUNT] = 1
    assert twin not in stash
    assert "test.count" not in stash
    assert repr(twin) == "StashKey('test.count')"


def test_stash_setdefault_calls_the_factory_once() -> None:
    calls: list[int] = []

    def factory() -> list[str]:
        calls.append(1)
        return ["a"]

    stash = Stash()
    first = stash.setdefault(NAMES, factory)
    first.append("b")
    second = stash.setdefault(NAMES, factory)
    assert second is first
    assert second == ["a", "b"]
    assert calls == [1]


def test_each_context_has_its_own_stash() -> None:
    a = PruneContext(visual=VisualTokens(torch.zeros(1, 2, 2)), keep=1)
    b = PruneContext(visual=VisualTokens(torch.zeros(1, 2, 2)), keep=1)
    a.stash[COUNT] = 1
    assert COUNT not in b.stash


# -- capabilities and vision blocks ---------------------------------------------------------------


def test_require_lists_what_was_provided() -> None:
    ctx = PruneContext(
        visual=VisualTokens(torch.zeros(1, 2, 2)),
        keep=1,
        capabilities=frozenset({Capability.PROJECTOR, Capability.TEXT_QUERY}),
    )
    ctx.require(Capability.PROJECTOR, "mine")  # provided: no error
    with pytest.raises(
        CapabilityError,
        match=r"stage 'mine' needs capability 'cls_attention', which this model adapter does not "
        r"provide \(provided: projector, text_query\)",
    ):
        ctx.require(Capability.CLS_ATTENTION, "mine")


def test_require_with_nothing_provided_says_none() -> None:
    ctx = PruneContext(visual=VisualTokens(torch.zeros(1, 2, 2)), keep=1)
    with pytest.raises(CapabilityError, match=r"\(provided: none\)"):
        ctx.require(Capability.VISION_BLOCK, "mine")


def test_vision_block_resolves_negative_indices() -> None:
    ctx = make_context(1, 4, 8, 2, seed=0, num_layers=3)
    assert ctx.vision_block(-1) is ctx.blocks[2]
    assert ctx.vision_block(0) is ctx.blocks[0]
    assert ctx.layer_index(-3) == 0


def test_vision_block_not_captured_lists_the_captured_ones() -> None:
    ctx = make_context(1, 4, 8, 2, seed=0, num_layers=3)
    ctx = dataclasses.replace(ctx, blocks={2: ctx.blocks[2]})
    with pytest.raises(
        CapabilityError, match=r"vision block -3 \(index 0\) was not captured \(captured: \[2\]\)"
    ):
        ctx.vision_block(-3)


def test_negative_layer_without_num_layers_is_an_error() -> None:
    ctx = dataclasses.replace(make_context(1, 4, 8, 2, seed=0), num_layers=None)
    with pytest.raises(CapabilityError, match="num_layers is unknown"):
        ctx.vision_block(-1)


def test_vision_block_needs_the_capability() -> None:
    ctx = make_context(1, 4, 8, 2, seed=0)
    ctx = dataclasses.replace(ctx, capabilities=ctx.capabilities - {Capability.VISION_BLOCK})
    with pytest.raises(CapabilityError, match="'vision_block'"):
        ctx.vision_block(0)


# -- cls_attention -------------------------------------------------------------------------------


def test_cls_attention_equals_the_functional_core() -> None:
    ctx = make_context(2, 9, 8, 3, seed=1)
    block = ctx.blocks[1]
    expected = F.cls_attention(
        block.layer_norm(block.hidden), block.q_proj, block.k_proj, num_heads=block.num_heads
    )
    torch.testing.assert_close(ctx.cls_attention(-1), expected, atol=0, rtol=0)


def test_cls_attention_is_cached_per_layer_and_call() -> None:
    ctx = make_context(2, 9, 8, 3, seed=1)
    first = ctx.cls_attention(-1)
    assert ctx.cls_attention(-1) is first
    assert ctx.cls_attention(1) is first  # the same block by its non-negative index
    other = ctx.cls_attention(0)
    assert other is not first
    assert not torch.equal(other, first)
    # A new context (a new call) computes afresh.
    assert make_context(2, 9, 8, 3, seed=1).cls_attention(-1) is not first


def test_cls_attention_needs_the_capability() -> None:
    ctx = make_context(1, 4, 8, 2, seed=0, with_cls_block=False)
    with pytest.raises(CapabilityError, match="'cls_attention'"):
        ctx.cls_attention(-1)


def test_cls_attention_checks_the_token_count() -> None:
    ctx = make_context(2, 9, 8, 3, seed=0)
    wrong = dataclasses.replace(ctx, visual=VisualTokens(ctx.visual.features[:, :8]))
    with pytest.raises(
        ShapeError, match=r"vision block -1 has 9 patch tokens .* but the visual tokens hold N=8"
    ):
        wrong.cls_attention(-1)


# -- require_text --------------------------------------------------------------------------------


def test_require_text_returns_the_prompt() -> None:
    text = TextTokens(texts=("what?",))
    ctx = PruneContext(visual=VisualTokens(torch.zeros(1, 2, 2)), keep=1, text=text)
    assert ctx.require_text("mine") is text


def test_require_text_error_names_the_stage_and_tokenprune_query() -> None:
    ctx = PruneContext(visual=VisualTokens(torch.zeros(1, 2, 2)), keep=1)
    with pytest.raises(CapabilityError) as info:
        ctx.require_text("desap")
    message = str(info.value)
    assert "stage 'desap' is text-guided" in message
    assert "tokenprune_query=[...]" in message
