"""The shipped presets validate and carry the paper's budgets."""

from __future__ import annotations

from typing import Any

import pytest

from tokenprune import ConfigError, Runtime
from tokenprune_desap import presets

BUDGETS = {
    "llava-1.5-192": ("keep", 192),
    "llava-1.5-128": ("keep", 128),
    "llava-1.5-64": ("keep", 64),
    "llava-next-320": ("keep_ratio", 0.111),
    "qwen2.5-vl-0.333": ("keep_ratio", 0.333),
    "qwen2.5-vl-0.222": ("keep_ratio", 0.222),
    "qwen2.5-vl-0.111": ("keep_ratio", 0.111),
    "video-llava-0.5": ("keep_ratio", 0.5),
}


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime()


def test_every_paper_budget_has_a_preset() -> None:
    assert presets.available() == sorted(BUDGETS)


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_preset_validates_with_the_paper_budget(runtime: Runtime, name: str) -> None:
    config: Any = runtime.parse_config(presets.load(name))
    assert (config.scorer.name, config.selector.name, config.merger.name) == (
        "desap",
        "desap_joint",
        "nearest_merge",
    )
    field, value = BUDGETS[name]
    assert getattr(config, field) == value
    other = "keep_ratio" if field == "keep" else "keep"
    assert getattr(config, other) is None
    assert config.selector.task_fraction == 0.5
    # The preset file itself loads the same way.
    assert runtime.load_config(presets.path(name)) == config


@pytest.mark.parametrize(
    "name", ["llava-1.5-64", "llava-1.5-128", "llava-1.5-192", "llava-next-320"]
)
def test_clip_presets_use_the_paired_text_encoder(runtime: Runtime, name: str) -> None:
    scorer: Any = runtime.parse_config(presets.load(name)).scorer
    assert scorer.text_source == "clip"
    assert scorer.text_encoder == "openai/clip-vit-large-patch14-336"
    assert (scorer.encoding, scorer.lam, scorer.align) == ("qq", 0.1, True)


def test_qwen_presets_use_received_attention_and_llm_embeddings(runtime: Runtime) -> None:
    for name in ("qwen2.5-vl-0.111", "qwen2.5-vl-0.222", "qwen2.5-vl-0.333"):
        scorer: Any = runtime.parse_config(presets.load(name)).scorer
        assert scorer.saliency == "received_attention"
        assert scorer.text_source == "llm_embeddings"


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown DeSAP preset 'llava-1\.5-32'.*llava-1\.5-64"):
        presets.path("llava-1.5-32")


def test_presets_are_registered_with_the_runtime(runtime: Runtime) -> None:
    for name in BUDGETS:
        assert f"desap-{name}" in runtime.presets
        assert runtime.presets.get(f"desap-{name}") == presets.path(name)
