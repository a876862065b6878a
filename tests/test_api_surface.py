"""Public-API snapshot: adding or removing a public name is a deliberate change to this file."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tokenprune
import tokenprune.plugin
import tokenprune.testing

TOKENPRUNE_API = [
    "AdapterError",
    "BudgetError",
    "Capability",
    "CapabilityError",
    "ConfigError",
    "Merger",
    "ModelAdapter",
    "Pipeline",
    "PipelineConfig",
    "PluginError",
    "PruneContext",
    "PruneHandle",
    "PrunedTokens",
    "RegistrationError",
    "Runtime",
    "Scorer",
    "Selection",
    "Selector",
    "ShapeError",
    "Stage",
    "StageConfig",
    "Stash",
    "StashKey",
    "TextTokens",
    "TokenPruneError",
    "VisionBlock",
    "VisualTokens",
    "__version__",
    "apply",
    "hookimpl",
    "load_pipeline_config",
    "save_pipeline",
]

TESTING_API = [
    "AdapterCase",
    "AdapterContractError",
    "CONTRACT_CHECKS",
    "IMAGE_TOKEN_ID",
    "PAD_TOKEN_ID",
    "VIDEO_TOKEN_ID",
    "check_capabilities",
    "check_equivalence_at_full_budget",
    "check_generate",
    "check_restore",
    "check_sequence_shortened",
    "check_stage",
    "llava_next_prompts",
    "llava_next_tokens_per_image",
    "llava_prompts",
    "make_context",
    "registered_stages",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_video_llava",
    "video_llava_prompts",
]

PLUGIN_API = [
    "AdapterRegistry",
    "ENV_DISABLED_PLUGINS",
    "ENV_DISABLE_AUTOLOAD",
    "PluginInfo",
    "PluginWarning",
    "PresetRegistry",
    "Runtime",
    "StageRegistry",
    "hookimpl",
    "hookspec",
]


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (tokenprune, TOKENPRUNE_API),
        (tokenprune.testing, TESTING_API),
        (tokenprune.plugin, PLUGIN_API),
    ],
    ids=["tokenprune", "tokenprune.testing", "tokenprune.plugin"],
)
def test_public_api_snapshot(module: object, expected: list[str]) -> None:
    exported = module.__all__  # type: ignore[attr-defined]
    assert sorted(exported) == expected
    assert len(set(exported)) == len(exported), "duplicate names in __all__"
    for name in exported:
        assert getattr(module, name) is not None, name


def test_top_level_names_are_the_defining_objects() -> None:
    from tokenprune.errors import TokenPruneError
    from tokenprune.pipeline import Pipeline
    from tokenprune.plugin.manager import Runtime

    assert tokenprune.Pipeline is Pipeline
    assert tokenprune.Runtime is Runtime is tokenprune.plugin.Runtime
    assert tokenprune.TokenPruneError is TokenPruneError
    assert tokenprune.hookimpl is tokenprune.plugin.hookimpl
    assert all(
        issubclass(getattr(tokenprune, name), TokenPruneError)
        for name in TOKENPRUNE_API
        if name.endswith("Error")
    )


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = tokenprune.no_such_name  # type: ignore[attr-defined]


@pytest.mark.parametrize("heavy", ["transformers", "torch"])
def test_import_tokenprune_stays_light(heavy: str) -> None:
    code = f"import tokenprune, sys; assert {heavy!r} not in sys.modules, 'imported {heavy}'"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
