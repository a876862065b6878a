"""Tiny, seeded, random-initialised models with the real architectures (no downloads)."""

from __future__ import annotations

import copy

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
) -> torch.nn.Module:
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
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration

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
        image_token_id=IMAGE_TOKEN_ID,
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
    model: torch.nn.Module,
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
        ((2, 24), (2, 3, 32, 32))
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
