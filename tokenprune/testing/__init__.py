"""Test kit for tokenprune and its plugin authors: tiny models and contract suites."""

from __future__ import annotations

from tokenprune.testing.adapter_contract import (
    CONTRACT_CHECKS,
    AdapterCase,
    AdapterContractError,
    check_capabilities,
    check_equivalence_at_full_budget,
    check_generate,
    check_restore,
    check_sequence_shortened,
)
from tokenprune.testing.contracts import check_stage, make_context, registered_stages
from tokenprune.testing.models import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VIDEO_TOKEN_ID,
    llava_next_prompts,
    llava_next_tokens_per_image,
    llava_prompts,
    tiny_llava,
    tiny_llava_next,
    tiny_video_llava,
    video_llava_prompts,
)

__all__ = [
    "IMAGE_TOKEN_ID",
    "PAD_TOKEN_ID",
    "check_stage",
    "llava_prompts",
    "make_context",
    "registered_stages",
    "tiny_llava",
    "AdapterCase",
    "AdapterContractError",
    "CONTRACT_CHECKS",
    "check_capabilities",
    "check_equivalence_at_full_budget",
    "check_generate",
    "check_restore",
    "check_sequence_shortened",
    "VIDEO_TOKEN_ID",
    "llava_next_prompts",
    "llava_next_tokens_per_image",
    "tiny_llava_next",
    "tiny_video_llava",
    "video_llava_prompts",
]
