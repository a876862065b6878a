"""Pruning inside the language model (FastV, multi-stage pipelines) on tiny seeded LLaVA models.

The tiny models have 3 decoder layers, so FastV's default ``K = 2`` exists. ``model`` is a fresh
model per test; ``reference`` an identically seeded one that is never pruned.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import pytest
import torch
from torch import nn

import tokenprune
from tokenprune import (
    AdapterError,
    BudgetError,
    CapabilityError,
    ConfigError,
    Pipeline,
    PruneContext,
    Runtime,
    Scorer,
    StageConfig,
)
from tokenprune.pipeline import LlmStage
from tokenprune.stages.scorers.cls_attention import ClsAttentionScorer
from tokenprune.stages.scorers.fastv import FastVScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.testing import IMAGE_TOKEN_ID, llava_prompts, tiny_llava, tiny_llava_next
from tokenprune.testing.adapter_contract import _snapshot

N = 16  # visual tokens per image (32 px, patch 8)
LAYERS = 3
FASTV = {"llm": [{"layer": 2, "keep_ratio": 0.5}]}
MULTI = {
    "scorer": {"name": "cls_attention"},
    "selector": {"name": "topk"},
    "keep": 8,
    "llm": [{"layer": 1, "keep": 4}, {"layer": 2, "keep_ratio": 0.5}],
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(autoload=False)


@pytest.fixture
def model() -> nn.Module:
    return tiny_llava(layers=LAYERS)


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    return tiny_llava(layers=LAYERS)


def batch(model: nn.Module, padding_side: str = "left", images: list[int] | None = None) -> Any:
    return llava_prompts(
        model,
        [(2, 3), (1, 5), (3, 2)],
        images_per_row=images or [1, 2, 1],
        padding_side=padding_side,
    )


class RecordingFastV(FastVScorer):
    """FastV that keeps every score map it returns (test instrumentation)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def score(self, ctx: PruneContext) -> torch.Tensor:
        scores = super().score(ctx)
        self.seen.append(scores.clone())
        return scores


class FixedScorer(FastVScorer):
    """Returns given score maps, one per call in order (the selection of an earlier run)."""

    def __init__(self, maps: list[torch.Tensor]) -> None:
        super().__init__()
        self.maps = maps
        self.calls = 0

    def score(self, ctx: PruneContext) -> torch.Tensor:
        scores = self.maps[self.calls % len(self.maps)]
        self.calls += 1
        assert scores.shape == (ctx.visual.batch_size, ctx.visual.num_tokens)
        return scores


def stage(scorer: Scorer[Any], layer: int, **budget: Any) -> LlmStage:
    return LlmStage(layer, Pipeline(scorer, TopKSelector(), **budget))


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate`` derives from a left-padded attention mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


# -- (a) keeping every visual token changes nothing ---------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("layer", [1, 2])
def test_keep_all_inside_the_llm_equals_unpruned_logits(
    model: nn.Module, reference: nn.Module, runtime: Runtime, padding_side: str, layer: int
) -> None:
    inputs = batch(model, padding_side, images=[1, 2, 0])
    config = {"llm": [{"layer": layer, "keep_ratio": 1.0}]}
    with torch.no_grad():
        expected = reference(**inputs).logits
        with tokenprune.apply(model, config, runtime=runtime):
            actual = model(**inputs).logits
    assert actual.shape == expected.shape
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=0, atol=1e-5)


# -- (b) the capture equals eager attention ------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [1, 2])
def test_capture_equals_eager_output_attentions(
    padding_side: str, implementation: str, layer: int
) -> None:
    eager = tiny_llava(layers=LAYERS, attn_implementation="eager")
    pruned = tiny_llava(layers=LAYERS, attn_implementation=implementation)
    inputs = batch(eager, padding_side)
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions[layer - 1]
    mask = inputs["attention_mask"]
    last = torch.where(mask.bool(), torch.arange(mask.shape[1]), -1).max(-1).values
    expected = []
    for row in range(mask.shape[0]):
        cols = torch.nonzero(inputs["input_ids"][row] == IMAGE_TOKEN_ID).flatten()
        heads = attentions[row, :, last[row], cols].mean(0)
        expected += list(heads.view(-1, N))  # one map per image of the row, in order
    scorer = RecordingFastV()
    with (
        torch.no_grad(),
        tokenprune.apply(pruned, Pipeline.llm_only([stage(scorer, layer, keep=4)])),
    ):
        pruned(**inputs)
    assert len(scorer.seen) == 1
    torch.testing.assert_close(scorer.seen[0], torch.stack(expected), rtol=0, atol=1e-6)


# -- (c) generate: batch of two, left padding, greedy, with the KV cache -------------------------
def _sequence_lengths(model: nn.Module) -> Any:
    """Sequence length of every output of the last decoder layer."""
    lengths: list[int] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        lengths.append(int(output.shape[1]))

    return lengths, model.model.language_model.layers[-1].register_forward_hook(hook)


@pytest.mark.parametrize("setting", ["fastv", "encoder+llm"])
def test_cached_generate_equals_uncached_recomputation(
    model: nn.Module, runtime: Runtime, setting: str
) -> None:
    inputs = llava_prompts(model, [(2, 3), (1, 6)], images_per_row=[1, 2])
    prompt = inputs["input_ids"].shape[1]
    recorders = [RecordingFastV(), RecordingFastV()]
    if setting == "fastv":
        pipeline = Pipeline.llm_only([stage(recorders[0], 2, keep_ratio=0.5)])
        fixed_encoder: dict[str, Any] = {}
    else:
        fixed_encoder = {"keep": 8}
        pipeline = Pipeline(
            ClsAttentionScorer(),
            TopKSelector(),
            keep=8,
            llm=[stage(recorders[0], 1, keep=4), stage(recorders[1], 2, keep_ratio=0.5)],
        )
    lengths, handle = _sequence_lengths(model)
    with torch.no_grad(), tokenprune.apply(model, pipeline, runtime=runtime):
        out = model.generate(
            **inputs,
            max_new_tokens=5,
            do_sample=False,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=True,
        )
    handle.remove()
    new = out.sequences[:, prompt:]
    assert out.sequences.shape[0] == 2
    assert new.shape[1] == 5
    assert torch.equal(out.sequences[:, :prompt], inputs["input_ids"])
    # one prefill on the pruned sequence, then one token per step from the cache
    assert lengths[1:] == [1, 1, 1, 1]
    # row 1 is the longest: 8 text tokens and 2 images of 16 -> 8 (FastV: half), or 8 -> 4 -> 2
    assert lengths[0] == {"fastv": 8 + 2 * 8, "encoder+llm": 8 + 2 * 2}[setting]

    # The same pruned model, recomputed from scratch at every step without a cache, with the
    # selection of the cached run (FastV's scores depend on the last prompt token).
    used = [r for r in recorders if r.seen]
    fixed = [FixedScorer([r.seen[0]]) for r in used]
    layers = [1, 2] if setting == "encoder+llm" else [2]
    budgets: list[dict[str, Any]] = (
        [{"keep": 4}, {"keep_ratio": 0.5}] if setting == "encoder+llm" else [{"keep_ratio": 0.5}]
    )
    llm = [stage(f, layer, **b) for f, layer, b in zip(fixed, layers, budgets, strict=True)]
    if fixed_encoder:
        again = Pipeline(ClsAttentionScorer(), TopKSelector(), keep=8, llm=llm)
    else:
        again = Pipeline.llm_only(llm)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad(), tokenprune.apply(model, again, runtime=runtime):
        for step in range(5):
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=inputs["pixel_values"],
                position_ids=generate_positions(mask),
                use_cache=False,
            ).logits[:, -1]
            torch.testing.assert_close(logits, out.logits[step], rtol=0, atol=1e-4)
            token = logits.argmax(-1)
            assert torch.equal(token, new[:, step])
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


@pytest.mark.parametrize("config", [FASTV, MULTI], ids=["fastv", "encoder+llm"])
def test_generate_batch_of_two_differs_from_unpruned_and_is_deterministic(
    model: nn.Module, reference: nn.Module, runtime: Runtime, config: dict[str, Any]
) -> None:
    inputs = llava_prompts(model, [(2, 3), (1, 6)])
    settings = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        unpruned = reference.generate(**inputs, **settings)
        with tokenprune.apply(model, config, runtime=runtime):
            first = model.generate(**inputs, **settings)
            second = model.generate(**inputs, **settings)
            logits = model(**inputs).logits
    assert torch.equal(first, second)
    assert not torch.equal(first, unpruned)
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(first[:, prompt], logits[:, -1].argmax(-1))


def test_forward_returns_logits_of_the_shortened_sequence(
    model: nn.Module, runtime: Runtime
) -> None:
    inputs = batch(model)  # rows of 6 + 16, 7 + 32, 6 + 16 real tokens, left padded to 39
    with torch.no_grad(), tokenprune.apply(model, FASTV, runtime=runtime):
        logits = model(**inputs).logits
    assert logits.shape[:2] == (3, 7 + 16)  # the longest row after halving each image


def test_a_non_drop_merger_writes_its_tokens_into_the_hidden_states(
    model: nn.Module, runtime: Runtime
) -> None:
    inputs = batch(model)
    drop = {"llm": [{"layer": 2, "keep": 8}]}
    merge = {
        "llm": [{"layer": 2, "keep": 8, "merger": {"name": "tome_merge", "metric": "features"}}]
    }
    with torch.no_grad():
        with tokenprune.apply(model, drop, runtime=runtime):
            dropped = model(**inputs).logits
        with tokenprune.apply(model, merge, runtime=runtime):
            merged = model(**inputs).logits
    assert dropped.shape == merged.shape
    assert not torch.allclose(dropped, merged)


# -- (d) exact restore ---------------------------------------------------------------------------
class _BoomError(RuntimeError):
    pass


class _FailingConfig(StageConfig):
    name: Literal["failing_llm"] = "failing_llm"


class FailingScorer(Scorer[_FailingConfig]):
    name: ClassVar[str] = "failing_llm"
    Config: ClassVar[type[StageConfig]] = _FailingConfig

    def score(self, ctx: PruneContext) -> torch.Tensor:
        raise _BoomError("raised inside an LLM stage")


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_exact_restore_after_remove_and_after_a_failing_stage(
    model: nn.Module, reference: nn.Module, runtime: Runtime, call: str
) -> None:
    inputs = batch(model)
    settings = {"max_new_tokens": 3, "do_sample": False}
    with torch.no_grad():
        expected = reference(**inputs).logits
        expected_generate = reference.generate(**inputs, **settings)
        model(**inputs)
        model.generate(**inputs, **settings)
    original = _snapshot(model)

    handle = tokenprune.apply(model, MULTI, runtime=runtime)
    with torch.no_grad():
        model(**inputs)
        model.generate(**inputs, **settings)
    assert any(name.startswith("tokenprune.llm.layer") for name in handle.hook_names)
    handle.remove()
    assert _snapshot(model) == original

    failing = Pipeline.llm_only([stage(FailingScorer(), 2, keep=4)])
    run = (
        (lambda: model(**inputs))
        if call == "forward"
        else (lambda: model.generate(**inputs, **settings))
    )
    with tokenprune.apply(model, failing, runtime=runtime) as handle:
        installed = _snapshot(model)
        with torch.no_grad(), pytest.raises(_BoomError):
            run()
        assert _snapshot(model) == installed
    assert _snapshot(model) == original
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
        assert torch.equal(model.generate(**inputs, **settings), expected_generate)


# -- (e) bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [3, 7])
def test_layer_out_of_range_is_refused_at_install(
    model: nn.Module, runtime: Runtime, layer: int
) -> None:
    before = _snapshot(model)
    with pytest.raises(AdapterError, match=rf"llm.0.layer={layer} does not exist.*\[1, 2\]"):
        tokenprune.apply(model, {"llm": [{"layer": layer}]}, runtime=runtime)
    assert _snapshot(model) == before


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"llm": [{"layer": 0}]}, ConfigError, r"llm.0.layer: Input should be greater than or"),
        (
            {"llm": [{"layer": 2, "keep": 8}, {"layer": 1, "keep": 4}]},
            ConfigError,
            r"llm.1.layer: 1 does not come after llm.0.layer=2",
        ),
        (
            {**MULTI, "keep": 3},
            BudgetError,
            r"llm.0.keep: 4 keeps more tokens than arrive .* \(keep=3\)",
        ),
        (
            {"llm": [{"layer": 1, "keep": 4}, {"layer": 2, "keep": 6}]},
            BudgetError,
            r"llm.1.keep: 6 keeps more tokens than arrive .* \(llm.0.keep=4\)",
        ),
        ({"llm": [{"keep": 4, "keep_ratio": 0.5}]}, BudgetError, "give exactly one of `keep`"),
        (
            {"scorer": {"name": "fastv"}, "selector": {"name": "topk"}, "keep": 4},
            ConfigError,
            r"scorer 'fastv' requires capability 'llm_attention', which exists only inside",
        ),
        (
            {"llm": [{"scorer": {"name": "cls_attention"}}]},
            ConfigError,
            r"scorer 'cls_attention' at LLM layer 2 requires capability 'cls_attention'",
        ),
        ({"llm": [{"kep": 4}]}, ConfigError, r"llm.0.kep: Extra inputs .* did you mean `keep`"),
        ({"keep": 4, "llm": [{}]}, ConfigError, r"scorer: Field required"),
    ],
)
def test_bad_configs_name_the_field(
    runtime: Runtime, config: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        runtime.build_pipeline(config)


def test_runtime_count_above_the_arriving_tokens_is_a_budget_error(
    model: nn.Module, runtime: Runtime
) -> None:
    config = {  # a ratio then a count: only checkable once N is known (16 -> 4 tokens arrive)
        "scorer": {"name": "cls_attention"},
        "selector": {"name": "topk"},
        "keep_ratio": 0.25,
        "llm": [{"layer": 1, "keep": 5}],
    }
    with (
        tokenprune.apply(model, config, runtime=runtime),
        torch.no_grad(),
        pytest.raises(BudgetError, match="out of range for N=4"),
    ):
        model(**batch(model))


def test_labels_are_refused_with_an_llm_stage(model: nn.Module, runtime: Runtime) -> None:
    inputs = batch(model)
    with (
        tokenprune.apply(model, FASTV, runtime=runtime),
        pytest.raises(AdapterError, match="labels cannot be combined"),
    ):
        model(**inputs, labels=inputs["input_ids"])


def test_adapter_without_the_capability_refuses_with_a_hint(runtime: Runtime) -> None:
    model = tiny_llava_next()
    with pytest.raises(CapabilityError, match=r"needs capability 'llm_attention'.*llava_next"):
        tokenprune.apply(model, FASTV, runtime=runtime)
    assert not model._forward_pre_hooks


def test_continuing_a_pruned_cache_with_several_tokens_is_refused(
    model: nn.Module, runtime: Runtime
) -> None:
    inputs = llava_prompts(model, [(2, 3), (1, 6)])
    with torch.no_grad(), tokenprune.apply(model, FASTV, runtime=runtime):
        out = model(**inputs, use_cache=True)
        more = torch.randint(10, 900, (2, 3))
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(more)], 1)
        with pytest.raises(AdapterError, match="one token at a time"):
            model(input_ids=more, attention_mask=mask, cache=out.cache)


def test_a_prompt_ending_in_an_image_is_refused(model: nn.Module, runtime: Runtime) -> None:
    inputs = llava_prompts(model, [(2, 0), (1, 0)])
    with (
        tokenprune.apply(model, FASTV, runtime=runtime),
        pytest.raises(AdapterError, match="needs text after the image"),
    ):
        model(**inputs)


# -- the shipped model ---------------------------------------------------------------------------
def test_multi_stage_generate_on_the_shipped_model(shipped_toy_model: None) -> None:
    """DeSAP at the encoder (a third of 144 tokens) then FastV to 16 before layer 2, batch 2."""
    from tokenprune.toy import model as toy_model
    from tokenprune.toy import task

    model, proc = toy_model.load_default_model()
    examples = [task.make_example("test", i, "attribute", 0) for i in range(2)]
    questions = [e.question.text for e in examples]
    inputs = proc([task.render(e.scene)[0] for e in examples], questions)
    config = {
        "scorer": {
            "name": "desap",
            "text_source": "clip",
            "text_encoder": str(toy_model.ASSETS / "clip"),
        },
        "selector": {"name": "desap_joint", "task_fraction": 0.5},
        "merger": {"name": "nearest_merge"},
        "keep_ratio": 0.333,
        "llm": [{"layer": 2, "keep": 16}],
    }
    lengths, handle = _sequence_lengths(model)
    with torch.no_grad(), tokenprune.apply(model, config):
        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, tokenprune_query=questions
        )
    handle.remove()
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :prompt], inputs["input_ids"])
    assert out.shape[0] == 2
    assert lengths[0] == prompt - 144 + 16  # 144 -> 48 at the encoder -> 16 from layer 2 on
    assert set(lengths[1:]) <= {1}
    assert not model._forward_pre_hooks
