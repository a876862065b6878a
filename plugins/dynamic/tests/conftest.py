"""Shared fixtures: one tiny LLaVA-1.5-shaped model and its paired CLIP, built once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tokenprune.testing import tiny_llava
from tokenprune.testing.clip import tiny_paired_clip


@pytest.fixture(scope="session")
def llava() -> Any:
    """A tiny ``LlavaForConditionalGeneration`` at LLaVA-1.5's token count (336 / 14 = 576)."""
    return tiny_llava(336, 14)


@pytest.fixture(scope="session")
def clip_dir(llava: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny ``CLIPModel`` + tokenizer whose vision weights are ``llava``'s."""
    path = tmp_path_factory.mktemp("paired_clip")
    tiny_paired_clip(llava, save_to=path)
    return path
