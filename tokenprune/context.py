"""The per-forward context handed to every pipeline stage."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import torch

from tokenprune import functional as F
from tokenprune.capabilities import Capability
from tokenprune.errors import CapabilityError, ShapeError
from tokenprune.types import TextTokens, VisualTokens

__all__ = ["PruneContext", "Stash", "StashKey", "VisionBlock"]

T = TypeVar("T")
Module = Callable[[torch.Tensor], torch.Tensor]


class StashKey(Generic[T]):
    """A typed key for :class:`Stash`; create one per value kind at module level.

    Examples:
        >>> KEY: StashKey[int] = StashKey("count")
        >>> s = Stash(); s[KEY] = 3; s[KEY]
        3
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """A typed scratch space shared by the stages of one forward pass (never across passes)."""

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: StashKey[T], default: T | None = None) -> T | None:
        """Return the value for ``key``, or ``default`` if it was never set."""
        return cast("T | None", self._data.get(key, default))

    def setdefault(self, key: StashKey[T], factory: Callable[[], T]) -> T:
        """Return the value for ``key``, computing and storing ``factory()`` on first use."""
        if key not in self._data:
            self._data[key] = factory()
        return cast(T, self._data[key])


@dataclass(frozen=True)
class VisionBlock:
    """One transformer block of the vision tower, as seen by stages.

    The adapter captures the block's *input* hidden state during the tower's forward pass and
    hands over the block's own LayerNorm and projections, so stages can recompute attention
    variants (for example one [CLS] query row, or query-query attention) without touching the
    model.

    Attributes:
        index: Non-negative index of the block in the tower's block list.
        hidden: Input hidden state of the block (before its pre-attention LayerNorm).
        layer_norm: The block's pre-attention LayerNorm.
        q_proj: Query projection.
        k_proj: Key projection.
        v_proj: Value projection.
        out_proj: Attention output projection.
        num_heads: Number of attention heads.
        num_prefix_tokens: Leading non-patch tokens in ``hidden`` ([CLS], registers).
        rotary: Rotary position embedding the block applies to its split queries and keys
            (Qwen2.5-VL's 2-D RoPE), ``(q, k) -> (q', k')`` on :math:`(B, T, H, d)`; ``None``
            for towers with absolute position embeddings.
        segments: Attention segment id of every token of ``hidden``: tokens attend only to
            tokens with the same id (Qwen2.5-VL's ``cu_seqlens``: windows, or one segment per
            image). ``None``: every token attends to every token.
        group_size: Consecutive rows of ``hidden`` (after the prefix) that form one visual token
            (Qwen2.5-VL: the 4 patches of a 2x2 merge group); 1 for one patch per token.

    Shape:
        - hidden: :math:`(B, P + G N, C)` with :math:`P` = ``num_prefix_tokens`` and
          :math:`G` = ``group_size``, groups in the order of the visual tokens
        - segments: :math:`(P + G N,)`
    """

    index: int
    hidden: torch.Tensor
    layer_norm: Module
    q_proj: Module
    k_proj: Module
    v_proj: Module
    out_proj: Module
    num_heads: int
    num_prefix_tokens: int
    rotary: F.Rotary | None = None
    segments: torch.Tensor | None = None
    group_size: int = 1

    def normed(self) -> torch.Tensor:
        """The block input after its pre-attention LayerNorm, shape :math:`(B, P + G N, C)`."""
        return self.layer_norm(self.hidden)


_CLS_KEY: StashKey[dict[int, torch.Tensor]] = StashKey("tokenprune.cls_attention")
_RECEIVED_KEY: StashKey[dict[int, torch.Tensor]] = StashKey("tokenprune.received_attention")


@dataclass
class PruneContext:
    """Everything a stage may read during one pruning call.

    Built by a model adapter for one batch of images that share a token count ``N``; stages read
    it and never modify the model. Optional pieces raise :class:`CapabilityError` when missing.

    Attributes:
        visual: The tokens to prune.
        keep: Number of tokens to keep per image ``K`` (already resolved from the budget).
        capabilities: What the adapter provided for this call.
        text: Prompt tokens per image (same batch order as ``visual``), if available.
        blocks: Captured vision blocks by non-negative index.
        num_layers: Number of blocks in the vision tower (to resolve negative indices).
        projector: Maps pruning-space features to the language model's input space.
        stash: Per-call scratch space shared by the stages.
        last_token_attention: At a pruning position inside the language model: the
            head-averaged attention the row's last prompt token pays to each visual token of the
            image in the decoder layer before the position, :math:`(B, N)`; read it through
            :meth:`llm_attention`. ``None`` at the encoder position.
        llm_layer: The decoder layer the tokens are dropped before (``None`` at the encoder).
    """

    visual: VisualTokens
    keep: int
    capabilities: frozenset[Capability] = frozenset()
    text: TextTokens | None = None
    blocks: Mapping[int, VisionBlock] = field(default_factory=dict)
    num_layers: int | None = None
    projector: Module | None = None
    stash: Stash = field(default_factory=Stash)
    last_token_attention: torch.Tensor | None = None
    llm_layer: int | None = None

    def require(self, capability: Capability, stage: str) -> None:
        """Raise :class:`CapabilityError` unless ``capability`` was provided for this call."""
        if capability not in self.capabilities:
            provided = ", ".join(sorted(c.value for c in self.capabilities)) or "none"
            raise CapabilityError(
                f"stage {stage!r} needs capability {capability.value!r}, which this model "
                f"adapter does not provide (provided: {provided})"
            )

    def layer_index(self, layer: int) -> int:
        """Resolve a possibly negative block index against ``num_layers``."""
        if layer >= 0:
            return layer
        if self.num_layers is None:
            raise CapabilityError("negative vision layer index used but num_layers is unknown")
        return self.num_layers + layer

    def vision_block(self, layer: int) -> VisionBlock:
        """Return the captured vision block ``layer`` (negative indices count from the end)."""
        self.require(Capability.VISION_BLOCK, "vision_block")
        index = self.layer_index(layer)
        if index not in self.blocks:
            captured = sorted(self.blocks) or "none"
            raise CapabilityError(
                f"vision block {layer} (index {index}) was not captured (captured: {captured}); "
                "stages must list the layers they read in vision_layers()"
            )
        return self.blocks[index]

    def cls_attention(self, layer: int) -> torch.Tensor:
        """Head-averaged [CLS]-to-patch attention of vision block ``layer``, cached per call.

        Only the [CLS] query row is computed, so this costs :math:`O(N)` per head and works
        whatever attention kernel the tower runs.

        Shape:
            - output: :math:`(B, N)`
        """
        self.require(Capability.CLS_ATTENTION, "cls_attention")
        cache = self.stash.setdefault(_CLS_KEY, dict)
        index = self.layer_index(layer)
        if index not in cache:
            block = self.vision_block(layer)
            attention = F.cls_attention(
                block.normed(),
                block.q_proj,
                block.k_proj,
                num_heads=block.num_heads,
                num_prefix_tokens=block.num_prefix_tokens,
            )
            if attention.shape[1] != self.visual.num_tokens:
                raise ShapeError(
                    f"vision block {layer} has {attention.shape[1]} patch tokens after its "
                    f"{block.num_prefix_tokens} prefix token(s), but the visual tokens hold "
                    f"N={self.visual.num_tokens}; its [CLS] attention cannot score them"
                )
            cache[index] = attention
        return cache[index]

    def received_attention(self, layer: int) -> torch.Tensor:
        """Head-averaged attention each visual token receives in vision block ``layer``.

        The column mean over queries of the block's attention map (the saliency substitute for
        towers without [CLS]), recomputed from the captured block input with the block's rotary
        embedding and attention segments, in query chunks, then averaged over each group of
        ``group_size`` patches (one value per visual token). Cached per call.

        Shape:
            - output: :math:`(B, N)`
        """
        self.require(Capability.RECEIVED_ATTENTION, "received_attention")
        cache = self.stash.setdefault(_RECEIVED_KEY, dict)
        index = self.layer_index(layer)
        if index not in cache:
            block = self.vision_block(layer)
            patches = block.hidden.shape[1] - block.num_prefix_tokens
            if patches != block.group_size * self.visual.num_tokens:
                raise ShapeError(
                    f"vision block {layer} has {patches} patch tokens after its "
                    f"{block.num_prefix_tokens} prefix token(s), but the visual tokens hold "
                    f"N={self.visual.num_tokens} groups of {block.group_size}; its received "
                    "attention cannot score them"
                )
            cache[index] = F.received_attention(
                block.normed(),
                block.q_proj,
                block.k_proj,
                num_heads=block.num_heads,
                num_prefix_tokens=block.num_prefix_tokens,
                rotary=block.rotary,
                segments=block.segments,
                group_size=block.group_size,
            )
        return cache[index]

    def llm_attention(self) -> torch.Tensor:
        """Attention the last prompt token pays to each visual token, in the layer before here.

        Available at pruning positions inside the language model (capability
        ``llm_attention``): position ``layer: K`` gives the attention of decoder layer ``K - 1``,
        recomputed for that one query row (so it works under SDPA), averaged over heads. The
        softmax runs over the whole sequence, so a row sums to at most 1.

        Raises:
            CapabilityError: At the encoder position, or if the adapter did not provide it.
            ShapeError: If it does not hold one value per visual token.

        Shape:
            - output: :math:`(B, N)`
        """
        self.require(Capability.LLM_ATTENTION, "llm_attention")
        attention = self.last_token_attention
        if attention is None:
            raise CapabilityError(
                "no language-model attention reached this stage: it is only available at a "
                "pruning position inside the language model (a stage listed under `llm:`)"
            )
        expected = (self.visual.batch_size, self.visual.num_tokens)
        if tuple(attention.shape) != expected:
            raise ShapeError(
                f"the language-model attention has shape {tuple(attention.shape)}, but the visual "
                f"tokens need (B, N) = {expected}"
            )
        return attention

    def require_text(self, stage: str) -> TextTokens:
        """Return the prompt tokens, or raise naming the stage that needed them."""
        if self.text is None:
            raise CapabilityError(
                f"stage {stage!r} is text-guided but no prompt text reached it; pass the question "
                "as tokenprune_query=[...] (one string per prompt) to forward/generate"
            )
        return self.text
