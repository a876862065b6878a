"""Helpers shared by the built-in method stages (private: not part of the public API)."""

from __future__ import annotations

import torch

from tokenprune import functional as F
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.errors import CapabilityError, ShapeError
from tokenprune.functional.assign import check_keep_indices
from tokenprune.stages.base import Scores
from tokenprune.types import Selection

__all__ = ["block_keys", "check_selection", "check_unused_scores", "projected_features"]


def check_unused_scores(scores: Scores, ctx: PruneContext, stage: str) -> None:
    """Validate the scores handed to a selector that does not rank by them.

    Such a selector still rejects malformed scores (a wrong shape, NaN), so that a broken
    scorer is reported rather than silently ignored.

    Raises:
        ShapeError: If a score map is not a finite ``(B, N)`` float tensor, or there is none.
    """
    maps = {"scores": scores} if isinstance(scores, torch.Tensor) else dict(scores)
    if not maps:
        raise ShapeError(f"{stage}: the scorer returned no score map")
    for key, value in maps.items():
        F.check_scores(
            value,
            batch=ctx.visual.batch_size,
            num_tokens=ctx.visual.num_tokens,
            name=f"{stage} scores {key!r}",
        )


def check_selection(selection: Selection, ctx: PruneContext) -> None:
    """Check a selection against the context (batch size, index range, order).

    Raises:
        ShapeError: If the selection does not fit the visual tokens.
    """
    check_keep_indices(
        selection.keep_idx, batch=ctx.visual.batch_size, num_tokens=ctx.visual.num_tokens
    )


def block_keys(ctx: PruneContext, layer: int, *, head_mean: bool) -> torch.Tensor:
    """Keys of the patch tokens in vision block ``layer``, one row per visual token.

    The keys are recomputed from the captured block input (``k_proj`` of the block's
    pre-attention LayerNorm output), without the prefix ([CLS]) tokens, averaged over the
    patches that form one visual token (Qwen2.5-VL's merge groups), and, with ``head_mean``,
    averaged over the heads as ToMe and VisionZip do. No rotary embedding is applied.

    Raises:
        CapabilityError: If the block was not captured.
        ShapeError: If the block's patch count disagrees with the visual tokens.

    Shape:
        - output: :math:`(B, N, C)`, or :math:`(B, N, C / H)` with ``head_mean``
    """
    block = ctx.vision_block(layer)
    with torch.no_grad():
        keys = block.k_proj(block.normed())[:, block.num_prefix_tokens :]
    b, n = ctx.visual.batch_size, ctx.visual.num_tokens
    group = block.group_size
    if keys.shape[0] != b or keys.shape[1] != group * n:
        raise ShapeError(
            f"vision block {layer} has {keys.shape[1]} patch tokens after its "
            f"{block.num_prefix_tokens} prefix token(s), but the visual tokens hold N={n} groups "
            f"of {group}; its keys cannot be matched to them"
        )
    width = keys.shape[-1]
    keys = keys.reshape(b, n, group, width).mean(dim=2)
    if head_mean:
        if width % block.num_heads:
            raise ShapeError(f"key width {width} is not divisible by {block.num_heads} heads")
        keys = keys.reshape(b, n, block.num_heads, width // block.num_heads).mean(dim=2)
    return keys


def projected_features(ctx: PruneContext, stage: str) -> torch.Tensor:
    """The visual tokens mapped by the model's projector into the language model's space.

    Raises:
        CapabilityError: If the adapter did not provide the projector.
    """
    ctx.require(Capability.PROJECTOR, stage)
    if ctx.projector is None:
        raise CapabilityError(
            f"stage {stage!r} needs the model's projector, which this adapter did not provide"
        )
    with torch.no_grad():
        return ctx.projector(ctx.visual.features)
