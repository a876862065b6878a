"""The plugin runtime: discovery (built-ins, entry points, named plugins), switches, isolation.

Entry-point discovery runs against the real installed ``tokenprune-example`` distribution
(``plugins/example``, installed by ``make install``).
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch

from tokenprune import (
    PluginError,
    PruneContext,
    RegistrationError,
    Runtime,
    Scorer,
    StageConfig,
)
from tokenprune.plugin import (
    ENV_DISABLE_AUTOLOAD,
    ENV_DISABLED_PLUGINS,
    PluginInfo,
    PluginWarning,
    hookimpl,
)

EXAMPLE = "tokenprune-example 0.1.0"

# Other plugin distributions of this repository are installed in the same environment and may be
# work in progress. Where a test needs autoload, a failure of one of them to load must not turn
# into an error under `filterwarnings = error`: only its own PluginWarning is tolerated.
tolerate_other_plugins = pytest.mark.filterwarnings(
    r"ignore:plugin 'desap' .*failed to load:tokenprune.plugin.PluginWarning"
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.delenv(ENV_DISABLED_PLUGINS, raising=False)


class OnesScorerConfig(StageConfig):
    name: Literal["ones"] = "ones"


class OnesScorer(Scorer[OnesScorerConfig]):
    name: ClassVar[str] = "ones"
    Config: ClassVar[type[StageConfig]] = OnesScorerConfig

    def score(self, ctx: PruneContext) -> torch.Tensor:
        return torch.ones(ctx.visual.features.shape[:2])


class OnesPlugin:
    """A plugin object (not a module) registering one scorer.

    Like pluggy, the runtime names a plugin object after its ``__name__`` attribute.
    """

    def __init__(self, name: str = "ones-plugin") -> None:
        self.__name__ = name

    @hookimpl
    def tokenprune_register_stages(self, registry: Any) -> None:
        registry.add(OnesScorer)


def _registration(runtime: Runtime, name: str) -> Any:
    (found,) = [r for r in runtime.stages if r.name == name]
    return found


# -- entry points -------------------------------------------------------------------------------
@tolerate_other_plugins
def test_entry_point_plugin_is_discovered() -> None:
    runtime = Runtime()
    assert "feature_norm" in runtime.stages.names("scorer")
    registration = _registration(runtime, "feature_norm")
    assert registration.plugin == "example"
    assert registration.provider == EXAMPLE
    assert PluginInfo("example", EXAMPLE, "entrypoint") in runtime.plugins
    assert runtime.plugins[0] == PluginInfo("builtin", f"tokenprune {_version()}", "builtin")


def _version() -> str:
    return importlib.metadata.version("tokenprune")


def test_autoload_can_be_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    runtime = Runtime()
    assert "feature_norm" not in runtime.stages.names("scorer")
    assert [p.source for p in runtime.plugins] == ["builtin"]
    assert runtime.failures == []


@tolerate_other_plugins
@pytest.mark.parametrize("value", ["", "0"])
def test_autoload_stays_on_for_empty_or_zero(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, value)
    assert "feature_norm" in Runtime().stages.names("scorer")


@tolerate_other_plugins
def test_explicit_autoload_argument_wins_over_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    assert "feature_norm" in Runtime(autoload=True).stages.names("scorer")
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD)
    assert "feature_norm" not in Runtime(autoload=False).stages.names("scorer")


@tolerate_other_plugins
def test_plugin_can_be_blocked_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DISABLED_PLUGINS, "example")
    runtime = Runtime()
    assert "feature_norm" not in runtime.stages.names("scorer")
    assert "example" not in [p.name for p in runtime.plugins]
    assert runtime.failures == [f for f in runtime.failures if "desap" in str(f)]


@tolerate_other_plugins
def test_plugin_can_be_blocked_by_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DISABLED_PLUGINS, " other , ")
    runtime = Runtime(disabled=["example"])
    assert runtime.disabled == {"other", "example"}
    assert "feature_norm" not in runtime.stages.names("scorer")


def test_broken_entry_point_is_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.entry_points(group="tokenprune", name="example")
    broken = importlib.metadata.EntryPoint(
        name="broken", value="tokenprune_no_such_module.plugin", group="tokenprune"
    )

    def entry_points(**params: Any) -> Any:
        assert params == {"group": "tokenprune"}
        return [broken, *real]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with pytest.warns(PluginWarning, match=r"plugin 'broken' .*failed to load: ModuleNotFound"):
        runtime = Runtime()
    assert "feature_norm" in runtime.stages.names("scorer")
    (failure,) = runtime.failures
    assert isinstance(failure, PluginError)
    assert "broken" in str(failure)
    assert isinstance(failure.__cause__, ModuleNotFoundError)
    assert "broken" not in [p.name for p in runtime.plugins]


# -- plugin objects and late registration -------------------------------------------------------
def test_plugin_object_at_construction() -> None:
    runtime = Runtime([OnesPlugin()], autoload=False)
    assert _registration(runtime, "ones").plugin == "ones-plugin"
    assert runtime.plugins[-1].name == "ones-plugin"
    assert runtime.plugins[-1].source == "named"


def test_plugin_object_added_later_gets_the_historic_hooks() -> None:
    runtime = Runtime(autoload=False)
    assert "ones" not in runtime.stages.names("scorer")
    plugin = OnesPlugin()
    runtime.add_plugin(plugin, name="late")
    registration = _registration(runtime, "ones")
    assert registration.obj is OnesScorer
    assert registration.plugin == "late"
    runtime.add_plugin(plugin)  # already registered: a no-op
    assert len([r for r in runtime.stages if r.name == "ones"]) == 1
    config = runtime.parse_config(
        {"scorer": {"name": "ones"}, "selector": {"name": "topk"}, "keep": 2}
    )
    assert runtime.build_pipeline(config).scorer.name == "ones"


def test_late_adapter_registration_is_historic() -> None:
    from tokenprune.adapters.llava import LlavaAdapter

    class OtherLlava(LlavaAdapter):
        name: ClassVar[str] = "other_llava"

    class AdapterPlugin:
        @hookimpl
        def tokenprune_register_adapters(self, registry: Any) -> None:
            registry.add(OtherLlava)

    runtime = Runtime(autoload=False)
    before = runtime.adapters.names()
    runtime.add_plugin(AdapterPlugin(), name="adapters")
    assert sorted(set(runtime.adapters.names()) - set(before)) == ["other_llava"]
    assert runtime.adapters.get("other_llava") is OtherLlava


# -- duplicates and failures --------------------------------------------------------------------
class FakeFeatureNormConfig(StageConfig):
    name: Literal["feature_norm"] = "feature_norm"


class FakeFeatureNorm(Scorer[FakeFeatureNormConfig]):
    name: ClassVar[str] = "feature_norm"
    Config: ClassVar[type[StageConfig]] = FakeFeatureNormConfig

    def score(self, ctx: PruneContext) -> torch.Tensor:
        return ctx.visual.features.sum(-1)


class Squatter:
    @hookimpl
    def tokenprune_register_stages(self, registry: Any) -> None:
        registry.add(FakeFeatureNorm)


def test_duplicate_stage_name_names_both_plugins() -> None:
    runtime = Runtime(disabled=["desap"])
    with pytest.raises(RegistrationError) as info:
        runtime.add_plugin(Squatter(), name="squatter")
    message = str(info.value)
    assert "scorer 'feature_norm' is registered twice" in message
    assert f"plugin 'example' ({EXAMPLE})" in message
    assert "plugin 'squatter'" in message
    assert "TOKENPRUNE_DISABLED_PLUGINS" in message
    # The runtime is unchanged: the first registration stands, the second plugin is gone.
    assert _registration(runtime, "feature_norm").plugin == "example"
    assert not runtime.pm.has_plugin("squatter")
    assert "squatter" not in [p.name for p in runtime.plugins]


def test_duplicate_of_a_builtin_names_the_core_distribution() -> None:
    from tokenprune.stages.selectors.topk import TopKSelector

    class Again:
        @hookimpl
        def tokenprune_register_stages(self, registry: Any) -> None:
            registry.add(TopKSelector)

    runtime = Runtime(autoload=False)
    with pytest.raises(RegistrationError, match=rf"'builtin' \(tokenprune {_version()}\)"):
        runtime.add_plugin(Again(), name="again")


class Broken:
    """Registers a stage, then fails: nothing of it may survive."""

    __name__ = "broken"

    @hookimpl
    def tokenprune_register_stages(self, registry: Any) -> None:
        registry.add(OnesScorer)
        raise RuntimeError("cannot build my stages")


def test_plugin_whose_hook_raises_is_isolated() -> None:
    with pytest.warns(PluginWarning, match=r"plugin 'broken' .*RuntimeError: cannot build"):
        runtime = Runtime([Broken(), OnesPlugin("healthy")], autoload=False)
    (failure,) = runtime.failures
    assert "broken" in str(failure)
    assert isinstance(failure.__cause__, RuntimeError)
    assert [p.name for p in runtime.plugins] == ["builtin", "healthy"]
    assert _registration(runtime, "ones").plugin == "healthy"  # the other plugin still loads
    assert not runtime.pm.has_plugin("broken")


# -- named plugin modules -----------------------------------------------------------------------
PLUGIN_MODULE = '''
"""A plugin module that exists only for this test."""
from typing import ClassVar, Literal

import torch

from tokenprune import Scorer, StageConfig
from tokenprune.plugin import hookimpl


class LocalConfig(StageConfig):
    name: Literal["local"] = "local"


class LocalScorer(Scorer[LocalConfig]):
    name: ClassVar[str] = "local"
    Config: ClassVar[type[StageConfig]] = LocalConfig

    def score(self, ctx):
        return torch.zeros(ctx.visual.features.shape[:2])


@hookimpl
def tokenprune_register_stages(registry):
    registry.add(LocalScorer)
'''


@pytest.fixture
def local_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "tokenprune_test_local_plugin"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN_MODULE), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_plugin_named_in_config_is_loaded(local_plugin: str) -> None:
    runtime = Runtime(autoload=False)
    assert "local" not in runtime.stages.names("scorer")
    config = runtime.parse_config(
        {
            "plugins": [local_plugin],
            "scorer": {"name": "local"},
            "selector": {"name": "topk"},
            "keep": 2,
        }
    )
    assert config.scorer.name == "local"
    assert config.plugins == (local_plugin,)
    assert PluginInfo(local_plugin, local_plugin, "named") in runtime.plugins
    assert local_plugin in sys.modules


def test_plugin_named_in_a_config_file_is_loaded(local_plugin: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"plugins: [{local_plugin}]\nscorer: {{name: local}}\nselector: {{name: topk}}\nkeep: 3\n",
        encoding="utf-8",
    )
    runtime = Runtime(autoload=False)
    pipeline = runtime.build_pipeline(runtime.load_config(path))
    assert pipeline.scorer.name == "local"


def test_installed_plugin_module_named_in_config() -> None:
    runtime = Runtime(autoload=False)
    runtime.parse_config(
        {
            "plugins": ["tokenprune_example.plugin"],
            "scorer": {"name": "feature_norm"},
            "selector": {"name": "topk"},
            "keep": 2,
        }
    )
    assert PluginInfo("tokenprune_example.plugin", EXAMPLE, "named") in runtime.plugins


def test_missing_plugin_module_is_a_clear_error() -> None:
    runtime = Runtime(autoload=False)
    with pytest.raises(PluginError, match="'no_such_tokenprune_plugin' cannot be imported"):
        runtime.parse_config(
            {
                "plugins": ["no_such_tokenprune_plugin"],
                "scorer": {"name": "random"},
                "selector": {"name": "topk"},
                "keep": 2,
            }
        )


def test_blocked_plugin_module_is_not_loaded(local_plugin: str) -> None:
    runtime = Runtime(autoload=False, disabled=[local_plugin])
    runtime.add_plugin(local_plugin)
    assert "local" not in runtime.stages.names("scorer")
    assert local_plugin not in sys.modules


# -- independence -------------------------------------------------------------------------------
def test_two_runtimes_are_independent() -> None:
    first, second = Runtime(autoload=False), Runtime(autoload=False)
    first.add_plugin(OnesPlugin())
    assert "ones" in first.stages.names("scorer")
    assert "ones" not in second.stages.names("scorer")
    assert first.stages is not second.stages
    assert first.pm is not second.pm
    assert len(second.plugins) == 1
    # A third runtime created afterwards starts from scratch as well.
    assert "ones" not in Runtime(autoload=False).stages.names("scorer")
