"""Tests of the example plugin, written the way a plugin author would: public API only."""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tokenprune import PruneContext, Runtime, ShapeError, VisualTokens
from tokenprune.plugin import hookimpl
from tokenprune.testing import check_stage, llava_prompts, tiny_llava
from tokenprune_example import FeatureNormScorer, FeatureNormScorerConfig, feature_norm_scores
from tokenprune_example import plugin as example_plugin


def _reference(features: torch.Tensor) -> torch.Tensor:
    return (features.double() ** 2).sum(-1).sqrt().float()


# -- the functional twin ------------------------------------------------------------------------
def test_matches_reference() -> None:
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    out = feature_norm_scores(x)
    assert out.shape == (3, 7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(x))


def test_half_precision_does_not_overflow() -> None:
    x = torch.full((1, 2, 4096), 300.0, dtype=torch.float16)  # sum of squares > fp16 max
    out = feature_norm_scores(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 2), 300.0 * 64))


@pytest.mark.parametrize(
    ("features", "match"),
    [
        (torch.zeros(4, 5), r"\(B, N, D\)"),
        (torch.zeros(1, 4, 5, 2), r"\(B, N, D\)"),
        (torch.zeros(1, 4, 5, dtype=torch.long), "floating-point"),
    ],
)
def test_rejects_bad_input(features: torch.Tensor, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        feature_norm_scores(features)


# -- the stage ----------------------------------------------------------------------------------
def test_stage_contract() -> None:
    """The suite every tokenprune stage passes: shapes, batches, determinism, errors."""
    check_stage(FeatureNormScorer)


def test_stage_is_a_thin_shell() -> None:
    x = torch.randn(2, 6, 4)
    ctx = PruneContext(visual=VisualTokens(x), keep=3)
    scorer = FeatureNormScorer()
    torch.testing.assert_close(scorer.score(ctx), feature_norm_scores(x))
    assert scorer.role == "scorer"
    assert scorer.requires == frozenset()
    assert scorer.vision_layers() == frozenset()
    assert repr(scorer) == "FeatureNormScorer()"


def test_config_is_strict() -> None:
    assert FeatureNormScorerConfig().name == "feature_norm"
    with pytest.raises(ValueError, match="extra"):
        FeatureNormScorerConfig(name="feature_norm", typo=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="feature_norm"):
        FeatureNormScorerConfig(name="other")  # type: ignore[arg-type]


def test_deterministic_and_batch_independent() -> None:
    x = torch.randn(4, 9, 8)
    ctx = PruneContext(visual=VisualTokens(x), keep=2)
    whole = FeatureNormScorer().score(ctx)
    assert torch.equal(whole, FeatureNormScorer().score(ctx))
    one = FeatureNormScorer().score(PruneContext(visual=VisualTokens(x[1:2]), keep=2))
    torch.testing.assert_close(whole[1:2], one)


# -- registration -------------------------------------------------------------------------------
def test_registered_by_the_plugin_module() -> None:
    runtime = Runtime([example_plugin], autoload=False)
    assert runtime.stages.get("scorer", "feature_norm") is FeatureNormScorer
    config = runtime.parse_config(
        {"scorer": {"name": "feature_norm"}, "selector": {"name": "topk"}, "keep": 4}
    )
    assert isinstance(config.scorer, FeatureNormScorerConfig)


def test_found_through_the_entry_point() -> None:
    # desap is another plugin of this repository; it is blocked so that its state cannot matter.
    runtime = Runtime(disabled=["desap"])
    (registration,) = [r for r in runtime.stages if r.name == "feature_norm"]
    assert registration.plugin == "example"
    assert registration.provider == "tokenprune-example 0.1.0"


# -- end to end on a tiny LLaVA -----------------------------------------------------------------
class _Recorder:
    """An observer plugin that keeps what each pruning call saw and produced."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    @hookimpl
    def tokenprune_after_prune(
        self, ctx: PruneContext, pruned: tokenprune.PrunedTokens, pipeline: tokenprune.Pipeline
    ) -> None:
        self.calls.append((ctx.visual.features, pruned.keep_idx))


def test_end_to_end_on_tiny_llava() -> None:
    recorder = _Recorder()
    runtime = Runtime([example_plugin, recorder], autoload=False)
    model = tiny_llava()  # 32 px, patch 8: 16 visual tokens per image
    batch = llava_prompts(model, [(2, 3), (1, 5)])
    keep = 4
    with torch.no_grad():
        full = model(**batch).logits
        config = {"scorer": {"name": "feature_norm"}, "selector": {"name": "topk"}, "keep": keep}
        with tokenprune.apply(model, config, runtime=runtime):
            pruned = model(**batch).logits
            generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert pruned.shape[1] == full.shape[1] - (16 - keep)
    assert len(recorder.calls) == 2  # one forward, one generate (pruned once, before prefill)
    features, keep_idx = recorder.calls[0]
    expected = feature_norm_scores(features).topk(keep, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(keep_idx, expected)
    assert torch.equal(generated[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3
