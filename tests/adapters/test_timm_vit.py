"""The timm ViT adapter: encoder-internal pruning of a tiny random classifier (``tiny_timm_vit``).

4 blocks, 32 px images with patch 8 (16 patch tokens), a class token and, where stated, a
register token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import pytest
import torch
from torch import nn

import tokenprune
from tokenprune.adapters.timm_vit import TimmViTAdapter
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.errors import AdapterError, CapabilityError
from tokenprune.pipeline import Pipeline
from tokenprune.plugin import Runtime
from tokenprune.stages.base import Scorer, StageConfig
from tokenprune.stages.scorers.cls_attention import ClsAttentionScorer
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.scorers.received_attention import ReceivedAttentionScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.testing.models import tiny_timm_vit

N = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> nn.Module:
    return tiny_timm_vit(reg_tokens=1)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class _ProbeConfig(StageConfig):
    name: Literal["timm_probe"] = "timm_probe"


class Probe(Scorer[_ProbeConfig]):
    """Scores with [CLS] and received attention of one block and records both."""

    name: ClassVar[str] = "timm_probe"
    Config: ClassVar[type[StageConfig]] = _ProbeConfig
    requires: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.VISION_BLOCK, Capability.CLS_ATTENTION, Capability.RECEIVED_ATTENTION}
    )

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.calls: list[dict[str, Any]] = []

    def vision_layers(self) -> frozenset[int]:
        return frozenset({self.layer})

    def score(self, ctx: PruneContext) -> torch.Tensor:
        self.calls.append(
            {
                "features": ctx.visual.features,
                "grid": ctx.visual.grid,
                "cls": ctx.cls_attention(self.layer),
                "received": ctx.received_attention(self.layer),
            }
        )
        return ctx.cls_attention(self.layer)


class Blocks:
    """Records the input of every block."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: dict[int, torch.Tensor] = {}
        self.handles = [
            block.register_forward_pre_hook(
                lambda m, args, i=i: self.inputs.__setitem__(i, args[0])
            )
            for i, block in enumerate(model.blocks)
        ]

    def __enter__(self) -> Blocks:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("reg_tokens", [0, 1])
@torch.no_grad()
def test_keep_all_equals_the_unpruned_model(reg_tokens: int, pixels: torch.Tensor) -> None:
    model = tiny_timm_vit(reg_tokens=reg_tokens)
    reference = model(pixels)
    pipeline = Pipeline(ClsAttentionScorer(layer=1), TopKSelector(), keep_ratio=1.0)
    with TimmViTAdapter(model).install(pipeline):
        torch.testing.assert_close(model(pixels), reference, rtol=0, atol=1e-6)


@torch.no_grad()
def test_prunes_patch_tokens_after_the_scored_block(model: nn.Module, pixels: torch.Tensor) -> None:
    reference = Blocks(model)
    with reference:
        logits_ref = model(pixels)
    pipeline = Pipeline(ClsAttentionScorer(layer=1), TopKSelector(), keep=4)
    with TimmViTAdapter(model).install(pipeline), Blocks(model) as seen:
        logits = model(pixels)
    assert logits.shape == logits_ref.shape == (3, 10)
    assert [seen.inputs[i].shape[1] for i in range(4)] == [2 + N, 2 + N, 2 + 4, 2 + 4]
    # blocks up to the pruning point are untouched; class and register tokens come through
    torch.testing.assert_close(seen.inputs[1], reference.inputs[1])
    after = reference.inputs[2]
    torch.testing.assert_close(seen.inputs[2][:, :2], after[:, :2])
    # the kept patches are the 4 with the highest [CLS] attention of block 1, in raster order
    probe = Probe(1)
    with TimmViTAdapter(model).install(Pipeline(probe, TopKSelector(), keep=4)):
        model(pixels)
    keep = probe.calls[0]["cls"].topk(4).indices.sort().values
    torch.testing.assert_close(
        seen.inputs[2][:, 2:], after[:, 2:].gather(1, keep[..., None].expand(-1, -1, 32))
    )
    assert probe.calls[0]["grid"] == (4, 4)


@pytest.mark.parametrize("layer", [0, 2])
@torch.no_grad()
def test_attention_equals_the_eager_attention_map(
    model: nn.Module, pixels: torch.Tensor, layer: int
) -> None:
    """[CLS] and received attention equal timm's own (non-fused) attention probabilities."""
    attn = model.blocks[layer].attn
    attn.fused_attn = False  # this instance only: timm then materialises the attention map
    probs: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda m, a, out: probs.append(out))
    probe = Probe(layer)
    try:
        with TimmViTAdapter(model).install(Pipeline(probe, TopKSelector(), keep_ratio=0.5)):
            model(pixels)
    finally:
        handle.remove()
    eager = probs[0]  # (B, H, 2 + N, 2 + N), the block's own softmax
    torch.testing.assert_close(probe.calls[0]["cls"], eager[:, :, 0, 2:].mean(1), atol=1e-6, rtol=0)
    received = eager.mean(1).mean(1)[:, 2:]  # heads, then all queries
    torch.testing.assert_close(probe.calls[0]["received"], received, atol=1e-6, rtol=0)


@torch.no_grad()
def test_apply_with_random_pruning_at_batch_3(model: nn.Module, pixels: torch.Tensor) -> None:
    cfg = {"scorer": {"name": "random"}, "selector": {"name": "topk"}, "keep_ratio": 0.25}
    with tokenprune.apply(model, cfg) as handle, Blocks(model) as seen:
        logits = model(pixels)
        assert isinstance(handle.adapter, TimmViTAdapter)
        assert handle.adapter.prune_block(handle.pipeline) == 2  # depth // 2: nothing is read
        assert "generate" not in vars(model)
    assert logits.shape == (3, 10)
    assert [seen.inputs[i].shape[1] for i in range(4)] == [2 + N, 2 + N, 2 + N, 2 + 4]
    assert not hasattr(model, "generate")


def test_the_pruning_point(model: nn.Module) -> None:
    adapter = TimmViTAdapter(model)
    assert adapter.prune_block(Pipeline(ClsAttentionScorer(layer=-2), TopKSelector(), keep=2)) == 2
    assert adapter.prune_block(Pipeline(RandomScorer(), TopKSelector(), keep=2)) == 2
    explicit = TimmViTAdapter(model, prune_after_block=-4)
    assert explicit.prune_block(Pipeline(RandomScorer(), TopKSelector(), keep=2)) == 0
    with pytest.raises(AdapterError, match="pruned after block 0"):
        explicit.install(Pipeline(ClsAttentionScorer(layer=1), TopKSelector(), keep=2))
    with pytest.raises(AdapterError, match="has 4 blocks"):
        TimmViTAdapter(model, prune_after_block=4)
    with pytest.raises(AdapterError, match="has 4 blocks"):
        adapter.install(Pipeline(ClsAttentionScorer(layer=7), TopKSelector(), keep=2))


def test_capabilities(pixels: torch.Tensor) -> None:
    no_cls = tiny_timm_vit(class_token=False, global_pool="avg")
    with pytest.raises(CapabilityError, match="received_attention"):
        TimmViTAdapter(no_cls).install(Pipeline(ClsAttentionScorer(), TopKSelector(), keep=2))
    pipeline = Pipeline(ReceivedAttentionScorer(layer=1), TopKSelector(), keep=3)
    with TimmViTAdapter(no_cls).install(pipeline), torch.no_grad():
        assert no_cls(pixels).shape == (3, 10)
    with pytest.raises(CapabilityError, match="'text_embeddings'"):
        TimmViTAdapter(no_cls).install(Pipeline(TextScorer(), TopKSelector(), keep=2))
    assert Runtime(autoload=False).resolve_adapter(no_cls) is TimmViTAdapter


class _TextConfig(StageConfig):
    name: Literal["needs_text"] = "needs_text"


class TextScorer(Scorer[_TextConfig]):
    name: ClassVar[str] = "needs_text"
    Config: ClassVar[type[StageConfig]] = _TextConfig
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.TEXT_EMBEDDINGS})

    def score(self, ctx: PruneContext) -> torch.Tensor:
        raise AssertionError("never runs")


def test_install_twice_and_remove(model: nn.Module, pixels: torch.Tensor) -> None:
    hooks = {name: dict(m._forward_hooks) for name, m in model.named_modules()}
    pre = {name: dict(m._forward_pre_hooks) for name, m in model.named_modules()}
    pipeline = Pipeline(ClsAttentionScorer(layer=1), TopKSelector(), keep=4)
    handle = TimmViTAdapter(model).install(pipeline)
    assert handle.hook_names == [
        "tokenprune.prune_visual_tokens",
        "tokenprune.capture_block_1",
        "tokenprune.prune_after_block_1",
    ]
    with pytest.raises(AdapterError, match="already has a tokenprune pipeline"):
        TimmViTAdapter(model).install(pipeline)
    handle.remove()
    assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == hooks
    assert {name: dict(m._forward_pre_hooks) for name, m in model.named_modules()} == pre


def test_attn_mask_is_refused(model: nn.Module, pixels: torch.Tensor) -> None:
    pipeline = Pipeline(RandomScorer(), TopKSelector(), keep=4)
    with TimmViTAdapter(model).install(pipeline), pytest.raises(AdapterError, match="attn_mask"):
        model(pixels, attn_mask=torch.zeros(18, 18, dtype=torch.bool))


def test_unsupported_block_type_is_named() -> None:
    from timm.models.vision_transformer import ResPostBlock

    model = tiny_timm_vit()
    model.blocks[1] = ResPostBlock(32, 2)
    with pytest.raises(AdapterError, match="ResPostBlock"):
        TimmViTAdapter(model).install(Pipeline(ClsAttentionScorer(layer=1), TopKSelector(), keep=2))
