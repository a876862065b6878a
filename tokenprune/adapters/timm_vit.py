"""Adapter for timm Vision Transformers (``timm.models.vision_transformer.VisionTransformer``).

Encoder-internal pruning for image classification (the EViT / ToMe setting), so the same stages
can be compared on classifiers as on VLMs.

Policy:

- **Where:** after block ``L`` of ``model.blocks``: a per-instance forward hook on ``blocks[L]``
  runs the pipeline on its output, and blocks ``L+1 ..`` (and the head) see ``P + K`` tokens.
  ``L`` is, in order: the adapter's ``prune_after_block`` argument when given
  (``TimmViTAdapter(model, prune_after_block=6).install(pipeline)``); else the deepest block the
  pipeline reads (``pipeline.vision_layers()``, e.g. the scorer's ``layer``), so the scores come
  from the block just computed; else ``depth // 2`` (6 for a 12-block ViT) for pipelines that
  read no block (``random``). A pipeline that reads a block after ``L`` is rejected at install.
- **What is pruned:** the patch tokens only; the class token and register tokens (the first
  ``model.num_prefix_tokens``) are always kept, in front. The budget applies to the
  ``N = (img_size / patch_size)^2`` patch tokens of each image.
- **Capabilities:** ``vision_block`` (the captured input of the block with its ``norm1`` and the
  query/key/value parts of the fused ``attn.qkv``, ``q_norm``/``k_norm`` applied),
  ``cls_attention`` (the [CLS] row recomputed from the captured input, so the model keeps its
  fused SDPA attention; only for models with a class token) and ``received_attention``. No
  prompt text and no projector: this is a classifier.
- **Positions:** nothing to do: position embeddings are added before the first block.
- **No generate:** the model has none, so none is wrapped. ``attn_mask`` cannot be combined with
  pruning (its size would no longer match), and ``forward_intermediates`` cannot reshape the
  pruned tokens of later blocks back into a grid; use ``forward`` or ``forward_features``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from tokenprune.adapters._hooks import HookSet
from tokenprune.adapters.base import QUERY_KWARG, CallMode, ModelAdapter
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext, VisionBlock
from tokenprune.errors import AdapterError, CapabilityError
from tokenprune.pipeline import Pipeline
from tokenprune.types import VisualTokens

__all__ = ["TimmViTAdapter"]

_NO_TEXT = (
    "a timm ViT is an image classifier without a prompt; use a scorer that needs no text "
    "(cls_attention, received_attention, random)"
)


class TimmViTAdapter(ModelAdapter):
    """Prunes the patch tokens of a timm ``VisionTransformer`` between two blocks.

    Args:
        model: The classifier.
        prune_after_block: Block after which tokens are pruned (negative counts from the end);
            by default the deepest block the pipeline reads, or ``depth // 2``.

    Examples:
        >>> from tokenprune.testing.models import tiny_timm_vit
        >>> adapter = TimmViTAdapter(tiny_timm_vit(depth=4), prune_after_block=1)
        >>> adapter.prune_after_block
        1
    """

    name: ClassVar[str] = "timm_vit"
    model_classes: ClassVar[tuple[str, ...]] = ("VisionTransformer",)
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.VISION_BLOCK, Capability.CLS_ATTENTION, Capability.RECEIVED_ATTENTION}
    )
    capability_hints: ClassVar[Mapping[Capability, str]] = {
        Capability.TEXT_EMBEDDINGS: _NO_TEXT,
        Capability.TEXT_QUERY: _NO_TEXT,
        Capability.PROJECTOR: "pruning happens inside the ViT encoder; there is no projector",
    }

    def __init__(self, model: nn.Module, prune_after_block: int | None = None) -> None:
        super().__init__(model)
        depth = len(self._blocks)
        if prune_after_block is not None and not -depth <= prune_after_block < depth:
            raise AdapterError(
                f"prune_after_block={prune_after_block} does not exist: the ViT has {depth} blocks"
            )
        self.prune_after_block = prune_after_block

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return any(
            c.__name__ in cls.model_classes and c.__module__.startswith("timm.")
            for c in type(model).__mro__
        ) and isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList)

    # -- model facts -----------------------------------------------------------------------
    @property
    def _blocks(self) -> Any:
        return getattr(self.model, "blocks")  # noqa: B009 - typed as Any on purpose

    @property
    def num_prefix_tokens(self) -> int:
        """Class and register tokens in front of the patch tokens (never pruned)."""
        return int(getattr(self.model, "num_prefix_tokens", 1))

    @property
    def has_class_token(self) -> bool:
        """Whether the first token is a class token."""
        return getattr(self.model, "cls_token", None) is not None

    def grid(self) -> tuple[int, int] | None:
        """Patch grid ``(rows, cols)`` at the configured input size (``None`` if unknown)."""
        size = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        return (int(size[0]), int(size[1])) if size is not None else None

    def prune_block(self, pipeline: Pipeline) -> int:
        """Non-negative index of the block after which ``pipeline`` prunes (see the policy)."""
        depth = len(self._blocks)
        if self.prune_after_block is not None:
            return self.prune_after_block % depth
        layers = pipeline.vision_layers()
        return max(i % depth for i in layers) if layers else depth // 2

    def validate(self, pipeline: Pipeline) -> None:
        super().validate(pipeline)
        blocks = self._blocks
        depth = len(blocks)
        if Capability.CLS_ATTENTION in pipeline.requires and not self.has_class_token:
            raise CapabilityError(
                "this ViT has no class token (class_token=False), so it cannot provide "
                "capability 'cls_attention'; use the 'received_attention' scorer instead"
            )
        after = self.prune_block(pipeline)
        for layer in pipeline.vision_layers():
            if not -depth <= layer < depth:
                raise AdapterError(
                    f"vision layer {layer} does not exist: the ViT has {depth} blocks"
                )
            if layer % depth > after:
                raise AdapterError(
                    f"the pipeline reads block {layer} but tokens are pruned after block {after}, "
                    "before that block runs; read a block <= the pruning point or set "
                    "prune_after_block"
                )
            _check_block(blocks[layer % depth], layer)

    # -- hooks -----------------------------------------------------------------------------
    def prepare_inputs(
        self, pipeline: Pipeline, kwargs: dict[str, Any], mode: CallMode
    ) -> dict[str, Any]:
        kwargs.pop(QUERY_KWARG, None)
        if kwargs.get("attn_mask") is not None:
            raise AdapterError(
                "attn_mask cannot be combined with token pruning: blocks after the pruning point "
                "see fewer tokens than the mask covers"
            )
        return kwargs

    def install_hooks(self, pipeline: Pipeline, hooks: HookSet) -> None:
        blocks = self._blocks
        depth = len(blocks)
        after = self.prune_block(pipeline)
        layers = sorted({i % depth for i in pipeline.vision_layers()})
        prefix = self.num_prefix_tokens
        grid = self.grid()
        capabilities = self.capabilities - (
            frozenset() if self.has_class_token else {Capability.CLS_ATTENTION}
        )
        captured: dict[int, torch.Tensor] = {}

        for index in layers:

            def capture(
                module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int = index
            ) -> None:
                captured[index] = args[0] if args else kwargs["x"]

            hooks.add(
                f"tokenprune.capture_block_{index}",
                blocks[index].register_forward_pre_hook(capture, with_kwargs=True),
            )

        def prune(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            try:
                patches = output[:, prefix:]
                n = patches.shape[1]
                ctx = PruneContext(
                    visual=VisualTokens(
                        patches, grid=grid if grid and grid[0] * grid[1] == n else None
                    ),
                    keep=pipeline.budget(n),
                    capabilities=capabilities,
                    blocks={i: self.vision_block(i, captured[i]) for i in layers},
                    num_layers=depth,
                )
                pruned = pipeline(ctx)
            finally:
                captured.clear()
            return torch.cat([output[:, :prefix], pruned.features.to(output.dtype)], dim=1)

        hooks.add(
            f"tokenprune.prune_after_block_{after}", blocks[after].register_forward_hook(prune)
        )

    def vision_block(self, index: int, hidden: torch.Tensor) -> VisionBlock:
        """Describe block ``index`` (captured input ``hidden``) as a :class:`VisionBlock`."""
        block = self._blocks[index]
        attn = block.attn
        return VisionBlock(
            index=index,
            hidden=hidden,
            layer_norm=block.norm1,
            q_proj=_qkv_part(attn, 0),
            k_proj=_qkv_part(attn, 1),
            v_proj=_qkv_part(attn, 2),
            out_proj=_out_proj(attn),
            num_heads=int(attn.num_heads),
            num_prefix_tokens=self.num_prefix_tokens,
        )


def _check_block(block: nn.Module, layer: int) -> None:
    from timm.models.vision_transformer import Block

    attn = getattr(block, "attn", None)
    if not isinstance(block, Block) or not isinstance(getattr(attn, "qkv", None), nn.Module):
        raise AdapterError(
            f"block {layer} is a {type(block).__name__}; only pre-norm timm `Block`s with a fused "
            "`attn.qkv` projection can have their attention recomputed"
        )
    width = int(getattr(attn, "head_dim", 0)) * int(getattr(attn, "num_heads", 0))
    if width != getattr(block.norm1, "normalized_shape", (width,))[0]:
        raise AdapterError(f"block {layer}: attention width {width} differs from the block width")


def _qkv_part(attn: Any, part: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Query (0), key (1) or value (2) of timm's fused ``qkv``, with ``q_norm``/``k_norm``."""
    norm = (attn.q_norm, attn.k_norm, None)[part]

    def project(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = attn.qkv(x)
        width = out.shape[-1] // 3
        y = out[..., part * width : (part + 1) * width]
        if norm is not None:
            y = norm(y.unflatten(-1, (int(attn.num_heads), -1))).flatten(-2)
        return y

    return project


def _out_proj(attn: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The output path after timm's attention: optional scale norm, then ``proj``.

    The optional output gate of gated attention depends on the block input, not on the
    attention context, and is left out.
    """

    def project(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = attn.proj(attn.norm(x))
        return out

    return project
