"""``find_image_spans`` and ``shrink_inputs`` on hand-made token ids (no model)."""

from __future__ import annotations

import pytest
import torch

from tokenprune.adapters._sequence import ImageSpan, find_image_spans, shrink_inputs
from tokenprune.errors import AdapterError

I = 9  # image placeholder id  # noqa: E741
P = 0  # padding id

# Row 0 is left padded and has one 4-token image; row 1 is full and has one 4-token image.
LEFT_IDS = torch.tensor([[P, P, 1, I, I, I, I, 5], [1, I, I, I, I, 6, 7, 8]])
LEFT_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
LEFT_SPANS = [ImageSpan(0, 3, 4), ImageSpan(1, 1, 4)]
KEEP = [torch.tensor([1, 3]), torch.tensor([0, 2])]


# -- find_image_spans ---------------------------------------------------------------------------
def test_one_span_per_image_row_major() -> None:
    assert find_image_spans(LEFT_IDS, I, [4, 4]) == LEFT_SPANS


def test_adjacent_images_are_cut_by_size_and_rows_may_have_none() -> None:
    ids = torch.tensor(
        [
            [1, 5, 6, 7, 8, 6, 7, 8, 2],  # no image
            [1, I, I, I, I, I, 5, I, I],  # two adjacent images (3 + 2), then one (2)
        ]
    )
    spans = find_image_spans(ids, I, [3, 2, 2])
    assert spans == [ImageSpan(1, 1, 3), ImageSpan(1, 4, 2), ImageSpan(1, 7, 2)]


def test_no_images_no_spans() -> None:
    assert find_image_spans(torch.tensor([[1, 5, 6]]), I, []) == []


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ([4], "more image placeholders than the 1 image"),
        ([4, 4, 4], r"found placeholders for 2 image\(s\) in input_ids but pixel_values hold 3"),
        ([5, 3], "a run of 4 image placeholder tokens at column 3 is shorter than the 5 tokens"),
    ],
)
def test_placeholders_must_match_the_images(sizes: list[int], match: str) -> None:
    with pytest.raises(AdapterError, match=match):
        find_image_spans(LEFT_IDS, I, sizes)


# -- shrink_inputs: ids, mask, padding ----------------------------------------------------------
def test_left_padding_is_rebuilt() -> None:
    out = shrink_inputs(LEFT_IDS, LEFT_MASK, LEFT_SPANS, KEEP, positions="contiguous")
    assert out.input_ids.tolist() == [[P, P, 1, I, I, 5], [1, I, I, 6, 7, 8]]
    assert out.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert out.position_ids is None  # the model numbers a contiguous sequence itself
    assert out.labels is None
    assert [c.tolist() for c in out.kept_columns] == [[2, 3, 4, 7], [0, 1, 2, 5, 6, 7]]


def test_right_padding_is_rebuilt_on_the_right() -> None:
    ids = torch.tensor([[1, I, I, I, I, 5, P, P], [1, I, I, I, I, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    spans = find_image_spans(ids, I, [4, 4])
    out = shrink_inputs(
        ids,
        mask,
        spans,
        [torch.tensor([0, 3]), torch.tensor([1, 2])],
        positions="contiguous",
        pad_token_id=P,
    )
    assert out.input_ids.tolist() == [[1, I, I, 5, P, P], [1, I, I, 6, 7, 8]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


def test_old_padding_does_not_keep_the_batch_long() -> None:
    # Row 0 has no image and is padded; row 1 loses 3 of its 4 image tokens.
    ids = torch.tensor([[P, P, P, 1, 5, 6], [1, I, I, I, I, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = shrink_inputs(
        ids, mask, [ImageSpan(1, 1, 4)], [torch.tensor([2])], positions="contiguous", pad_token_id=P
    )
    assert out.input_ids.tolist() == [[1, 5, 6], [1, I, 7]]
    assert out.attention_mask.tolist() == [[1, 1, 1], [1, 1, 1]]


def test_unpadded_batch_is_padded_left() -> None:
    ids = torch.tensor([[1, I, I, 5], [1, 5, 6, 7]])
    mask = torch.ones_like(ids)
    out = shrink_inputs(
        ids, mask, [ImageSpan(0, 1, 2)], [torch.tensor([1])], positions="contiguous", pad_token_id=P
    )
    assert out.input_ids.tolist() == [[P, 1, I, 5], [1, 5, 6, 7]]
    assert out.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]


def test_pad_token_id_fills_new_padding() -> None:
    out = shrink_inputs(
        LEFT_IDS, LEFT_MASK, LEFT_SPANS, KEEP, positions="contiguous", pad_token_id=77
    )
    assert out.input_ids[0, :2].tolist() == [77, 77]


def test_labels_shrink_with_ids_and_pad_with_ignore_index() -> None:
    labels = torch.tensor(
        [[-100, -100, 1, -100, -100, -100, -100, 5], [1, -100, -100, -100, -100, 6, 7, 8]]
    )
    out = shrink_inputs(
        LEFT_IDS, LEFT_MASK, LEFT_SPANS, KEEP, positions="contiguous", labels=labels
    )
    assert out.labels is not None
    assert out.labels.tolist() == [[-100, -100, 1, -100, -100, 5], [1, -100, -100, 6, 7, 8]]


# -- shrink_inputs: position ids ----------------------------------------------------------------
def test_original_positions_forward_numbering() -> None:
    """``arange``: what a forward pass uses (padding columns count)."""
    out = shrink_inputs(
        LEFT_IDS, LEFT_MASK, LEFT_SPANS, KEEP, positions="original", default_positions="arange"
    )
    assert out.position_ids is not None
    # Row 0 keeps BOS (col 2), image tokens 1 and 3 (cols 4, 6), text (col 7).
    assert out.position_ids[0, 2:].tolist() == [2, 4, 6, 7]
    assert out.position_ids[1].tolist() == [0, 1, 3, 5, 6, 7]


def test_original_positions_generate_numbering() -> None:
    """``cumsum``: what ``generate`` uses (numbering starts at the first real token)."""
    out = shrink_inputs(
        LEFT_IDS, LEFT_MASK, LEFT_SPANS, KEEP, positions="original", default_positions="cumsum"
    )
    assert out.position_ids is not None
    assert out.position_ids[0, 2:].tolist() == [0, 2, 4, 5]
    assert out.position_ids[1].tolist() == [0, 1, 3, 5, 6, 7]


def test_original_positions_with_a_cache_offset() -> None:
    out = shrink_inputs(LEFT_IDS, LEFT_MASK, LEFT_SPANS, KEEP, positions="original", past_length=10)
    assert out.position_ids is not None
    assert out.position_ids[1].tolist() == [10, 11, 13, 15, 16, 17]


def test_original_positions_gather_explicit_position_ids() -> None:
    given = torch.arange(8).expand(2, 8) * 10
    out = shrink_inputs(
        LEFT_IDS, LEFT_MASK, LEFT_SPANS, KEEP, positions="original", position_ids=given
    )
    assert out.position_ids is not None
    assert out.position_ids[0, 2:].tolist() == [20, 40, 60, 70]
    assert out.position_ids[1].tolist() == [0, 10, 30, 50, 60, 70]


def test_contiguous_positions_renumber_explicit_position_ids() -> None:
    given = (LEFT_MASK.cumsum(-1) - 1).clamp(min=0)
    out = shrink_inputs(
        LEFT_IDS, LEFT_MASK, LEFT_SPANS, KEEP, positions="contiguous", position_ids=given
    )
    assert out.position_ids is not None
    assert out.position_ids[0, 2:].tolist() == [0, 1, 2, 3]
    assert out.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5]


def test_multi_axis_position_ids_keep_their_leading_dimension() -> None:
    given = torch.stack([torch.arange(8).expand(2, 8), 100 + torch.arange(8).expand(2, 8)])
    out = shrink_inputs(
        LEFT_IDS, LEFT_MASK, LEFT_SPANS, KEEP, positions="original", position_ids=given
    )
    assert out.position_ids is not None
    assert out.position_ids.shape == (2, 2, 6)
    assert out.position_ids[1, 1].tolist() == [100, 101, 103, 105, 106, 107]


def test_keeping_everything_is_the_identity() -> None:
    keep_all = [torch.arange(4), torch.arange(4)]
    out = shrink_inputs(
        LEFT_IDS, LEFT_MASK, LEFT_SPANS, keep_all, positions="original", default_positions="arange"
    )
    assert torch.equal(out.input_ids, LEFT_IDS)
    assert torch.equal(out.attention_mask, LEFT_MASK)
    assert out.position_ids is not None
    assert out.position_ids[1].tolist() == list(range(8))


def test_inputs_are_not_modified() -> None:
    ids, mask = LEFT_IDS.clone(), LEFT_MASK.clone()
    shrink_inputs(ids, mask, LEFT_SPANS, KEEP, positions="original")
    assert torch.equal(ids, LEFT_IDS)
    assert torch.equal(mask, LEFT_MASK)
