"""Registration through the entry point, the presets and the configs in ``configs/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import tokenprune_desap.plugin
import tokenprune_dynamic.plugin
from tokenprune import ConfigError, Runtime
from tokenprune.testing import make_context
from tokenprune_desap import presets as desap_presets
from tokenprune_dynamic import DesapDynamicSelector, presets

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_entry_point_registers_the_selector() -> None:
    runtime = Runtime()
    registration = next(r for r in runtime.stages if r.name == "desap_dynamic")
    assert registration.obj is DesapDynamicSelector
    assert registration.plugin == "dynamic"
    assert registration.provider.startswith("tokenprune-dynamic ")


def test_explicit_plugin_without_autoload() -> None:
    runtime = Runtime([tokenprune_desap.plugin, tokenprune_dynamic.plugin], autoload=False)
    assert "desap_dynamic" in runtime.stages.names("selector")
    assert {f"dynamic-{n}" for n in desap_presets.available()} <= set(runtime.presets.names())


@pytest.mark.parametrize("name", desap_presets.available())
def test_presets_are_desap_with_the_dynamic_selector(name: str) -> None:
    runtime = Runtime()
    ours: Any = runtime.load_config(f"dynamic-{name}")
    theirs: Any = runtime.parse_config(desap_presets.load(name))
    assert ours.selector.name == "desap_dynamic"
    assert ours.model_copy(update={"selector": theirs.selector}) == theirs


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown dynamic preset 'llava-9'; available: "):
        presets.load("llava-9")


@pytest.mark.parametrize(
    ("name", "selector"),
    [("desap_dynamic_11pct.yaml", "desap_dynamic"), ("desap_11pct.yaml", "desap_joint")],
)
def test_configs_validate_and_run(name: str, selector: str) -> None:
    runtime = Runtime()
    config: Any = runtime.load_config(CONFIGS / name)
    assert (config.selector.name, config.keep_ratio) == (selector, 0.111)
    assert config.scorer.text_encoder == "tokenprune/toy/assets/clip"
    # The toy model's CLIP is exercised by the eval; here the same pipeline on a synthetic
    # 12 x 12 context, with the text taken from the prompt embeddings.
    scorer = config.scorer.model_copy(update={"text_source": "llm_embeddings"})
    pipeline = runtime.build_pipeline(config.model_copy(update={"scorer": scorer}))
    ctx = make_context(2, 144, 16, pipeline.budget(144), num_layers=3)
    out = pipeline(ctx)
    assert out.features.shape == (2, 16, 16)


def test_the_pair_differs_only_in_the_selector() -> None:
    runtime = Runtime()
    dynamic: Any = runtime.load_config(CONFIGS / "desap_dynamic_11pct.yaml")
    fixed: Any = runtime.load_config(CONFIGS / "desap_11pct.yaml")
    assert dynamic.model_copy(update={"selector": fixed.selector}) == fixed
