"""tokenprune.functional.query_row_attention against a naive per-sample, per-head reference."""

from __future__ import annotations

import math

import pytest
import torch

from tokenprune.errors import ShapeError
from tokenprune.functional import query_row_attention


def naive(
    query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """One sample and one head at a time, with Python loops over the keys."""
    b, heads, _ = query.shape
    kv_heads, t = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            logits = []
            for j in range(t):
                value = float(query[i, h].double() @ keys[i, h // group, j].double()) * scaling
                if mask is not None:
                    if mask.dtype == torch.bool:
                        value = value if bool(mask[i, j]) else -math.inf
                    else:
                        value += float(mask[i, j])
                logits.append(value)
            row = torch.tensor(logits, dtype=torch.float64)
            out[i] += torch.softmax(row, dim=0) / heads
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_matches_naive_reference(seed: int, kv_heads: int, mask_kind: str) -> None:
    g = torch.Generator().manual_seed(seed)
    b, heads, t, d = 3, 4, 11, 8
    query = torch.randn(b, heads, d, generator=g)
    keys = torch.randn(b, kv_heads, t, d, generator=g)
    mask: torch.Tensor | None = None
    if mask_kind == "bool":
        mask = torch.rand(b, t, generator=g) > 0.4
        mask[:, -1] = True  # every row attends to something
    elif mask_kind == "float":
        allowed = torch.rand(b, t, generator=g) > 0.4
        allowed[:, 0] = True
        mask = torch.zeros(b, t).masked_fill(~allowed, torch.finfo(torch.float32).min)
    scaling = 0.3 if seed % 2 else d**-0.5
    got = query_row_attention(query, keys, mask, scaling=None if seed % 2 == 0 else 0.3)
    expected = naive(query, keys, mask, scaling)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(b), rtol=0, atol=1e-6)


def test_half_precision_inputs_compute_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    query, keys = torch.randn(2, 2, 4, generator=g), torch.randn(2, 2, 6, 4, generator=g)
    got = query_row_attention(query.half(), keys.half())
    expected = naive(query.half().float(), keys.half().float(), None, 0.5)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("query", "keys", "mask", "match"),
    [
        ((2, 4), (2, 4, 5, 8), None, r"query must be \(B, H, d\)"),
        ((2, 4, 8), (3, 4, 5, 8), None, "do not fit the query"),
        ((2, 4, 8), (2, 4, 5, 6), None, "do not fit the query"),
        ((2, 4, 8), (2, 3, 5, 8), None, "not a multiple of 3 key heads"),
        ((2, 4, 8), (2, 4, 5, 8), (2, 4), r"mask must be \(B, T\)"),
    ],
)
def test_shape_errors(
    query: tuple[int, ...],
    keys: tuple[int, ...],
    mask: tuple[int, ...] | None,
    match: str,
) -> None:
    with pytest.raises(ShapeError, match=match):
        query_row_attention(
            torch.zeros(query),
            torch.zeros(keys),
            None if mask is None else torch.ones(mask, dtype=torch.bool),
        )


def test_a_row_without_any_allowed_key_is_an_error() -> None:
    mask = torch.tensor([[True, True], [False, False]])
    with pytest.raises(ShapeError, match="no key it may attend to"):
        query_row_attention(torch.zeros(2, 1, 4), torch.zeros(2, 1, 2, 4), mask)
