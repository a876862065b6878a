"""Tiny, seeded, random-initialised models with the real architectures (no downloads)."""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["IMAGE_TOKEN_ID", "PAD_TOKEN_ID", "VOCAB_SIZE", "llava_prompts", "tiny_llava"]

VOCAB_SIZE = 1000
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
IMAGE_TOKEN_ID = 999


def tiny_llava(
    image_size: int = 32,
    patch_size: int = 8,
    *,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> Any:
    """A tiny ``LlavaForConditionalGeneration`` (CLIP tower + Llama LM), in eval mode.

    ``vision_feature_layer=-2`` and the ``default`` select strategy, as LLaVA-1.5; image token
    id :data:`IMAGE_TOKEN_ID`, ``(image_size / patch_size)^2`` tokens per image.

    Args:
        image_size: Input resolution (336 with ``patch_size=14`` gives LLaVA-1.5's 576 tokens).
        patch_size: ViT patch size.
        hidden: Width of both towers.
        layers: Blocks in each tower.
        seed: Seed of the weight initialisation.
        attn_implementation: ``sdpa`` or ``eager`` for both towers.

    Examples:
        >>> m = tiny_llava()
        >>> type(m).__name__, m.config.vision_config.image_size
        ('LlavaForConditionalGeneration', 32)
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    text = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,  # type: ignore[call-arg]  # transformers 5.x name
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(
        copy.deepcopy(config), attn_implementation=attn_implementation
    )
    return model.eval()


def llava_prompts(
    model: Any,
    text_lengths: list[tuple[int, int]],
    *,
    images_per_row: list[int] | None = None,
    seed: int = 0,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """Padded ``input_ids``/``attention_mask``/``pixel_values`` for a tiny LLaVA.

    Row ``i`` is ``[BOS] + before_i random tokens + images + after_i random tokens``.

    Args:
        model: A model from :func:`tiny_llava`.
        text_lengths: ``(before, after)`` text-token counts per row.
        images_per_row: Images per row (default one each).
        seed: Seed for token ids and pixels.
        padding_side: ``left`` (generation) or ``right``.

    Examples:
        >>> batch = llava_prompts(tiny_llava(), [(2, 3), (1, 5)])
        >>> tuple(batch["input_ids"].shape), tuple(batch["pixel_values"].shape)
        ((2, 23), (2, 3, 32, 32))
    """
    config = model.config
    n = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    images_per_row = images_per_row or [1] * len(text_lengths)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for (before, after), n_img in zip(text_lengths, images_per_row, strict=True):
        body = torch.randint(10, 900, (before + after,), generator=g).tolist()
        rows.append([BOS_TOKEN_ID, *body[:before], *([IMAGE_TOKEN_ID] * n * n_img), *body[before:]])
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        sl = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        ids[i, sl] = torch.tensor(row)
        mask[i, sl] = 1
    size = config.vision_config.image_size
    pixels = torch.randn(sum(images_per_row), 3, size, size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


# -- Qwen2.5-VL ---------------------------------------------------------------------------------

QWEN_IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID = 995, 996
QWEN_VISION_START_ID, QWEN_VISION_END_ID = 997, 998


def tiny_qwen2_5_vl(
    *,
    depth: int = 2,
    fullatt_block_indexes: tuple[int, ...] = (1,),
    hidden: int = 64,
    vision_hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A tiny ``Qwen2_5_VLForConditionalGeneration``, in eval mode.

    Patch size 14, 2x2 spatial merge, temporal patch 2 and a 112-pixel attention window (4x4
    merged tokens), as the real model; the other blocks use window attention. Token ids:
    :data:`QWEN_IMAGE_TOKEN_ID` (``<|image_pad|>``), :data:`QWEN_VISION_START_ID`,
    :data:`QWEN_VISION_END_ID`.

    Args:
        depth: Vision blocks.
        fullatt_block_indexes: Vision blocks with full (per-image) attention.
        hidden: Width of the language model (and of the merger output).
        vision_hidden: Width of the vision tower (two heads).
        layers: Language-model layers.
        seed: Seed of the weight initialisation.
        attn_implementation: ``sdpa`` or ``eager`` for both towers.

    Examples:
        >>> m = tiny_qwen2_5_vl()
        >>> type(m).__name__, m.config.vision_config.spatial_merge_size
        ('Qwen2_5_VLForConditionalGeneration', 2)
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = {
        "depth": depth,
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "out_hidden_size": hidden,
        "fullatt_block_indexes": list(fullatt_block_indexes),
        "in_channels": 3,
    }
    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
    }
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=QWEN_IMAGE_TOKEN_ID,
        video_token_id=QWEN_VIDEO_TOKEN_ID,
        vision_start_token_id=QWEN_VISION_START_ID,
        vision_end_token_id=QWEN_VISION_END_ID,
    )
    torch.manual_seed(seed)
    model: torch.nn.Module = Qwen2_5_VLForConditionalGeneration._from_config(
        copy.deepcopy(config), attn_implementation=attn_implementation
    )
    return model.eval()


QWEN_DEFAULT_GRIDS: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((1, 8, 12),),
    ((1, 4, 8), (1, 8, 8)),
)
"""Default images of :func:`qwen2_5_vl_prompts`: ``(t, h, w)`` patch grids per row (24, 8 and
16 language-model tokens; the first spans two attention windows)."""


def qwen2_5_vl_prompts(
    model: torch.nn.Module,
    grids: tuple[tuple[tuple[int, int, int], ...], ...] = QWEN_DEFAULT_GRIDS,
    *,
    text_lengths: list[tuple[int, int]] | None = None,
    seed: int = 0,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """Padded inputs for a tiny Qwen2.5-VL: several images per row, variable resolution.

    Row ``i`` is ``[BOS] + before_i tokens + (<vision_start> <image_pad>*n <vision_end>) per
    image + after_i tokens`` with ``n = t*h*w/4``, as the processor lays it out.

    Args:
        model: A model from :func:`tiny_qwen2_5_vl`.
        grids: ``(t, h, w)`` patch grid of every image, per row (``h``, ``w`` even).
        text_lengths: ``(before, after)`` text-token counts per row; ``(2, 3)``, ``(1, 5)``, ...
            by default.
        seed: Seed for token ids and pixels.
        padding_side: ``left`` (generation) or ``right``.

    Returns:
        ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (1 on image tokens),
        ``pixel_values`` (flattened patches) and ``image_grid_thw``.

    Examples:
        >>> batch = qwen2_5_vl_prompts(tiny_qwen2_5_vl())
        >>> tuple(batch["input_ids"].shape), batch["image_grid_thw"].tolist()
        ((2, 37), [[1, 8, 12], [1, 4, 8], [1, 8, 8]])
        >>> (batch["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum(-1).tolist()
        [24, 24]
    """
    vc: Any = getattr(model, "config").vision_config  # noqa: B009 - typed as Any
    merge = int(vc.spatial_merge_size)
    text_lengths = text_lengths or [(2 + i % 2, 3 + 2 * (i % 2)) for i in range(len(grids))]
    g = torch.Generator().manual_seed(seed)
    rows, flat = [], []
    for (before, after), row_grids in zip(text_lengths, grids, strict=True):
        body = torch.randint(10, 900, (before + after,), generator=g).tolist()
        row = [BOS_TOKEN_ID, *body[:before]]
        for t, h, w in row_grids:
            if h % merge or w % merge:
                raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of {merge}")
            n = t * h * w // merge**2
            row += [QWEN_VISION_START_ID, *([QWEN_IMAGE_TOKEN_ID] * n), QWEN_VISION_END_ID]
            flat.append((t, h, w))
        rows.append(row + body[before:])
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        sl = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        ids[i, sl] = torch.tensor(row)
        mask[i, sl] = 1
    grid = torch.tensor(flat, dtype=torch.long)
    patch_dim = int(vc.in_channels * vc.temporal_patch_size * vc.patch_size**2)
    pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == QWEN_IMAGE_TOKEN_ID).long(),
        "pixel_values": pixels,
        "image_grid_thw": grid,
    }


# -- timm ViT ------------------------------------------------------------------------------------


def tiny_timm_vit(
    *,
    img_size: int = 32,
    patch_size: int = 8,
    embed_dim: int = 32,
    depth: int = 4,
    num_heads: int = 2,
    num_classes: int = 10,
    reg_tokens: int = 0,
    class_token: bool = True,
    global_pool: str = "token",
    seed: int = 0,
) -> torch.nn.Module:
    """A tiny ``timm`` ``VisionTransformer`` classifier (random weights), in eval mode.

    Args:
        img_size: Input resolution.
        patch_size: Patch size (``(img_size / patch_size)^2`` patch tokens).
        embed_dim: Width.
        depth: Blocks.
        num_heads: Attention heads.
        num_classes: Classifier outputs.
        reg_tokens: Register tokens after the class token.
        class_token: Whether the model has a class token.
        global_pool: ``token`` (class token), ``avg``, ...
        seed: Seed of the weight initialisation.

    Examples:
        >>> m = tiny_timm_vit()
        >>> tuple(m(torch.randn(2, 3, 32, 32)).shape), m.num_prefix_tokens
        ((2, 10), 1)
    """
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    options: dict[str, Any] = {"global_pool": global_pool, "class_token": class_token}
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=num_classes,
        reg_tokens=reg_tokens,
        qkv_bias=True,
        **options,
    )
    return model.eval()


__all__ += [
    "QWEN_DEFAULT_GRIDS",
    "QWEN_IMAGE_TOKEN_ID",
    "QWEN_VISION_END_ID",
    "QWEN_VISION_START_ID",
    "qwen2_5_vl_prompts",
    "tiny_qwen2_5_vl",
    "tiny_timm_vit",
]


# -- LLaVA-NeXT and Video-LLaVA ------------------------------------------------------------------

VIDEO_TOKEN_ID = 998
"""Video placeholder id of :func:`tiny_video_llava` (its image id is ``IMAGE_TOKEN_ID``)."""


def _tiny_clip_llama(image_size: int, patch_size: int, hidden: int, layers: int) -> tuple[Any, Any]:
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    text = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    return vision, text


def _pad_rows(rows: list[list[int]], padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        sl = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        ids[i, sl] = torch.tensor(row)
        mask[i, sl] = 1
    return ids, mask


def tiny_llava_next(
    image_size: int = 32,
    patch_size: int = 8,
    *,
    hidden: int = 64,
    layers: int = 2,
    grid_pinpoints: list[list[int]] | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A tiny ``LlavaNextForConditionalGeneration`` (anyres CLIP tiles + Llama LM), in eval mode.

    ``vision_feature_layer=-2`` and the ``default`` select strategy; ``(image_size /
    patch_size)^2`` tokens per tile (16 by default); image token id :data:`IMAGE_TOKEN_ID`.

    Args:
        image_size: Tile resolution.
        patch_size: ViT patch size.
        hidden: Width of both towers.
        layers: Blocks in each tower.
        grid_pinpoints: Anyres resolutions ``[height, width]``; default 1x2, 2x1 and 2x2 tiles.
        seed: Seed of the weight initialisation.
        attn_implementation: ``sdpa`` or ``eager`` for both towers.

    Examples:
        >>> m = tiny_llava_next()
        >>> type(m).__name__, m.config.image_grid_pinpoints
        ('LlavaNextForConditionalGeneration', [[32, 64], [64, 32], [64, 64]])
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    vision, text = _tiny_clip_llama(image_size, patch_size, hidden, layers)
    s = image_size
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=(image_size // patch_size) ** 2,
        image_grid_pinpoints=grid_pinpoints or [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model: torch.nn.Module = LlavaNextForConditionalGeneration._from_config(
        copy.deepcopy(config), attn_implementation=attn_implementation
    )
    return model.eval()


def llava_next_tokens_per_image(
    model: torch.nn.Module, image_sizes: list[tuple[int, int]], *, newlines: bool = True
) -> list[int]:
    """Placeholder tokens of each image as the model packs it (unpadding and newlines included).

    Computed with the model's own ``pack_image_features`` on dummy tiles (no vision forward).

    Args:
        model: A LLaVA-NeXT model.
        image_sizes: Original ``(height, width)`` per image.
        newlines: Count the ``image_newline`` tokens too (``False``: patch tokens only).

    Examples:
        >>> m = tiny_llava_next()
        >>> llava_next_tokens_per_image(m, [(64, 64), (40, 64)])
        [88, 70]
        >>> llava_next_tokens_per_image(m, [(64, 64), (40, 64)], newlines=False)
        [80, 64]
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config: Any = model.config
    per_tile = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    sizes = torch.tensor(image_sizes)
    size = config.vision_config.image_size
    tiles = [image_size_to_num_patches(s, config.image_grid_pinpoints, size) for s in sizes]
    dummy = [torch.ones(t, per_tile, 1) for t in tiles]
    inner: Any = model.model
    packed, _ = inner.pack_image_features(dummy, sizes, "default", image_newline=torch.zeros(1))
    return [int(p.sum()) + (int((p == 0).sum()) if newlines else 0) for p in packed]


def llava_next_prompts(
    model: torch.nn.Module,
    text_lengths: list[tuple[int, int]],
    image_sizes: list[tuple[int, int]],
    *,
    seed: int = 0,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """Padded inputs for a tiny LLaVA-NeXT: one image per row, each with its own size.

    Row ``i`` is ``[BOS] + before_i random tokens + image_i placeholders + after_i random
    tokens``; ``pixel_values`` is ``(B, max_tiles, 3, S, S)`` (unused tiles are zeros) and
    ``image_sizes`` is ``(B, 2)`` in ``(height, width)``, as the processor returns them.

    Args:
        model: A model from :func:`tiny_llava_next`.
        text_lengths: ``(before, after)`` text-token counts per row.
        image_sizes: Original ``(height, width)`` of each row's image.
        seed: Seed for token ids and pixels.
        padding_side: ``left`` (generation) or ``right``.

    Examples:
        >>> batch = llava_next_prompts(tiny_llava_next(), [(2, 3), (1, 5)], [(64, 64), (32, 64)])
        >>> tuple(batch["input_ids"].shape), tuple(batch["pixel_values"].shape)
        ((2, 94), (2, 5, 3, 32, 32))
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config: Any = model.config
    counts = llava_next_tokens_per_image(model, image_sizes)
    size = config.vision_config.image_size
    tiles = [image_size_to_num_patches(s, config.image_grid_pinpoints, size) for s in image_sizes]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for (before, after), n in zip(text_lengths, counts, strict=True):
        body = torch.randint(10, 900, (before + after,), generator=g).tolist()
        rows.append([BOS_TOKEN_ID, *body[:before], *([IMAGE_TOKEN_ID] * n), *body[before:]])
    ids, mask = _pad_rows(rows, padding_side)
    pixels = torch.zeros(len(rows), max(tiles), 3, size, size)
    for i, t in enumerate(tiles):
        pixels[i, :t] = torch.randn(t, 3, size, size, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_sizes": torch.tensor(image_sizes),
    }


def tiny_video_llava(
    image_size: int = 32,
    patch_size: int = 8,
    *,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A tiny ``VideoLlavaForConditionalGeneration`` (two CLIP towers + Llama LM), in eval mode.

    ``vision_feature_layer=-2`` and the ``default`` select strategy: an image gives
    ``(image_size / patch_size)^2`` tokens (16 by default), a video frame one more (its [CLS]).
    Placeholder ids :data:`IMAGE_TOKEN_ID` and :data:`VIDEO_TOKEN_ID`.

    Args:
        image_size: Image and frame resolution.
        patch_size: ViT patch size.
        hidden: Width of all towers.
        layers: Blocks in each tower.
        seed: Seed of the weight initialisation.
        attn_implementation: ``sdpa`` or ``eager`` for all towers.

    Examples:
        >>> m = tiny_video_llava()
        >>> type(m).__name__, m.config.video_token_id
        ('VideoLlavaForConditionalGeneration', 998)
    """
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    vision, text = _tiny_clip_llama(image_size, patch_size, hidden, layers)
    n = (image_size // patch_size) ** 2
    config = VideoLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        image_seq_length=n,
        video_seq_length=8 * (n + 1),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model: torch.nn.Module = VideoLlavaForConditionalGeneration._from_config(
        copy.deepcopy(config), attn_implementation=attn_implementation
    )
    return model.eval()


def video_llava_prompts(
    model: torch.nn.Module,
    text_lengths: list[tuple[int, int]],
    *,
    images_per_row: list[int] | None = None,
    videos_per_row: list[int] | None = None,
    num_frames: int = 4,
    seed: int = 0,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """Padded inputs for a tiny Video-LLaVA, with images and/or videos per row.

    Row ``i`` is ``[BOS] + before_i tokens + its images' placeholders + its videos'
    placeholders + after_i tokens``. An image takes ``P`` placeholders, a video
    ``num_frames * (1 + P)``. ``pixel_values`` (images) and ``pixel_values_videos``
    (``(videos, frames, 3, S, S)``) are present only when some row has one.

    Args:
        model: A model from :func:`tiny_video_llava`.
        text_lengths: ``(before, after)`` text-token counts per row.
        images_per_row: Images per row (default none).
        videos_per_row: Videos per row (default one each).
        num_frames: Frames per video.
        seed: Seed for token ids and pixels.
        padding_side: ``left`` (generation) or ``right``.

    Examples:
        >>> m = tiny_video_llava()
        >>> batch = video_llava_prompts(m, [(2, 3), (1, 5)], images_per_row=[1, 0])
        >>> tuple(batch["input_ids"].shape), tuple(batch["pixel_values_videos"].shape)
        ((2, 90), (2, 4, 3, 32, 32))
    """
    config: Any = model.config
    n = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    images_per_row = images_per_row or [0] * len(text_lengths)
    videos_per_row = videos_per_row or [1] * len(text_lengths)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for (before, after), n_img, n_vid in zip(
        text_lengths, images_per_row, videos_per_row, strict=True
    ):
        body = torch.randint(10, 900, (before + after,), generator=g).tolist()
        visual = [IMAGE_TOKEN_ID] * (n * n_img) + [VIDEO_TOKEN_ID] * (num_frames * (n + 1) * n_vid)
        rows.append([BOS_TOKEN_ID, *body[:before], *visual, *body[before:]])
    ids, mask = _pad_rows(rows, padding_side)
    size = config.vision_config.image_size
    out = {"input_ids": ids, "attention_mask": mask}
    if sum(images_per_row):
        out["pixel_values"] = torch.randn(sum(images_per_row), 3, size, size, generator=g)
    if sum(videos_per_row):
        shape = (sum(videos_per_row), num_frames, 3, size, size)
        out["pixel_values_videos"] = torch.randn(shape, generator=g)
    return out


__all__ += [
    "VIDEO_TOKEN_ID",
    "llava_next_prompts",
    "llava_next_tokens_per_image",
    "tiny_llava_next",
    "tiny_video_llava",
    "video_llava_prompts",
]
