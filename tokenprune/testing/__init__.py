"""Test kit for tokenprune and its plugin authors: tiny models and contract suites."""

from __future__ import annotations

from tokenprune.testing.contracts import check_stage, make_context, registered_stages
from tokenprune.testing.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, llava_prompts, tiny_llava

__all__ = [
    "IMAGE_TOKEN_ID",
    "PAD_TOKEN_ID",
    "check_stage",
    "llava_prompts",
    "make_context",
    "registered_stages",
    "tiny_llava",
]
