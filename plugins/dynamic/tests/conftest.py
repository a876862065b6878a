"""Shared fixtures: one tiny LLaVA-1.5-shaped model and its paired CLIP, built once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenprune.testing import tiny_llava
from tokenprune.testing.clip import tiny_paired_clip

REFERENCE = "tokenprune_dynamic_tests_reference"
"""Module name of the naive references in ``_reference.py``, importable by the test modules
(pytest runs this conftest first; a sibling import would not work in importlib mode)."""

if REFERENCE not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        REFERENCE, Path(__file__).with_name("_reference.py")
    )
    assert _spec is not None
    assert _spec.loader is not None
    sys.modules[REFERENCE] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[REFERENCE])


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
