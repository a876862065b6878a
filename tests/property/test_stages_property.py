"""Property tests over every registered stage (built-ins and installed plugins).

Random batch sizes, token counts, widths, dtypes (float32, bfloat16, float16) and budgets from 1
to ``N``, with random, constant and tied scores:

- scorers return finite floating ``(B, N)`` maps;
- selectors keep exactly ``K`` unique, in-range indices per image, in spatial (ascending) order;
- mergers return ``K`` finite tokens of the input dtype, with the weights each merger documents
  (see :data:`WEIGHT_RULES`);
- every stage is deterministic: equal inputs (equal seeds) give equal outputs, also from a fresh
  instance, and the global RNG is untouched.

Each property runs under the hypothesis profile loaded by ``tests/conftest.py`` (``default``: a
bounded number of examples; ``HYPOTHESIS_PROFILE=slow`` for more) and again, marked ``slow``,
under the ``slow`` profile.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune import (
    BudgetError,
    Merger,
    Pipeline,
    PruneContext,
    PrunedTokens,
    Runtime,
    Scorer,
    Selection,
    Selector,
    Stage,
    StageConfig,
    TextTokens,
    VisualTokens,
)
from tokenprune.context import Stash
from tokenprune.functional.pool import pool_shape
from tokenprune.plugin import PluginWarning
from tokenprune.stages.selectors.visionzip import VISIONZIP_SPLIT
from tokenprune.testing import make_context, registered_stages

with warnings.catch_warnings():
    # A work-in-progress plugin of this repository that fails to load must not stop collection.
    warnings.simplefilter("ignore", PluginWarning)
    RUNTIME = Runtime()

STAGES = registered_stages(RUNTIME)
SCORERS = [s for s in STAGES if issubclass(s, Scorer)]
SELECTORS = [s for s in STAGES if issubclass(s, Selector)]
MERGERS = [s for s in STAGES if issubclass(s, Merger)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MAX_TOKENS = 40
PROFILES = [
    pytest.param(None, id="default"),
    pytest.param("slow", id="slow", marks=pytest.mark.slow),
]


def stage_id(stage_cls: type[Stage[Any]]) -> str:
    return f"{stage_cls.role}:{stage_cls.name}"


def run_property(profile: str | None, check: Callable[[st.DataObject], None]) -> None:
    """Run ``check`` under the loaded profile (``None``) or the named one."""
    chosen = settings() if profile is None else settings.get_profile(profile)

    @settings(chosen)
    @given(data=st.data())
    def prop(data: st.DataObject) -> None:
        check(data)

    prop()


# -- inputs ---------------------------------------------------------------------------------------


def config_of(stage_cls: type[Stage[Any]]) -> StageConfig:
    hook = getattr(stage_cls, "contract_config", None)
    return hook() if hook is not None else stage_cls.Config(name=stage_cls.name)


def num_layers(*stages: Stage[Any]) -> int:
    """Vision blocks the context needs for the layers the stages read."""
    layers = [i for stage in stages for i in stage.vision_layers()]
    return max([2, *(i + 1 if i >= 0 else -i for i in layers)])


def cast_module(module: Any, dtype: torch.dtype) -> Any:
    """A ``dtype`` copy of a (shared, frozen) context module; the original stays untouched."""
    return copy.deepcopy(module).to(dtype) if isinstance(module, torch.nn.Module) else module


def cast_context(ctx: PruneContext, dtype: torch.dtype) -> PruneContext:
    """``ctx`` with every tensor and module in ``dtype``, as a half-precision model gives it."""
    if dtype == torch.float32:
        return ctx
    parts = ("layer_norm", "q_proj", "k_proj", "v_proj", "out_proj")
    blocks = {
        i: dataclasses.replace(
            block,
            hidden=block.hidden.to(dtype),
            **{part: cast_module(getattr(block, part), dtype) for part in parts},
        )
        for i, block in ctx.blocks.items()
    }
    text = ctx.text
    if text is not None and text.embeddings is not None:
        text = TextTokens(texts=text.texts, embeddings=text.embeddings.to(dtype), mask=text.mask)
    return dataclasses.replace(
        ctx,
        visual=VisualTokens(ctx.visual.features.to(dtype), grid=ctx.visual.grid),
        blocks=blocks,
        text=text,
        projector=cast_module(ctx.projector, dtype),
        stash=Stash(),
    )


@dataclasses.dataclass(frozen=True)
class Draw:
    """One drawn input size: batch, tokens, width, dtype, budget and seed."""

    batch: int
    num_tokens: int
    dim: int
    dtype: torch.dtype
    keep: int
    seed: int

    def context(self, *stages: Stage[Any]) -> PruneContext:
        ctx = make_context(
            self.batch,
            self.num_tokens,
            self.dim,
            self.keep,
            seed=self.seed,
            num_layers=num_layers(*stages),
        )
        return cast_context(ctx, self.dtype)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def draw_sizes(data: st.DataObject) -> Draw:
    num_tokens = data.draw(st.integers(1, MAX_TOKENS), label="N")
    return Draw(
        batch=data.draw(st.integers(1, 3), label="B"),
        num_tokens=num_tokens,
        dim=data.draw(st.sampled_from([4, 8, 16]), label="D"),
        dtype=data.draw(st.sampled_from(DTYPES), label="dtype"),
        keep=data.draw(st.integers(1, num_tokens), label="K"),
        seed=data.draw(st.integers(0, 2**16), label="seed"),
    )


SCORE_KINDS = ("random", "constant", "ties")


def make_scores(kind: str, draw: Draw, dtype: torch.dtype) -> torch.Tensor:
    shape = (draw.batch, draw.num_tokens)
    g = draw.generator()
    if kind == "random":
        scores = torch.rand(shape, generator=g)
    elif kind == "constant":
        scores = torch.full(shape, float(torch.randn(1, generator=g)))
    else:  # few distinct values: many ties
        scores = torch.randint(0, 3, shape, generator=g).float()
    return scores.to(dtype)


def call(fn: Callable[[], Any]) -> Any:
    """Call a stage and check that it left the global torch RNG alone."""
    state = torch.random.get_rng_state()
    result = fn()
    assert torch.equal(state, torch.random.get_rng_state()), "the stage used the global RNG"
    return result


def maps_of(scores: Any) -> dict[str, torch.Tensor]:
    return {"scores": scores} if isinstance(scores, torch.Tensor) else dict(scores)


# -- scorers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("stage_cls", SCORERS, ids=stage_id)
def test_scorer_properties(stage_cls: type[Scorer[Any]], profile: str | None) -> None:
    stage = stage_cls.from_config(config_of(stage_cls), stages=RUNTIME.stages)

    def check(data: st.DataObject) -> None:
        draw = draw_sizes(data)
        first = maps_of(call(lambda: stage.score(draw.context(stage))))
        assert first, "no score map"
        for key, value in first.items():
            assert tuple(value.shape) == (draw.batch, draw.num_tokens), (key, value.shape)
            assert value.is_floating_point(), (key, value.dtype)
            assert bool(torch.isfinite(value).all()), f"score map {key!r} has NaN/Inf: {draw}"
        fresh = stage_cls.from_config(stage.config, stages=RUNTIME.stages)
        for again in (stage, fresh):  # no state between calls; equal configs, equal scores
            second = maps_of(call(lambda s=again: s.score(draw.context(stage))))
            assert second.keys() == first.keys()
            assert all(torch.equal(first[k], second[k]) for k in first), draw

    run_property(profile, check)


# -- selectors ------------------------------------------------------------------------------------


def select_input(stage_cls: type[Selector[Any]], kind: str, draw: Draw) -> Any:
    names = getattr(stage_cls, "contract_score_names", None)
    if names is None:
        return make_scores(kind, draw, draw.dtype)
    return {
        name: make_scores(kind, dataclasses.replace(draw, seed=draw.seed + i), draw.dtype)
        for i, name in enumerate(names())
    }


def pool_fits(draw: Draw) -> bool:
    grid = make_context(1, draw.num_tokens, 4, 1).visual.grid
    assert grid is not None
    try:
        pool_shape(grid, draw.keep)
    except BudgetError:
        return False
    return True


def check_selection(selection: Any, draw: Draw) -> None:
    assert isinstance(selection, Selection)
    idx = selection.keep_idx
    assert idx.dtype == torch.long
    assert tuple(idx.shape) == (draw.batch, draw.keep), (tuple(idx.shape), draw)
    assert bool(((idx >= 0) & (idx < draw.num_tokens)).all()), "index out of range"
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "not strictly increasing (order or duplicates)"
    for row in idx.tolist():
        assert len(set(row)) == draw.keep


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("stage_cls", SELECTORS, ids=stage_id)
def test_selector_properties(stage_cls: type[Selector[Any]], profile: str | None) -> None:
    stage = stage_cls.from_config(config_of(stage_cls), stages=RUNTIME.stages)

    def check(data: st.DataObject) -> None:
        draw = draw_sizes(data)
        kind = data.draw(st.sampled_from(SCORE_KINDS), label="scores")
        scores = select_input(stage_cls, kind, draw)
        if stage.name == "pool" and not pool_fits(draw):
            # Documented: no h' x w' = K window grid fits the patch grid.
            with pytest.raises(BudgetError, match=f"keep={draw.keep}"):
                stage.select(scores, draw.context(stage))
            return
        first = call(lambda: stage.select(scores, draw.context(stage)))
        check_selection(first, draw)
        fresh = stage_cls.from_config(stage.config, stages=RUNTIME.stages)
        for again in (stage, fresh):
            second = call(lambda s=again: s.select(scores, draw.context(stage)))
            assert torch.equal(first.keep_idx, second.keep_idx), (kind, draw)
        if stage.name == "topk":  # the K best, ties to the lower index
            s = scores.float()
            kept = s.gather(1, first.keep_idx)
            mask = first.mask(draw.num_tokens)
            for b in range(draw.batch):
                dropped = s[b][~mask[b]]
                if dropped.numel():
                    assert float(kept[b].min()) >= float(dropped.max())
            if kind == "constant":
                assert first.keep_idx.tolist() == [list(range(draw.keep))] * draw.batch

    run_property(profile, check)


# -- mergers --------------------------------------------------------------------------------------


def weights_sum_to_n(pruned: PrunedTokens, ctx: PruneContext) -> None:
    w = pruned.weights.double()
    assert bool((w >= 1 - 1e-6).all()), "a merged token stands for fewer than one token"
    n = float(ctx.visual.num_tokens)
    torch.testing.assert_close(w.sum(-1), torch.full_like(w[:, 0], n), rtol=1e-2, atol=1e-2)


def mass_preserved(pruned: PrunedTokens, ctx: PruneContext) -> None:
    """Means of a partition: the weighted outputs add up to the inputs."""
    weights_sum_to_n(pruned, ctx)
    total_in = ctx.visual.features.double().sum(1)
    total_out = (pruned.features.double() * pruned.weights.double().unsqueeze(-1)).sum(1)
    scale = float(ctx.visual.features.double().abs().sum(1).max()) + 1.0
    tol = 1e-4 if ctx.visual.features.dtype == torch.float32 else 3e-2
    assert float((total_in - total_out).abs().max()) <= tol * scale


def ones(pruned: PrunedTokens, ctx: PruneContext) -> None:
    assert bool((pruned.weights == 1).all()), "drop: every kept token stands for itself"


def visionzip_weights(pruned: PrunedTokens, ctx: PruneContext) -> None:
    # 1 per dominant token, 1 + members per contextual target: N in all whenever an image has a
    # target; with none (K too small for one), the dropped tokens are discarded: K in all.
    split = ctx.stash.get(VISIONZIP_SPLIT)
    if split is not None and torch.equal(split.keep_idx, pruned.keep_idx):
        targets = ~split.dominant
    else:  # after another selector every kept token is a target
        targets = torch.ones_like(pruned.keep_idx, dtype=torch.bool)
    w = pruned.weights.double()
    assert bool((w[~targets] == 1).all()), "a dominant token absorbed others"
    assert bool((w[targets] >= 1).all())
    k, n = pruned.num_kept, ctx.visual.num_tokens
    expected = torch.where(targets.any(-1), n, k).double()
    torch.testing.assert_close(w.sum(-1), expected, rtol=1e-2, atol=1e-2)


def prumerge_weights(pruned: PrunedTokens, ctx: PruneContext) -> None:
    # w_i = 1 + the [CLS] attention of its k neighbours: between 1 and 1 + all the attention.
    attention = ctx.cls_attention(-1).double().sum(-1, keepdim=True)
    w = pruned.weights.double()
    assert bool((w >= 1 - 1e-3).all())
    assert bool((w <= 1 + attention + 1e-2).all())


WEIGHT_RULES: dict[str, Callable[[PrunedTokens, PruneContext], None]] = {
    "drop": ones,  # identity on the kept tokens
    "pool_merge": mass_preserved,  # window / cell means, weights = cell sizes (sum N)
    "tome_merge": mass_preserved,  # group means, weights = group sizes (sum N)
    "visionzip_merge": visionzip_weights,  # 1 per dominant, 1 + members per target
    "prumerge_merge": prumerge_weights,  # 1 + neighbours' attention (not a partition)
    "nearest_merge": mass_preserved,  # DeSAP: cluster means, weights = cluster sizes (sum N)
}
"""Merger name -> the documented weights (see each merger's docstring)."""


def test_every_builtin_merger_has_a_weight_rule() -> None:
    builtin = {r.name for r in RUNTIME.stages if r.role == "merger" and r.plugin == "builtin"}
    assert builtin <= set(WEIGHT_RULES)


def random_selection(draw: Draw) -> Selection:
    g = draw.generator()
    rows = [torch.randperm(draw.num_tokens, generator=g)[: draw.keep] for _ in range(draw.batch)]
    return Selection(torch.stack(rows).sort(dim=-1).values)


def check_pruned(pruned: Any, ctx: PruneContext, selection: Selection) -> None:
    assert isinstance(pruned, PrunedTokens)
    b, k = selection.keep_idx.shape
    feats = ctx.visual.features
    assert tuple(pruned.features.shape) == (b, k, feats.shape[-1])
    assert pruned.features.dtype == feats.dtype
    assert bool(torch.isfinite(pruned.features).all()), "merged features have NaN/Inf"
    assert torch.equal(pruned.keep_idx, selection.keep_idx)
    assert tuple(pruned.weights.shape) == (b, k)
    assert bool(torch.isfinite(pruned.weights).all())
    assert bool((pruned.weights > 0).all()), "a token with no weight"


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("stage_cls", MERGERS, ids=stage_id)
def test_merger_properties(stage_cls: type[Merger[Any]], profile: str | None) -> None:
    stage = stage_cls.from_config(config_of(stage_cls), stages=RUNTIME.stages)
    rule = WEIGHT_RULES.get(stage.name)

    def check(data: st.DataObject) -> None:
        draw = draw_sizes(data)
        selection = random_selection(draw)
        ctx = draw.context(stage)
        first = call(lambda: stage.merge(ctx, selection))
        check_pruned(first, ctx, selection)
        if rule is not None:
            rule(first, ctx)
        fresh = stage_cls.from_config(stage.config, stages=RUNTIME.stages)
        for again in (stage, fresh):
            second = call(lambda s=again: s.merge(draw.context(stage), selection))
            assert torch.equal(first.features, second.features), draw
            assert torch.equal(first.weights, second.weights), draw

    run_property(profile, check)


# -- the built-in method pipelines (selector and merger that share a stash entry) -----------------

PRESETS = [r.name for r in RUNTIME.presets if r.plugin == "builtin"]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_pipeline_properties(preset: str, profile: str | None) -> None:
    config = RUNTIME.load_config(preset)
    template = RUNTIME.build_pipeline(config)
    rule = WEIGHT_RULES[template.merger.name]

    def check(data: st.DataObject) -> None:
        draw = draw_sizes(data)
        pipeline = Pipeline(*template.stages, keep=draw.keep)
        if template.selector.name == "pool" and not pool_fits(draw):
            return  # covered by the selector property
        ctx = draw.context(*pipeline.stages)
        first = call(lambda: pipeline(ctx))
        check_pruned(first, ctx, Selection(first.keep_idx))
        rule(first, ctx)
        second = call(lambda: pipeline(draw.context(*pipeline.stages)))
        assert torch.equal(first.features, second.features)
        assert torch.equal(first.keep_idx, second.keep_idx)

    run_property(profile, check)
