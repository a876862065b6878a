"""The hook specifications: naming, documentation, and the documented behaviour of each hook."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from tokenprune import AdapterError, Pipeline, PruneContext, Runtime, VisualTokens
from tokenprune.adapters.llava import LlavaAdapter
from tokenprune.plugin import hookimpl, spec
from tokenprune.testing import tiny_llava

SPECS = {
    name: function
    for name, function in inspect.getmembers(spec, inspect.isfunction)
    if hasattr(function, f"{spec.PROJECT_NAME}_spec")
}


def test_the_module_defines_hooks() -> None:
    assert {
        "tokenprune_register_stages",
        "tokenprune_register_adapters",
        "tokenprune_resolve_adapter",
        "tokenprune_after_prune",
    } <= set(SPECS)


def test_every_public_function_is_a_hookspec() -> None:
    functions = {
        name
        for name, f in inspect.getmembers(spec, inspect.isfunction)
        if f.__module__ == spec.__name__ and not name.startswith("_")
    }
    assert functions == set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_is_prefixed_and_documented(name: str) -> None:
    function = SPECS[name]
    assert name.startswith("tokenprune_")
    doc = inspect.getdoc(function)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.endswith("."), f"{name}: the summary line must be a sentence"
    for parameter in inspect.signature(function).parameters:
        assert f"{parameter}:" in doc, f"{name}: parameter {parameter!r} is not documented"


def test_hook_options_match_the_documentation() -> None:
    def options(name: str) -> dict[str, Any]:
        return dict(getattr(SPECS[name], f"{spec.PROJECT_NAME}_spec"))

    assert options("tokenprune_register_stages")["historic"]
    assert options("tokenprune_register_adapters")["historic"]
    assert options("tokenprune_resolve_adapter")["firstresult"]
    assert "historic" in inspect.getdoc(SPECS["tokenprune_register_stages"]).lower()
    assert "first" in inspect.getdoc(SPECS["tokenprune_resolve_adapter"]).lower()


# -- register hooks -----------------------------------------------------------------------------
def test_register_hooks_receive_the_runtimes_registries() -> None:
    received: dict[str, Any] = {}

    class Spy:
        __name__ = "spy"

        @hookimpl
        def tokenprune_register_stages(self, registry: Any) -> None:
            received["stages"] = registry

        @hookimpl
        def tokenprune_register_adapters(self, registry: Any) -> None:
            received["adapters"] = registry

    runtime = Runtime(autoload=False)
    runtime.add_plugin(Spy())  # registered after the historic calls: still called, once
    assert received == {"stages": runtime.stages, "adapters": runtime.adapters}


def test_builtins_register_through_the_same_hooks() -> None:
    runtime = Runtime(autoload=False)
    assert {r.plugin for r in runtime.stages} == {"builtin"}
    assert {r.plugin for r in runtime.adapters} == {"builtin"}
    assert "llava" in runtime.adapters.names()


# -- resolve hook -------------------------------------------------------------------------------
class ClaimingAdapter(LlavaAdapter):
    name: ClassVar[str] = "claiming"


def test_builtin_resolver_picks_the_supporting_adapter() -> None:
    assert Runtime(autoload=False).resolve_adapter(tiny_llava()) is LlavaAdapter


def test_no_adapter_is_an_error_listing_the_supported_ones() -> None:
    with pytest.raises(AdapterError, match=r"unsupported model class Linear.*llava \("):
        Runtime(autoload=False).resolve_adapter(nn.Linear(2, 2))


@pytest.mark.parametrize("options", [{"tryfirst": True}, {}])
def test_plugin_resolver_claims_a_model_before_the_builtin(options: dict[str, bool]) -> None:
    """The built-in resolver runs last, so a plugin impl (``tryfirst`` or plain) wins."""
    calls: list[str] = []

    class Claimer:
        __name__ = "claimer"

        @hookimpl(**options)
        def tokenprune_resolve_adapter(self, model: nn.Module, registry: Any) -> Any:
            calls.append(type(model).__name__)
            return ClaimingAdapter

    runtime = Runtime([Claimer()], autoload=False)
    assert runtime.resolve_adapter(tiny_llava()) is ClaimingAdapter
    assert calls == ["LlavaForConditionalGeneration"]


def test_a_resolver_returning_none_lets_the_others_decide() -> None:
    class Abstainer:
        __name__ = "abstainer"

        @hookimpl(tryfirst=True)
        def tokenprune_resolve_adapter(self, model: nn.Module, registry: Any) -> None:
            return None

    runtime = Runtime([Abstainer()], autoload=False)
    assert runtime.resolve_adapter(tiny_llava()) is LlavaAdapter


# -- observer hook ------------------------------------------------------------------------------
def test_after_prune_observes_each_pipeline_call() -> None:
    seen: list[tuple[PruneContext, Any, Pipeline]] = []

    class Observer:
        __name__ = "observer"

        @hookimpl
        def tokenprune_after_prune(self, ctx: PruneContext, pruned: Any, pipeline: Any) -> str:
            seen.append((ctx, pruned, pipeline))
            return "ignored"

    runtime = Runtime([Observer()], autoload=False)
    pipeline = runtime.build_pipeline(
        {"scorer": {"name": "random"}, "selector": {"name": "topk"}, "keep": 3}
    )
    ctx = PruneContext(visual=VisualTokens(torch.randn(2, 8, 4)), keep=3)
    pruned = pipeline(ctx)
    assert len(seen) == 1
    assert seen[0][0] is ctx
    assert seen[0][1] is pruned
    assert seen[0][2] is pipeline
    pipeline(ctx)
    assert len(seen) == 2
