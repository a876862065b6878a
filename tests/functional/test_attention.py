from __future__ import annotations

from typing import Any

import pytest
import torch

from tokenprune.errors import ShapeError
from tokenprune.functional import cls_attention

NUM_HEADS = 4


@pytest.fixture(scope="module")
def clip_eager() -> tuple[Any, Any]:
    """A tiny CLIP vision tower on eager attention and one forward pass with its attentions."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=NUM_HEADS,
        image_size=16,
        patch_size=4,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPVisionModel._from_config(config, attn_implementation="eager").eval()
        pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    return model, out


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_cls_attention_equals_the_eager_cls_row(clip_eager: tuple[Any, Any], layer: int) -> None:
    model, out = clip_eager
    block = model.encoder.layers[layer]
    hidden = out.hidden_states[layer]  # the input of block `layer`
    assert hidden.shape == (2, 17, 32)  # [CLS] + 4x4 patches
    with torch.no_grad():
        ours = cls_attention(
            block.layer_norm1(hidden),
            block.self_attn.q_proj,
            block.self_attn.k_proj,
            num_heads=NUM_HEADS,
        )
    reference = out.attentions[layer][:, :, 0, 1:].mean(dim=1)
    assert ours.shape == (2, 16)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_cls_attention_without_prefix_is_a_distribution(clip_eager: tuple[Any, Any]) -> None:
    model, out = clip_eager
    block = model.encoder.layers[0]
    with torch.no_grad():
        full = cls_attention(
            block.layer_norm1(out.hidden_states[0]),
            block.self_attn.q_proj,
            block.self_attn.k_proj,
            num_heads=NUM_HEADS,
            num_prefix_tokens=0,
        )
    assert full.shape == (2, 17)
    torch.testing.assert_close(full.sum(-1), torch.ones(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(full, out.attentions[0][:, :, 0, :].mean(dim=1), atol=1e-6, rtol=0)


def test_cls_attention_runs_in_float32_for_low_precision_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 8, generator=g)
    eye = torch.nn.Identity()
    low = cls_attention(x.to(torch.bfloat16), eye, eye, num_heads=2)
    assert low.dtype == torch.float32
    torch.testing.assert_close(
        low, cls_attention(x.to(torch.bfloat16).float(), eye, eye, num_heads=2)
    )


def test_cls_attention_matches_a_per_head_loop() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 8, generator=g)
    wq, wk = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    out = cls_attention(x, lambda t: t @ wq, lambda t: t @ wk, num_heads=2, num_prefix_tokens=1)
    q, k = x @ wq, x @ wk
    rows = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        head = torch.einsum("bd,btd->bt", q[:, 0, sl], k[:, :, sl]) / 2.0  # sqrt(head_dim = 4)
        rows.append(head.softmax(-1)[:, 1:])
    torch.testing.assert_close(out, torch.stack(rows).mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("shape", "heads", "match"),
    [
        ((5, 8), 2, r"normed hidden state must be \(B, T, C\), got \(5, 8\)"),
        ((1, 5, 8), 3, r"hidden width 8 is not divisible by num_heads=3"),
    ],
)
def test_cls_attention_errors(shape: tuple[int, ...], heads: int, match: str) -> None:
    eye = torch.nn.Identity()
    with pytest.raises(ShapeError, match=match):
        cls_attention(torch.zeros(shape), eye, eye, num_heads=heads)
