"""The adapter contract cases of the built-in adapters: one tiny seeded model per adapter.

``tests/adapters/test_contract.py`` runs every check of
:mod:`tokenprune.testing.adapter_contract` over every registered adapter and fails for an
adapter without an entry here. To add one, write a ``<adapter>_case()`` function returning an
:class:`~tokenprune.testing.adapter_contract.AdapterCase` and add one line to
:data:`ADAPTER_CASES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tokenprune.testing.adapter_contract import AdapterCase
from tokenprune.testing.models import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    llava_next_prompts,
    llava_next_tokens_per_image,
    llava_prompts,
    tiny_llava,
    tiny_llava_next,
    tiny_video_llava,
    video_llava_prompts,
)

__all__ = ["ADAPTER_CASES", "llava_case", "llava_next_case", "text_lengths", "video_llava_case"]


def text_lengths(batch: int) -> list[tuple[int, int]]:
    """``(before, after)`` text lengths that differ from row to row (4, 7, 10, ... tokens).

    Examples:
        >>> text_lengths(3)
        [(1, 3), (2, 5), (3, 7)]
    """
    return [(1 + i, 3 + 2 * i) for i in range(batch)]


def _patches(model: nn.Module) -> int:
    config: Any = model.config
    vc = config.vision_config
    return int((vc.image_size // vc.patch_size) ** 2)


def _rows_of(input_ids: torch.Tensor, token_id: int, per_item: int) -> list[int]:
    """Row of each item whose ``per_item`` placeholders are ``token_id``, in fill order."""
    counts = (input_ids == token_id).sum(-1).tolist()
    return [row for row, n in enumerate(counts) for _ in range(int(n) // per_item)]


# -- LLaVA-1.5 -----------------------------------------------------------------------------------
def llava_case() -> AdapterCase:
    """LLaVA-1.5: 16 tokens per image, one image per row."""

    def tokens(model: nn.Module, inputs: Mapping[str, Any]) -> list[int]:
        return [_patches(model)] * int(inputs["pixel_values"].shape[0])

    return AdapterCase(
        name="llava",
        make_model=lambda seed: tiny_llava(seed=seed),
        make_inputs=lambda model, batch, seed: llava_prompts(model, text_lengths(batch), seed=seed),
        tokens_per_item=tokens,
    )


# -- LLaVA-NeXT ----------------------------------------------------------------------------------
LLAVA_NEXT_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (40, 64), (32, 64), (64, 40))
"""Image sizes cycled over the rows: a 2x2 grid, a 2x2 grid whose tiles unpadding cuts to 12
patches, a 1x2 grid and a 2x2 grid cut in the other direction."""


def llava_next_case() -> AdapterCase:
    """LLaVA-NeXT: anyres tiles of 16 patches, images of different sizes in one batch."""

    def sizes(inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        return [(int(h), int(w)) for h, w in inputs["image_sizes"]]

    return AdapterCase(
        name="llava_next",
        make_model=lambda seed: tiny_llava_next(seed=seed),
        make_inputs=lambda model, batch, seed: llava_next_prompts(
            model,
            text_lengths(batch),
            [LLAVA_NEXT_SIZES[i % len(LLAVA_NEXT_SIZES)] for i in range(batch)],
            seed=seed,
        ),
        tokens_per_item=lambda model, inputs: llava_next_tokens_per_image(model, sizes(inputs)),
        prunable_per_item=lambda model, inputs: llava_next_tokens_per_image(
            model, sizes(inputs), newlines=False
        ),
    )


# -- Video-LLaVA ---------------------------------------------------------------------------------
def video_llava_case() -> AdapterCase:
    """Video-LLaVA: a video of 4 frames per row, and an image next to the first row's video."""

    def counts(model: nn.Module, inputs: Mapping[str, Any], *, structural: bool) -> list[int]:
        p = _patches(model)
        images = inputs.get("pixel_values")
        videos = inputs.get("pixel_values_videos")
        n_img = 0 if images is None else int(images.shape[0])
        n_vid, frames = (0, 0) if videos is None else (int(videos.shape[0]), int(videos.shape[1]))
        return [p] * n_img + [frames * (p + int(structural))] * n_vid

    def rows(model: nn.Module, inputs: Mapping[str, Any]) -> list[int]:
        p = _patches(model)
        ids = inputs["input_ids"]
        videos = inputs.get("pixel_values_videos")
        frames = 0 if videos is None else int(videos.shape[1])
        return _rows_of(ids, IMAGE_TOKEN_ID, p) + _rows_of(ids, VIDEO_TOKEN_ID, frames * (p + 1))

    return AdapterCase(
        name="video_llava",
        make_model=lambda seed: tiny_video_llava(seed=seed),
        make_inputs=lambda model, batch, seed: video_llava_prompts(
            model,
            text_lengths(batch),
            images_per_row=[1] + [0] * (batch - 1),
            videos_per_row=[1] * batch,
            num_frames=4,
            seed=seed,
        ),
        tokens_per_item=lambda model, inputs: counts(model, inputs, structural=True),
        prunable_per_item=lambda model, inputs: counts(model, inputs, structural=False),
        item_rows=rows,
    )


ADAPTER_CASES: dict[str, AdapterCase] = {
    "llava": llava_case(),
    "llava_next": llava_next_case(),
    "video_llava": video_llava_case(),
}
"""Contract case of every built-in adapter, by adapter name."""


# -- Qwen2.5-VL ----------------------------------------------------------------------------------
def qwen2_5_vl_case() -> AdapterCase:
    """Qwen2.5-VL: variable resolution, one image in even rows and two in odd rows.

    The first image (24 tokens) spans two attention windows; the probe reads block 0, a
    window-attention block.
    """
    from tokenprune.testing.models import (
        QWEN_DEFAULT_GRIDS,
        QWEN_VISION_START_ID,
        qwen2_5_vl_prompts,
        tiny_qwen2_5_vl,
    )

    def tokens(model: nn.Module, inputs: Mapping[str, Any]) -> list[int]:
        config: Any = model.config
        merge = int(config.vision_config.spatial_merge_size)
        return [int(n) for n in (inputs["image_grid_thw"].prod(-1) // merge**2).tolist()]

    def rows(model: nn.Module, inputs: Mapping[str, Any]) -> list[int]:
        return _rows_of(inputs["input_ids"], QWEN_VISION_START_ID, 1)

    return AdapterCase(
        name="qwen2_5_vl",
        make_model=lambda seed: tiny_qwen2_5_vl(seed=seed),
        make_inputs=lambda model, batch, seed: qwen2_5_vl_prompts(
            model,
            tuple(QWEN_DEFAULT_GRIDS[i % len(QWEN_DEFAULT_GRIDS)] for i in range(batch)),
            text_lengths=text_lengths(batch),
            seed=seed,
        ),
        tokens_per_item=tokens,
        item_rows=rows,
    )


# -- timm ViT ------------------------------------------------------------------------------------
def timm_vit_case() -> AdapterCase:
    """A timm ViT classifier: 16 patches, a class token and a register token, no ``generate``.

    The sequence is the input of the last block (pruning happens after block ``depth // 2`` for
    the contract's random pipelines).
    """
    from tokenprune.testing.models import tiny_timm_vit

    def pixels(batch: int, seed: int) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}

    def last_block(model: nn.Module) -> nn.Module:
        block: nn.Module = getattr(model, "blocks")[-1]  # noqa: B009 - typed as Any
        return block

    return AdapterCase(
        name="timm_vit",
        make_model=lambda seed: tiny_timm_vit(reg_tokens=1, seed=seed),
        make_inputs=lambda model, batch, seed: pixels(batch, seed),
        tokens_per_item=lambda model, inputs: [16] * int(inputs["x"].shape[0]),
        sequence_module=last_block,
        generative=False,
    )


ADAPTER_CASES["qwen2_5_vl"] = qwen2_5_vl_case()
ADAPTER_CASES["timm_vit"] = timm_vit_case()
__all__ += ["qwen2_5_vl_case", "timm_vit_case"]
