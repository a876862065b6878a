"""Adapter for Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, transformers 5.x).

Policy:

- **What is pruned:** the language-model tokens of each image, i.e. the output of the vision
  tower's 2x2 patch merger (one token per 2x2 group of 14-pixel patches), in the raster order of
  the merged grid. Images of any resolution (``image_grid_thw``), several per prompt, batches
  with padding. Each image keeps ``pipeline.budget(N_i)`` of its ``N_i = t*h*w/4`` tokens, so
  the budget applies per image (a count ``keep`` is capped at ``N_i``); images with the same
  grid are scored together.
- **Seams:** a forward pre-hook on the model and a per-instance ``generate`` wrapper. Both run
  the tower through the public ``get_image_features`` with temporary block pre-hooks (capturing
  the block input, ``cu_seqlens`` and rotary ``position_embeddings``), run the pipeline, pass the
  kept features as ``mm_encoder_outputs`` and shorten ``input_ids``, ``attention_mask``,
  ``mm_token_type_ids`` and ``labels`` to ``K_i`` placeholders per image.
- **Positions (mRoPE):** the 3-D (t, h, w) positions are computed on the unpruned layout with the
  model's own ``get_rope_index`` and gathered for the kept tokens, so every kept token keeps its
  original (t, h, w) position. They are
  passed explicitly (``(3, B, L')`` to ``forward``, ``(4, B, L')`` with the text-position row to
  ``generate``, which continues each row with ``last + 1``); ``model.model.rope_deltas`` is set
  to the pruned layout's deltas, as the model would after a prefill. mRoPE positions encode the
  2-D layout, so kept image tokens are never renumbered among themselves; the policies differ
  only after an image. ``original`` keeps every position (the text after an image still starts
  at the image's start + ``max(h, w)/2``); ``contiguous`` closes the gap a pruned image can
  leave at its end: later tokens move down so the token after the image follows the largest
  position its kept tokens use. Both equal the unpruned model when every token is kept.
- **No [CLS]:** the tower has no class token, so ``cls_attention`` is not offered; the
  saliency substitute is ``received_attention``: the attention each token receives, averaged
  over heads and over the queries of its attention segment, recomputed from the captured block
  input with the block's 2-D rotary embedding and ``cu_seqlens`` (tokens of different images,
  or of different windows in window-attention blocks, never attend to each other), then
  averaged over each 2x2 merge group.
- **Vision blocks:** ``ctx.blocks[i].hidden`` holds, per image, the block input rearranged from
  the tower's window order to the merged raster order, 4 consecutive rows (one 2x2 group) per
  language-model token (``group_size=4``), with ``segments`` and ``rotary`` set; ``q_proj``,
  ``k_proj`` and ``v_proj`` are the three parts of the fused ``attn.qkv``.
- **Text:** ``text_embeddings`` are the language model's input embeddings of the prompt without
  padding, image placeholders and vision start/end tokens; ``projector`` is the identity (the
  pruned tokens already live in the language model's space).
- **Not pruned:** videos (``pixel_values_videos`` together with images raise an error; a call
  with only videos runs unpruned).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from tokenprune.adapters._sequence import ImageSpan, _pads_left, find_image_spans, shrink_inputs
from tokenprune.adapters._vision import text_tokens_for_images
from tokenprune.adapters.base import QUERY_KWARG, CallMode, ModelAdapter
from tokenprune.adapters.llava import normalize_queries
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext, VisionBlock
from tokenprune.errors import AdapterError, CapabilityError
from tokenprune.pipeline import Pipeline
from tokenprune.types import TextTokens, VisualTokens

__all__ = ["Qwen2_5_VLAdapter"]

_MODULE = "transformers.models.qwen2_5_vl"


class Qwen2_5_VLAdapter(ModelAdapter):  # noqa: N801 - named after the model class
    """Prunes the image tokens of ``Qwen2_5_VLForConditionalGeneration`` after the patch merger.

    Examples:
        >>> from tokenprune.testing.models import tiny_qwen2_5_vl
        >>> Qwen2_5_VLAdapter.supports(tiny_qwen2_5_vl())
        True
    """

    name: ClassVar[str] = "qwen2_5_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.VISION_BLOCK,
            Capability.RECEIVED_ATTENTION,
            Capability.TEXT_EMBEDDINGS,
            Capability.TEXT_QUERY,
            Capability.PROJECTOR,
        }
    )
    follow_up_inputs: ClassVar[tuple[str, ...] | None] = None
    """Follow-up turns from a cache are refused: Qwen2.5-VL's M-RoPE offsets of a pruned
    prefill are not tracked across turns yet."""
    capability_hints: ClassVar[Mapping[Capability, str]] = {
        Capability.CLS_ATTENTION: (
            "the Qwen2.5-VL vision tower has no [CLS] token; use the 'received_attention' "
            "scorer instead (attention each token receives, averaged over queries and pooled "
            "over each 2x2 merge group)"
        ),
    }

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return any(
            c.__name__ in cls.model_classes and c.__module__.startswith(_MODULE)
            for c in type(model).__mro__
        )

    # -- model facts -----------------------------------------------------------------------
    @property
    def _inner(self) -> Any:
        return self.model.model

    @property
    def _config(self) -> Any:
        return self.model.config

    @property
    def _merge(self) -> int:
        return int(self._config.vision_config.spatial_merge_size)

    def tokens_per_image(self, image_grid_thw: torch.Tensor) -> list[int]:
        """Language-model tokens of each image before pruning, ``t*h*w / merge^2``."""
        return [int(n) for n in (image_grid_thw.prod(-1) // self._merge**2).tolist()]

    @staticmethod
    def budget(pipeline: Pipeline, num_tokens: int) -> int:
        """Tokens to keep of an image with ``num_tokens`` tokens.

        A ratio applies to every image (:meth:`Pipeline.budget`); a count ``keep`` is capped at
        the image's size, so images smaller than the budget are kept whole.
        """
        if pipeline.keep is not None:
            return min(pipeline.keep, num_tokens)
        return pipeline.budget(num_tokens)

    def validate(self, pipeline: Pipeline) -> None:
        super().validate(pipeline)
        depth = len(self._inner.visual.blocks)
        for layer in pipeline.vision_layers():
            if not -depth <= layer < depth:
                raise AdapterError(
                    f"vision layer {layer} does not exist: the Qwen2.5-VL tower has {depth} blocks"
                )

    # -- the per-call work -----------------------------------------------------------------
    def prepare_inputs(
        self, pipeline: Pipeline, kwargs: dict[str, Any], mode: CallMode
    ) -> dict[str, Any]:
        query = kwargs.pop(QUERY_KWARG, None)
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return kwargs
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise AdapterError(
                "a pruned Qwen2.5-VL needs input_ids with <|image_pad|> placeholders "
                "(inputs_embeds alone cannot be shortened); pass input_ids"
            )
        for unsupported in ("mm_encoder_outputs", "pixel_values_videos"):
            if kwargs.get(unsupported) is not None:
                raise AdapterError(
                    f"{unsupported} cannot be combined with pixel_values when pruning "
                    "Qwen2.5-VL (only images are pruned); pass it in a separate call"
                )
        grid = kwargs.get("image_grid_thw")
        token_types = kwargs.get("mm_token_type_ids")
        if grid is None or token_types is None:
            missing = "image_grid_thw" if grid is None else "mm_token_type_ids"
            raise AdapterError(
                f"a pruned Qwen2.5-VL needs {missing} (the processor returns it; by hand: "
                "mm_token_type_ids = (input_ids == image_token_id).long()) to lay out the mRoPE "
                "positions of the unpruned prompt"
            )
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and int(cache.get_seq_length()) > 0:
            raise AdapterError(
                "cannot prune images of a prompt that continues a non-empty cache; start "
                "from an empty cache"
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
        sizes = self.tokens_per_image(grid)
        spans = find_image_spans(input_ids, self._config.image_token_id, sizes)
        rows = [s.row for s in spans]

        text = self._text(pipeline, input_ids, attention_mask, rows, queries)
        features, keep_idx = self._pruned_features(pipeline, pixel_values, grid, text)
        full_positions = self._full_positions(kwargs, input_ids, token_types, grid, attention_mask)
        shrunk = shrink_inputs(
            input_ids,
            attention_mask,
            spans,
            keep_idx,
            positions="original",
            position_ids=full_positions,
            labels=kwargs.get("labels"),
            pad_token_id=_pad_id(self._config, input_ids, attention_mask),
        )
        assert shrunk.position_ids is not None  # always returned under "original"
        mask = shrunk.attention_mask
        positions = shrunk.position_ids  # (3, B, L')
        if pipeline.positions == "contiguous":
            positions = _close_gaps(positions, mask, spans, keep_idx, shrunk.kept_columns)
        valid = mask.bool()
        last = positions.masked_fill(~valid.unsqueeze(0), 0).amax(dim=(0, 2))
        self._inner.rope_deltas = (last + 1 - valid.sum(-1)).unsqueeze(1)
        if mode == "generate":  # generate prepends the 1-D text positions (used for masks)
            text_positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            positions = torch.cat([text_positions.unsqueeze(0), positions], dim=0)

        out = dict(kwargs)
        out.pop("pixel_values")
        out["mm_encoder_outputs"] = {"image": features}
        out["input_ids"] = shrunk.input_ids
        out["attention_mask"] = mask
        out["mm_token_type_ids"] = _shrink_like(token_types, shrunk.kept_columns, attention_mask)
        out["position_ids"] = positions
        if shrunk.labels is not None:
            out["labels"] = shrunk.labels
        return out

    def _full_positions(
        self,
        kwargs: Mapping[str, Any],
        input_ids: torch.Tensor,
        token_types: torch.Tensor,
        grid: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Unpruned (t, h, w) positions ``(3, B, L)``: the caller's, or ``get_rope_index``'s."""
        given: torch.Tensor | None = kwargs.get("position_ids")
        if given is not None:
            if given.ndim == 2:
                return given.unsqueeze(0).expand(3, -1, -1)
            if given.ndim == 3 and given.shape[0] in (3, 4):
                return given[-3:]
            raise AdapterError(
                f"position_ids must be (B, L), (3, B, L) or (4, B, L), got {tuple(given.shape)}"
            )
        positions, _ = self._inner.get_rope_index(
            input_ids,
            mm_token_type_ids=token_types,
            image_grid_thw=grid,
            video_grid_thw=kwargs.get("video_grid_thw"),
            second_per_grid_ts=kwargs.get("second_per_grid_ts"),
            attention_mask=attention_mask,
        )
        return positions  # type: ignore[no-any-return]

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
        config = self._config
        image_id = int(config.image_token_id)
        specials = torch.tensor(
            [config.video_token_id, config.vision_start_token_id, config.vision_end_token_id],
            device=input_ids.device,
        )
        ids = input_ids.masked_fill(torch.isin(input_ids, specials), image_id)
        model: Any = self.model
        with torch.no_grad():
            emb, mask = text_tokens_for_images(
                model.get_input_embeddings(), ids, attention_mask, image_id, rows
            )
        return TextTokens(texts=texts, embeddings=emb, mask=mask)

    def _pruned_features(
        self,
        pipeline: Pipeline,
        pixel_values: torch.Tensor,
        grid: torch.Tensor,
        text: TextTokens | None,
    ) -> tuple[Any, list[torch.Tensor]]:
        visual = self._inner.visual
        blocks: nn.ModuleList = visual.blocks
        captured: dict[int, _Captured] = {}
        handles = []
        for index in sorted({i % len(blocks) for i in pipeline.vision_layers()}):

            def hook(
                module: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                index: int = index,
            ) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                cos, sin = kwargs["position_embeddings"]
                captured[index] = _Captured(hidden, kwargs["cu_seqlens"], cos, sin)

            handles.append(blocks[index].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            output = self._inner.get_image_features(
                pixel_values=pixel_values, image_grid_thw=grid, return_dict=True
            )
        finally:
            for handle in handles:
                handle.remove()

        features: list[torch.Tensor] = list(output.pooler_output)
        layout = _Layout(self, grid) if captured else None
        capabilities = self.capabilities - (
            frozenset() if text is not None and text.texts is not None else {Capability.TEXT_QUERY}
        )
        kept: list[torch.Tensor | None] = [None] * len(features)
        keep_idx: list[torch.Tensor | None] = [None] * len(features)
        groups: dict[tuple[int, ...], list[int]] = {}
        for image, thw in enumerate(grid.tolist()):
            groups.setdefault(tuple(thw), []).append(image)
        for (t, h, w), images in groups.items():
            feats = torch.stack([features[i] for i in images])
            merged = (h // self._merge, w // self._merge)
            vision_blocks = {
                i: layout.block(i, blocks[i], c, images)
                for i, c in captured.items()
                if layout is not None
            }
            ctx = PruneContext(
                visual=VisualTokens(feats, grid=merged if t == 1 else None),
                keep=self.budget(pipeline, feats.shape[1]),
                capabilities=capabilities,
                text=_select_text(text, images),
                blocks=vision_blocks,
                num_layers=len(blocks),
                projector=_identity,
            )
            pruned = pipeline(ctx)
            for row, image in enumerate(images):
                kept[image] = pruned.features[row].to(feats.dtype)
                keep_idx[image] = pruned.keep_idx[row]
        output.pooler_output = tuple(f for f in kept if f is not None)
        return output, [i for i in keep_idx if i is not None]


class _Captured:
    """What one vision block received: its input, ``cu_seqlens`` and rotary ``cos``/``sin``."""

    def __init__(
        self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> None:
        self.hidden, self.cu_seqlens, self.cos, self.sin = hidden, cu_seqlens, cos, sin


class _Layout:
    """Maps the tower's packed, window-ordered rows to per-image raster order.

    The tower permutes whole 2x2 merge groups into attention windows (``window_index``); the
    merger output is permuted back with its inverse. Here the inverse is applied to the block
    inputs, so group ``j`` of image ``i`` is the ``j``-th language-model token of that image.
    """

    def __init__(self, adapter: Qwen2_5_VLAdapter, grid: torch.Tensor) -> None:
        from transformers.vision_utils import get_vision_window_index

        vc = adapter._config.vision_config
        self.unit = adapter._merge**2
        window_index, _ = get_vision_window_index(
            grid, adapter._merge, int(vc.window_size), int(vc.patch_size)
        )
        reverse = torch.argsort(window_index.to(grid.device))
        sizes = adapter.tokens_per_image(grid)
        offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        within = torch.arange(self.unit, device=grid.device)
        self.rows = [
            (reverse[offsets[i] : offsets[i + 1]].unsqueeze(1) * self.unit + within).flatten()
            for i in range(len(sizes))
        ]

    def block(
        self, index: int, block: Any, captured: _Captured, images: Sequence[int]
    ) -> VisionBlock:
        """Vision block ``index`` for ``images`` (same grid), rows in raster group order."""
        hidden = captured.hidden
        device = hidden.device
        cu = captured.cu_seqlens.to(device)
        segment_of = torch.bucketize(
            torch.arange(hidden.shape[0], device=device), cu[1:].long(), right=True
        )
        rows = [self.rows[i].to(device) for i in images]
        segments = [_relabel(segment_of[r]) for r in rows]
        if any(not torch.equal(s, segments[0]) for s in segments[1:]):
            raise AdapterError("images with the same grid got different attention windows")
        cos = torch.stack([captured.cos[r] for r in rows])
        sin = torch.stack([captured.sin[r] for r in rows])

        def rotary(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
                apply_rotary_pos_emb_vision,
            )

            return apply_rotary_pos_emb_vision(q, k, cos, sin)

        attn = block.attn
        return VisionBlock(
            index=index,
            hidden=torch.stack([hidden[r] for r in rows]),
            layer_norm=block.norm1,
            q_proj=_fused_part(attn.qkv, 0),
            k_proj=_fused_part(attn.qkv, 1),
            v_proj=_fused_part(attn.qkv, 2),
            out_proj=attn.proj,
            num_heads=int(attn.num_heads),
            num_prefix_tokens=0,
            rotary=rotary,
            segments=segments[0],
            group_size=self.unit,
        )


def _fused_part(qkv: nn.Module, part: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Query (0), key (1) or value (2) part of a fused ``qkv`` projection, as one callable."""

    def project(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = qkv(x)
        width = out.shape[-1] // 3
        return out[..., part * width : (part + 1) * width]

    return project


def _relabel(ids: torch.Tensor) -> torch.Tensor:
    """Segment ids renumbered 0, 1, ... (in sorted order), so equal layouts compare equal."""
    inverse: torch.Tensor = torch.unique(ids, return_inverse=True)[1]
    return inverse


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _select_text(text: TextTokens | None, images: Sequence[int]) -> TextTokens | None:
    if text is None:
        return None
    texts = None if text.texts is None else tuple(text.texts[i] for i in images)
    if text.embeddings is None or text.mask is None:
        return TextTokens(texts=texts)
    index = torch.tensor(list(images), device=text.embeddings.device)
    return TextTokens(texts=texts, embeddings=text.embeddings[index], mask=text.mask[index])


def _close_gaps(
    positions: torch.Tensor,
    attention_mask: torch.Tensor,
    spans: Sequence[ImageSpan],
    keep_idx: Sequence[torch.Tensor],
    kept_columns: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The ``contiguous`` policy: close the position gap each pruned image leaves at its end.

    Kept image tokens keep their (t, h, w) positions relative to the image; every later token of
    the row moves down so that the token after the image follows the largest position the kept
    tokens use. With every token kept there is no gap and nothing moves.

    Shape:
        - positions: :math:`(3, B, L')`; attention_mask: :math:`(B, L')`
    """
    out = positions.clone()
    length = out.shape[-1]
    left = _pads_left(attention_mask)
    for span, idx in zip(spans, keep_idx, strict=True):
        cols = kept_columns[span.row]
        offset = length - int(cols.numel()) if left else 0
        first = offset + int(torch.searchsorted(cols, span.start))
        after = first + int(idx.numel())  # column of the token after the kept image tokens
        if after >= offset + int(cols.numel()) or not bool(attention_mask[span.row, after]):
            continue
        row = out[:, span.row]
        gap = int(row[:, after].min()) - (int(row[:, first:after].max()) + 1)
        if gap > 0:
            row[:, after:] -= gap * attention_mask[span.row, after:].to(row.dtype)
    return out


def _shrink_like(
    values: torch.Tensor, kept_columns: Sequence[torch.Tensor], attention_mask: torch.Tensor
) -> torch.Tensor:
    """Apply the column selection and re-padding of ``shrink_inputs`` to another (B, L) tensor."""
    length = max(int(c.numel()) for c in kept_columns)
    out = torch.zeros(values.shape[0], length, dtype=values.dtype, device=values.device)
    left = _pads_left(attention_mask)
    for row, cols in enumerate(kept_columns):
        n = int(cols.numel())
        sl = slice(length - n, length) if left else slice(0, n)
        out[row, sl] = values[row, cols]
    return out


def _pad_id(config: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    padded = input_ids[attention_mask == 0]
    if padded.numel():
        return int(padded[0])
    pad = getattr(config.text_config, "pad_token_id", None)
    return int(pad) if pad is not None else 0
