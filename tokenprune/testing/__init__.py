"""Test kit for tokenprune and its plugin authors: tiny models and contract suites."""

from __future__ import annotations

from tokenprune.testing.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, llava_prompts, tiny_llava

__all__ = ["IMAGE_TOKEN_ID", "PAD_TOKEN_ID", "llava_prompts", "tiny_llava"]
