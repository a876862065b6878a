"""The paired CLIP text encoder DeSAP compares decoupled visual attention with.

LLaVA-style checkpoints ship only the vision tower; DeSAP also needs the text tower,
``text_projection``, ``visual_projection`` and ``post_layernorm`` of the CLIP model the tower
comes from (LLaVA-1.5: ``openai/clip-vit-large-patch14-336``). :class:`PairedTextEncoder` loads
them (``CLIPModel`` + tokenizer, from a hub id or a local directory) and checks that the CLIP
model's vision weights are the VLM's vision tower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune import CapabilityError, ConfigError
from tokenprune_desap import functional as F

__all__ = ["EncodedText", "PairedTextEncoder", "query_row_attention"]


@dataclass(frozen=True)
class EncodedText:
    """CLIP text-encoder output for a batch of questions.

    Attributes:
        tokens: ``text_projection`` of every token, L2-normalised, in CLIP's joint space.
        mask: ``True`` for real (non-padded) tokens.
        eos_index: Position of the [EOS] token per sample.
        eos_attention: Head-averaged last-layer attention of the [EOS] query over all tokens.
        start_mask: ``True`` at the start-of-text token of each sample (all ``False`` if the
            tokenizer adds none).

    Shape:
        - tokens: :math:`(B, T, E)`
        - mask, eos_attention, start_mask: :math:`(B, T)`
        - eos_index: :math:`(B,)`
    """

    tokens: Tensor
    mask: Tensor
    eos_index: Tensor
    eos_attention: Tensor
    start_mask: Tensor

    @property
    def eos(self) -> Tensor:
        """The [EOS] token of each sample (the global text token ``q_t``), ``(B, E)``."""
        return self.tokens[torch.arange(self.tokens.shape[0]), self.eos_index]


def query_row_attention(
    normed: Tensor,
    q_proj: F.Projection,
    k_proj: F.Projection,
    num_heads: int,
    query_index: Tensor,
    key_mask: Tensor,
) -> Tensor:
    r"""Head-averaged attention of one query row per sample over the valid, causal keys.

    .. math::
        a_b = \frac{1}{H}\sum_h \operatorname{softmax}_{j \le i_b,\, j \text{ valid}}
        \left(\frac{q_{h, i_b} k_{h, j}^\top}{\sqrt{d}}\right)

    Args:
        normed: Block input after the block's LayerNorm.
        q_proj: Query projection.
        k_proj: Key projection.
        num_heads: Number of heads.
        query_index: The query position ``i_b`` per sample.
        key_mask: ``True`` for valid keys.

    Returns:
        Attention weights over the ``T`` positions (zero on masked and future keys).

    Shape:
        - normed: :math:`(B, T, C)`; query_index: :math:`(B,)`; key_mask: :math:`(B, T)`
        - output: :math:`(B, T)`

    Examples:
        >>> x = torch.randn(1, 4, 8); eye = torch.nn.Identity()
        >>> valid = torch.ones(1, 4, dtype=torch.bool)
        >>> a = query_row_attention(x, eye, eye, 2, torch.tensor([2]), valid)
        >>> round(float(a.sum()), 5), float(a[0, 3])
        (1.0, 0.0)
    """
    b, t, c = normed.shape
    head_dim = c // num_heads
    rows = normed[torch.arange(b), query_index].unsqueeze(1)
    q = q_proj(rows).float().view(b, 1, num_heads, head_dim).transpose(1, 2)
    k = k_proj(normed).float().view(b, t, num_heads, head_dim).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2))[:, :, 0] / math.sqrt(head_dim)  # (B, H, T)
    positions = torch.arange(t, device=normed.device)
    allowed = key_mask.bool() & (positions[None, :] <= query_index[:, None])
    logits = logits.masked_fill(~allowed[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


class PairedTextEncoder:
    """A CLIP model and tokenizer used as DeSAP's text branch and joint-space projection.

    Args:
        clip: A ``transformers.CLIPModel``.
        tokenizer: Its tokenizer (callable on a list of strings).
        max_length: Token limit of the text tower (77 for CLIP).
    """

    def __init__(self, clip: nn.Module, tokenizer: Any, max_length: int = 77) -> None:
        for attr in ("text_model", "vision_model", "text_projection", "visual_projection"):
            if not hasattr(clip, attr):
                raise ConfigError(
                    f"text_encoder must be a CLIPModel (text and vision towers with projections); "
                    f"{type(clip).__name__} has no `{attr}`"
                )
        self.clip = clip.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def _model(self) -> Any:
        # The CLIPModel with its attributes untyped (nn.Module.__getattr__ is a Tensor/Module
        # union for type checkers).
        return self.clip

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> PairedTextEncoder:
        """Load ``CLIPModel`` and its tokenizer from a hub id or a local directory.

        Weights are read from ``.safetensors`` files only (``use_safetensors=True``): a
        checkpoint that has only pickle files (``pytorch_model.bin``) is refused, since
        unpickling can run arbitrary code.

        Args:
            name_or_path: Hub id or local directory of the CLIP checkpoint.
            **kwargs: Passed on to ``CLIPModel.from_pretrained`` (``dtype``, ``revision``, ...).

        Raises:
            ConfigError: If loading fails (missing, damaged or truncated files, pickle-only
                weights); the message names the setting to change.
        """
        from transformers import AutoTokenizer, CLIPModel

        if kwargs.pop("use_safetensors", True) is not True:
            raise ConfigError(
                "desap loads the text encoder from .safetensors files only; do not pass "
                "use_safetensors=False (convert the checkpoint to safetensors instead)"
            )
        try:
            clip = CLIPModel.from_pretrained(name_or_path, use_safetensors=True, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as exc:  # OSError, ValueError, safetensors' own error on a bad file
            raise ConfigError(
                f"desap `text_encoder`={name_or_path!r} cannot be loaded as a CLIPModel with a "
                f"tokenizer from safetensors weights ({type(exc).__name__}: {exc}); give the hub "
                "id or local directory of the CLIP checkpoint the VLM's vision tower comes from, "
                "with intact model.safetensors and tokenizer files"
            ) from exc
        max_length = int(getattr(clip.config.text_config, "max_position_embeddings", 77))
        return cls(clip, tokenizer, max_length=max_length)

    @property
    def device(self) -> torch.device:
        """Device of the CLIP model's weights."""
        return next(self.clip.parameters()).device

    # -- pairing ---------------------------------------------------------------------------
    def check_paired(self, vision_tower: nn.Module, *, atol: float = 1e-3) -> None:
        """Check that this CLIP model's vision weights are ``vision_tower``'s weights.

        Raises:
            ConfigError: Naming how many weights differ and the first one.
        """
        ours = _strip(self._model.vision_model.state_dict())
        theirs = _strip(vision_tower.state_dict())
        missing = sorted(set(theirs) - set(ours))
        differ = [
            k
            for k in sorted(set(ours) & set(theirs))
            if ours[k].shape != theirs[k].shape
            or not torch.allclose(ours[k].float().cpu(), theirs[k].float().cpu(), atol=atol)
        ]
        if missing or differ:
            first = (missing or differ)[0]
            raise ConfigError(
                f"desap `text_encoder` is not paired with this model's vision tower: "
                f"{len(differ)} of {len(theirs)} vision weights differ and {len(missing)} are "
                f"missing (first: {first!r}). Use the CLIP checkpoint the VLM's tower comes from "
                "(LLaVA-1.5: openai/clip-vit-large-patch14-336), or set "
                "`allow_unpaired_text_encoder: true` to accept the mismatch knowingly"
            )

    # -- encoding --------------------------------------------------------------------------
    def project_visual(self, hidden: Tensor) -> Tensor:
        """``visual_projection(post_layernorm(x))`` on every token, L2-normalised.

        Shape:
            - hidden: :math:`(B, T, C)` -> :math:`(B, T, E)`
        """
        model = self._model
        param = next(self.clip.parameters())
        x = hidden.to(param.device, param.dtype)
        projected = model.visual_projection(model.vision_model.post_layernorm(x))
        return F.l2_normalize(projected.float())

    @torch.no_grad()
    def encode(self, texts: list[str] | tuple[str, ...]) -> EncodedText:
        """Tokenise and encode questions; every token goes through ``text_projection``.

        Raises:
            CapabilityError: If a question is empty.
        """
        if any(not t.strip() for t in texts):
            raise CapabilityError(
                "desap got an empty question (a blank tokenprune_query string); text-guided "
                "pruning needs the user's question: pass it in tokenprune_query, one non-empty "
                "string per prompt"
            )
        param = next(self.clip.parameters())
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(param.device)
        mask = batch["attention_mask"].to(param.device).bool()
        text_model = self._model.text_model
        last = text_model.encoder.layers[-1]
        captured: dict[str, Tensor] = {}

        def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["h"] = args[0] if args else kwargs["hidden_states"]

        handle = last.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = text_model(input_ids=ids, attention_mask=mask.long())
        finally:
            handle.remove()
        positions = torch.arange(ids.shape[1], device=ids.device)
        eos_index = (positions[None, :] * mask).argmax(dim=-1)  # last valid token
        first = mask.to(torch.uint8).argmax(dim=-1)  # first valid token
        start_mask = torch.zeros_like(mask)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None:
            is_start = ids.gather(1, first[:, None]) == bos
            start_mask.scatter_(1, first[:, None], is_start & (first != eos_index)[:, None])
        tokens = F.l2_normalize(self._model.text_projection(out.last_hidden_state).float())
        attn = last.self_attn
        eos_attention = query_row_attention(
            last.layer_norm1(captured["h"]),
            attn.q_proj,
            attn.k_proj,
            int(attn.num_heads),
            eos_index,
            mask,
        )
        return EncodedText(
            tokens=tokens,
            mask=mask,
            eos_index=eos_index,
            eos_attention=eos_attention,
            start_mask=start_mask,
        )


def _strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("vision_model."): v for k, v in state.items()}
