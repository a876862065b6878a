"""The Qwen2.5-VL adapter on a tiny seeded random model (``tiny_qwen2_5_vl``).

The default prompts (``qwen2_5_vl_prompts``) are a left-padded batch of two rows: one image of
24 tokens (8x12 patches, two attention windows) in row 0, images of 8 and 16 tokens in row 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import pytest
import torch
from torch import nn

import tokenprune
from tokenprune.adapters._sequence import find_image_spans
from tokenprune.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.errors import AdapterError, CapabilityError
from tokenprune.pipeline import Pipeline
from tokenprune.plugin import Runtime
from tokenprune.stages.base import Scorer, Scores, StageConfig
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.testing.models import (
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VISION_END_ID,
    QWEN_VISION_START_ID,
    qwen2_5_vl_prompts,
    tiny_qwen2_5_vl,
)
from tokenprune.types import Selection

Positions = Literal["contiguous", "original"]
SIZES = [24, 8, 16]  # language-model tokens of the three images


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_qwen2_5_vl()


@pytest.fixture(scope="module")
def batch(model: nn.Module) -> dict[str, torch.Tensor]:
    return qwen2_5_vl_prompts(model)


def random_pipeline(positions: Positions = "original", **budget: Any) -> Pipeline:
    budget = budget or {"keep_ratio": 0.25}
    return Pipeline(RandomScorer(seed=3), RecordingSelector(), positions=positions, **budget)


class RecordingSelector(TopKSelector):
    """Top-k that remembers, per call, the token count and the kept indices."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, torch.Tensor]] = []

    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        selection = super().select(scores, ctx)
        self.seen.append((ctx.visual.num_tokens, selection.keep_idx))
        return selection


class _ProbeConfig(StageConfig):
    name: Literal["qwen_probe"] = "qwen_probe"


class Probe(Scorer[_ProbeConfig]):
    """Records what the context offers (received attention of given layers, text) per call."""

    name: ClassVar[str] = "qwen_probe"
    Config: ClassVar[type[StageConfig]] = _ProbeConfig

    def __init__(self, layers: tuple[int, ...] = (), requires: frozenset[Capability] = frozenset()):
        super().__init__()
        self.layers = layers
        self.requires = requires | (
            {Capability.VISION_BLOCK, Capability.RECEIVED_ATTENTION} if layers else set()
        )
        self.calls: list[dict[str, Any]] = []

    def vision_layers(self) -> frozenset[int]:
        return frozenset(self.layers)

    def score(self, ctx: PruneContext) -> torch.Tensor:
        record: dict[str, Any] = {"n": ctx.visual.num_tokens, "grid": ctx.visual.grid}
        record["received"] = {i: ctx.received_attention(i) for i in self.layers}
        record["blocks"] = {i: ctx.vision_block(i) for i in self.layers}
        record["text"] = ctx.text
        self.calls.append(record)
        return torch.rand(ctx.visual.batch_size, ctx.visual.num_tokens)


class LMInputs:
    """Records the keyword arguments of every language-model call."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handle = model.model.language_model.register_forward_pre_hook(
            self.hook, with_kwargs=True
        )

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls.append(dict(kwargs))

    def __enter__(self) -> LMInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def full_positions(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    positions, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    return positions


# -- equivalence at full budget ------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@torch.no_grad()
def test_keep_all_equals_the_unpruned_model(
    model: nn.Module, batch: dict[str, torch.Tensor], positions: Positions
) -> None:
    reference = model(**batch).logits
    ref_generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    with Qwen2_5_VLAdapter(model).install(random_pipeline(positions, keep_ratio=1.0)):
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
    assert torch.equal(generated, ref_generated)


# -- pruned generate -----------------------------------------------------------------------------
@torch.no_grad()
def test_generate_batch_of_two_with_random_pruning_to_25_percent(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    cfg = {
        "scorer": {"name": "random"},
        "selector": {"name": "topk"},
        "keep_ratio": 0.25,
        "positions": "original",
    }
    prompt = batch["input_ids"]
    with tokenprune.apply(model, cfg) as handle, LMInputs(model) as lm:
        assert handle.adapter.name == "qwen2_5_vl"
        generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, prompt.shape[1] + 5)
    assert torch.equal(generated[:, : prompt.shape[1]], prompt)
    prefill, steps = lm.calls[0], lm.calls[1:]
    kept = [6, 2 + 4]  # 25% of 24 | of 8 and 16
    valid = batch["attention_mask"].sum(-1) - torch.tensor([24, 24]) + torch.tensor(kept)
    assert prefill["attention_mask"].sum(-1).tolist() == valid.tolist()
    assert prefill["position_ids"].shape[0] == 4  # text row + (t, h, w)
    assert len(steps) == 4
    assert all(c["inputs_embeds"].shape[1] == 1 for c in steps)
    last = prefill["position_ids"][:, :, -1]
    for step, call in enumerate(steps, start=1):
        torch.testing.assert_close(call["position_ids"][:, :, -1], last + step)  # last + 1, ...


# -- positions -----------------------------------------------------------------------------------
def kept_columns(
    batch: dict[str, torch.Tensor], seen: list[tuple[int, torch.Tensor]]
) -> list[torch.Tensor]:
    """Columns of the unpruned prompt that survive, per row (the images' kept indices)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    spans = find_image_spans(ids, QWEN_IMAGE_TOKEN_ID, SIZES)
    by_size = {n: idx[0] for n, idx in seen}  # one image per distinct grid
    keep = mask.bool().clone()
    for span in spans:
        keep[span.row, span.start : span.start + span.length] = False
        keep[span.row, span.start + by_size[span.length]] = True
    return [torch.nonzero(keep[r]).flatten() for r in range(ids.shape[0])]


@torch.no_grad()
def test_kept_tokens_keep_their_unpruned_positions(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    pipeline = random_pipeline("original")
    with Qwen2_5_VLAdapter(model).install(pipeline), LMInputs(model) as lm:
        model(**batch)
    full = full_positions(model, batch)
    got, mask = lm.calls[0]["position_ids"], lm.calls[0]["attention_mask"]
    assert got.shape[0] == 3  # forward: (t, h, w), like the model's own
    assert isinstance(pipeline.selector, RecordingSelector)
    for row, cols in enumerate(kept_columns(batch, pipeline.selector.seen)):
        assert torch.equal(got[:, row, mask[row].bool()], full[:, row, cols])
    deltas = model.model.rope_deltas.flatten()
    expected = got.masked_fill(mask == 0, 0).amax(dim=(0, 2)) + 1 - mask.sum(-1)
    assert deltas.tolist() == expected.tolist()


@torch.no_grad()
def test_contiguous_closes_the_gap_after_each_image(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    pipeline = random_pipeline("contiguous", keep=2)
    with Qwen2_5_VLAdapter(model).install(pipeline), LMInputs(model) as lm:
        model(**batch)
    full = full_positions(model, batch)
    got, mask = lm.calls[0]["position_ids"], lm.calls[0]["attention_mask"]
    assert isinstance(pipeline.selector, RecordingSelector)
    ids = batch["input_ids"]
    for row, cols in enumerate(kept_columns(batch, pipeline.selector.seen)):
        pos = got[:, row, mask[row].bool()]
        original = full[:, row, cols]
        is_img = ids[row, cols] == QWEN_IMAGE_TOKEN_ID
        starts = torch.nonzero(ids[row, cols] == QWEN_VISION_START_ID).flatten().tolist()
        # text before the first image is untouched; each image's kept tokens keep their
        # positions relative to the image start
        assert torch.equal(pos[:, : starts[0] + 1], original[:, : starts[0] + 1])
        for start in starts:
            image = slice(start + 1, start + 3)  # keep=2
            assert bool(is_img[image].all())
            shift = original[0, start] - pos[0, start]
            assert torch.equal(original[:, image] - shift, pos[:, image])
            end = start + 3  # <vision_end> follows the largest kept position
            assert int(pos[:, end].min()) == int(pos[:, image].max()) + 1


@torch.no_grad()
def test_rope_deltas_continue_a_manual_decoding_step(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    with Qwen2_5_VLAdapter(model).install(random_pipeline()), LMInputs(model) as lm:
        out = model(**batch, use_cache=True)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        # no position_ids: the model continues from its rope_deltas (cache length + delta)
        model(input_ids=next_ids, cache=out.cache)
    prefill, step = lm.calls[0], lm.calls[1]["position_ids"]
    full_rows = prefill["attention_mask"].bool().all(-1)  # rows without padding after pruning
    assert bool(full_rows.any())
    torch.testing.assert_close(
        step[:, full_rows, -1], prefill["position_ids"][:, full_rows, -1] + 1
    )


# -- budget and batching --------------------------------------------------------------------------
@torch.no_grad()
def test_count_budget_is_capped_per_image(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    pipeline = random_pipeline(keep=10)
    with Qwen2_5_VLAdapter(model).install(pipeline), LMInputs(model) as lm:
        model(**batch)
    assert isinstance(pipeline.selector, RecordingSelector)
    assert sorted((n, idx.shape[1]) for n, idx in pipeline.selector.seen) == [
        (8, 8),
        (16, 10),
        (24, 10),
    ]
    lengths = lm.calls[0]["attention_mask"].sum(-1)
    assert lengths.tolist() == (batch["attention_mask"].sum(-1) - torch.tensor([14, 6])).tolist()


@torch.no_grad()
def test_images_with_the_same_grid_are_scored_together(model: nn.Module) -> None:
    grids = (((1, 4, 8),), ((1, 4, 8), (1, 8, 8)))
    inputs = qwen2_5_vl_prompts(model, grids)
    probe = Probe(layers=(-1,))
    with Qwen2_5_VLAdapter(model).install(Pipeline(probe, TopKSelector(), keep=3)):
        out = model(**inputs)
    assert [(c["n"], c["grid"], c["received"][-1].shape[0]) for c in probe.calls] == [
        (8, (2, 4), 2),
        (16, (4, 4), 1),
    ]
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - (8 - 3) - (16 - 3)  # row 1


# -- received attention == the model's eager attention --------------------------------------------
@pytest.fixture(scope="module")
def eager() -> nn.Module:
    return tiny_qwen2_5_vl(attn_implementation="eager", seed=1)


def eager_received(
    model: nn.Module, batch: dict[str, torch.Tensor], layer: int
) -> list[torch.Tensor]:
    """Received attention per image from the attention weights the model computes (eager)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    attn = visual.blocks[layer].attn
    grabbed: dict[str, Any] = {}

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        grabbed.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])

    def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        grabbed["out"] = out

    handles = [
        attn.register_forward_pre_hook(pre, with_kwargs=True),
        attn.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    finally:
        for h in handles:
            h.remove()
    x, cu = grabbed["hidden"], grabbed["cu_seqlens"].tolist()
    cos, sin = grabbed["position_embeddings"]
    s = x.shape[0]
    q, k, v = attn.qkv(x).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = mq.apply_rotary_pos_emb_vision(q, k, cos, sin)
    received = torch.zeros(s)
    context = []
    for a, b in itertools.pairwise(cu):
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out, weights = mq.eager_attention_forward(attn, qs, ks, vs, None, scaling=attn.scaling)
        context.append(out[0])
        received[a:b] = weights[0].mean(0).mean(0)  # heads, then queries of the segment
    # the weights are the ones the model used: they reproduce its attention output
    rebuilt = attn.proj(torch.cat(context).reshape(s, -1))
    torch.testing.assert_close(rebuilt, grabbed["out"], rtol=0, atol=1e-6)
    vc = model.config.vision_config
    window_index, _ = get_vision_window_index(
        batch["image_grid_thw"], vc.spatial_merge_size, vc.window_size, vc.patch_size
    )
    units = received.view(-1, 4).mean(-1)[torch.argsort(window_index)]  # merged raster order
    return list(units.split(SIZES))


@pytest.mark.parametrize("layer", [0, 1], ids=["window-block", "full-block"])
@torch.no_grad()
def test_received_attention_equals_the_eager_attention(eager: nn.Module, layer: int) -> None:
    batch = qwen2_5_vl_prompts(eager)
    want = eager_received(eager, batch, layer)
    probe = Probe(layers=(layer,))
    with Qwen2_5_VLAdapter(eager).install(Pipeline(probe, TopKSelector(), keep_ratio=0.5)):
        eager(**batch)
    got = [call["received"][layer][0] for call in probe.calls]
    assert [g.shape[0] for g in got] == SIZES
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    block = probe.calls[0]["blocks"][layer]
    assert block.group_size == 4
    assert block.num_prefix_tokens == 0
    assert block.hidden.shape == (1, 4 * 24, 32)
    assert block.segments is not None
    assert len(block.segments.unique()) == (2 if layer == 0 else 1)  # two windows / one image


# -- capabilities and errors ---------------------------------------------------------------------
def test_cls_attention_is_refused_when_applied(model: nn.Module) -> None:
    hooks = dict(model._forward_pre_hooks)
    cfg = {"scorer": {"name": "cls_attention"}, "selector": {"name": "topk"}, "keep": 4}
    with pytest.raises(CapabilityError) as info:
        tokenprune.apply(model, cfg)
    message = str(info.value)
    assert "'cls_attention'" in message
    assert "'qwen2_5_vl'" in message
    assert "received_attention" in message
    assert dict(model._forward_pre_hooks) == hooks
    assert "generate" not in vars(model)


@torch.no_grad()
def test_text_embeddings_are_the_prompt_without_vision_tokens(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    probe = Probe(requires=frozenset({Capability.TEXT_EMBEDDINGS}))
    with Qwen2_5_VLAdapter(model).install(Pipeline(probe, TopKSelector(), keep=2)):
        model(**batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vision = torch.tensor([QWEN_IMAGE_TOKEN_ID, QWEN_VISION_START_ID, QWEN_VISION_END_ID])
    embed = model.get_input_embeddings()
    rows = {24: 0, 8: 1, 16: 1}
    for call in probe.calls:
        row = rows[call["n"]]
        text = call["text"]
        prompt = ids[row][mask[row].bool() & ~torch.isin(ids[row], vision)]
        assert text.embeddings.shape[0] == 1
        assert int(text.mask.sum()) == prompt.numel()
        torch.testing.assert_close(text.embeddings[0, : prompt.numel()], embed(prompt))


def test_runtime_resolves_the_adapter(model: nn.Module) -> None:
    assert Runtime(autoload=False).resolve_adapter(model) is Qwen2_5_VLAdapter


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mm_token_type_ids": None}, "mm_token_type_ids"),
        ({"image_grid_thw": None}, "image_grid_thw"),
        ({"pixel_values_videos": torch.zeros(1)}, "pixel_values_videos"),
        ({"input_ids": None, "inputs_embeds": torch.zeros(1)}, "input_ids"),
    ],
)
def test_input_errors_are_clear(
    model: nn.Module, batch: dict[str, torch.Tensor], change: dict[str, Any], message: str
) -> None:
    inputs = {**batch, **change}
    with (
        Qwen2_5_VLAdapter(model).install(random_pipeline()),
        pytest.raises(AdapterError, match=message),
    ):
        model(**inputs)


def test_vision_layer_out_of_range(model: nn.Module) -> None:
    with pytest.raises(AdapterError, match="has 2 blocks"):
        Qwen2_5_VLAdapter(model).install(Pipeline(Probe(layers=(5,)), TopKSelector(), keep=2))
