"""``received_attention``: chunked computation == a naive full-matrix reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tokenprune.errors import ShapeError
from tokenprune.functional import received_attention

Proj = Callable[[torch.Tensor], torch.Tensor]


def linear(width: int, out: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(width, out, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, width, generator=g, dtype=dtype) * width**-0.5)
        layer.bias.copy_(torch.randn(out, generator=g, dtype=dtype) * 0.1)
    return layer


def rope(num_tokens: int, head_dim: int, dtype: torch.dtype) -> Any:
    """A 1-D rotary embedding on the split heads ``(B, T, H, d)`` (rotate-half convention)."""
    inv = 1.0 / (100.0 ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    angles = torch.arange(num_tokens, dtype=dtype)[:, None] * inv
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None]  # (T, 1, d)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None]

    def half(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    def rotary(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q * cos + half(q) * sin, k * cos + half(k) * sin

    return rotary


def naive(
    normed: torch.Tensor,
    q_proj: Proj,
    k_proj: Proj,
    num_heads: int,
    num_prefix_tokens: int = 0,
    rotary: Any = None,
    segments: torch.Tensor | None = None,
    group_size: int = 1,
) -> torch.Tensor:
    """Full (B, H, T, T) attention with a segment mask, column mean per segment, group mean."""
    b, t, _ = normed.shape
    q = q_proj(normed).view(b, t, num_heads, -1)
    k = k_proj(normed).view(b, t, num_heads, -1)
    if rotary is not None:
        q, k = rotary(q, k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    seg = torch.zeros(t, dtype=torch.long) if segments is None else segments
    same = seg[:, None] == seg[None, :]
    attn = logits.masked_fill(~same, float("-inf")).softmax(-1)  # (B, H, T, T)
    queries_per_token = same.sum(0).to(attn.dtype)  # |S(j)|
    received = attn.mean(1).sum(1) / queries_per_token  # (B, T)
    out = received[:, num_prefix_tokens:]
    return out.reshape(b, -1, group_size).mean(-1)


CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"num_prefix_tokens": 2}, id="prefix"),
    pytest.param({"group_size": 4}, id="groups"),
    pytest.param({"rotary": True}, id="rotary"),
    pytest.param({"segments": "windows"}, id="segments"),
    pytest.param({"segments": "interleaved", "group_size": 2}, id="interleaved-segments"),
    pytest.param(
        {"num_prefix_tokens": 1, "rotary": True, "segments": "windows", "group_size": 3},
        id="everything",
    ),
]


@pytest.mark.parametrize("options", CASES)
@pytest.mark.parametrize("chunk_size", [1, 5, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_the_naive_full_matrix(
    options: dict[str, Any], chunk_size: int, dtype: torch.dtype
) -> None:
    b, t, c, heads = 2, 25, 16, 4
    kwargs = dict(options)
    if kwargs.get("rotary"):
        kwargs["rotary"] = rope(t, c // heads, dtype)
    if kwargs.get("segments") == "windows":
        kwargs["segments"] = torch.tensor([0] * 7 + [1] * 12 + [2] * 6)
    elif kwargs.get("segments") == "interleaved":  # ids need not be contiguous or sorted
        kwargs["segments"] = torch.tensor([5, 3] * 12 + [5])
    prefix = kwargs.get("num_prefix_tokens", 0)
    group = kwargs.get("group_size", 1)
    t = prefix + (t - prefix) // group * group
    if kwargs.get("segments") is not None:
        kwargs["segments"] = kwargs["segments"][:t]
    normed = torch.randn(b, t, c, generator=torch.Generator().manual_seed(0), dtype=dtype)
    q, k = linear(c, c, 1, dtype), linear(c, c, 2, dtype)
    with torch.no_grad():
        got = received_attention(normed, q, k, num_heads=heads, chunk_size=chunk_size, **kwargs)
        want = naive(normed, q, k, heads, **kwargs)
    assert got.dtype == dtype
    assert got.shape == (b, (t - prefix) // group)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_each_segment_distributes_one_unit_of_attention() -> None:
    normed = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(3))
    segments = torch.tensor([0] * 5 + [1] * 15)
    q, k = linear(8, 8, 4), linear(8, 8, 5)
    with torch.no_grad():
        r = received_attention(normed, q, k, num_heads=2, segments=segments)
    torch.testing.assert_close(r[:, :5].sum(-1), torch.ones(3))
    torch.testing.assert_close(r[:, 5:].sum(-1), torch.ones(3))
    assert bool((r > 0).all())


def test_uniform_attention() -> None:
    eye = torch.nn.Identity()
    r = received_attention(torch.zeros(2, 6, 4), eye, eye, num_heads=2, num_prefix_tokens=2)
    torch.testing.assert_close(r, torch.full((2, 4), 1 / 6))


class _SoftmaxSizes(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.softmax, torch.Tensor.softmax):
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_never_holds_the_full_attention_map() -> None:
    normed = torch.randn(2, 40, 8)
    q, k = linear(8, 8, 6), linear(8, 8, 7)
    with torch.no_grad(), _SoftmaxSizes() as mode:
        received_attention(normed, q, k, num_heads=2, chunk_size=8)
    assert mode.shapes
    assert all(shape[-2] <= 8 for shape in mode.shapes)  # (B, H, chunk, T)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normed": torch.zeros(4, 8)}, "must be \\(B, T, C\\)"),
        ({"num_heads": 3}, "H \\* d"),
        ({"segments": torch.zeros(5, dtype=torch.long)}, "one id per token"),
        ({"group_size": 4}, "multiple of group_size=4"),
        ({"num_prefix_tokens": 6}, "positive multiple"),
        ({"chunk_size": 0}, "must be positive"),
    ],
)
def test_errors_name_the_problem(kwargs: dict[str, Any], message: str) -> None:
    eye = torch.nn.Identity()
    args: dict[str, Any] = {"normed": torch.zeros(1, 6, 8), "num_heads": 2, **kwargs}
    with pytest.raises(ShapeError, match=message):
        received_attention(args.pop("normed"), eye, eye, **args)
