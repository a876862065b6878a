"""Saving and sharing pipelines: presets, ``save_pipeline``/``load_pipeline_config``, safe loading.

A configuration is data: loading one imports nothing but the plugin modules it names under
``plugins:``, and weights (the DeSAP text encoder) are read from safetensors files only.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import tokenprune
from tokenprune import ConfigError, Pipeline, RegistrationError, Runtime, hookimpl
from tokenprune.config import SAVED_CONFIG_NAME, SAVED_FORMAT
from tokenprune.plugin import PluginWarning, PresetRegistry
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.testing import llava_prompts, tiny_llava

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_PRESETS = [
    "cls_attention-64",
    "divprune-64",
    "pool-64",
    "prumerge_plus-64",
    "random-64",
    "tome-64",
    "visionzip-64",
]
# Built-in preset -> the user-facing example in configs/ that it must agree with.
EXAMPLES = {
    "cls_attention-64": "cls_attention_topk64.yaml",
    "divprune-64": "divprune_64.yaml",
    "pool-64": "pool_64.yaml",
    "prumerge_plus-64": "prumerge_plus_64.yaml",
    "tome-64": "tome_64.yaml",
    "visionzip-64": "visionzip_64.yaml",
}
CONFIG: dict[str, Any] = {
    "scorer": {"name": "random", "seed": 3},
    "selector": {"name": "topk"},
    "keep": 5,
}


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(autoload=False)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A tiny LLaVA with a 12x12 patch grid: 144 tokens per image, room for the 64-token presets."""
    return tiny_llava(image_size=96, patch_size=8)


@pytest.fixture(scope="module")
def batch(model: nn.Module) -> dict[str, torch.Tensor]:
    return llava_prompts(model, [(2, 3), (1, 4)])


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**batch).logits
    return out


# -- presets --------------------------------------------------------------------------------------


def test_builtin_presets_come_from_the_builtin_plugin(runtime: Runtime) -> None:
    found = {r.name: r for r in runtime.presets}
    assert set(BUILTIN_PRESETS) <= set(found)
    for name in BUILTIN_PRESETS:
        assert found[name].plugin == "builtin"
        assert found[name].provider.startswith("tokenprune ")
        preset = runtime.presets.get(name)
        assert isinstance(preset, Path)
        assert preset.parent.name == "presets"
        assert preset.parent.parent == Path(tokenprune.__file__).parent  # shipped in the package


@pytest.mark.parametrize("name", BUILTIN_PRESETS)
def test_builtin_preset_validates_and_builds(runtime: Runtime, name: str) -> None:
    config = runtime.load_config(name)
    assert config.keep == 64
    pipeline = runtime.build_pipeline(config)
    assert pipeline.config == config


@pytest.mark.parametrize(("name", "example"), sorted(EXAMPLES.items()))
def test_builtin_preset_agrees_with_its_example(runtime: Runtime, name: str, example: str) -> None:
    assert runtime.load_config(name) == runtime.load_config(ROOT / "configs" / example)


def test_apply_accepts_a_preset_name(
    model: nn.Module, batch: dict[str, torch.Tensor], runtime: Runtime
) -> None:
    reference = logits(model, batch)
    with tokenprune.apply(model, "random-64", runtime=runtime):
        pruned = logits(model, batch)
    assert pruned.shape[1] == reference.shape[1] - (144 - 64)
    with tokenprune.apply(model, runtime.load_config("random-64"), runtime=runtime):
        torch.testing.assert_close(logits(model, batch), pruned)


@pytest.mark.parametrize("source", ["no-such-preset", "visionzip-65", "configs/nope.yaml"])
def test_unknown_string_lists_the_presets(runtime: Runtime, source: str) -> None:
    with pytest.raises(ConfigError) as info:
        runtime.load_config(source)
    message = str(info.value)
    assert f"{source}' does not exist" in message
    assert "not a preset name" in message
    assert all(name in message for name in BUILTIN_PRESETS)


def test_an_existing_path_wins_over_a_preset(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tokenprune.save_pipeline(runtime.parse_config(CONFIG), tmp_path / "random-64")
    assert runtime.load_config("random-64").keep == 5
    assert runtime.load_config(Path("random-64")).keep == 5


def test_a_preset_mapping_is_validated_when_used_and_named_in_errors() -> None:
    class Presets:
        @hookimpl
        def tokenprune_register_presets(self, registry: PresetRegistry) -> None:
            registry.add("good-5", CONFIG)
            registry.add("bad-5", {**CONFIG, "kep": 1})

    runtime = Runtime([Presets()], autoload=False)
    assert runtime.load_config("good-5") == runtime.parse_config(CONFIG)
    with pytest.raises(ConfigError, match=r"preset 'bad-5': invalid pipeline config:\n  kep"):
        runtime.load_config("bad-5")


def test_presets_are_historic_and_attributed_to_their_plugin() -> None:
    class Late:
        __name__ = "late"

        @hookimpl
        def tokenprune_register_presets(self, registry: PresetRegistry) -> None:
            registry.add("late-5", CONFIG)

    runtime = Runtime(autoload=False)
    assert "late-5" not in runtime.presets
    runtime.add_plugin(Late())
    (registration,) = [r for r in runtime.presets if r.name == "late-5"]
    assert registration.plugin == "late"
    assert runtime.load_config("late-5").keep == 5


def test_a_plugin_whose_preset_hook_raises_is_isolated() -> None:
    class Broken:
        __name__ = "broken-presets"

        @hookimpl
        def tokenprune_register_presets(self, registry: PresetRegistry) -> None:
            registry.add("broken-5", CONFIG)
            raise RuntimeError("cannot list my presets")

    class Healthy:
        __name__ = "healthy-presets"

        @hookimpl
        def tokenprune_register_presets(self, registry: PresetRegistry) -> None:
            registry.add("healthy-5", CONFIG)

    with pytest.warns(PluginWarning, match=r"plugin 'broken-presets' .*cannot list my presets"):
        runtime = Runtime([Broken(), Healthy()], autoload=False)
    assert "broken-5" not in runtime.presets
    assert "healthy-5" in runtime.presets
    assert "visionzip-64" in runtime.presets


def test_duplicate_preset_names_both_plugins() -> None:
    class Again:
        __name__ = "again"

        @hookimpl
        def tokenprune_register_presets(self, registry: PresetRegistry) -> None:
            registry.add("random-64", CONFIG)

    with pytest.raises(RegistrationError, match=r"preset 'random-64' is registered twice.*builtin"):
        Runtime([Again()], autoload=False)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "-x", "x.yaml", "x.JSON", "a b", 3])
def test_malformed_preset_names_are_refused(name: Any) -> None:
    with pytest.raises(RegistrationError, match=r"preset name .* is invalid"):
        PresetRegistry().add(name, CONFIG)


def test_preset_files_must_exist_and_be_configs(tmp_path: Path) -> None:
    registry = PresetRegistry()
    with pytest.raises(RegistrationError, match=r"is not a \.yaml, \.yml, \.toml or \.json file"):
        registry.add("missing", tmp_path / "missing.yaml")
    (tmp_path / "notes.txt").write_text("keep: 1\n", encoding="utf-8")
    with pytest.raises(RegistrationError, match=r"is not a \.yaml"):
        registry.add("notes", tmp_path / "notes.txt")
    with pytest.raises(RegistrationError, match=r"must be a mapping or a config file path"):
        registry.add("number", 3)  # type: ignore[arg-type]


def test_preset_mappings_are_copied_in_and_out() -> None:
    registry = PresetRegistry()
    data = json.loads(json.dumps(CONFIG))
    registry.add("mine", data)
    data["scorer"]["seed"] = 99
    out = registry.get("mine")
    assert isinstance(out, dict)
    assert out["scorer"]["seed"] == 3
    out["keep"] = 1
    assert registry.get("mine") == CONFIG
    assert len(registry) == 1
    assert "mine" in registry
    with pytest.raises(ConfigError, match=r"unknown preset 'yours'; available: mine"):
        registry.get("yours")


def test_desap_registers_its_presets_with_a_prefix() -> None:
    desap_presets = pytest.importorskip("tokenprune_desap.presets")
    runtime = Runtime()
    if "desap" not in {p.name for p in runtime.plugins}:
        pytest.skip("the tokenprune-desap plugin is not loaded")
    names = {f"desap-{name}" for name in desap_presets.available()}
    assert names <= set(runtime.presets.names())
    for registration in runtime.presets:
        if registration.name in names:
            assert registration.plugin == "desap"
    config = runtime.load_config("desap-llava-1.5-64")
    assert config == runtime.parse_config(desap_presets.load("llava-1.5-64"))


# -- save_pipeline / load_pipeline_config ---------------------------------------------------------


def test_saved_file_has_a_header_and_the_config(runtime: Runtime, tmp_path: Path) -> None:
    config = runtime.parse_config(CONFIG)
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")  # the model's own file
    path = tokenprune.save_pipeline(config, tmp_path)
    assert path == tmp_path / SAVED_CONFIG_NAME
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document == {
        "tokenprune": {"version": tokenprune.__version__, "format": SAVED_FORMAT},
        "pipeline": config.to_dict(),
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SAVED_CONFIG_NAME]
    assert (tmp_path / "config.json").read_text(encoding="utf-8") == "{}"


@pytest.mark.parametrize("target", ["directory", "file"])
def test_round_trip(runtime: Runtime, tmp_path: Path, target: str) -> None:
    config = runtime.load_config("visionzip-64")
    path = tokenprune.save_pipeline(config, tmp_path / "new" / "model-dir")  # created
    source = path.parent if target == "directory" else path
    assert tokenprune.load_pipeline_config(source, runtime) == config
    fresh = tokenprune.load_pipeline_config(str(source))  # a fresh runtime's config class
    assert fresh.to_dict() == config.to_dict()


def test_save_accepts_mappings_and_pipelines(runtime: Runtime, tmp_path: Path) -> None:
    expected = runtime.parse_config(CONFIG)
    built = runtime.build_pipeline(expected)
    by_hand = Pipeline(RandomScorer(seed=3), TopKSelector(), keep=5)
    for i, item in enumerate([CONFIG, built, by_hand]):
        tokenprune.save_pipeline(item, tmp_path / str(i), runtime=runtime)
        assert runtime.load_config(tmp_path / str(i)) == expected, item
    tokenprune.save_pipeline(CONFIG, tmp_path / "no-runtime")
    assert runtime.load_config(tmp_path / "no-runtime") == expected
    tokenprune.save_pipeline(by_hand, tmp_path / "by-hand")  # validated by a fresh runtime
    assert runtime.load_config(tmp_path / "by-hand") == expected


def test_save_overwrites(runtime: Runtime, tmp_path: Path) -> None:
    tokenprune.save_pipeline(CONFIG, tmp_path, runtime=runtime)
    tokenprune.save_pipeline({**CONFIG, "keep": 7}, tmp_path, runtime=runtime)
    assert runtime.load_config(tmp_path).keep == 7
    assert [p.name for p in tmp_path.iterdir()] == [SAVED_CONFIG_NAME]


def test_save_refuses_bad_input(runtime: Runtime, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"kep"):
        tokenprune.save_pipeline({**CONFIG, "kep": 1}, tmp_path, runtime=runtime)
    assert not (tmp_path / SAVED_CONFIG_NAME).exists()
    with pytest.raises(ConfigError, match=r"needs a Pipeline, a PipelineConfig or a mapping"):
        tokenprune.save_pipeline([("keep", 1)], tmp_path, runtime=runtime)  # type: ignore[arg-type]
    (tmp_path / "file").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'.*file': it exists and is not a directory"):
        tokenprune.save_pipeline(CONFIG, tmp_path / "file", runtime=runtime)


def test_apply_accepts_a_saved_directory(
    model: nn.Module, batch: dict[str, torch.Tensor], runtime: Runtime, tmp_path: Path
) -> None:
    config = runtime.load_config("cls_attention-64")
    tokenprune.save_pipeline(config, tmp_path)
    with tokenprune.apply(model, config, runtime=runtime):
        expected = logits(model, batch)
    with tokenprune.apply(model, tmp_path, runtime=runtime):
        torch.testing.assert_close(logits(model, batch), expected)
    with tokenprune.apply(model, str(tmp_path)):  # a fresh runtime
        torch.testing.assert_close(logits(model, batch), expected)


@pytest.mark.parametrize(
    ("document", "match"),
    [
        (
            {"tokenprune": {"version": "9.0.0", "format": SAVED_FORMAT + 1}, "pipeline": CONFIG},
            r"saved by tokenprune 9\.0\.0 in format 2; .* reads formats 1 to 1: upgrade",
        ),
        ({"tokenprune": {"version": "0.1.0"}, "pipeline": CONFIG}, r"in format None"),
        ({"tokenprune": "0.1.0", "pipeline": CONFIG}, r"a `tokenprune` header mapping"),
        ({"tokenprune": {"format": 1}}, r"got the keys \['tokenprune'\]"),
        (
            {"tokenprune": {"format": 1}, "pipeline": CONFIG, "extra": 1},
            r"got the keys \['extra', 'pipeline', 'tokenprune'\]",
        ),
        ({"tokenprune": {"format": 1}, "pipeline": {**CONFIG, "kep": 1}}, r"kep: Extra inputs"),
    ],
    ids=["newer-format", "no-format", "header-not-a-mapping", "no-pipeline", "extra-key", "typo"],
)
def test_damaged_saved_files(
    runtime: Runtime, tmp_path: Path, document: dict[str, Any], match: str
) -> None:
    (tmp_path / SAVED_CONFIG_NAME).write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        tokenprune.load_pipeline_config(tmp_path, runtime)


def test_truncated_saved_file(runtime: Runtime, tmp_path: Path) -> None:
    path = tokenprune.save_pipeline(CONFIG, tmp_path, runtime=runtime)
    path.write_text(path.read_text(encoding="utf-8")[:40], encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cannot be parsed .*damaged or truncated"):
        tokenprune.load_pipeline_config(tmp_path, runtime)


def test_directory_without_a_saved_pipeline(runtime: Runtime, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no tokenprune\.json; write one with .*save_pipe"):
        tokenprune.apply(tiny_llava(), tmp_path, runtime=runtime)


# -- configurations never import code, except the plugins they name -------------------------------

PROBE = "tokenprune_sharing_probe"
PROBE_SOURCE = '''
"""A plugin module that records being imported."""
from typing import ClassVar, Literal

import torch

from tokenprune import Scorer, StageConfig, hookimpl

IMPORTED = True


class ProbeConfig(StageConfig):
    name: Literal["probe"] = "probe"


class ProbeScorer(Scorer[ProbeConfig]):
    name: ClassVar[str] = "probe"
    Config: ClassVar[type[StageConfig]] = ProbeConfig

    def score(self, ctx):
        return torch.zeros(ctx.visual.features.shape[:2])


@hookimpl
def tokenprune_register_stages(registry):
    registry.add(ProbeScorer)


def boom(*args):
    raise AssertionError("a config file ran code")
'''


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / f"{PROBE}.py").write_text(textwrap.dedent(PROBE_SOURCE), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PROBE, raising=False)
    yield PROBE
    sys.modules.pop(PROBE, None)


def _files(folder: Path, data: dict[str, Any]) -> list[Path]:
    """The config as YAML, JSON and a saved directory."""
    folder.mkdir()
    (folder / "p.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    (folder / "p.json").write_text(json.dumps(data), encoding="utf-8")
    saved = folder / "saved"
    saved.mkdir()
    document = {"tokenprune": {"version": "0.1.0", "format": 1}, "pipeline": data}
    (saved / SAVED_CONFIG_NAME).write_text(json.dumps(document), encoding="utf-8")
    return [folder / "p.yaml", folder / "p.json", saved]


def test_a_config_without_plugins_imports_nothing(probe: str, tmp_path: Path) -> None:
    runtime = Runtime(autoload=False)
    warm = _files(tmp_path / "warm", {**CONFIG, "keep": 6})
    for source in warm:  # the first parse builds the config model and may import lazily
        runtime.load_config(source)
    loaded_before = set(sys.modules)
    for source in _files(tmp_path / "cold", CONFIG):
        assert runtime.load_config(source).keep == 5
    assert set(sys.modules) == loaded_before
    assert probe not in sys.modules


def test_yaml_tags_cannot_run_code(probe: str, tmp_path: Path) -> None:
    for tag in (f"!!python/object/apply:{probe}.boom []", f"!!python/name:{probe}.boom"):
        path = tmp_path / "evil.yaml"
        path.write_text(f"scorer: {tag}\nselector: {{name: topk}}\nkeep: 1\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=r"evil\.yaml' cannot be parsed"):
            Runtime(autoload=False).load_config(path)
    assert probe not in sys.modules


def test_a_config_naming_a_plugin_imports_it_then(probe: str, tmp_path: Path) -> None:
    data = {
        "plugins": [probe],
        "scorer": {"name": "probe"},
        "selector": {"name": "topk"},
        "keep": 2,
    }
    for source in _files(tmp_path / "named", data):
        sys.modules.pop(probe, None)
        runtime = Runtime(autoload=False)
        assert probe not in sys.modules
        config = runtime.load_config(source)
        assert sys.modules[probe].IMPORTED
        assert config.scorer.name == "probe"
        assert "probe" in runtime.stages.names("scorer")


def test_saving_keeps_the_plugins_a_config_names(probe: str, tmp_path: Path) -> None:
    data = {
        "plugins": [probe],
        "scorer": {"name": "probe"},
        "selector": {"name": "topk"},
        "keep": 2,
    }
    tokenprune.save_pipeline(data, tmp_path)  # validated by a runtime that loads the plugin
    sys.modules.pop(probe, None)
    assert tokenprune.load_pipeline_config(tmp_path).plugins == (probe,)
    assert probe in sys.modules


# -- weights: safetensors only --------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tokenprune_desap")
    from tokenprune.testing.clip import tiny_paired_clip

    path = tmp_path_factory.mktemp("clip")
    tiny_paired_clip(tiny_llava(), save_to=path)
    return path


def test_desap_text_encoder_loads_safetensors(clip_dir: Path) -> None:
    from tokenprune_desap.text_encoder import PairedTextEncoder

    assert PairedTextEncoder.from_pretrained(str(clip_dir)).max_length == 77


def test_desap_text_encoder_refuses_pickle_only_checkpoints(clip_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tokenprune_desap.text_encoder import PairedTextEncoder

    for item in clip_dir.iterdir():
        if item.name != "model.safetensors":
            (tmp_path / item.name).write_bytes(item.read_bytes())
    torch.save(load_file(clip_dir / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"from safetensors weights .*model\.safetensors"):
        PairedTextEncoder.from_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match=r"from \.safetensors files only"):
        PairedTextEncoder.from_pretrained(str(clip_dir), use_safetensors=False)
