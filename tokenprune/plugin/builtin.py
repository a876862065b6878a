"""The built-in plugin: registers the baseline stages, the bundled adapters and the presets."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from tokenprune.plugin.spec import hookimpl

if TYPE_CHECKING:
    from torch import nn

    from tokenprune.adapters.base import ModelAdapter
    from tokenprune.registry import AdapterRegistry, PresetRegistry, StageRegistry

__all__ = ["BUILTIN_PLUGINS"]

BUILTIN_PLUGINS: dict[str, str] = {"builtin": "tokenprune.plugin.builtin"}
"""Plugin name -> module, registered by every runtime before any entry point."""


@hookimpl
def tokenprune_register_stages(registry: StageRegistry) -> None:
    from tokenprune.stages.mergers.drop import DropMerger
    from tokenprune.stages.mergers.pool import PoolMerger
    from tokenprune.stages.mergers.prumerge import PruMergeMerger
    from tokenprune.stages.mergers.tome import ToMeMerger
    from tokenprune.stages.mergers.visionzip import VisionZipMerger
    from tokenprune.stages.scorers.cls_attention import ClsAttentionScorer
    from tokenprune.stages.scorers.combine import CombineScorer
    from tokenprune.stages.scorers.fastv import FastVScorer
    from tokenprune.stages.scorers.random import RandomScorer
    from tokenprune.stages.scorers.received_attention import ReceivedAttentionScorer
    from tokenprune.stages.scorers.uniform import UniformScorer
    from tokenprune.stages.selectors.divprune import DivPruneSelector
    from tokenprune.stages.selectors.pool import PoolSelector
    from tokenprune.stages.selectors.prumerge import PruMergeSelector
    from tokenprune.stages.selectors.tome import ToMeSelector
    from tokenprune.stages.selectors.topk import TopKSelector
    from tokenprune.stages.selectors.visionzip import VisionZipSelector

    for stage in (
        ClsAttentionScorer,
        RandomScorer,
        ReceivedAttentionScorer,
        TopKSelector,
        DropMerger,
        # Method baselines (docs/methods/): selectors and their mergers, and score fusion.
        UniformScorer,
        CombineScorer,
        FastVScorer,
        VisionZipSelector,
        VisionZipMerger,
        PruMergeSelector,
        PruMergeMerger,
        DivPruneSelector,
        ToMeSelector,
        ToMeMerger,
        PoolSelector,
        PoolMerger,
    ):
        registry.add(stage)


@hookimpl
def tokenprune_register_adapters(registry: AdapterRegistry) -> None:
    from tokenprune.adapters.llava import LlavaAdapter
    from tokenprune.adapters.llava_next import LlavaNextAdapter
    from tokenprune.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
    from tokenprune.adapters.timm_vit import TimmViTAdapter
    from tokenprune.adapters.video_llava import VideoLlavaAdapter

    registry.add(LlavaAdapter)
    registry.add(LlavaNextAdapter)
    registry.add(Qwen2_5_VLAdapter)
    registry.add(TimmViTAdapter)
    registry.add(VideoLlavaAdapter)


@hookimpl
def tokenprune_register_presets(registry: PresetRegistry) -> None:
    # One YAML file per preset, shipped inside the package: tokenprune/presets/<name>.yaml.
    root = resources.files("tokenprune").joinpath("presets")
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            registry.add(entry.name.removesuffix(".yaml"), Path(str(entry)))


@hookimpl(trylast=True)
def tokenprune_resolve_adapter(
    model: nn.Module, registry: AdapterRegistry
) -> type[ModelAdapter] | None:
    for registration in registry:
        if registration.obj.supports(model):
            return registration.obj
    return None
