"""Shrinking a batch of token sequences after visual tokens were pruned.

Model-independent: works on ``input_ids`` with runs of an image placeholder token, and rebuilds
``input_ids``, ``attention_mask``, ``labels`` and position ids consistently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tokenprune.errors import AdapterError

__all__ = ["ImageSpan", "ShrunkInputs", "find_image_spans", "shrink_inputs"]


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's placeholder tokens sit: row ``row``, columns ``start .. start+length``."""

    row: int
    start: int
    length: int


def find_image_spans(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_image: Sequence[int]
) -> list[ImageSpan]:
    """Locate each image's placeholder span, in the order the model fills them (row-major).

    Consecutive images without a separator form one run; the run is cut into the images' sizes.

    Args:
        input_ids: Token ids.
        image_token_id: The placeholder id.
        tokens_per_image: Placeholder count of each image, in order.

    Raises:
        AdapterError: If the placeholders do not match the images (count or run lengths).

    Shape:
        - input_ids: :math:`(B, L)`
    """
    spans: list[ImageSpan] = []
    sizes = list(tokens_per_image)
    is_img = input_ids == image_token_id
    for row in range(input_ids.shape[0]):
        cols = torch.nonzero(is_img[row]).flatten().tolist()
        i = 0
        while i < len(cols):
            j = i
            while j + 1 < len(cols) and cols[j + 1] == cols[j] + 1:
                j += 1
            start, run = cols[i], j - i + 1
            while run > 0:
                if len(spans) >= len(sizes):
                    raise AdapterError(
                        f"input_ids hold more image placeholders than the {len(sizes)} image(s) "
                        "in pixel_values; build prompts with the model's processor"
                    )
                size = sizes[len(spans)]
                if size > run:
                    raise AdapterError(
                        f"row {row}: a run of {run} image placeholder tokens at column {start} is "
                        f"shorter than the {size} tokens of image {len(spans)}; the prompt must "
                        "contain each image's full placeholder span (see the processor)"
                    )
                spans.append(ImageSpan(row, start, size))
                start += size
                run -= size
            i = j + 1
    if len(spans) != len(sizes):
        raise AdapterError(
            f"found placeholders for {len(spans)} image(s) in input_ids but pixel_values hold "
            f"{len(sizes)}; each image needs its own placeholder span"
        )
    return spans


@dataclass(frozen=True)
class ShrunkInputs:
    """The pruned batch. ``position_ids`` is ``None`` when the model may derive them itself."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    position_ids: torch.Tensor | None
    kept_columns: list[torch.Tensor]

    def apply(
        self, kwargs: Mapping[str, Any], *, drop: Iterable[str], encoder_outputs: Any
    ) -> dict[str, Any]:
        """The call's keyword arguments with the pruned batch written in.

        ``drop`` names the raw vision inputs that ``encoder_outputs`` replaces (passed on as
        ``mm_encoder_outputs``); ``position_ids`` are set, or removed when the model derives them.
        """
        out = {k: v for k, v in kwargs.items() if k not in set(drop)}
        out["mm_encoder_outputs"] = encoder_outputs
        out["input_ids"] = self.input_ids
        out["attention_mask"] = self.attention_mask
        if self.labels is not None:
            out["labels"] = self.labels
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        else:
            out.pop("position_ids", None)
        return out


def shrink_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    spans: Sequence[ImageSpan],
    keep_idx: Sequence[torch.Tensor],
    *,
    positions: Literal["contiguous", "original"],
    position_ids: torch.Tensor | None = None,
    default_positions: Literal["arange", "cumsum"] = "arange",
    past_length: int = 0,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> ShrunkInputs:
    """Drop the placeholders of pruned tokens and rebuild masks, labels and positions.

    Each image keeps the first ``K_i`` placeholders of its span (the features fill them in
    order). The old edge padding is dropped and the rows are re-padded to the longest remaining
    row, on the side the batch was padded on (left if no row is padded).

    Position ids: the unpruned positions are ``position_ids`` if given, else what the model
    would derive (``arange``: ``past_length + 0..L-1``, as a forward pass does; ``cumsum``: from
    the attention mask, as ``generate`` does). Under ``original`` each kept token takes the
    unpruned position of its source token (image token ``j`` kept from index ``keep_idx[j]``
    takes the position of column ``start + keep_idx[j]``), so gaps remain. Under
    ``contiguous`` positions are renumbered without gaps; ``None`` is returned when the model's
    own default gives exactly that.

    Args:
        input_ids: Token ids.
        attention_mask: 1 for real tokens.
        spans: One span per image (see :func:`find_image_spans`).
        keep_idx: Kept token indices of each image, ascending.
        positions: Position policy.
        position_ids: Explicit unpruned position ids, if the caller passed any.
        default_positions: How the model derives missing position ids.
        past_length: Tokens already in the cache (offset of ``arange`` positions).
        labels: Optional labels, shrunk like ``input_ids`` (padding is ``-100``).
        pad_token_id: Id used to pad re-padded rows.

    Shape:
        - input_ids, attention_mask, labels: :math:`(B, L)` -> :math:`(B, L')`
        - position_ids: :math:`(B, L)` or :math:`(C, B, L)` -> same leading dims, :math:`L'`
    """
    b, length = input_ids.shape
    device = input_ids.device
    dropped = torch.zeros(b, length, dtype=torch.bool, device=device)
    source = torch.arange(length, device=device).expand(b, length).clone()
    for span, idx in zip(spans, keep_idx, strict=True):
        k = int(idx.numel())
        dropped[span.row, span.start + k : span.start + span.length] = True
        source[span.row, span.start : span.start + k] = span.start + idx.to(device)
    # The old edge padding goes too (it is rebuilt below), so rows that lose few or no tokens
    # do not keep the batch at its old length.
    real = attention_mask.long()
    edge_pad = (real.cumsum(-1) == 0) | (real.flip(-1).cumsum(-1).flip(-1) == 0)
    keep_cols = ~dropped & ~edge_pad
    if position_ids is None:
        if default_positions == "arange":
            base = torch.arange(length, device=device).expand(b, length) + past_length
        else:
            base = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    else:
        base = position_ids
    removed_before = dropped.long().cumsum(-1)

    pad_left = _pads_left(attention_mask)
    counts = keep_cols.sum(-1)
    new_len = int(counts.max())
    out_ids = torch.full((b, new_len), pad_token_id, dtype=input_ids.dtype, device=device)
    out_mask = torch.zeros((b, new_len), dtype=attention_mask.dtype, device=device)
    out_labels = None if labels is None else torch.full_like(out_ids, -100, dtype=labels.dtype)
    pos_shape = (*base.shape[:-2], b, new_len)
    out_pos = torch.zeros(pos_shape, dtype=torch.long, device=device)
    kept_columns = []
    for row in range(b):
        cols = torch.nonzero(keep_cols[row]).flatten()
        kept_columns.append(cols)
        n = cols.numel()
        sl = slice(new_len - n, new_len) if pad_left else slice(0, n)
        out_ids[row, sl] = input_ids[row, cols]
        out_mask[row, sl] = attention_mask[row, cols]
        if out_labels is not None and labels is not None:
            out_labels[row, sl] = labels[row, cols]
        if positions == "original":
            out_pos[..., row, sl] = base[..., row, :].index_select(-1, source[row, cols])
        else:
            out_pos[..., row, sl] = base[..., row, cols] - removed_before[row, cols]
    model_default = positions == "contiguous" and position_ids is None
    return ShrunkInputs(
        input_ids=out_ids,
        attention_mask=out_mask,
        labels=out_labels,
        position_ids=None if model_default else out_pos,
        kept_columns=kept_columns,
    )


def _pads_left(attention_mask: torch.Tensor) -> bool:
    padded = attention_mask == 0
    if not bool(padded.any()):
        return True
    return bool(padded[:, 0].any()) or not bool(padded[:, -1].any())
