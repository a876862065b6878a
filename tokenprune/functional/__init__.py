"""Pure tensor functions: the functional core behind every built-in stage.

Everything here takes and returns tensors (or plain numbers), keeps no state and never touches a
model, so it can be used on bare tensors and tested against naive reference implementations.
"""

from __future__ import annotations

from tokenprune.functional.attention import cls_attention
from tokenprune.functional.checks import check_features, check_scores
from tokenprune.functional.fastv import query_row_attention
from tokenprune.functional.received import Rotary, received_attention
from tokenprune.functional.selection import (
    resolve_budget,
    sorted_keep_indices,
    topk_keep_indices,
)
from tokenprune.functional.tokens import gather_tokens, random_scores

__all__ = [
    "Rotary",
    "check_features",
    "check_scores",
    "cls_attention",
    "gather_tokens",
    "query_row_attention",
    "random_scores",
    "received_attention",
    "resolve_budget",
    "sorted_keep_indices",
    "topk_keep_indices",
]
