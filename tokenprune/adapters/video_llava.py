"""Adapter for Video-LLaVA (``VideoLlavaForConditionalGeneration``, transformers 5.x).

Video-LLaVA has two CLIP towers of the same shape, ``image_tower`` and ``video_tower``, and one
projector. An image gives ``P`` patch tokens (its [CLS] is dropped, ``default`` select
strategy); a video of ``F`` frames gives ``F * (1 + P)`` tokens: each frame's [CLS] followed by
its patches (the model keeps the frame's [CLS] whatever the select strategy).

Policy:

- **What is pruned:** the features the projector consumes (the ``vision_feature_layer`` hidden
  state), before the projector; merged tokens are projected after merging. Images are pruned as
  in LLaVA-1.5 (all images of a call in one :class:`~tokenprune.context.PruneContext`). Videos
  are pruned frame by frame: every frame is a CLIP image with its own [CLS], and the frames
  with the same budget form one context.
- **Budget:** per image ``pipeline.budget(P)``; per video ``pipeline.budget(F * P)``, split over
  its frames by an allocation rule (:mod:`tokenprune.adapters._allocation`): ``uniform`` by
  default, any rule by name or as a function via ``allocation=``.
- **Frame [CLS] tokens:** never pruned and never counted in the budget; each stays first in its
  frame, so a video keeps the unpruned frame structure ``[CLS_f, kept patches of f]`` per frame.
  Kept patches stay in raster order within their frame.
- **Images and videos in one call:** supported; both are pruned and spliced into their own
  placeholders (``image_token_id``/``video_token_id``). ``pixel_values_images`` (the
  deprecated name) is accepted as an alias of ``pixel_values``.
- **Seams and positions:** as the LLaVA-1.5 adapter: the public ``get_image_features`` and
  ``get_video_features`` run under temporary hooks (block-input capture on the matching tower
  and a projector pre-hook that runs the pipeline), the pruned features go back as
  ``mm_encoder_outputs`` and ``input_ids``/``attention_mask``/``labels``/``position_ids`` are
  shortened (``contiguous`` or ``original`` positions).
- **[CLS] attention:** recomputed for one query row from the captured block input of the tower
  that encoded the image or frame, so both towers keep running SDPA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from tokenprune.adapters._allocation import (
    AllocationRule,
    allocate,
    needs_features,
    resolve_allocation,
)
from tokenprune.adapters._sequence import ImageSpan, find_image_spans, shrink_inputs
from tokenprune.adapters._vision import capture_block_inputs, clip_blocks, text_tokens_for_images
from tokenprune.adapters.base import QUERY_KWARG, CallMode, ModelAdapter
from tokenprune.adapters.llava import normalize_queries
from tokenprune.adapters.llava_next import (
    CLIP_CAPABILITIES,
    PrunePart,
    bypass_hooks,
    pad_token_id,
    prune_parts,
)
from tokenprune.capabilities import Capability
from tokenprune.errors import AdapterError, CapabilityError
from tokenprune.pipeline import Pipeline
from tokenprune.types import TextTokens

__all__ = ["VideoLlavaAdapter"]


class VideoLlavaAdapter(ModelAdapter):
    """Prunes the image and video tokens of ``VideoLlavaForConditionalGeneration`` models.

    Args:
        model: The model.
        allocation: How a video's budget is split over its frames: a name from
            :data:`~tokenprune.adapters._allocation.ALLOCATIONS`, a function
            ``allocate(counts, budget) -> shares``, or a
            :class:`~tokenprune.adapters.FeatureAllocation` (which also receives each frame's
            patch features, and then splits every video's budget on its own).

    Raises:
        AdapterError: If the model is not a Video-LLaVA model or the rule is unknown.

    Examples:
        >>> from tokenprune.testing import tiny_video_llava
        >>> VideoLlavaAdapter(tiny_video_llava()).allocation_name
        'uniform'
    """

    name: ClassVar[str] = "video_llava"
    model_classes: ClassVar[tuple[str, ...]] = ("VideoLlavaForConditionalGeneration",)
    capabilities: ClassVar[frozenset[Capability]] = CLIP_CAPABILITIES
    follow_up_inputs: ClassVar[tuple[str, ...] | None] = (
        "pixel_values_images",
        "pixel_values_videos",
    )
    default_allocation: ClassVar[str] = "uniform"

    def __init__(self, model: nn.Module, *, allocation: str | AllocationRule | None = None) -> None:
        super().__init__(model)
        self.allocation_name, self.allocation = resolve_allocation(
            self.default_allocation if allocation is None else allocation
        )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes and hasattr(model, "model")

    # -- model facts -----------------------------------------------------------------------
    @property
    def _inner(self) -> Any:
        return self.model.model

    @property
    def _config(self) -> Any:
        return self.model.config

    def grid(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of one image or frame."""
        vc = self._config.vision_config
        side = int(vc.image_size // vc.patch_size)
        return side, side

    def tokens_per_image(self) -> int:
        """Patch tokens per image or frame ``P`` (a frame adds its [CLS])."""
        rows, cols = self.grid()
        return rows * cols

    def validate(self, pipeline: Pipeline) -> None:
        super().validate(pipeline)
        strategy = self._config.vision_feature_select_strategy
        if strategy != "default":
            raise AdapterError(
                f"vision_feature_select_strategy={strategy!r} is not supported: an image's "
                "[CLS] token would be pruned like a patch. Use 'default' (Video-LLaVA's setting)"
            )
        for tower in ("image_tower", "video_tower"):
            blocks = clip_blocks(getattr(self._inner, tower))
            for layer in pipeline.vision_layers():
                if not -len(blocks) <= layer < len(blocks):
                    raise AdapterError(
                        f"vision layer {layer} does not exist: the {tower} has {len(blocks)} blocks"
                    )

    # -- the per-call work -----------------------------------------------------------------
    def prepare_inputs(
        self, pipeline: Pipeline, kwargs: dict[str, Any], mode: CallMode
    ) -> dict[str, Any]:
        query = kwargs.pop(QUERY_KWARG, None)
        images = kwargs.get("pixel_values")
        legacy = kwargs.get("pixel_values_images")
        if legacy is not None:
            if images is not None:
                raise AdapterError(
                    "pass images either as pixel_values or as pixel_values_images (deprecated), "
                    "not both"
                )
            images = legacy
        videos = kwargs.get("pixel_values_videos")
        if images is None and videos is None:
            return kwargs
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise AdapterError(
                "a pruned Video-LLaVA needs input_ids with <image>/<video> placeholders "
                "(inputs_embeds alone cannot be shortened); pass input_ids"
            )
        if kwargs.get("mm_encoder_outputs") is not None:
            raise AdapterError(
                "mm_encoder_outputs cannot be combined with pixel_values/pixel_values_videos here"
            )
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        queries = normalize_queries(query, input_ids.shape[0])
        if Capability.TEXT_QUERY in pipeline.requires and queries is None:
            raise CapabilityError(
                "the pipeline is text-guided but no question was given: pass "
                f"{QUERY_KWARG}=[...] (the user's question, one string per prompt) to "
                f"{mode}()"
            )
        num_patches = self.tokens_per_image()
        image_spans: list[ImageSpan] = []
        video_spans: list[ImageSpan] = []
        if images is not None:
            image_spans = find_image_spans(
                input_ids, self._config.image_token_id, [num_patches] * int(images.shape[0])
            )
        if videos is not None:
            if videos.ndim != 5:
                raise AdapterError(
                    "pixel_values_videos must be (videos, frames, channels, height, width), got "
                    f"shape {tuple(videos.shape)}"
                )
            per_video = int(videos.shape[1]) * (1 + num_patches)
            try:
                video_spans = find_image_spans(
                    input_ids, self._config.video_token_id, [per_video] * int(videos.shape[0])
                )
            except AdapterError as exc:
                raise AdapterError(f"<video> placeholders: {exc}") from None
        rows = [s.row for s in image_spans + video_spans]
        text = self._text(pipeline, input_ids, attention_mask, rows, queries)
        capabilities = self.capabilities - (
            frozenset() if text is not None and text.texts is not None else {Capability.TEXT_QUERY}
        )

        encoded: dict[str, Any] = {}
        keep_idx: list[torch.Tensor] = []
        if images is not None:
            encoded["image"], kept = self._prune_images(
                pipeline, images, kwargs, text, capabilities
            )
            keep_idx += kept
        if videos is not None:
            encoded["video"], kept = self._prune_videos(
                pipeline, videos, kwargs, text, capabilities, first_item=len(image_spans)
            )
            keep_idx += kept

        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        shrunk = shrink_inputs(
            input_ids,
            attention_mask,
            image_spans + video_spans,
            keep_idx,
            positions=pipeline.positions,
            position_ids=kwargs.get("position_ids"),
            default_positions="arange" if mode == "forward" else "cumsum",
            past_length=past,
            labels=kwargs.get("labels"),
            pad_token_id=pad_token_id(self._config, input_ids, attention_mask),
        )
        return shrunk.apply(
            kwargs,
            drop=("pixel_values", "pixel_values_images", "pixel_values_videos"),
            encoder_outputs=encoded,
        )

    def _text(
        self,
        pipeline: Pipeline,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: list[int],
        queries: tuple[str, ...] | None,
    ) -> TextTokens | None:
        texts = None if queries is None else tuple(queries[r] for r in rows)
        if Capability.TEXT_EMBEDDINGS not in pipeline.requires:
            return None if texts is None else TextTokens(texts=texts)
        text_mask = attention_mask * (input_ids != self._config.video_token_id)
        with torch.no_grad():
            emb, mask = text_tokens_for_images(
                self._inner.get_input_embeddings(),
                input_ids,
                text_mask,
                self._config.image_token_id,
                rows,
            )
        return TextTokens(texts=texts, embeddings=emb, mask=mask)

    def _prune_images(
        self,
        pipeline: Pipeline,
        images: torch.Tensor,
        kwargs: Mapping[str, Any],
        text: TextTokens | None,
        capabilities: frozenset[Capability],
    ) -> tuple[Any, list[torch.Tensor]]:
        inner = self._inner
        blocks = clip_blocks(inner.image_tower)
        projector: nn.Module = inner.multi_modal_projector
        keep = pipeline.budget(self.tokens_per_image())
        patches = torch.arange(self.tokens_per_image())
        kept: list[torch.Tensor] = []

        with capture_block_inputs(blocks, pipeline.vision_layers()) as captured:

            def run_pipeline(module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor]:
                feats = args[0]
                parts = [PrunePart(i, i, patches, keep, self.grid()) for i in range(feats.shape[0])]
                results = prune_parts(
                    pipeline,
                    parts,
                    features=feats,
                    hidden=dict(captured),
                    blocks=blocks,
                    text=text,
                    capabilities=capabilities,
                    projector=bypass_hooks(projector),
                )
                kept.extend(r.keep_idx for r in results)
                return (torch.stack([r.features for r in results]).to(feats.dtype),)

            handle = projector.register_forward_pre_hook(run_pipeline)
            try:
                output = inner.get_image_features(
                    pixel_values=images,
                    vision_feature_layer=kwargs.get("vision_feature_layer"),
                    vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                    return_dict=True,
                )
            finally:
                handle.remove()
        return output, kept

    def _prune_videos(
        self,
        pipeline: Pipeline,
        videos: torch.Tensor,
        kwargs: Mapping[str, Any],
        text: TextTokens | None,
        capabilities: frozenset[Capability],
        *,
        first_item: int,
    ) -> tuple[Any, list[torch.Tensor]]:
        inner = self._inner
        blocks = clip_blocks(inner.video_tower)
        projector: nn.Module = inner.multi_modal_projector
        num_videos, num_frames = int(videos.shape[0]), int(videos.shape[1])
        num_patches = self.tokens_per_image()
        counts = [num_patches] * num_frames
        budget = pipeline.budget(num_frames * num_patches)
        # A count-based rule gives every video the same split; a feature rule splits each
        # video's budget by its own frames, once they are encoded (in run_pipeline).
        shared = (
            None if needs_features(self.allocation) else allocate(counts, budget, self.allocation)
        )
        patches = torch.arange(num_patches)
        kept: list[torch.Tensor] = []

        with capture_block_inputs(blocks, pipeline.vision_layers()) as captured:

            def run_pipeline(module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor]:
                frames = args[0]  # (videos * frames, 1 + P, C): [CLS] first
                shares = [
                    shared
                    if shared is not None
                    else allocate(
                        counts,
                        budget,
                        self.allocation,
                        features=list(frames[v * num_frames : (v + 1) * num_frames, 1:]),
                    )
                    for v in range(num_videos)
                ]
                parts = [
                    PrunePart(first_item + v, v * num_frames + f, patches, share, self.grid())
                    for v in range(num_videos)
                    for f, share in enumerate(shares[v])
                    if share > 0
                ]
                results = iter(
                    prune_parts(
                        pipeline,
                        parts,
                        features=frames[:, 1:],
                        hidden=dict(captured),
                        blocks=blocks,
                        text=text,
                        capabilities=capabilities,
                        projector=bypass_hooks(projector),
                    )
                )
                per_video = []
                for v in range(num_videos):
                    tokens, index = [], []
                    for f, share in enumerate(shares[v]):
                        start = f * (1 + num_patches)
                        tokens.append(frames[v * num_frames + f, :1])
                        index.append(torch.tensor([start]))
                        if share > 0:
                            result = next(results)
                            tokens.append(result.features.to(frames.dtype))
                            index.append(start + 1 + result.keep_idx.cpu())
                    per_video.append(torch.cat(tokens))
                    kept.append(torch.cat(index))
                return (torch.stack(per_video),)

            handle = projector.register_forward_pre_hook(run_pipeline)
            try:
                output = inner.get_video_features(
                    pixel_values_videos=videos,
                    vision_feature_layer=kwargs.get("vision_feature_layer"),
                    return_dict=True,
                )
            finally:
                handle.remove()
        return output, kept
