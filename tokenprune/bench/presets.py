"""Models to benchmark: random-weight presets built from configs, or a checkpoint.

Two presets build a ``LlavaForConditionalGeneration`` from configs with random weights, so
nothing is downloaded:

- ``tiny``: a CLIP tower of 2 blocks x 64 at 96 px with 6 px patches (256 visual tokens per
  image) and a 2-layer Llama of width 64 (4 query / 2 key-value heads). For tests and smoke runs.
- ``real-shaped``: LLaVA-1.5's CLIP ViT-L/14-336 tower (24 blocks x 1024, MLP 4096, 16 heads,
  576 patches + [CLS]) and a 1.1 B Llama-shaped language model (TinyLlama's shape: 22 layers x
  2048, FFN 5632, 32 query / 4 key-value heads, vocabulary 32,000). Real shapes make the
  timings real; the weights are random, so the generated text is not.

:func:`load_pretrained` loads a real checkpoint (a directory or a hub id) through
``transformers.AutoModelForImageTextToText``. Both towers always use SDPA attention, so the
unpruned and the pruned runs share the same kernels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from tokenprune.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from torch import nn

__all__ = [
    "ATTN_IMPLEMENTATION",
    "PRESETS",
    "ModelPreset",
    "build_preset",
    "list_presets",
    "load_pretrained",
    "preset_visual_tokens",
    "resolve_dtype",
]

ATTN_IMPLEMENTATION: Final[str] = "sdpa"
"""Attention implementation of both towers in every benchmarked model."""

_DTYPES: Final[Mapping[str, str]] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


@dataclass(frozen=True)
class ModelPreset:
    """A random-weight LLaVA-1.5-style model described by its two configs.

    Attributes:
        name: Preset name (``--preset``).
        description: One line for the report.
        vision: Keyword arguments of ``transformers.CLIPVisionConfig``.
        text: Keyword arguments of ``transformers.LlamaConfig``.
        image_token_id: Placeholder id of an image token (inside the vocabulary).
    """

    name: str
    description: str
    vision: Mapping[str, Any] = field(default_factory=dict)
    text: Mapping[str, Any] = field(default_factory=dict)
    image_token_id: int = 0


PRESETS: Final[Mapping[str, ModelPreset]] = {
    "tiny": ModelPreset(
        name="tiny",
        description="tiny random LLaVA: CLIP 2 x 64 at 96 px / 6 px patches (256 visual "
        "tokens), Llama 2 x 64 (4 / 2 heads, vocab 1000)",
        vision={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 96,
            "patch_size": 6,
            "projection_dim": 64,
        },
        text={
            "vocab_size": 1000,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        image_token_id=999,
    ),
    "real-shaped": ModelPreset(
        name="real-shaped",
        description="random weights, real shapes: CLIP ViT-L/14-336 (24 x 1024, MLP 4096, "
        "16 heads, 576 patches + [CLS]) + 1.1 B Llama-shaped LM (d 2048, FFN 5632, 32 / 4 "
        "heads, vocab 32000)",
        vision={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
        },
        text={
            "vocab_size": 32000,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "max_position_embeddings": 4096,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        image_token_id=31999,
    ),
}
"""The built-in benchmark models by name."""


def list_presets() -> list[str]:
    """Names of the benchmark presets, in definition order.

    Returns:
        The keys of :data:`PRESETS`.

    Examples:
        >>> list_presets()
        ['tiny', 'real-shaped']
    """
    return list(PRESETS)


def _get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown benchmark preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None


def preset_visual_tokens(name: str) -> int:
    """Visual tokens per image of a preset, ``(image_size / patch_size)^2``, without building it.

    Args:
        name: A key of :data:`PRESETS`.

    Returns:
        The count ``N``.

    Raises:
        ConfigError: Unknown preset.

    Examples:
        >>> preset_visual_tokens("real-shaped"), preset_visual_tokens("tiny")
        (576, 256)
    """
    vision = _get_preset(name).vision
    return (int(vision["image_size"]) // int(vision["patch_size"])) ** 2


def resolve_dtype(name: str) -> torch.dtype:
    """Turn a dtype name (``float32``, ``bfloat16``, ``float16`` or a short alias) into a dtype.

    Args:
        name: The name, optionally prefixed with ``torch.``.

    Returns:
        The torch dtype.

    Raises:
        ConfigError: Unknown name.

    Examples:
        >>> resolve_dtype("bf16")
        torch.bfloat16
    """
    import torch

    key = name.lower().removeprefix("torch.")
    try:
        dtype: torch.dtype = getattr(torch, _DTYPES[key])
    except KeyError:
        raise ConfigError(
            f"unknown dtype {name!r}; choose one of float32, bfloat16, float16"
        ) from None
    return dtype


def build_preset(
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    lm_layers: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build a preset's ``LlavaForConditionalGeneration`` with seeded random weights.

    Args:
        name: A key of :data:`PRESETS`.
        dtype: Parameter dtype (default float32).
        device: Where the weights are created (directly, without a CPU copy).
        lm_layers: Override the language model's layer count (shorter, faster runs; the
            per-layer cost, hence the prefill ratio, is unchanged).
        seed: Seed of the weight initialisation.

    Returns:
        The model in eval mode, SDPA attention in both towers, with the LLaVA-1.5 feature
        settings (``vision_feature_layer=-2``, ``default`` select strategy).

    Raises:
        ConfigError: Unknown preset, or ``lm_layers`` is not a positive int.

    Examples:
        >>> model = build_preset("tiny", lm_layers=1)
        >>> model.config.text_config.num_hidden_layers, model.config.image_seq_length
        (1, 256)
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    preset = _get_preset(name)
    text = dict(preset.text)
    if lm_layers is not None:
        if isinstance(lm_layers, bool) or not isinstance(lm_layers, int) or lm_layers < 1:
            raise ConfigError(f"lm_layers must be a positive int, got {lm_layers!r}")
        text["num_hidden_layers"] = lm_layers
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**preset.vision),
        text_config=LlamaConfig(**text),
        image_token_index=preset.image_token_id,
        image_seq_length=preset_visual_tokens(name),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        llava: Any = LlavaForConditionalGeneration  # _from_config is untyped
        model: nn.Module = llava._from_config(
            copy.deepcopy(config),
            attn_implementation=ATTN_IMPLEMENTATION,
            dtype=dtype or torch.float32,
        )
    return model.eval()


def load_pretrained(
    name_or_path: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """Load a checkpoint with ``transformers.AutoModelForImageTextToText`` (SDPA attention).

    Args:
        name_or_path: A local directory or a hub id (a hub id needs network access or a
            cached download).
        dtype: Parameter dtype (default float32).
        device: Where the model is moved.

    Returns:
        The model in eval mode.

    Raises:
        ConfigError: transformers cannot load it.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        model: nn.Module = AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=dtype or torch.float32, attn_implementation=ATTN_IMPLEMENTATION
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"could not load model {name_or_path!r}: {exc}") from exc
    return model.to(device).eval()
