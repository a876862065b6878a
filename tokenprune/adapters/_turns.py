"""Multi-turn chats: continuing a pruned model's ``generate`` from the cache of an earlier turn.

A pruned prefill leaves a *pruned* conversation in the KV cache, while the caller only ever sees
the unpruned one (``generate`` returns the prompt as it was passed). A follow-up turn is built the
usual way, ``torch.cat([output.sequences, follow_up_ids], dim=1)`` with the same cache, so its
prefix has to be mapped back onto what the cache holds. :class:`TurnMemory` remembers, per cache
object, the last prompt and its pruned form; the two policies of
:attr:`tokenprune.PipelineConfig.follow_up` then build the call:

* ``reuse``: keep the first turn's selection. The cached prefix stays valid; only the new tokens
  (the last answer and the follow-up question) are run.
* ``rescore``: prune the image again, guided by the whole new conversation (new question
  included). The cache is cropped to the longest prefix that cannot depend on the image (text
  before the first image placeholder that is identical in both pruned prompts) and the rest is
  prefilled again.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tokenprune.errors import AdapterError

__all__ = [
    "FollowUp",
    "Turn",
    "TurnMemory",
    "cached_length",
    "continue_with_selection",
    "placeholder_ids",
    "reusable_prefix",
]

FollowUp = Literal["reuse", "rescore"]

_BUILD_HINT = (
    "build the follow-up as torch.cat([output.sequences, follow_up_ids], dim=1) (and the "
    "attention mask likewise) and pass the same cache"
)


@dataclass(frozen=True)
class Turn:
    """A prompt as the caller passed it and as it was run (pruned).

    Args:
        prompt_ids: The caller's token ids.
        prompt_mask: The caller's attention mask (ones if none was passed).
        pruned_ids: The ids the language model ran.
        pruned_mask: Their attention mask.
        pruned_positions: Their explicit position ids, or ``None`` where the model derived them.

    Shape:
        - prompt_ids, prompt_mask: :math:`(B, L)`
        - pruned_ids, pruned_mask: :math:`(B, L')`
        - pruned_positions: :math:`(B, L')` or :math:`(C, B, L')`
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    pruned_ids: torch.Tensor
    pruned_mask: torch.Tensor
    pruned_positions: torch.Tensor | None


class TurnMemory:
    """The last :class:`Turn` run into each cache object (weakly keyed: caches are not kept alive).

    Examples:
        >>> from transformers import DynamicCache
        >>> memory, cache = TurnMemory(), DynamicCache()
        >>> ids = torch.ones(1, 3, dtype=torch.long)
        >>> memory.remember(cache, Turn(ids, ids, ids, ids, None))
        >>> memory.recall(cache).prompt_ids.shape
        torch.Size([1, 3])
    """

    def __init__(self) -> None:
        self._turns: weakref.WeakKeyDictionary[Any, Turn] = weakref.WeakKeyDictionary()

    def remember(self, cache: Any, turn: Turn) -> None:
        """Record ``turn`` as the latest content of ``cache``."""
        self._turns[cache] = turn

    def recall(self, cache: Any) -> Turn | None:
        """The latest turn run into ``cache``, or ``None`` if this installation never filled it."""
        return self._turns.get(cache)

    def __len__(self) -> int:
        return len(self._turns)


def cached_length(cache: Any) -> int:
    """Tokens already in ``cache`` (0 for ``None`` or an empty cache)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def placeholder_ids(config: Any) -> frozenset[int]:
    """Image/video placeholder token ids named by a model config (top level attributes)."""
    names = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")
    found = (getattr(config, name, None) for name in names)
    return frozenset(int(v) for v in found if isinstance(v, int))


def _check_prefix(turn: Turn, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    length = turn.prompt_ids.shape[1]
    if input_ids.shape[0] != turn.prompt_ids.shape[0]:
        raise AdapterError(
            f"the follow-up has {input_ids.shape[0]} rows but the cached conversation "
            f"{turn.prompt_ids.shape[0]}; {_BUILD_HINT}"
        )
    same = input_ids.shape[1] > length and bool(
        torch.equal(input_ids[:, :length], turn.prompt_ids.to(input_ids.device))
        and torch.equal(
            attention_mask[:, :length].long(), turn.prompt_mask.to(attention_mask.device).long()
        )
    )
    if not same:
        raise AdapterError(
            "the cache holds a pruned conversation, but input_ids/attention_mask do not "
            f"start with its prompt (and add new tokens); {_BUILD_HINT}"
        )


def continue_with_selection(
    turn: Turn,
    kwargs: Mapping[str, Any],
    placeholders: Collection[int],
    *,
    drop: Collection[str],
) -> tuple[dict[str, Any], Turn]:
    """Build a follow-up ``generate`` call that re-uses the cached selection (policy ``reuse``).

    The caller's prefix (the previous prompt) is replaced by its pruned form; the new tokens
    follow unchanged. Explicit position ids (policy ``original``) continue by one per token, as
    ``generate`` numbers generated tokens.

    Args:
        turn: What the cache holds.
        kwargs: The caller's ``generate`` keyword arguments (with ``input_ids``).
        placeholders: Image/video placeholder ids, refused in the new tokens.
        drop: Raw vision inputs to leave out (the image is in the cache already).

    Returns:
        ``(kwargs for the model's own generate, the turn to remember once it returns)``.

    Raises:
        AdapterError: If the call does not continue the cached conversation, brings a new image,
            or passes its own position ids.
    """
    input_ids: torch.Tensor = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if mask is None else mask
    if kwargs.get("position_ids") is not None:
        raise AdapterError(
            "position_ids cannot be passed to a follow-up turn of a pruned model; the cached "
            "positions are continued automatically"
        )
    _check_prefix(turn, input_ids, attention_mask)
    length = turn.prompt_ids.shape[1]
    new_ids, new_mask = input_ids[:, length:], attention_mask[:, length:]
    if placeholders and bool(torch.isin(new_ids, torch.tensor(sorted(placeholders))).any()):
        raise AdapterError(
            "the follow-up brings new image/video placeholders; a new image needs a new "
            "conversation (call generate without a cache)"
        )
    device = turn.pruned_ids.device
    ids = torch.cat([turn.pruned_ids, new_ids.to(device)], dim=1)
    out_mask = torch.cat([turn.pruned_mask, new_mask.to(device).to(turn.pruned_mask.dtype)], 1)
    out = {k: v for k, v in kwargs.items() if k not in set(drop)}
    out["input_ids"] = ids
    out["attention_mask"] = out_mask
    positions = None
    if turn.pruned_positions is not None:
        last = turn.pruned_positions[..., -1:]
        steps = torch.arange(1, new_ids.shape[1] + 1, device=last.device)
        positions = torch.cat([turn.pruned_positions, last + steps], dim=-1)
        out["position_ids"] = positions
    else:
        out.pop("position_ids", None)
    return out, Turn(input_ids, attention_mask, ids, out_mask, positions)


def reusable_prefix(turn: Turn, pruned: Mapping[str, Any], placeholders: Collection[int]) -> int:
    """Cached tokens still valid after re-pruning (policy ``rescore``).

    That is the longest prefix on which the old and the new pruned prompts agree in ids, mask
    and explicit positions, cut before the first image/video placeholder of any row (whose
    features changed).

    Args:
        turn: What the cache holds.
        pruned: The re-pruned call (``input_ids``, ``attention_mask``, maybe ``position_ids``).
        placeholders: Image/video placeholder ids.

    Returns:
        The number of leading cache entries to keep.
    """
    old_ids, new_ids = turn.pruned_ids, pruned["input_ids"].to(turn.pruned_ids.device)
    width = min(old_ids.shape[1], new_ids.shape[1])
    agree = (old_ids[:, :width] == new_ids[:, :width]).all(0)
    new_mask = pruned["attention_mask"].to(old_ids.device)
    agree &= (turn.pruned_mask[:, :width].long() == new_mask[:, :width].long()).all(0)
    new_pos = pruned.get("position_ids")
    if (turn.pruned_positions is None) != (new_pos is None):
        return 0
    if turn.pruned_positions is not None and new_pos is not None:
        old_pos = turn.pruned_positions[..., :width]
        agree &= (old_pos == new_pos[..., :width].to(old_pos.device)).flatten(0, -2).all(0)
    if placeholders:
        is_placeholder = torch.isin(old_ids[:, :width], torch.tensor(sorted(placeholders)))
        agree &= ~is_placeholder.any(0).cumsum(0).bool()
    disagree = torch.nonzero(~agree).flatten()
    return int(disagree[0]) if disagree.numel() else width
