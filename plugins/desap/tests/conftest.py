"""Shared fixtures of the DeSAP tests: one tiny LLaVA-1.5-shaped model and its paired CLIP.

Building the models dominates the cost of these tests, so each is built once per session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tokenprune.testing import tiny_llava
from tokenprune.testing.clip import tiny_paired_clip, word_tokenizer
from tokenprune_desap.text_encoder import PairedTextEncoder

SMALL_DIM = 16
"""Width of the vision blocks of ``tokenprune.testing.make_context(..., dim=SMALL_DIM)``."""


@pytest.fixture(scope="session")
def llava() -> torch.nn.Module:
    """A tiny ``LlavaForConditionalGeneration`` at LLaVA-1.5's token count (336 / 14 = 576)."""
    return tiny_llava(336, 14)


@pytest.fixture(scope="session")
def clip_dir(llava: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny ``CLIPModel`` + tokenizer whose vision weights are ``llava``'s."""
    path = tmp_path_factory.mktemp("paired_clip")
    tiny_paired_clip(llava, save_to=path)
    return path


@pytest.fixture(scope="session")
def unpaired_clip_dir(llava: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``clip_dir`` but with fresh random vision weights (not ``llava``'s tower)."""
    path = tmp_path_factory.mktemp("unpaired_clip")
    tiny_paired_clip(llava, paired=False, save_to=path)
    return path


@pytest.fixture(scope="session")
def encoder(clip_dir: Path) -> PairedTextEncoder:
    """The paired text encoder loaded from ``clip_dir``, as the scorer loads it."""
    return PairedTextEncoder.from_pretrained(str(clip_dir))


@pytest.fixture(scope="session")
def small_encoder() -> PairedTextEncoder:
    """An in-memory CLIP text encoder whose vision width matches ``make_context(dim=16)``."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer: Any = word_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": SMALL_DIM,
            "intermediate_size": 2 * SMALL_DIM,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={
            "hidden_size": SMALL_DIM,
            "intermediate_size": 2 * SMALL_DIM,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        projection_dim=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIPModel(config).eval()
    return PairedTextEncoder(clip, tokenizer)
