"""Video-LLaVA adapter: per-frame budgets, frame [CLS] tokens, images and videos in one batch.

Tiny model: 32 px images and frames with patch 8, so an image gives P = 16 tokens and a video of
4 frames 4 * (1 + 16) = 68 (each frame's [CLS] first).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from tokenprune import AdapterError, Pipeline, PruneContext
from tokenprune.adapters.video_llava import VideoLlavaAdapter
from tokenprune.capabilities import Capability
from tokenprune.plugin.manager import Runtime
from tokenprune.stages.scorers.cls_attention import ClsAttentionScorer
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.testing import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_video_llava, video_llava_prompts

P, F = 16, 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads cost more in synchronisation than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_video_llava()


class RecordingScorer(RandomScorer):
    """Random scores; records each pruning context (and its prompt text, when given)."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def score(self, ctx: PruneContext) -> torch.Tensor:
        RecordingScorer.seen.append(
            {
                "n": ctx.visual.num_tokens,
                "keep": ctx.keep,
                "batch": ctx.visual.batch_size,
                "text": ctx.text,
            }
        )
        return super().score(ctx)


class TextRecordingScorer(RecordingScorer):
    """Also needs the prompt embeddings."""

    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.TEXT_EMBEDDINGS})


def prompts(
    model: nn.Module, images: Sequence[int], videos: Sequence[int], frames: int = F
) -> dict[str, torch.Tensor]:
    lengths = [(1 + i, 3 + 2 * i) for i in range(len(videos))]
    return video_llava_prompts(
        model,
        lengths,
        images_per_row=list(images),
        videos_per_row=list(videos),
        num_frames=frames,
    )


def prepared(
    model: nn.Module, inputs: dict[str, torch.Tensor], pipeline: Pipeline, **options: Any
) -> dict[str, Any]:
    adapter = VideoLlavaAdapter(model, **options)
    adapter.validate(pipeline)
    with torch.no_grad():
        return adapter.prepare_inputs(pipeline, dict(inputs), "forward")


def kept_offsets(
    inputs: dict[str, torch.Tensor], out: dict[str, Any], token_id: int, row: int
) -> torch.Tensor:
    """Offsets (within the row's placeholder run) of the kept tokens, from original positions."""
    start = int(torch.nonzero(inputs["input_ids"][row] == token_id)[0])
    cols = out["input_ids"][row] == token_id
    offsets: torch.Tensor = out["position_ids"][row, cols] - start
    return offsets


def test_video_budget_is_split_uniformly_over_frames(model: nn.Module) -> None:
    RecordingScorer.seen.clear()
    inputs = prompts(model, [0, 0], [1, 1])
    out = prepared(model, inputs, Pipeline(RecordingScorer(), TopKSelector(), keep=10))
    # budget 10 of 4 x 16 patches, uniform: [3, 3, 2, 2]; frames of both videos share contexts
    seen = sorted((s["n"], s["keep"], s["batch"]) for s in RecordingScorer.seen)
    assert seen == [(P, 2, 4), (P, 3, 4)]
    assert ((out["input_ids"] == VIDEO_TOKEN_ID).sum(-1) == 10 + F).all()
    features = out["mm_encoder_outputs"]["video"].pooler_output
    assert tuple(features.shape[:2]) == (2, 10 + F)


def test_frame_allocation_is_pluggable(model: nn.Module) -> None:
    def first_frame(counts: Sequence[int], budget: int) -> list[int]:
        """Everything the other frames do not need goes to the first frame."""
        rest = [1] * (len(counts) - 1)
        return [budget - sum(rest), *rest]

    RecordingScorer.seen.clear()
    inputs = prompts(model, [0, 0], [1, 1])
    prepared(
        model, inputs, Pipeline(RecordingScorer(), TopKSelector(), keep=10), allocation=first_frame
    )
    seen = sorted((s["n"], s["keep"], s["batch"]) for s in RecordingScorer.seen)
    assert seen == [(P, 1, 6), (P, 7, 2)]
    assert VideoLlavaAdapter(model, allocation="proportional").allocation_name == "proportional"


def test_frame_cls_tokens_are_always_kept(model: nn.Module) -> None:
    inputs = prompts(model, [0, 0], [1, 1])
    pipeline = Pipeline(RandomScorer(seed=2), TopKSelector(), keep_ratio=0.1, positions="original")
    out = prepared(model, inputs, pipeline)  # budget 6 of 64: [2, 2, 1, 1]
    with torch.no_grad():
        full = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
    full_features = full.pooler_output.reshape(2, F * (1 + P), -1)
    pruned = out["mm_encoder_outputs"]["video"].pooler_output
    for row in range(2):
        offsets = kept_offsets(inputs, out, VIDEO_TOKEN_ID, row)
        assert offsets.numel() == 6 + F
        cls_slots = [f * (1 + P) for f in range(F)]
        assert set(cls_slots) <= set(offsets.tolist())
        assert bool((offsets[1:] > offsets[:-1]).all())  # raster order within each frame
        per_frame = [int(((offsets >= s) & (offsets < s + 1 + P)).sum()) - 1 for s in cls_slots]
        assert per_frame == [2, 2, 1, 1]
        torch.testing.assert_close(pruned[row], full_features[row, offsets], rtol=0, atol=1e-6)


def test_images_and_videos_in_one_batch(model: nn.Module) -> None:
    RecordingScorer.seen.clear()
    inputs = prompts(model, [1, 2], [1, 0])  # row 0: image + video, row 1: two images
    pipeline = Pipeline(TextRecordingScorer(), TopKSelector(), keep_ratio=0.25)
    assert Runtime(autoload=False).resolve_adapter(model) is VideoLlavaAdapter
    with VideoLlavaAdapter(model).install(pipeline), torch.no_grad():
        logits = model(**inputs).logits
        seen = list(RecordingScorer.seen)
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # row 0: 5 text + 4 image + (16 + 4) video = 29; row 1: 8 text + 2 x 4 image = 16
    assert logits.shape[1] == 29
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert len(RecordingScorer.seen) == 2 * len(seen)  # generate pruned once, like forward
    images = [s for s in seen if s["batch"] == 3]
    frames = [s for s in seen if s["batch"] == F]  # 4 frames of the one video, 4 tokens each
    assert [(s["n"], s["keep"]) for s in images] == [(P, 4)]
    assert [(s["n"], s["keep"]) for s in frames] == [(P, 4)]
    # prompt text per item, placeholders of both kinds excluded: rows have 5 and 8 text tokens
    assert images[0]["text"].mask.sum(-1).tolist() == [5, 8, 8]
    assert frames[0]["text"].mask.sum(-1).tolist() == [5] * F


def test_images_only_and_legacy_argument(model: nn.Module) -> None:
    inputs = prompts(model, [1, 1], [0, 0])
    pipeline = Pipeline(RandomScorer(), TopKSelector(), keep=4)
    legacy = dict(inputs, pixel_values_images=inputs["pixel_values"])
    del legacy["pixel_values"]
    with VideoLlavaAdapter(model).install(pipeline), torch.no_grad():
        a = model(**inputs).logits
        b = model(**legacy).logits
        with pytest.raises(AdapterError, match="not both"):
            model(**dict(inputs, pixel_values_images=inputs["pixel_values"]))
    assert torch.equal(a, b)
    assert a.shape[1] == 1 + 2 + 5 + 4  # the longer row: text + 4 kept tokens


def test_cls_attention_of_frames_matches_eager() -> None:
    eager = tiny_video_llava(attn_implementation="eager")
    inputs = prompts(eager, [0], [1], frames=2)
    frames = inputs["pixel_values_videos"].flatten(0, 1)
    with torch.no_grad():
        attentions = eager.model.video_tower(frames, output_attentions=True).attentions
    expected = attentions[0][:, :, 0, 1:].mean(1)

    seen: list[torch.Tensor] = []

    class Cls(ClsAttentionScorer):
        def score(self, ctx: PruneContext) -> torch.Tensor:
            scores = super().score(ctx)
            seen.append(scores)
            return scores

    pipeline = Pipeline(Cls(layer=-2), TopKSelector(), keep_ratio=1.0)
    prepared(eager, inputs, pipeline)
    torch.testing.assert_close(torch.cat(seen), expected, rtol=0, atol=1e-6)


def test_errors_name_the_fix(model: nn.Module) -> None:
    inputs = prompts(model, [0, 0], [1, 1])
    pipeline = Pipeline(RandomScorer(), TopKSelector(), keep=4)
    short = dict(inputs, input_ids=inputs["input_ids"].clone())
    short["input_ids"][0, -3] = IMAGE_TOKEN_ID + 1  # a text token, still no image
    bad = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:, :2])
    with pytest.raises(AdapterError, match="<video> placeholders"):
        prepared(model, bad, pipeline)
    with pytest.raises(AdapterError, match=r"\(videos, frames, channels, height, width\)"):
        prepared(
            model, dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][0]), pipeline
        )
    with pytest.raises(AdapterError, match="needs input_ids"):
        prepared(model, {"pixel_values_videos": inputs["pixel_values_videos"]}, pipeline)
    with pytest.raises(AdapterError, match="vision layer -3 does not exist"):
        VideoLlavaAdapter(model).install(
            Pipeline(ClsAttentionScorer(layer=-3), TopKSelector(), keep=4)
        )
