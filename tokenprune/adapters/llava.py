"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``, transformers 5.x).

Policy:

- **What is pruned:** the vision features the projector consumes (``hidden_states[-2]``
  without [CLS] for LLaVA-1.5), before the projector; merged tokens are projected after merging.
- **Seams:** a forward pre-hook on the model and a per-instance ``generate`` wrapper. Both run
  the vision tower through the public ``get_image_features`` with temporary hooks (block-input
  capture and a projector pre-hook that runs the pipeline), then pass the pruned features as
  ``mm_encoder_outputs`` and shorten ``input_ids``/``attention_mask``/``labels`` to ``K``
  placeholders per image. ``generate`` therefore prunes once, before prefill.
- **Positions:** ``contiguous`` lets the model number the shorter sequence itself;
  ``original`` passes explicit ``position_ids`` that keep each kept token's unpruned position.
- **[CLS] attention:** recomputed for one query row from the captured block input, so the tower
  keeps running SDPA.
- **Inside the LLM** (``llm:`` stages, capability ``llm_attention``): per-instance hooks on the
  language model's decoder layers (:mod:`tokenprune.adapters._llm`) drop visual tokens before
  each stage's layer, once per ``forward`` and once per ``generate`` (at the prefill). ``forward``
  then returns logits for the shortened sequence (text and padding positions are all kept, in
  order), so ``labels`` cannot be combined with LLM stages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from tokenprune.adapters._hooks import HookSet
from tokenprune.adapters._llm import LlmPruning, check_llm_stages
from tokenprune.adapters._sequence import find_image_spans, shrink_inputs
from tokenprune.adapters._vision import (
    capture_block_inputs,
    clip_blocks,
    clip_vision_block,
    prompt_text,
)
from tokenprune.adapters.base import QUERY_KWARG, CallMode, ModelAdapter
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.errors import AdapterError, CapabilityError
from tokenprune.pipeline import Pipeline
from tokenprune.types import TextTokens, VisualTokens

__all__ = ["LlavaAdapter", "normalize_queries"]


def normalize_queries(query: Any, num_rows: int) -> tuple[str, ...] | None:
    """Check the ``tokenprune_query`` argument: one string per prompt row.

    Raises:
        AdapterError: If it is not a string (batch of one) or a sequence of ``num_rows`` strings.
    """
    if query is None:
        return None
    if isinstance(query, str):
        query = [query]
    if not isinstance(query, Sequence) or not all(isinstance(q, str) for q in query):
        raise AdapterError(f"{QUERY_KWARG} must be a string or a list of strings")
    if len(query) != num_rows:
        raise AdapterError(
            f"{QUERY_KWARG} has {len(query)} string(s) but the batch has {num_rows} prompt(s); "
            "pass one question per prompt"
        )
    return tuple(query)


class LlavaAdapter(ModelAdapter):
    """Prunes the visual tokens of ``LlavaForConditionalGeneration`` models.

    Examples:
        >>> from tokenprune.testing import tiny_llava
        >>> LlavaAdapter.supports(tiny_llava(image_size=32, patch_size=8))
        True
    """

    name: ClassVar[str] = "llava"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.VISION_BLOCK,
            Capability.CLS_ATTENTION,
            Capability.TEXT_EMBEDDINGS,
            Capability.TEXT_QUERY,
            Capability.PROJECTOR,
            Capability.LLM_ATTENTION,
        }
    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes and hasattr(model, "model")

    # -- model facts -----------------------------------------------------------------------
    @property
    def _model_any(self) -> Any:
        return self.model

    @property
    def _inner(self) -> Any:
        return self.model.model

    @property
    def _config(self) -> Any:
        return self.model.config

    def tokens_per_image(self) -> int:
        """Visual tokens per image before pruning (``(image_size / patch_size)^2``)."""
        vc = self._config.vision_config
        return int((vc.image_size // vc.patch_size) ** 2)

    def grid(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of one image."""
        vc = self._config.vision_config
        side = int(vc.image_size // vc.patch_size)
        return side, side

    def vision_tower(self) -> nn.Module:
        """The CLIP vision tower (``model.model.vision_tower``)."""
        tower: nn.Module = self._inner.vision_tower
        return tower

    def validate(self, pipeline: Pipeline) -> None:
        super().validate(pipeline)
        strategy = self._config.vision_feature_select_strategy
        if strategy != "default":
            raise AdapterError(
                f"vision_feature_select_strategy={strategy!r} is not supported: the [CLS] token "
                "would be pruned like a patch. Use 'default' (LLaVA-1.5's setting)"
            )
        blocks = clip_blocks(self._inner.vision_tower)
        for layer in pipeline.vision_layers():
            if not -len(blocks) <= layer < len(blocks):
                raise AdapterError(
                    f"vision layer {layer} does not exist: the tower has {len(blocks)} blocks"
                )
        if pipeline.llm:
            check_llm_stages(self._inner.language_model, pipeline)

    def install_hooks(self, pipeline: Pipeline, hooks: HookSet) -> None:
        """Add the hooks of the pipeline's LLM stages on the language model (if any)."""
        if not pipeline.llm:
            return
        n = self.tokens_per_image()
        LlmPruning(
            pipeline,
            self._inner,
            self._inner.language_model,
            image_token_id=int(self._config.image_token_id),
            tokens_per_image=pipeline.budget(n) if pipeline.has_encoder_stage else n,
        ).install(hooks)

    # -- the per-call work -----------------------------------------------------------------
    def prepare_inputs(
        self, pipeline: Pipeline, kwargs: dict[str, Any], mode: CallMode
    ) -> dict[str, Any]:
        query = kwargs.pop(QUERY_KWARG, None)
        if pipeline.llm and kwargs.get("labels") is not None:
            raise AdapterError(
                "labels cannot be combined with pruning inside the language model: the logits "
                "cover the sequence shortened at the LLM layers, which no longer lines up with "
                "the labels. Compute the loss without `llm` stages"
            )
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return kwargs
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise AdapterError(
                "a pruned LLaVA needs input_ids with <image> placeholders (inputs_embeds alone "
                "cannot be shortened); pass input_ids"
            )
        if not pipeline.has_encoder_stage:
            return kwargs  # pruned inside the language model only
        for unsupported in ("image_sizes", "mm_encoder_outputs"):
            if kwargs.get(unsupported) is not None:
                raise AdapterError(f"{unsupported} cannot be combined with pixel_values here")
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
        n = self.tokens_per_image()
        n_images = int(pixel_values.shape[0])
        spans = find_image_spans(input_ids, self._config.image_token_id, [n] * n_images)
        rows = [s.row for s in spans]
        keep = pipeline.budget(n)

        text = self._text(pipeline, input_ids, attention_mask, rows, queries)
        features, keep_idx = self._pruned_features(pipeline, kwargs, keep, text)

        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        shrunk = shrink_inputs(
            input_ids,
            attention_mask,
            spans,
            list(keep_idx),
            positions=pipeline.positions,
            position_ids=kwargs.get("position_ids"),
            default_positions="arange" if mode == "forward" else "cumsum",
            past_length=past,
            labels=kwargs.get("labels"),
            pad_token_id=_pad_id(self._config, input_ids, attention_mask),
        )
        return shrunk.apply(kwargs, drop=("pixel_values",), encoder_outputs={"image": features})

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
            self._model_any.get_input_embeddings(),
            input_ids,
            attention_mask,
            self._config.image_token_id,
            rows,
            queries,
        )

    def _pruned_features(
        self, pipeline: Pipeline, kwargs: Mapping[str, Any], keep: int, text: TextTokens | None
    ) -> tuple[Any, torch.Tensor]:
        inner = self._inner
        blocks = clip_blocks(inner.vision_tower)
        projector: nn.Module = inner.multi_modal_projector
        result: dict[str, torch.Tensor] = {}
        capabilities = self.capabilities - (
            frozenset() if text is not None and text.texts is not None else {Capability.TEXT_QUERY}
        )

        with capture_block_inputs(blocks, pipeline.vision_layers()) as captured:

            def run_pipeline(
                module: nn.Module, args: tuple[Any, ...]
            ) -> tuple[torch.Tensor] | None:
                if "keep_idx" in result:  # re-entrant call (a stage used ctx.projector)
                    return None
                feats = args[0]
                ctx = PruneContext(
                    visual=VisualTokens(feats, grid=self.grid()),
                    keep=keep,
                    capabilities=capabilities,
                    text=text,
                    blocks={i: clip_vision_block(blocks, i, h) for i, h in captured.items()},
                    num_layers=len(blocks),
                    projector=_bypass_hooks(projector),
                )
                pruned = pipeline(ctx)
                result["keep_idx"] = pruned.keep_idx
                return (pruned.features.to(feats.dtype),)

            handle = projector.register_forward_pre_hook(run_pipeline)
            try:
                features = inner.get_image_features(
                    pixel_values=kwargs["pixel_values"],
                    vision_feature_layer=kwargs.get("vision_feature_layer"),
                    vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                    return_dict=True,
                )
            finally:
                handle.remove()
        return features, result["keep_idx"]


def _bypass_hooks(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def project(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = module.forward(x)
        return out

    return project


def _pad_id(config: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    padded = input_ids[attention_mask == 0]
    if padded.numel():
        return int(padded[0])
    pad = getattr(config.text_config, "pad_token_id", None)
    return int(pad) if pad is not None else 0
