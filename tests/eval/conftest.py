"""Fixtures shared by the evaluation tests: the tiny task and model of ``_tiny.py``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny() -> ModuleType:
    """The ``_tiny`` helper module (a tiny task and a counting tiny-LLaVA model)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module("_tiny")


@pytest.fixture(scope="module")
def model(tiny: ModuleType) -> Any:
    """A tiny LLaVA evaluation model, shared by the tests of one module."""
    return tiny.tiny_model()
