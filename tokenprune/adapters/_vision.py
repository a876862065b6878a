"""Helpers shared by adapters of CLIP-style vision towers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tokenprune.capabilities import Capability
from tokenprune.context import VisionBlock
from tokenprune.errors import AdapterError
from tokenprune.types import TextTokens

__all__ = [
    "capture_block_inputs",
    "clip_blocks",
    "clip_vision_block",
    "prompt_text",
    "text_tokens_for_images",
]


def clip_blocks(tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a CLIP-style tower (``CLIPVisionModel`` or its inner model)."""
    for path in ("vision_model.encoder.layers", "encoder.layers"):
        obj: Any = tower
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise AdapterError(f"cannot find the transformer blocks of vision tower {type(tower).__name__}")


@contextmanager
def capture_block_inputs(
    blocks: nn.ModuleList, layers: Iterable[int]
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the input hidden state of the given blocks while the context is open.

    The hooks are removed on exit, also when the forward pass raises.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index in sorted({i % len(blocks) for i in layers}):

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int = index
        ) -> None:
            captured[index] = args[0] if args else kwargs["hidden_states"]

        handles.append(blocks[index].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def clip_vision_block(blocks: nn.ModuleList, index: int, hidden: torch.Tensor) -> VisionBlock:
    """Describe CLIP block ``index`` (captured input ``hidden``) as a :class:`VisionBlock`."""
    block: Any = blocks[index]
    attn = block.self_attn
    return VisionBlock(
        index=index,
        hidden=hidden,
        layer_norm=block.layer_norm1,
        q_proj=attn.q_proj,
        k_proj=attn.k_proj,
        v_proj=attn.v_proj,
        out_proj=attn.out_proj,
        num_heads=int(attn.num_heads),
        num_prefix_tokens=1,
    )


def text_tokens_for_images(
    embed: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    image_rows: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Language-model embeddings of each image's prompt text (its row, minus placeholders/padding).

    Returns:
        ``(embeddings, mask)`` with one row per image.

    Shape:
        - embeddings: :math:`(B_{img}, T, D)`
        - mask: :math:`(B_{img}, T)`
    """
    text = attention_mask.bool() & (input_ids != image_token_id)
    lengths = text.sum(-1)
    t = max(1, int(lengths.max()))
    ids = torch.zeros(input_ids.shape[0], t, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros(input_ids.shape[0], t, dtype=torch.bool, device=input_ids.device)
    for row in range(input_ids.shape[0]):
        n = int(lengths[row])
        ids[row, :n] = input_ids[row][text[row]]
        mask[row, :n] = True
    rows = torch.tensor(list(image_rows), device=input_ids.device, dtype=torch.long)
    return embed(ids[rows]), mask[rows]


def prompt_text(
    requires: frozenset[Capability],
    embed: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    rows: Sequence[int],
    queries: tuple[str, ...] | None,
) -> TextTokens | None:
    """The prompt of each image for the stages: its question and, if required, its embeddings.

    Args:
        requires: The pipeline's required capabilities (embeddings only with ``text_embeddings``).
        embed: The language model's input embedding table.
        input_ids: Token ids of the batch.
        attention_mask: 1 for real tokens.
        image_token_id: The image placeholder id (excluded from the text).
        rows: Prompt row of each image.
        queries: ``tokenprune_query`` strings per row, if given.
    """
    texts = None if queries is None else tuple(queries[r] for r in rows)
    if Capability.TEXT_EMBEDDINGS not in requires:
        return None if texts is None else TextTokens(texts=texts)
    with torch.no_grad():
        emb, mask = text_tokens_for_images(embed, input_ids, attention_mask, image_token_id, rows)
    return TextTokens(texts=texts, embeddings=emb, mask=mask)
