"""Adapter for LLaVA-NeXT (``LlavaNextForConditionalGeneration``, transformers 5.x).

LLaVA-NeXT ("anyres") encodes each image as a base tile (the whole image, resized) followed by a
grid of tiles; every tile is a separate CLIP image with its own [CLS]. ``pack_image_features``
then lays the grid tiles out as one large raster, **unpads** it to the image's aspect ratio
(dropping whole rows or columns of patches) and appends the learned ``image_newline`` embedding
after every row of the grid. The base tile comes first, without newlines.

Policy:

- **What is pruned:** the patch features each tile hands to the projector (the
  ``vision_feature_layer`` hidden state without [CLS]), tile by tile, restricted to the patches
  that survive unpadding (the others never reach the language model). Tiles of one batch with
  the same number of candidates, budget and patch grid share one
  :class:`~tokenprune.context.PruneContext`. The pipeline's output is projected with the model's
  projector (merged tokens are projected after merging).
- **Budget:** per image, ``pipeline.budget(N)`` with ``N`` the image's patch tokens after
  unpadding (newline tokens excluded), split over its tiles by an allocation rule
  (:mod:`tokenprune.adapters._allocation`): ``proportional`` to the tiles' candidate counts by
  default, any rule by name or as a function via ``allocation=``.
- **Newlines:** ``image_newline`` tokens are never pruned and never counted in the budget.
  ``newlines="all"`` (default) keeps every one, so the language model sees as many grid rows as
  unpruned (a row whose tokens were all pruned becomes a lone newline) and the sequence length
  depends only on the budget. ``newlines="kept_rows"`` keeps the newline of a row only if the
  row keeps at least one token, so no empty row remains. Either way no newline is duplicated.
- **Layout:** kept tokens and kept newlines are emitted in the packed order (base tile raster,
  then the grid raster with its newlines), i.e. the unpruned sequence with the pruned tokens
  removed; the language model receives a coherent 2-D layout.
- **[CLS] attention and vision blocks:** every tile brings its own [CLS]. The captured block
  input of a tile lists [CLS] and the patches removed by unpadding as prefix tokens
  (``num_prefix_tokens = 1 + removed``), then the candidate patches in raster order. Attention
  recomputed from the block therefore runs over all tokens of the tile, exactly as in the tower,
  and reports the candidate columns only (no renormalisation).
- **Seams and positions:** as the LLaVA-1.5 adapter: the public ``get_image_features`` runs
  under temporary hooks (block-input capture and a projector pre-hook that records the
  projector's input); the pruned, packed features go back as ``mm_encoder_outputs`` and
  ``input_ids``/``attention_mask``/``labels``/``position_ids`` are shortened by
  :func:`~tokenprune.adapters._sequence.shrink_inputs` (``contiguous`` or ``original`` positions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

from tokenprune.adapters._allocation import (
    AllocationRule,
    allocate,
    needs_features,
    resolve_allocation,
)
from tokenprune.adapters._sequence import find_image_spans, shrink_inputs
from tokenprune.adapters._vision import (
    capture_block_inputs,
    clip_blocks,
    clip_vision_block,
    prompt_text,
)
from tokenprune.adapters.base import QUERY_KWARG, CallMode, ModelAdapter
from tokenprune.adapters.llava import normalize_queries
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext, VisionBlock
from tokenprune.errors import AdapterError, CapabilityError
from tokenprune.pipeline import Pipeline
from tokenprune.types import TextTokens, VisualTokens

__all__ = [
    "AnyresLayout",
    "LlavaNextAdapter",
    "NewlinePolicy",
    "PartResult",
    "PrunePart",
    "prune_parts",
]

NewlinePolicy = Literal["all", "kept_rows"]
"""What happens to ``image_newline`` tokens after pruning (see the module docstring)."""

CLIP_CAPABILITIES: frozenset[Capability] = frozenset(
    {
        Capability.VISION_BLOCK,
        Capability.CLS_ATTENTION,
        Capability.RECEIVED_ATTENTION,
        Capability.TEXT_EMBEDDINGS,
        Capability.TEXT_QUERY,
        Capability.PROJECTOR,
    }
)
"""What the adapters of LLaVA-style models with CLIP towers provide."""


# -- pruning CLIP images (tiles, frames) one by one ------------------------------------------------
@dataclass(frozen=True)
class PrunePart:
    """One CLIP image of a batch (a tile or a video frame) to prune on its own.

    Attributes:
        item: Index of the image or video it belongs to (selects its prompt text).
        index: Its index in the vision tower's batch.
        patches: Candidate patch indices (raster order within the CLIP image), ascending.
        keep: Tokens to keep, ``1 <= keep <= len(patches)``.
        grid: ``(rows, cols)`` of the candidates when they form a rectangle, else ``None``.

    Shape:
        - patches: :math:`(N,)`, long
    """

    item: int
    index: int
    patches: torch.Tensor
    keep: int
    grid: tuple[int, int] | None


@dataclass(frozen=True)
class PartResult:
    """The pipeline's output for one :class:`PrunePart`.

    Attributes:
        keep_idx: Patch index (within the CLIP image) of each output token, ascending.
        features: Output tokens in the pruning space (before the projector).

    Shape:
        - keep_idx: :math:`(K,)`
        - features: :math:`(K, C)`
    """

    keep_idx: torch.Tensor
    features: torch.Tensor


def subset_text(text: TextTokens | None, items: Sequence[int]) -> TextTokens | None:
    """The prompt rows of ``items`` (one row per image or video), in that order."""
    if text is None:
        return None
    idx = list(items)
    texts = None if text.texts is None else tuple(text.texts[i] for i in idx)
    if text.embeddings is None or text.mask is None:
        return TextTokens(texts=texts)
    rows = torch.tensor(idx, dtype=torch.long, device=text.embeddings.device)
    return TextTokens(texts=texts, embeddings=text.embeddings[rows], mask=text.mask[rows])


def _part_block(
    blocks: nn.ModuleList, layer: int, hidden: torch.Tensor, parts: Sequence[PrunePart]
) -> VisionBlock:
    """The captured block of a group of parts, non-candidate patches moved into the prefix."""
    num_patches = hidden.shape[1] - 1
    rows = []
    for part in parts:
        h = hidden[part.index]
        if part.patches.numel() != num_patches:
            dropped = torch.ones(num_patches, dtype=torch.bool, device=h.device)
            dropped[part.patches.to(h.device)] = False
            order = torch.cat(
                [
                    torch.zeros(1, dtype=torch.long, device=h.device),
                    1 + torch.nonzero(dropped).flatten(),
                    1 + part.patches.to(h.device),
                ]
            )
            h = h.index_select(0, order)
        rows.append(h)
    block = clip_vision_block(blocks, layer, torch.stack(rows))
    prefix = 1 + num_patches - int(parts[0].patches.numel())
    return dataclasses.replace(block, num_prefix_tokens=prefix)


def prune_parts(
    pipeline: Pipeline,
    parts: Sequence[PrunePart],
    *,
    features: torch.Tensor,
    hidden: Mapping[int, torch.Tensor],
    blocks: nn.ModuleList,
    text: TextTokens | None,
    capabilities: frozenset[Capability],
    projector: Callable[[torch.Tensor], torch.Tensor] | None,
) -> list[PartResult]:
    """Run the pipeline over CLIP images, batching those with equal ``N``, ``K`` and grid.

    Args:
        pipeline: The pipeline to run.
        parts: The CLIP images to prune.
        features: Pruning-space patch features of the whole tower batch.
        hidden: Captured block inputs of the whole tower batch, by block index ([CLS] first).
        blocks: The tower's blocks.
        text: Prompt text per item (indexed by :attr:`PrunePart.item`), or ``None``.
        capabilities: Capabilities provided to the stages for this call.
        projector: Maps pruning-space features into the language model's space.

    Returns:
        One result per part, in the order of ``parts``.

    Shape:
        - features: :math:`(T, P, C)` for :math:`T` CLIP images of :math:`P` patches
        - hidden: :math:`(T, 1 + P, C_{vis})` per block
    """
    groups: dict[tuple[int, int, tuple[int, int] | None], list[int]] = {}
    for i, part in enumerate(parts):
        groups.setdefault((int(part.patches.numel()), part.keep, part.grid), []).append(i)
    results: list[PartResult | None] = [None] * len(parts)
    for (_, keep, grid), members in groups.items():
        group = [parts[i] for i in members]
        feats = torch.stack([features[p.index, p.patches.to(features.device)] for p in group])
        ctx = PruneContext(
            visual=VisualTokens(feats, grid=grid),
            keep=keep,
            capabilities=capabilities,
            text=subset_text(text, [p.item for p in group]),
            blocks={i: _part_block(blocks, i, h, group) for i, h in hidden.items()},
            num_layers=len(blocks),
            projector=projector,
        )
        pruned = pipeline(ctx)
        for row, (i, part) in enumerate(zip(members, group, strict=True)):
            local = pruned.keep_idx[row].to(part.patches.device)
            results[i] = PartResult(part.patches[local], pruned.features[row])
    return [r for r in results if r is not None]


def rectangle(patches: torch.Tensor, width: int) -> tuple[int, int] | None:
    """The ``(rows, cols)`` of the rectangle that raster indices fill, or ``None``.

    ``patches`` index a grid ``width`` patches wide.

    Examples:
        >>> rectangle(torch.tensor([4, 5, 6, 7, 8, 9, 10, 11]), 4)
        (2, 4)
        >>> rectangle(torch.tensor([0, 1, 4]), 4) is None
        True
    """
    if patches.numel() == 0:
        return None
    rows = torch.unique(patches // width)
    cols = torch.unique(patches % width)
    if rows.numel() * cols.numel() != patches.numel():
        return None
    return int(rows.numel()), int(cols.numel())


def bypass_hooks(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Call ``module.forward`` directly, so the adapter's temporary hooks do not fire."""

    def project(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = module.forward(x)
        return out

    return project


def pad_token_id(config: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """The id to re-pad shortened rows with: the batch's own padding, else the config's."""
    padded = input_ids[attention_mask == 0]
    if padded.numel():
        return int(padded[0])
    pad = getattr(config.text_config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


# -- the anyres layout ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AnyresLayout:
    """Where each packed token of one LLaVA-NeXT image comes from.

    Obtained by pushing tile/patch indices through the model's own ``pack_image_features``, so
    unpadding and newline placement are exactly the model's.

    Attributes:
        source: For each packed token, ``tile * P + patch`` (tile 0 is the base tile), or ``-1``
            for an ``image_newline`` token.
        row: Row id of each packed token. The base tile is one row without a newline (when the
            image has grid tiles); every newline ends its row.
        num_tiles: Tiles of the image (base tile included).
        tile_tokens: Patches per tile ``P``.

    Shape:
        - source, row: :math:`(n,)` with :math:`n` the image's placeholder count
    """

    source: torch.Tensor
    row: torch.Tensor
    num_tiles: int
    tile_tokens: int

    @classmethod
    def from_source(cls, source: torch.Tensor, num_tiles: int, tile_tokens: int) -> AnyresLayout:
        """Build the layout (with row ids) from the packed ``source`` indices."""
        newline = source < 0
        tile = torch.where(newline, -1, source // tile_tokens)
        boundary = torch.zeros_like(newline)
        boundary[1:] = newline[:-1] | ((tile[:-1] == 0) & (tile[1:] > 0))
        return cls(source, boundary.long().cumsum(0), num_tiles, tile_tokens)

    @property
    def num_packed(self) -> int:
        """Placeholder tokens of the image in the prompt (patches and newlines)."""
        return int(self.source.numel())

    @property
    def newline_positions(self) -> torch.Tensor:
        """Packed positions of the newline tokens."""
        return torch.nonzero(self.source < 0).flatten()

    def tile_patches(self, tile: int) -> torch.Tensor:
        """Ascending patch indices of ``tile`` that survive unpadding."""
        src = self.source[self.source >= 0]
        local = src[src // self.tile_tokens == tile] % self.tile_tokens
        return local.sort().values

    def counts(self) -> list[int]:
        """Patch tokens per tile after unpadding (the allocation's ``counts``)."""
        return [int(self.tile_patches(t).numel()) for t in range(self.num_tiles)]

    def positions(self) -> torch.Tensor:
        """Packed position of every ``tile * P + patch`` index, ``-1`` where unpadding removed it.

        Shape:
            - output: :math:`(T P,)` for :math:`T` tiles of :math:`P` patches
        """
        pos = torch.full((self.num_tiles * self.tile_tokens,), -1, dtype=torch.long)
        tokens = torch.nonzero(self.source >= 0).flatten()
        pos[self.source[tokens]] = tokens
        return pos

    def newlines_to_keep(self, kept_positions: torch.Tensor, policy: NewlinePolicy) -> torch.Tensor:
        """Packed positions of the newlines kept under ``policy``, given the kept tokens."""
        newlines = self.newline_positions
        if policy == "all":
            return newlines
        rows_with_tokens = torch.unique(self.row[kept_positions])
        return newlines[torch.isin(self.row[newlines], rows_with_tokens)]


class LlavaNextAdapter(ModelAdapter):
    """Prunes the visual tokens of ``LlavaNextForConditionalGeneration`` models, tile by tile.

    Args:
        model: The model.
        allocation: How an image's budget is split over its tiles: a name from
            :data:`~tokenprune.adapters._allocation.ALLOCATIONS`, a function
            ``allocate(counts, budget) -> shares``, or a
            :class:`~tokenprune.adapters.FeatureAllocation` (which also receives each tile's
            unpadded patch features).
        newlines: ``"all"`` or ``"kept_rows"`` (see the module docstring).

    Raises:
        AdapterError: If the model is not a LLaVA-NeXT model or an option is unknown.

    Examples:
        >>> from tokenprune.testing import tiny_llava_next
        >>> adapter = LlavaNextAdapter(tiny_llava_next(), allocation="uniform")
        >>> adapter.allocation_name, adapter.newlines
        ('uniform', 'all')
    """

    name: ClassVar[str] = "llava_next"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)
    capabilities: ClassVar[frozenset[Capability]] = CLIP_CAPABILITIES
    default_allocation: ClassVar[str] = "proportional"

    def __init__(
        self,
        model: nn.Module,
        *,
        allocation: str | AllocationRule | None = None,
        newlines: NewlinePolicy = "all",
    ) -> None:
        super().__init__(model)
        self.allocation_name, self.allocation = resolve_allocation(
            self.default_allocation if allocation is None else allocation
        )
        if newlines not in get_args(NewlinePolicy):
            raise AdapterError(
                f"newlines={newlines!r} is not a newline policy; use one of "
                f"{list(get_args(NewlinePolicy))}"
            )
        self.newlines: NewlinePolicy = newlines

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

    def tile_grid(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of one tile."""
        vc = self._config.vision_config
        side = int(vc.image_size // vc.patch_size)
        return side, side

    def tiles_per_image(self, image_sizes: torch.Tensor) -> list[int]:
        """Tiles (base tile included) the processor makes for each ``(height, width)``."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [
            int(
                image_size_to_num_patches(
                    image_size=size,
                    grid_pinpoints=self._config.image_grid_pinpoints,
                    patch_size=self._config.vision_config.image_size,
                )
            )
            for size in image_sizes
        ]

    def layouts(self, image_sizes: torch.Tensor | Sequence[Sequence[int]]) -> list[AnyresLayout]:
        """The packed layout of each image, from the model's own ``pack_image_features``.

        Args:
            image_sizes: Original ``(height, width)`` of each image.

        Shape:
            - image_sizes: :math:`(B_{img}, 2)`
        """
        sizes = torch.as_tensor(image_sizes).cpu().long()
        rows, cols = self.tile_grid()
        per_tile = rows * cols
        tiles = self.tiles_per_image(sizes)
        index = [
            torch.arange(t * per_tile, dtype=torch.float64).view(t, per_tile, 1) for t in tiles
        ]
        packed, _ = self._inner.pack_image_features(
            index, sizes, "default", image_newline=torch.tensor([-1.0], dtype=torch.float64)
        )
        return [
            AnyresLayout.from_source(p[:, 0].round().long(), t, per_tile)
            for p, t in zip(packed, tiles, strict=True)
        ]

    def validate(self, pipeline: Pipeline) -> None:
        super().validate(pipeline)
        strategy = self._config.vision_feature_select_strategy
        if strategy != "default":
            raise AdapterError(
                f"vision_feature_select_strategy={strategy!r} is not supported: the [CLS] token "
                "would be packed and pruned like a patch. Use 'default' (LLaVA-NeXT's setting)"
            )
        blocks = clip_blocks(self._inner.vision_tower)
        for layer in pipeline.vision_layers():
            if not -len(blocks) <= layer < len(blocks):
                raise AdapterError(
                    f"vision layer {layer} does not exist: the tower has {len(blocks)} blocks"
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
                "a pruned LLaVA-NeXT needs input_ids with <image> placeholders (inputs_embeds "
                "alone cannot be shortened); pass input_ids"
            )
        if kwargs.get("mm_encoder_outputs") is not None:
            raise AdapterError("mm_encoder_outputs cannot be combined with pixel_values here")
        image_sizes = kwargs.get("image_sizes")
        if image_sizes is None:
            raise AdapterError(
                "LLaVA-NeXT needs image_sizes, the original (height, width) of each image, "
                "with pixel_values; pass the processor's image_sizes"
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
        layouts = self.layouts(image_sizes)
        spans = find_image_spans(
            input_ids, self._config.image_token_id, [lay.num_packed for lay in layouts]
        )
        text = self._text(pipeline, input_ids, attention_mask, [s.row for s in spans], queries)
        features, keep_positions = self._pruned_features(pipeline, kwargs, layouts, text)

        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        shrunk = shrink_inputs(
            input_ids,
            attention_mask,
            spans,
            keep_positions,
            positions=pipeline.positions,
            position_ids=kwargs.get("position_ids"),
            default_positions="arange" if mode == "forward" else "cumsum",
            past_length=past,
            labels=kwargs.get("labels"),
            pad_token_id=pad_token_id(self._config, input_ids, attention_mask),
        )
        return shrunk.apply(
            kwargs, drop=("pixel_values", "image_sizes"), encoder_outputs={"image": features}
        )

    def _text(
        self,
        pipeline: Pipeline,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: list[int],
        queries: tuple[str, ...] | None,
    ) -> TextTokens | None:
        return prompt_text(
            pipeline.requires,
            self._inner.get_input_embeddings(),
            input_ids,
            attention_mask,
            self._config.image_token_id,
            rows,
            queries,
        )

    def _encode(
        self, pipeline: Pipeline, kwargs: Mapping[str, Any]
    ) -> tuple[Any, torch.Tensor, dict[int, torch.Tensor]]:
        """Run ``get_image_features``; return its output, the projector input and block inputs."""
        inner = self._inner
        projector: nn.Module = inner.multi_modal_projector
        grabbed: dict[str, torch.Tensor] = {}

        def grab_projector_input(module: nn.Module, args: tuple[Any, ...]) -> None:
            grabbed["features"] = args[0]

        with capture_block_inputs(
            clip_blocks(inner.vision_tower), pipeline.vision_layers()
        ) as captured:
            handle = projector.register_forward_pre_hook(grab_projector_input)
            try:
                output = inner.get_image_features(
                    pixel_values=kwargs["pixel_values"],
                    image_sizes=kwargs["image_sizes"],
                    vision_feature_layer=kwargs.get("vision_feature_layer"),
                    vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                    return_dict=True,
                )
            finally:
                handle.remove()
        return output, grabbed["features"], dict(captured)

    def _pruned_features(
        self,
        pipeline: Pipeline,
        kwargs: Mapping[str, Any],
        layouts: Sequence[AnyresLayout],
        text: TextTokens | None,
    ) -> tuple[Any, list[torch.Tensor]]:
        """Prune every image tile by tile; return the model output and kept packed positions."""
        output, tile_features, hidden = self._encode(pipeline, kwargs)
        packed = list(output.pooler_output)
        _, width = self.tile_grid()
        parts: list[PrunePart] = []
        offset = 0
        for item, layout in enumerate(layouts):
            if packed[item].shape[0] != layout.num_packed:
                raise AdapterError(
                    f"image {item}: the model packed {packed[item].shape[0]} tokens but the "
                    f"layout predicts {layout.num_packed}; check image_sizes against pixel_values"
                )
            counts = layout.counts()
            tile_feats = None
            if needs_features(self.allocation):
                if offset + layout.num_tiles > tile_features.shape[0]:
                    raise AdapterError(
                        f"pixel_values hold {tile_features.shape[0]} tiles but image_sizes imply "
                        f"at least {offset + layout.num_tiles}"
                    )
                tile_feats = [
                    tile_features[offset + t][layout.tile_patches(t).to(tile_features.device)]
                    for t in range(layout.num_tiles)
                ]
            shares = allocate(
                counts, pipeline.budget(sum(counts)), self.allocation, features=tile_feats
            )
            for tile, keep in enumerate(shares):
                if keep > 0:
                    patches = layout.tile_patches(tile)
                    parts.append(
                        PrunePart(item, offset + tile, patches, keep, rectangle(patches, width))
                    )
            offset += layout.num_tiles
        if offset != tile_features.shape[0]:
            raise AdapterError(
                f"pixel_values hold {tile_features.shape[0]} tiles but image_sizes imply {offset}"
            )
        capabilities = self.capabilities - (
            frozenset() if text is not None and text.texts is not None else {Capability.TEXT_QUERY}
        )
        projector = bypass_hooks(self._inner.multi_modal_projector)
        results = prune_parts(
            pipeline,
            parts,
            features=tile_features,
            hidden=hidden,
            blocks=clip_blocks(self._inner.vision_tower),
            text=text,
            capabilities=capabilities,
            projector=projector,
        )

        features: list[torch.Tensor] = []
        keep_positions: list[torch.Tensor] = []
        first_tile = 0
        for item, layout in enumerate(layouts):
            to_packed = layout.positions()
            mine = [(p, r) for p, r in zip(parts, results, strict=True) if p.item == item]
            token_pos = torch.cat(
                [
                    to_packed[(p.index - first_tile) * layout.tile_tokens + r.keep_idx]
                    for p, r in mine
                ]
            )
            token_feats = projector(torch.cat([r.features for _, r in mine]))
            newline_pos = layout.newlines_to_keep(token_pos, self.newlines)
            positions = torch.cat([token_pos, newline_pos])
            device = packed[item].device
            feats = torch.cat(
                [token_feats.to(packed[item].dtype), packed[item][newline_pos.to(device)]]
            )
            order = positions.argsort(stable=True)
            keep_positions.append(positions[order])
            features.append(feats[order.to(feats.device)])
            first_tile += layout.num_tiles
        output.pooler_output = features
        return output, keep_positions
