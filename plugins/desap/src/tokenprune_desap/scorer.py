"""The ``desap`` scorer: task relevance (decoupled similarity) and visual saliency maps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from tokenprune import Capability, CapabilityError, PruneContext, Scorer, StageConfig
from tokenprune_desap import functional as F
from tokenprune_desap.text_encoder import PairedTextEncoder

if TYPE_CHECKING:
    from tokenprune import ModelAdapter

__all__ = ["DesapScorer", "DesapScorerConfig"]


class DesapScorerConfig(StageConfig):
    r"""Configuration of :class:`DesapScorer` (defaults follow the paper; see the method page).

    Attributes:
        layer: Vision block ``l`` whose input :math:`S_v^{l-1}` is decomposed (Eq. 1-2). ``-1``
            (the last block, input = ``hidden_states[-2]``, LLaVA-1.5's feature) is the
            recommended reading of the paper [O1]; ``-2`` is the alternative.
        saliency_layer: Block whose [CLS] attention gives :math:`A_s` (Eq. 4) [O2].
        saliency: ``cls_attention`` ([CLS] row, the paper) or ``received_attention`` (towers
            without [CLS], e.g. Qwen2.5-VL).
        encoding: Attention encoding of the decoupled attention (``qq`` best in the paper).
        align: Fine-grained cross-modal alignment (FCMA, Eq. 3); off gives "De-Simi".
        lam: FCMA sharpness :math:`\lambda`.
        text_source: ``clip``: the paired CLIP text encoder (the paper). ``llm_embeddings``: the
            language model's input embeddings of the prompt, compared with the decoupled
            attention mapped through the model's projector (our extension for models without a
            paired text encoder).
        text_encoder: Hub id or local directory of the paired ``CLIPModel`` (``clip`` source).
        allow_unpaired_text_encoder: Accept a text encoder whose vision weights differ from the
            model's vision tower.
        text_filter: Keep only [EOS] and the ``text_filter_top_n`` tokens [EOS] attends to most
            (the paper's CalibCLIP step for long prompts).
        text_filter_top_n: Tokens kept by the filter besides [EOS].
        text_start_token: Count the start-of-text token among the text tokens :math:`S_q` (the
            paper's "non-padded tokens", so on by default) [O5]; ``false`` drops it.
        text_global: ``llm_embeddings`` source only: the global text token is the mean or the
            last valid prompt embedding.
    """

    name: Literal["desap"] = "desap"
    layer: int = -1
    saliency_layer: int = -1
    saliency: Literal["cls_attention", "received_attention"] = "cls_attention"
    encoding: Literal["qq", "qk", "vv", "kk"] = "qq"
    align: bool = True
    lam: float = Field(default=0.1, gt=0.0)
    text_source: Literal["clip", "llm_embeddings"] = "clip"
    text_encoder: str | None = None
    allow_unpaired_text_encoder: bool = False
    text_filter: bool = False
    text_filter_top_n: int = Field(default=30, ge=1)
    text_start_token: bool = True
    text_global: Literal["mean", "last"] = "mean"

    @model_validator(mode="after")
    def _text_encoder_given(self) -> DesapScorerConfig:
        if self.text_source == "clip" and self.text_encoder is None:
            raise ValueError(
                "text_source 'clip' needs `text_encoder`: the hub id or local directory of the "
                "CLIPModel paired with the VLM's vision tower (LLaVA-1.5: "
                "openai/clip-vit-large-patch14-336); or use text_source: llm_embeddings"
            )
        return self


class DesapScorer(Scorer[DesapScorerConfig]):
    """DeSAP's two score maps: ``task`` (:math:`A_t`, Eq. 1-3) and ``saliency`` (:math:`A_s`).

    Pair it with the ``desap_joint`` selector; any selector that takes a named map also works
    (``topk`` with ``score: task``).

    Args:
        config: The configuration.
        text_encoder: An already loaded :class:`PairedTextEncoder` (otherwise it is loaded from
            ``config.text_encoder`` on first use).
        **overrides: Config fields, when no ``config`` is given.

    Shape:
        - output: ``{"task": (B, N), "saliency": (B, N)}``
    """

    name: ClassVar[str] = "desap"
    Config: ClassVar[type[StageConfig]] = DesapScorerConfig

    def __init__(
        self,
        config: DesapScorerConfig | None = None,
        *,
        text_encoder: PairedTextEncoder | None = None,
        **overrides: Any,
    ) -> None:
        if config is None and text_encoder is not None:
            overrides.setdefault("text_encoder", "<in-memory>")
        super().__init__(config, **overrides)
        self._text_encoder = text_encoder
        self._owns_encoder = False

    @classmethod
    def contract_config(cls) -> DesapScorerConfig:
        """A configuration that runs without a CLIP checkpoint (for the stage contract kit)."""
        return DesapScorerConfig(text_source="llm_embeddings")

    @property
    def text_encoder(self) -> PairedTextEncoder:
        """The paired CLIP text encoder, loaded on first use.

        An encoder loaded from ``config.text_encoder`` follows the vision tower to its device on
        the first call (in float32); an encoder passed to the constructor stays where it is.
        """
        if self._text_encoder is None:
            assert self.config.text_encoder is not None
            self._text_encoder = PairedTextEncoder.from_pretrained(self.config.text_encoder)
            self._owns_encoder = True
        return self._text_encoder

    def required_capabilities(self) -> frozenset[Capability]:
        needs = {Capability.VISION_BLOCK}
        needs.add(
            Capability.CLS_ATTENTION
            if self.config.saliency == "cls_attention"
            else Capability.RECEIVED_ATTENTION
        )
        if self.config.text_source == "clip":
            needs.add(Capability.TEXT_QUERY)
        else:
            needs |= {Capability.TEXT_EMBEDDINGS, Capability.PROJECTOR}
        return frozenset(needs)

    def vision_layers(self) -> frozenset[int]:
        return frozenset({self.config.layer, self.config.saliency_layer})

    def check_model(self, adapter: ModelAdapter) -> None:
        if self.config.text_source == "clip" and not self.config.allow_unpaired_text_encoder:
            self.text_encoder.check_paired(adapter.vision_tower())

    def score(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        cfg = self.config
        block = ctx.vision_block(cfg.layer)
        prefix = block.num_prefix_tokens
        if block.rotary is not None or block.segments is not None or block.group_size != 1:
            raise CapabilityError(
                "desap recomputes the decoupled attention of a plain ViT block; vision block "
                f"{cfg.layer} uses rotary embeddings, attention segments or merged patch groups "
                "(e.g. Qwen2.5-VL), which it does not support yet"
            )
        patches = block.hidden.shape[1] - prefix
        if patches != ctx.visual.num_tokens:
            raise CapabilityError(
                f"desap: vision block {cfg.layer} has {patches} patch tokens but "
                f"{ctx.visual.num_tokens} visual tokens are pruned; this adapter prunes at another "
                "granularity than the vision blocks"
            )
        decoupled = F.decoupled_attention(
            block.normed(),
            block.q_proj,
            block.k_proj,
            block.v_proj,
            block.out_proj,
            block.num_heads,
            encoding=cfg.encoding,
        )
        if cfg.text_source == "clip":
            visual, visual_global, text, mask, text_global = self._clip_inputs(ctx, decoupled)
        else:
            visual, visual_global, text, mask, text_global = self._llm_inputs(
                ctx, decoupled[:, prefix:]
            )
        task = F.fcma_relevance(
            visual, visual_global, text, mask, text_global, lam=cfg.lam, align=cfg.align
        )
        saliency = self._saliency(ctx)
        return {"task": task.to(saliency.device), "saliency": saliency}

    def _saliency(self, ctx: PruneContext) -> torch.Tensor:
        if self.config.saliency == "cls_attention":
            return ctx.cls_attention(self.config.saliency_layer)
        return ctx.received_attention(self.config.saliency_layer)

    def _clip_inputs(
        self, ctx: PruneContext, decoupled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        text = ctx.require_text(self.name)
        if text.texts is None:
            raise CapabilityError(
                "desap (text_source 'clip') needs the question as text: pass "
                "tokenprune_query=[...] (one string per prompt) to forward/generate"
            )
        block_prefix = ctx.vision_block(self.config.layer).num_prefix_tokens
        if block_prefix < 1:
            raise CapabilityError(
                "desap with text_source 'clip' needs a [CLS] row in the vision tower for v_s; "
                "use text_source: llm_embeddings for towers without one"
            )
        encoder = self.text_encoder
        if self._owns_encoder and encoder.device != decoupled.device:
            encoder.clip.to(decoupled.device)
        joint = encoder.project_visual(decoupled)
        encoded = encoder.encode(text.texts)
        mask = encoded.mask
        if not self.config.text_start_token:
            mask = mask & ~encoded.start_mask
        if self.config.text_filter:
            mask = F.text_filter_mask(
                encoded.eos_attention, mask, encoded.eos_index, top_n=self.config.text_filter_top_n
            )
        device = joint.device
        return (
            joint[:, block_prefix:],
            joint[:, 0],
            encoded.tokens.to(device),
            mask.to(device),
            encoded.eos.to(device),
        )

    def _llm_inputs(
        self, ctx: PruneContext, decoupled_patches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        text = ctx.require_text(self.name)
        if text.embeddings is None or text.mask is None or ctx.projector is None:
            raise CapabilityError(
                "desap with text_source 'llm_embeddings' needs the prompt's embeddings and the "
                "model's projector from the adapter"
            )
        visual = F.l2_normalize(ctx.projector(decoupled_patches).float())
        visual_global = F.l2_normalize(visual.mean(dim=1))
        emb = F.l2_normalize(text.embeddings.float())
        mask = text.mask
        if self.config.text_global == "mean":
            weights = mask.float().unsqueeze(-1)
            text_global = (emb * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        else:
            last = (torch.arange(mask.shape[1], device=mask.device)[None, :] * mask).argmax(-1)
            text_global = emb[torch.arange(emb.shape[0]), last]
        return visual, visual_global, emb, mask, text_global
