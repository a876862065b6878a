from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError

from tokenprune.config import PipelineConfig
from tokenprune.context import PruneContext
from tokenprune.errors import ConfigError, PluginError
from tokenprune.plugin import Runtime
from tokenprune.types import VisualTokens

PLUGIN_DIR = Path(__file__).parent / "_plugins"
PLUGIN_MODULE = "tokenprune_config_test_plugin"


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(autoload=False)


def base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "scorer": {"name": "cls_attention"},
        "selector": {"name": "topk"},
        "keep": 64,
    }
    data.update(overrides)
    return data


# -- file formats ------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def to_toml(data: dict[str, Any]) -> str:
    """Enough of a TOML writer for a pipeline config: scalars first, then one table per stage."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


WRITERS = {
    ".yaml": lambda d: yaml.safe_dump(d, sort_keys=False),
    ".yml": lambda d: yaml.safe_dump(d),
    ".toml": to_toml,
    ".json": lambda d: json.dumps(d, indent=2),
}


@pytest.mark.parametrize("suffix", sorted(WRITERS))
@pytest.mark.parametrize(
    "data",
    [
        base(),
        base(scorer={"name": "cls_attention", "layer": -3}, positions="original"),
        {
            "scorer": {"name": "random", "seed": 7},
            "selector": {"name": "topk", "score": "scores"},
            "merger": {"name": "drop"},
            "keep_ratio": 0.222,
        },
    ],
    ids=["defaults", "options", "ratio"],
)
def test_file_round_trip(
    runtime: Runtime, tmp_path: Path, suffix: str, data: dict[str, Any]
) -> None:
    config = runtime.parse_config(data)
    path = tmp_path / f"pipeline{suffix}"
    path.write_text(WRITERS[suffix](config.to_dict()), encoding="utf-8")
    loaded = runtime.load_config(path)
    assert loaded == config
    assert loaded.to_dict() == config.to_dict()


def test_to_dict_is_plain_json_without_unset_budgets(runtime: Runtime) -> None:
    out = runtime.parse_config(base()).to_dict()
    assert json.loads(json.dumps(out)) == out
    assert out == {
        "scorer": {"name": "cls_attention", "layer": -2},
        "selector": {"name": "topk"},
        "merger": {"name": "drop"},
        "keep": 64,
        "positions": "contiguous",
        "follow_up": "reuse",
        "plugins": [],
    }


def test_parsed_config_is_frozen(runtime: Runtime) -> None:
    config = runtime.parse_config(base())
    assert isinstance(config, PipelineConfig)
    with pytest.raises(ValidationError, match="frozen"):
        config.keep = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("missing.yaml", None, r"missing.yaml' does not exist"),
        ("pipeline.ini", "keep = 1", r"unknown extension '.ini'; use .yaml, .toml or .json"),
        ("broken.yaml", "scorer: [unclosed", r"broken.yaml' cannot be parsed"),
        ("broken.toml", "keep = = 1", r"broken.toml' cannot be parsed"),
        ("broken.json", "{", r"broken.json' cannot be parsed"),
        ("list.yaml", "- 1\n- 2\n", r"must be a mapping, got list"),
        ("empty.yaml", "", r"scorer.*Field required"),
        ("typo.yaml", "scorer: {name: random}\nselector: {name: topk}\nkep: 3\n", r"kep"),
    ],
)
def test_load_config_errors(
    runtime: Runtime, tmp_path: Path, name: str, text: str | None, match: str
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        runtime.load_config(path)


# -- validation messages -----------------------------------------------------------------------


def test_misspelled_stage_field_names_the_field(runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match=r"scorer\.(cls_attention\.)?layr: Extra inputs"):
        runtime.parse_config(base(scorer={"name": "cls_attention", "layr": -2}))


def test_misspelled_top_level_field_names_the_field(runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match=r"\n  kep: Extra inputs are not permitted"):
        runtime.parse_config({"scorer": {"name": "random"}, "selector": {"name": "topk"}, "kep": 1})


def test_wrong_field_type_names_the_field(runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match=r"selector\.(topk\.)?score: Input should be a valid str"):
        runtime.parse_config(base(selector={"name": "topk", "score": 3}))


def test_unknown_stage_lists_the_available_names_and_hints_at_plugins(runtime: Runtime) -> None:
    with pytest.raises(ConfigError) as info:
        runtime.parse_config(base(scorer={"name": "cls_attn"}))
    message = str(info.value)
    assert "unknown scorer 'cls_attn'" in message
    available = message.split("available: ", 1)[1].split(".", 1)[0].split(", ")
    assert available == runtime.stages.names("scorer")
    assert "cls_attention" in available
    assert "plugins:" in message


def test_unknown_merger_lists_mergers(runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match=r"unknown merger 'merge'; available: .*drop"):
        runtime.parse_config(base(merger={"name": "merge"}))


@pytest.mark.parametrize(
    "section", [{"layer": -2}, "cls_attention", ["cls_attention"]], ids=["no-name", "str", "list"]
)
def test_stage_section_must_be_a_mapping_with_a_name(runtime: Runtime, section: Any) -> None:
    with pytest.raises(ConfigError, match=r"`scorer` must be a mapping with a `name` field"):
        runtime.parse_config(base(scorer=section))


def test_missing_stage_is_reported(runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match=r"selector: Field required"):
        runtime.parse_config({"scorer": {"name": "random"}, "keep": 4})


@pytest.mark.parametrize("budget", [{}, {"keep": 64, "keep_ratio": 0.5}], ids=["neither", "both"])
def test_exactly_one_budget(runtime: Runtime, budget: dict[str, Any]) -> None:
    data = {"scorer": {"name": "random"}, "selector": {"name": "topk"}, **budget}
    with pytest.raises(ConfigError, match=r"give exactly one of `keep` .* and `keep_ratio`"):
        runtime.parse_config(data)


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ({"keep_ratio": 0.0}, r"keep_ratio: Input should be greater than 0"),
        ({"keep_ratio": -0.1}, r"keep_ratio: Input should be greater than 0"),
        ({"keep_ratio": 1.5}, r"keep_ratio: Input should be less than or equal to 1"),
        ({"keep": 0}, r"keep: Input should be greater than 0"),
        ({"keep": 2.5}, r"keep: Input should be a valid integer"),
    ],
)
def test_budget_out_of_range_names_the_field(
    runtime: Runtime, budget: dict[str, Any], match: str
) -> None:
    data = {"scorer": {"name": "random"}, "selector": {"name": "topk"}, **budget}
    with pytest.raises(ConfigError, match=match):
        runtime.parse_config(data)


def test_keep_ratio_of_one_is_allowed(runtime: Runtime) -> None:
    assert runtime.parse_config(base(keep=None, keep_ratio=1.0)).keep_ratio == 1.0


def test_positions_policy_is_checked(runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match=r"positions: Input should be 'contiguous' or 'original'"):
        runtime.parse_config(base(positions="shifted"))


def test_config_must_be_a_mapping(runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match=r"must be a mapping, got list"):
        runtime.parse_config([("keep", 1)])  # type: ignore[arg-type]


# -- JSON schema -------------------------------------------------------------------------------


def _stage_names_in_schema(schema: dict[str, Any]) -> set[str]:
    names = set()
    for definition in schema.get("$defs", {}).values():
        name = definition.get("properties", {}).get("name", {})
        if "const" in name:
            names.add(name["const"])
        names.update(name.get("enum", []))
    return names


def test_json_schema_lists_every_registered_stage(runtime: Runtime) -> None:
    schema = runtime.config_model().model_json_schema()
    json.dumps(schema)  # serialisable
    registered = {r.name for r in runtime.stages}
    assert registered
    assert _stage_names_in_schema(schema) == registered
    assert {"scorer", "selector", "merger", "keep", "keep_ratio", "positions", "plugins"} <= set(
        schema["properties"]
    )
    assert schema["additionalProperties"] is False


# -- plugins: ----------------------------------------------------------------------------------


def test_plugins_field_loads_a_named_plugin_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    runtime = Runtime(autoload=False)
    assert "linear_ramp" not in runtime.stages.names("scorer")
    data = {
        "plugins": [PLUGIN_MODULE],
        "scorer": {"name": "linear_ramp", "descending": True},
        "selector": {"name": "topk"},
        "keep": 2,
    }
    config = runtime.parse_config(data)
    assert config.plugins == (PLUGIN_MODULE,)
    assert config.scorer.name == "linear_ramp"
    assert "linear_ramp" in runtime.stages.names("scorer")
    assert any(p.name == PLUGIN_MODULE and p.source == "named" for p in runtime.plugins)
    assert "linear_ramp" in _stage_names_in_schema(runtime.config_model().model_json_schema())

    # The plugin stage runs like a built-in one: descending ramp keeps the first tokens.
    pipeline = runtime.build_pipeline(config)
    features = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    out = pipeline(PruneContext(visual=VisualTokens(features), keep=pipeline.budget(5)))
    assert out.keep_idx.tolist() == [[0, 1], [0, 1]]

    # And the config survives a round trip through a file (the plugin is named in it).
    assert Runtime(autoload=False).parse_config(config.to_dict()).to_dict() == config.to_dict()


def test_unknown_plugin_module_is_a_plugin_error() -> None:
    with pytest.raises(PluginError, match=r"plugin module 'no_such_tokenprune_plugin' cannot be"):
        Runtime(autoload=False).parse_config(base(plugins=["no_such_tokenprune_plugin"]))


def test_plugins_field_must_be_a_list() -> None:
    with pytest.raises(ConfigError, match=r"`plugins` must be a list of module names"):
        Runtime(autoload=False).parse_config(base(plugins=PLUGIN_MODULE))
