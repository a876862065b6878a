"""Multi-turn chats: ``generate`` continuing from the cache of an earlier pruned turn.

The ground truth for a follow-up is the same pruned model run on the whole conversation without a
cache: greedy continuation from the cache must produce exactly the same tokens.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import pytest
import torch
from transformers import DynamicCache

import tokenprune
from tokenprune import AdapterError, PruneContext, Runtime, Scorer, StageConfig
from tokenprune.adapters._turns import Turn, TurnMemory, placeholder_ids, reusable_prefix
from tokenprune.capabilities import Capability
from tokenprune.plugin import hookimpl
from tokenprune.testing.models import (
    IMAGE_TOKEN_ID,
    llava_prompts,
    qwen2_5_vl_prompts,
    tiny_llava,
    tiny_qwen2_5_vl,
)

GREEDY: dict[str, Any] = {"do_sample": False, "max_new_tokens": 3, "min_new_tokens": 3}


class QueryScorerConfig(StageConfig):
    name: Literal["query_hash"] = "query_hash"


class QueryScorer(Scorer[QueryScorerConfig]):
    """Text-guided test scorer: scores are a pseudo-random function of each row's question."""

    name: ClassVar[str] = "query_hash"
    Config: ClassVar[type[StageConfig]] = QueryScorerConfig
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.TEXT_QUERY})

    def required_capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.TEXT_QUERY})

    def score(self, ctx: PruneContext) -> torch.Tensor:
        assert ctx.text is not None
        assert ctx.text.texts is not None
        rows = []
        for text in ctx.text.texts:
            g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            rows.append(torch.rand(ctx.visual.num_tokens, generator=g))
        return torch.stack(rows)


class QueryPlugin:
    @hookimpl
    def tokenprune_register_stages(self, registry: Any) -> None:
        registry.add(QueryScorer)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime([QueryPlugin()], autoload=False)


def config(follow_up: str, positions: str = "contiguous", scorer: str = "cls_attention") -> dict:
    return {
        "scorer": {"name": scorer},
        "selector": {"name": "topk"},
        "keep": 5,
        "positions": positions,
        "follow_up": follow_up,
    }


def follow_up_batch(
    batch: dict[str, torch.Tensor], sequences: torch.Tensor, question_len: int = 4
) -> dict[str, torch.Tensor]:
    """The conversation so far plus a follow-up question (no padding inside)."""
    g = torch.Generator().manual_seed(7)
    rows = sequences.shape[0]
    question = torch.randint(10, 900, (rows, question_len), generator=g)
    new = sequences.shape[1] - batch["input_ids"].shape[1] + question_len
    return {
        "input_ids": torch.cat([sequences, question], dim=1),
        "attention_mask": torch.cat(
            [batch["attention_mask"], torch.ones(rows, new, dtype=torch.long)], dim=1
        ),
        "pixel_values": batch["pixel_values"],
    }


@pytest.mark.parametrize("follow_up", ["reuse", "rescore"])
@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_follow_up_from_cache_equals_whole_conversation(
    runtime: Runtime, follow_up: str, positions: str
) -> None:
    model = tiny_llava()
    batch = llava_prompts(model, [(2, 3), (1, 5)])
    with torch.no_grad(), tokenprune.apply(model, config(follow_up, positions), runtime=runtime):
        first = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
        assert torch.equal(first.sequences[:, : batch["input_ids"].shape[1]], batch["input_ids"])
        second = follow_up_batch(batch, first.sequences)
        cache = first.cache
        continued = model.generate(**second, cache=cache, **GREEDY, return_dict_in_generate=True)
        whole = model.generate(**second, **GREEDY)
        # Third turn: the memory follows the conversation.
        third = follow_up_batch(second, continued.sequences, question_len=2)
        again = model.generate(**third, cache=continued.cache, **GREEDY)
        whole_third = model.generate(**third, **GREEDY)
    assert torch.equal(continued.sequences, whole)
    assert continued.sequences.shape[1] == second["input_ids"].shape[1] + 3
    assert torch.equal(again, whole_third)


def test_reuse_runs_only_the_new_tokens(runtime: Runtime) -> None:
    model = tiny_llava()
    batch = llava_prompts(model, [(2, 3), (1, 5)])
    seen: list[int] = []
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(
        lambda m, a, k: seen.append(int(k["inputs_embeds"].shape[1])), with_kwargs=True
    )
    try:
        with torch.no_grad(), tokenprune.apply(model, config("reuse"), runtime=runtime):
            first = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
            seen.clear()
            second = follow_up_batch(batch, first.sequences, question_len=4)
            model.generate(**second, cache=first.cache, **GREEDY)
    finally:
        hook.remove()
    # The last answer token (not yet cached) + 4 question tokens, then one token per step.
    assert seen == [5, 1, 1]


def test_rescore_uses_the_new_question_and_reuse_does_not(runtime: Runtime) -> None:
    model = tiny_llava()
    batch = llava_prompts(model, [(2, 3), (1, 5)])
    selections: dict[str, list[torch.Tensor]] = {}

    class Recorder:
        def __init__(self, key: str) -> None:
            self.key = key

        @hookimpl
        def tokenprune_after_prune(self, ctx: Any, pruned: Any, pipeline: Any) -> None:
            selections.setdefault(self.key, []).append(pruned.keep_idx)

    for policy in ("reuse", "rescore"):
        rt = Runtime([QueryPlugin(), Recorder(policy)], autoload=False)
        cfg = config(policy, scorer="query_hash")
        with torch.no_grad(), tokenprune.apply(model, cfg, runtime=rt):
            first = model.generate(
                **batch, **GREEDY, return_dict_in_generate=True, tokenprune_query=["a", "b"]
            )
            second = follow_up_batch(batch, first.sequences)
            out = model.generate(
                **second,
                cache=first.cache,
                **GREEDY,
                tokenprune_query=["new c", "new d"],
            )
            whole = model.generate(**second, **GREEDY, tokenprune_query=["new c", "new d"])
        if policy == "rescore":
            assert torch.equal(out, whole)
    assert len(selections["reuse"]) == 2  # first turn + the uncached reference only
    assert len(selections["rescore"]) == 3
    first_sel, rescored, _ = selections["rescore"]
    assert not torch.equal(first_sel, rescored)


def test_rescore_crops_the_cache_before_the_image(runtime: Runtime) -> None:
    model = tiny_llava()
    batch = llava_prompts(model, [(3, 3), (3, 3)])  # no padding: 4 text tokens before the image
    with torch.no_grad(), tokenprune.apply(model, config("rescore"), runtime=runtime):
        first = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
        cache = first.cache
        seen: list[int] = []
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.append(int(k["cache"].get_seq_length())),
            with_kwargs=True,
        )
        try:
            model.generate(**follow_up_batch(batch, first.sequences), cache=cache, **GREEDY)
        finally:
            hook.remove()
    assert seen[0] == 4  # [BOS] + 3 text tokens stayed cached; the image on was prefilled again


def test_cache_from_elsewhere_is_refused(runtime: Runtime) -> None:
    model = tiny_llava()
    batch = llava_prompts(model, [(2, 3)])
    with torch.no_grad():
        foreign = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
        with tokenprune.apply(model, config("reuse"), runtime=runtime):
            second = follow_up_batch(batch, foreign.sequences)
            with pytest.raises(AdapterError, match="not filled by this pruned model"):
                model.generate(**second, cache=foreign.cache, **GREEDY)


def test_follow_up_that_does_not_continue_the_conversation(runtime: Runtime) -> None:
    model = tiny_llava()
    batch = llava_prompts(model, [(2, 3), (1, 5)])
    with torch.no_grad(), tokenprune.apply(model, config("reuse"), runtime=runtime):
        first = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
        second = follow_up_batch(batch, first.sequences)
        second["input_ids"] = second["input_ids"].clone()
        second["input_ids"][0, -8] += 1  # an edited answer token
        with pytest.raises(AdapterError, match="do not start with its prompt"):
            model.generate(**second, cache=first.cache, **GREEDY)


def test_follow_up_with_a_new_image_is_refused(runtime: Runtime) -> None:
    model = tiny_llava()
    batch = llava_prompts(model, [(2, 3)])
    with torch.no_grad(), tokenprune.apply(model, config("reuse"), runtime=runtime):
        first = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
        second = follow_up_batch(batch, first.sequences)
        second["input_ids"][0, -1] = IMAGE_TOKEN_ID
        with pytest.raises(AdapterError, match="new image"):
            model.generate(**second, cache=first.cache, **GREEDY)


def test_rescore_needs_the_image(runtime: Runtime) -> None:
    model = tiny_llava()
    batch = llava_prompts(model, [(2, 3)])
    with torch.no_grad(), tokenprune.apply(model, config("rescore"), runtime=runtime):
        first = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
        second = follow_up_batch(batch, first.sequences)
        del second["pixel_values"]
        with pytest.raises(AdapterError, match="pass its pixel_values"):
            model.generate(**second, cache=first.cache, **GREEDY)


def test_text_only_cache_passes_through(runtime: Runtime) -> None:
    model, reference = tiny_llava(), tiny_llava()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        with tokenprune.apply(model, config("reuse"), runtime=runtime):
            first = model.generate(input_ids=ids, **GREEDY, return_dict_in_generate=True)
            more = torch.cat([first.sequences, torch.tensor([[8, 9]])], dim=1)
            ours = model.generate(input_ids=more, cache=first.cache, **GREEDY)
        theirs = reference.generate(input_ids=more, **GREEDY)
    assert torch.equal(ours, theirs)


def test_unknown_follow_up_policy_is_a_config_error(runtime: Runtime) -> None:
    with pytest.raises(tokenprune.ConfigError, match="follow_up"):
        runtime.parse_config(config("remember"))


def test_memory_is_weak_and_recalls_latest() -> None:
    memory, cache = TurnMemory(), DynamicCache()
    ids = torch.ones(1, 2, dtype=torch.long)
    memory.remember(cache, Turn(ids, ids, ids, ids, None))
    memory.remember(cache, Turn(ids * 2, ids, ids, ids, None))
    recalled = memory.recall(cache)
    assert recalled is not None
    assert int(recalled.prompt_ids[0, 0]) == 2
    del cache
    assert len(memory) == 0


def test_reusable_prefix_stops_at_first_placeholder_or_difference() -> None:
    img = 99
    old = torch.tensor([[0, 1, 2, img, img, 5], [1, 2, 3, 4, img, img]])
    mask = torch.ones_like(old)
    turn = Turn(old, mask, old, mask, None)
    same = {"input_ids": old.clone(), "attention_mask": mask}
    assert reusable_prefix(turn, same, {img}) == 3
    changed = old.clone()
    changed[1, 1] = 7
    assert reusable_prefix(turn, {"input_ids": changed, "attention_mask": mask}, {img}) == 1
    assert placeholder_ids(model_config_with(image_token_id=img)) == frozenset({img})


def model_config_with(**attrs: int) -> Any:
    class Config:
        pass

    cfg = Config()
    for k, v in attrs.items():
        setattr(cfg, k, v)
    return cfg


def test_adapter_without_follow_up_support_says_so(runtime: Runtime) -> None:
    model = tiny_qwen2_5_vl()
    batch = qwen2_5_vl_prompts(model)
    cfg = config("reuse", scorer="received_attention")
    with torch.no_grad(), tokenprune.apply(model, cfg, runtime=runtime):
        first = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
        rows = first.sequences.shape[0]
        more = torch.cat([first.sequences, torch.full((rows, 2), 8)], dim=1)
        new = more.shape[1] - batch["attention_mask"].shape[1]
        mask = torch.cat([batch["attention_mask"], torch.ones(rows, new, dtype=torch.long)], 1)
        with pytest.raises(AdapterError, match="cannot continue a pruned conversation"):
            model.generate(
                input_ids=more,
                attention_mask=mask,
                cache=first.cache,
                **{k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")},
                **GREEDY,
            )
