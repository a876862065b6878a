"""Fault safety: failures, many install/remove cycles and threads never leave a model changed.

- A stage that raises inside ``forward`` or ``generate`` leaves, once the ``with`` block is left,
  a model that computes exactly what a never-pruned copy computes.
- 1,000 apply/remove cycles leave no hook, no instance attribute and no memory behind.
- Two models used from two threads, one pruned and one not, give what each gives alone.
"""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import pytest
import torch
from torch import nn

import tokenprune
from tokenprune import (
    Merger,
    PruneContext,
    PrunedTokens,
    Runtime,
    Scorer,
    Selection,
    Selector,
    StageConfig,
    hookimpl,
)
from tokenprune.stages.base import Scores
from tokenprune.testing import llava_prompts, tiny_llava

Batch = dict[str, torch.Tensor]
KEEP = 4
GENERATE = {"max_new_tokens": 3, "do_sample": False}


class FailingStageError(RuntimeError):
    """What the failing stages raise."""


class FailingScorerConfig(StageConfig):
    name: Literal["failing_scorer"] = "failing_scorer"


class FailingScorer(Scorer[FailingScorerConfig]):
    name: ClassVar[str] = "failing_scorer"
    Config: ClassVar[type[StageConfig]] = FailingScorerConfig

    def score(self, ctx: PruneContext) -> torch.Tensor:
        raise FailingStageError("scorer failed")


class FailingSelectorConfig(StageConfig):
    name: Literal["failing_selector"] = "failing_selector"


class FailingSelector(Selector[FailingSelectorConfig]):
    name: ClassVar[str] = "failing_selector"
    Config: ClassVar[type[StageConfig]] = FailingSelectorConfig

    def select(self, scores: Scores, ctx: PruneContext) -> Selection:
        raise FailingStageError("selector failed")


class FailingMergerConfig(StageConfig):
    name: Literal["failing_merger"] = "failing_merger"


class FailingMerger(Merger[FailingMergerConfig]):
    name: ClassVar[str] = "failing_merger"
    Config: ClassVar[type[StageConfig]] = FailingMergerConfig

    def merge(self, ctx: PruneContext, selection: Selection) -> PrunedTokens:
        raise FailingStageError("merger failed")


class FailingStages:
    __name__ = "failing-stages"

    @hookimpl
    def tokenprune_register_stages(self, registry: Any) -> None:
        for stage in (FailingScorer, FailingSelector, FailingMerger):
            registry.add(stage)


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime([FailingStages()], autoload=False)


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    """Never pruned: what every restored model must compute."""
    return tiny_llava()


@pytest.fixture
def model() -> nn.Module:
    return tiny_llava()  # same seed: the same weights as ``reference``


@pytest.fixture(scope="module")
def batch(reference: nn.Module) -> Batch:
    return llava_prompts(reference, [(2, 3), (1, 5)])


def config(**stages: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "scorer": {"name": "cls_attention"},
        "selector": {"name": "topk"},
        "merger": {"name": "drop"},
        "keep": KEEP,
    }
    data.update({role: {"name": name} for role, name in stages.items()})
    return data


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Every hook dict and the instance attribute names of every submodule, and torch's globals."""
    state: dict[str, Any] = {
        f"{name}.{attr}": dict(getattr(module, attr, {}))
        for name, module in model.named_modules()
        for attr in _HOOK_DICTS
    }
    state.update({f"{name}.__dict__": sorted(m.__dict__) for name, m in model.named_modules()})
    state.update({g: dict(getattr(nn.modules.module, g)) for g in _GLOBAL_HOOKS})
    return state


def outputs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(**batch).logits, model.generate(**batch, **GENERATE)


def warm(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """The snapshot after one unpruned call (hooks a model adds lazily count as its own)."""
    outputs(model, batch)
    return snapshot(model)


# -- a failing stage ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["forward", "generate"])
@pytest.mark.parametrize(
    ("role", "stage"),
    [("scorer", "failing_scorer"), ("selector", "failing_selector"), ("merger", "failing_merger")],
)
def test_a_failing_stage_leaves_the_model_unpruned(
    model: nn.Module,
    reference: nn.Module,
    batch: Batch,
    runtime: Runtime,
    role: str,
    stage: str,
    mode: str,
) -> None:
    before = warm(model, batch)
    call: Callable[[], Any] = (
        (lambda: model(**batch)) if mode == "forward" else (lambda: model.generate(**batch))
    )
    handle = tokenprune.apply(model, config(**{role: stage}), runtime=runtime)
    installed = snapshot(model)
    with torch.no_grad(), pytest.raises(FailingStageError, match=f"{role} failed"):
        call()
    assert snapshot(model) == installed, "a temporary hook survived the failure"
    with pytest.raises(FailingStageError, match=f"{role} failed"), handle, torch.no_grad():
        call()  # the error leaves the `with` block, which uninstalls the pipeline
    assert not handle.active
    assert snapshot(model) == before
    expected_logits, expected_tokens = outputs(reference, batch)
    logits, tokens = outputs(model, batch)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    assert torch.equal(tokens, expected_tokens)
    # And it can be pruned again, with a working pipeline.
    with tokenprune.apply(model, config(), runtime=runtime), torch.no_grad():
        assert model(**batch).logits.shape[1] == expected_logits.shape[1] - (16 - KEEP)


# -- many cycles ----------------------------------------------------------------------------------

CYCLES = 1000
WARM_UP = 200
MAX_GROWTH = 128 * 1024
"""Traced bytes 1,000 cycles may add: CPython's type attribute cache (4096 entries) keeps the
attribute-name strings of lookups alive, a bounded amount; a leak of one object per cycle shows
up in the gc object count instead, and one of over 131 bytes per cycle here."""


def test_apply_remove_cycles_leave_nothing_behind(
    model: nn.Module, batch: Batch, runtime: Runtime, record_property: Any
) -> None:
    before = warm(model, batch)
    attributes = set(model.__dict__)
    pipeline = runtime.build_pipeline(config())

    def cycle() -> None:
        handle = tokenprune.apply(model, pipeline, runtime=runtime)
        assert handle.active
        handle.remove()

    for _ in range(WARM_UP):  # caches inside torch, pluggy and inspect fill up here
        cycle()
    gc.collect()
    tracemalloc.start()
    try:
        gc.collect()
        objects_before = len(gc.get_objects())
        traced_before, _ = tracemalloc.get_traced_memory()
        start = time.perf_counter()
        for _ in range(CYCLES):
            cycle()
        seconds = time.perf_counter() - start
        gc.collect()
        traced_after, peak = tracemalloc.get_traced_memory()
        objects_after = len(gc.get_objects())
    finally:
        tracemalloc.stop()
    growth = traced_after - traced_before
    report = {
        "cycles": CYCLES,
        "seconds": round(seconds, 2),
        "traced_bytes_before": traced_before,
        "traced_bytes_after": traced_after,
        "traced_bytes_growth": growth,
        "traced_bytes_peak": peak,
        "gc_objects_before": objects_before,
        "gc_objects_after": objects_after,
    }
    for key, value in report.items():
        record_property(key, value)
    print(f"\n{CYCLES} apply/remove cycles: {report}")
    assert snapshot(model) == before
    assert set(model.__dict__) == attributes
    assert objects_after - objects_before <= 50, report
    assert growth <= MAX_GROWTH, report
    with torch.no_grad():
        model(**batch)  # still usable, unpruned
    assert snapshot(model) == before


# -- threads --------------------------------------------------------------------------------------


def run_alone(model: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
    results = []
    with torch.no_grad():
        for b in batches:
            results.append(model(**b).logits)
        results.append(model.generate(**batches[0], **GENERATE))
    return results


def test_two_models_in_two_threads(runtime: Runtime, reference: nn.Module) -> None:
    pruned, plain = tiny_llava(), tiny_llava()
    batches = [llava_prompts(plain, [(2, 3), (1, 5)], seed=s) for s in range(3)]
    with tokenprune.apply(pruned, config(), runtime=runtime):
        expected_pruned = run_alone(pruned, batches)
    expected_plain = run_alone(plain, batches)
    assert expected_pruned[0].shape[1] == expected_plain[0].shape[1] - (16 - KEEP)

    results: dict[str, list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(name: str, model: nn.Module) -> None:
        try:
            start.wait(timeout=60)
            out: list[torch.Tensor] = []
            for _ in range(2):  # interleave as much as the scheduler allows
                out = run_alone(model, batches)
            results[name] = out
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    with tokenprune.apply(pruned, config(), runtime=runtime):
        threads = [
            threading.Thread(target=work, args=("pruned", pruned)),
            threading.Thread(target=work, args=("plain", plain)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    assert not errors, errors
    for got, expected in zip(results["pruned"], expected_pruned, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for got, expected in zip(results["plain"], expected_plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert "generate" not in pruned.__dict__
    torch.testing.assert_close(run_alone(pruned, batches)[0], run_alone(reference, batches)[0])
