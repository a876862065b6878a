"""The DeSAP stages: contract, equality with the functional core, selection and merge rules."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor

from tokenprune import (
    Capability,
    CapabilityError,
    ConfigError,
    PruneContext,
    Selection,
    ShapeError,
    VisualTokens,
)
from tokenprune.testing import check_stage, make_context
from tokenprune_desap import functional as F
from tokenprune_desap.merger import NearestMerger
from tokenprune_desap.scorer import DesapScorer, DesapScorerConfig
from tokenprune_desap.selector import DesapJointSelector
from tokenprune_desap.text_encoder import PairedTextEncoder

DIM = 16  # conftest.SMALL_DIM: the width of small_encoder's vision tower
QUESTIONS = (
    "what is the colour of the star ?",
    "how many red objects are there ?",
    "describe this image",
)


def _ctx(batch: int = 3, n: int = 16, keep: int = 6, **kwargs: Any) -> PruneContext:
    kwargs.setdefault("text", QUESTIONS[:batch])
    return make_context(batch, n, DIM, keep, seed=7, num_layers=3, **kwargs)


# -- contract ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage_cls", [DesapScorer, DesapJointSelector, NearestMerger])
def test_stage_contract(stage_cls: Any) -> None:
    check_stage(stage_cls)


@pytest.mark.parametrize(
    "overrides",
    [
        {"weighting": "cls_attention"},
        {"space": "projected"},
    ],
)
def test_merger_contract_with_options(overrides: dict[str, Any]) -> None:
    class Configured(NearestMerger):
        @classmethod
        def contract_config(cls) -> Any:
            return cls.Config(name=cls.name, **overrides)

    check_stage(Configured)


# -- scorer --------------------------------------------------------------------------------------


def _clip_reference(
    ctx: PruneContext, encoder: PairedTextEncoder, cfg: DesapScorerConfig
) -> dict[str, Tensor]:
    """DeSAP's two maps composed directly from the functional core and the CLIP modules."""
    clip: Any = encoder.clip
    block = ctx.blocks[ctx.layer_index(cfg.layer)]
    normed = block.layer_norm(block.hidden)
    decoupled = F.decoupled_attention(
        normed,
        block.q_proj,
        block.k_proj,
        block.v_proj,
        block.out_proj,
        block.num_heads,
        encoding=cfg.encoding,
    )
    joint = F.l2_normalize(clip.visual_projection(clip.vision_model.post_layernorm(decoupled)))
    assert ctx.text is not None
    assert ctx.text.texts is not None
    batch = encoder.tokenizer(list(ctx.text.texts), padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        hidden = clip.text_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    text = F.l2_normalize(clip.text_projection(hidden))
    eos = mask.sum(-1) - 1  # right padding: the last valid token
    if not cfg.text_start_token:
        mask = mask.clone()
        mask[:, 0] = False
    task = F.fcma_relevance(
        joint[:, 1:],
        joint[:, 0],
        text,
        mask,
        text[torch.arange(len(eos)), eos],
        lam=cfg.lam,
        align=cfg.align,
    )
    sal_block = ctx.blocks[ctx.layer_index(cfg.saliency_layer)]
    saliency = F.cls_attention(
        sal_block.layer_norm(sal_block.hidden), sal_block.q_proj, sal_block.k_proj, 2, 1
    )
    return {"task": task, "saliency": saliency}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"encoding": "qk", "lam": 0.5},
        {"encoding": "kk", "align": False},
        {"encoding": "vv", "layer": -2, "saliency_layer": -3},
        {"text_start_token": False},
    ],
    ids=["defaults", "qk-lam", "kk-no-align", "vv-layers", "no-start-token"],
)
def test_scorer_equals_functional_composition(
    small_encoder: PairedTextEncoder, options: dict[str, Any]
) -> None:
    ctx = _ctx()
    scorer = DesapScorer(text_encoder=small_encoder, **options)
    out = scorer.score(ctx)
    expected = _clip_reference(ctx, small_encoder, scorer.config)
    assert set(out) == {"task", "saliency"}
    for key in out:
        assert out[key].shape == (3, 16)
        torch.testing.assert_close(out[key], expected[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("text_global", ["mean", "last"])
def test_scorer_llm_embeddings_equals_functional_composition(text_global: str) -> None:
    ctx = _ctx()
    scorer = DesapScorer(text_source="llm_embeddings", text_global=text_global)
    out = scorer.score(ctx)
    block = ctx.blocks[2]
    normed = block.layer_norm(block.hidden)
    decoupled = F.decoupled_attention(
        normed, block.q_proj, block.k_proj, block.v_proj, block.out_proj, 2
    )
    assert ctx.projector is not None
    assert ctx.text is not None
    assert ctx.text.embeddings is not None
    assert ctx.text.mask is not None
    visual = F.l2_normalize(ctx.projector(decoupled[:, 1:]))
    text = F.l2_normalize(ctx.text.embeddings)
    mask = ctx.text.mask
    if text_global == "mean":
        q_t = torch.stack([text[b][mask[b]].mean(0) for b in range(3)])
    else:
        q_t = torch.stack([text[b][mask[b]][-1] for b in range(3)])
    task = F.fcma_relevance(visual, visual.mean(1), text, mask, q_t, lam=0.1)
    torch.testing.assert_close(out["task"], task, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["saliency"], ctx.cls_attention(-1))


def test_scorer_received_attention_without_cls() -> None:
    ctx = _ctx(with_cls_block=False)
    scorer = DesapScorer(text_source="llm_embeddings", saliency="received_attention")
    out = scorer.score(ctx)
    torch.testing.assert_close(out["saliency"], ctx.received_attention(-1))
    assert Capability.RECEIVED_ATTENTION in scorer.required_capabilities()
    assert Capability.CLS_ATTENTION not in scorer.required_capabilities()


def test_scorer_capabilities_and_layers(small_encoder: PairedTextEncoder) -> None:
    clip = DesapScorer(text_encoder=small_encoder, layer=-2, saliency_layer=-3)
    assert clip.required_capabilities() == {
        Capability.VISION_BLOCK,
        Capability.CLS_ATTENTION,
        Capability.TEXT_QUERY,
    }
    assert clip.vision_layers() == {-2, -3}
    llm = DesapScorer(text_source="llm_embeddings")
    assert llm.required_capabilities() == {
        Capability.VISION_BLOCK,
        Capability.CLS_ATTENTION,
        Capability.TEXT_EMBEDDINGS,
        Capability.PROJECTOR,
    }


def test_scorer_config_needs_text_encoder_for_clip() -> None:
    with pytest.raises(ValueError, match="text_encoder"):
        DesapScorerConfig()
    with pytest.raises(ValueError, match="lam"):
        DesapScorerConfig(text_source="llm_embeddings", lam=0.0)


def test_scorer_clip_source_needs_question_text(small_encoder: PairedTextEncoder) -> None:
    ctx = _ctx()
    assert ctx.text is not None
    no_question = dataclasses.replace(ctx, text=dataclasses.replace(ctx.text, texts=None))
    with pytest.raises(CapabilityError, match="tokenprune_query"):
        DesapScorer(text_encoder=small_encoder).score(no_question)
    with pytest.raises(CapabilityError, match="tokenprune_query"):
        DesapScorer(text_encoder=small_encoder).score(dataclasses.replace(ctx, text=None))


def test_scorer_clip_source_needs_cls(small_encoder: PairedTextEncoder) -> None:
    ctx = _ctx(with_cls_block=False)
    scorer = DesapScorer(text_encoder=small_encoder, saliency="received_attention")
    with pytest.raises(CapabilityError, match=r"\[CLS\]"):
        scorer.score(ctx)


# -- selector ------------------------------------------------------------------------------------


def _select(task: Tensor, saliency: Tensor, keep: int, **options: Any) -> Tensor:
    ctx = PruneContext(visual=VisualTokens(torch.zeros(task.shape[0], task.shape[1], 2)), keep=keep)
    selection = DesapJointSelector(**options).select({"task": task, "saliency": saliency}, ctx)
    return selection.keep_idx


def test_selector_task_branch_first_then_saliency_among_the_rest() -> None:
    task = torch.tensor([[0.0, 0.4, 0.1, 0.8, 0.2, 0.9, 0.3, 0.1, 0.0, 0.7]])
    saliency = torch.tensor([[0.1, 0.0, 0.8, 0.95, 0.3, 0.9, 0.1, 0.6, 0.2, 0.0]])
    # K = 4: task top-2 = {5, 3}; saliency over the rest: 3 and 5 are taken -> {2, 7}.
    assert _select(task, saliency, 4).tolist() == [[2, 3, 5, 7]]
    # Odd K = 5 gives the extra token to the task branch: {5, 3, 9} + {2, 7}.
    assert _select(task, saliency, 5).tolist() == [[2, 3, 5, 7, 9]]
    # task_fraction moves the split: 1 by task, 3 by saliency.
    assert _select(task, saliency, 4, task_fraction=0.25).tolist() == [[2, 3, 5, 7]]
    assert _select(task, saliency, 4, task_fraction=0.0).tolist() == [[2, 3, 5, 7]]
    assert _select(task, saliency, 3, task_fraction=1.0).tolist() == [[3, 5, 9]]


@pytest.mark.parametrize("keep", [1, 2, 7, 32, 63, 64])
@pytest.mark.parametrize("fraction", [0.5, 0.3, 1.0])
def test_selector_properties(keep: int, fraction: float) -> None:
    g = torch.Generator().manual_seed(keep)
    task = torch.rand(4, 64, generator=g)
    saliency = torch.randint(0, 5, (4, 64), generator=g).float()  # many ties
    idx = _select(task, saliency, keep, task_fraction=fraction)
    assert idx.shape == (4, keep)
    assert idx.dtype == torch.long
    assert bool((idx[:, 1:] > idx[:, :-1]).all())  # raster order, no duplicates
    k1, k2 = F.split_budget(keep, fraction)
    for b in range(4):
        chosen = set(idx[b].tolist())
        by_task = set(torch.sort(task[b], descending=True, stable=True).indices[:k1].tolist())
        assert by_task <= chosen
        rest = sorted(set(range(64)) - by_task)
        order = torch.sort(saliency[b, rest], descending=True, stable=True).indices[:k2]
        by_saliency = {rest[i] for i in order.tolist()}
        assert by_task.isdisjoint(by_saliency)
        assert chosen == by_task | by_saliency
    task_idx, sal_idx = F.joint_rank_branches(task, saliency, keep, fraction)
    expected = torch.sort(torch.cat([task_idx, sal_idx], 1), 1).values
    assert torch.equal(idx, expected)


def test_selector_custom_keys() -> None:
    ctx = _ctx()
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(3, 16, generator=g), "b": torch.rand(3, 16, generator=g)}
    selector = DesapJointSelector(task_key="a", saliency_key="b")
    expected = F.joint_rank_select(scores["a"], scores["b"], 6)
    assert torch.equal(selector.select(scores, ctx).keep_idx, expected)


def test_selector_errors_when_maps_are_missing() -> None:
    ctx = _ctx()
    selector = DesapJointSelector()
    with pytest.raises(ConfigError, match=r"'task' and 'saliency'.*one unnamed map"):
        selector.select(torch.rand(3, 16), ctx)
    with pytest.raises(ConfigError, match=r"got \['saliency', 'scores'\].*task_key"):
        selector.select({"scores": torch.rand(3, 16), "saliency": torch.rand(3, 16)}, ctx)
    with pytest.raises(ShapeError, match="'saliency' must be"):
        selector.select({"task": torch.rand(3, 16), "saliency": torch.rand(3, 15)}, ctx)


# -- merger --------------------------------------------------------------------------------------


def _members(similarity: Tensor, keep: Tensor) -> list[list[list[int]]]:
    """Members of each cluster, by an independent cosine argmax (ties: lower kept index)."""
    out = []
    for b in range(similarity.shape[0]):
        z = torch.nn.functional.normalize(similarity[b].double(), dim=-1)
        centres = keep[b].tolist()
        clusters: list[list[int]] = [[c] for c in centres]
        for i in range(similarity.shape[1]):
            if i in centres:
                continue
            sims = z[i] @ z[centres].T
            clusters[int(torch.argmax(sims))].append(i)
        out.append(clusters)
    return out


def test_merger_preserves_each_cluster_sum() -> None:
    ctx = _ctx(batch=2, n=16, keep=5)
    keep = Selection(torch.tensor([[0, 3, 7, 8, 15], [1, 2, 4, 9, 12]]))
    pruned = NearestMerger().merge(ctx, keep)
    features = ctx.visual.features
    assert pruned.features.shape == (2, 5, DIM)
    assert torch.equal(pruned.keep_idx, keep.keep_idx)
    for b, clusters in enumerate(_members(features, keep.keep_idx)):
        for k, members in enumerate(clusters):
            assert float(pruned.weights[b, k]) == len(members)
            torch.testing.assert_close(
                pruned.features[b, k] * pruned.weights[b, k], features[b, members].sum(0)
            )
    torch.testing.assert_close(
        (pruned.features * pruned.weights[..., None]).sum(1), features.sum(1)
    )


def test_merger_projected_space_uses_ctx_projector() -> None:
    # In feature space token 2 is closest to token 0; after a projector that zeroes the first
    # coordinate it is closest to token 1.
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.5]]])
    calls: list[Tensor] = []

    def projector(x: Tensor) -> Tensor:
        calls.append(x)
        return x * torch.tensor([0.0, 1.0])

    ctx = PruneContext(
        visual=VisualTokens(features),
        keep=2,
        capabilities=frozenset({Capability.PROJECTOR}),
        projector=projector,
    )
    selection = Selection(torch.tensor([[0, 1]]))
    plain = NearestMerger().merge(ctx, selection)
    projected = NearestMerger(space="projected").merge(ctx, selection)
    assert len(calls) == 1
    assert calls[0] is features
    assert plain.weights.tolist() == [[2.0, 1.0]]
    assert projected.weights.tolist() == [[1.0, 2.0]]
    torch.testing.assert_close(projected.features, torch.tensor([[[1.0, 0.0], [0.45, 0.75]]]))
    assert NearestMerger(space="projected").required_capabilities() == {Capability.PROJECTOR}


def test_merger_projected_space_equals_functional_composition() -> None:
    ctx = _ctx(batch=3, n=16, keep=4)
    selection = Selection(F.joint_rank_select(torch.rand(3, 16), torch.rand(3, 16), 4))
    assert ctx.projector is not None
    out = NearestMerger(space="projected").merge(ctx, selection)
    features = ctx.visual.features
    merged, sizes = F.nearest_merge(
        features, selection.keep_idx, similarity_features=ctx.projector(features)
    )
    assert torch.equal(out.features, merged)
    assert torch.equal(out.weights, sizes)


def test_merger_projected_space_without_projector() -> None:
    ctx = PruneContext(visual=VisualTokens(torch.rand(1, 4, 2)), keep=2)
    with pytest.raises(CapabilityError, match="projector"):
        NearestMerger(space="projected").merge(ctx, Selection(torch.tensor([[0, 1]])))


def test_merger_cls_attention_weighting() -> None:
    ctx = _ctx(batch=2, n=16, keep=4)
    selection = Selection(torch.tensor([[0, 5, 6, 11], [2, 3, 13, 14]]))
    merger = NearestMerger(weighting="cls_attention", saliency_layer=-2)
    assert merger.vision_layers() == {-2}
    assert merger.required_capabilities() == {Capability.VISION_BLOCK, Capability.CLS_ATTENTION}
    pruned = merger.merge(ctx, selection)
    weights = ctx.cls_attention(-2)
    merged, sizes = F.nearest_merge(ctx.visual.features, selection.keep_idx, weights=weights)
    assert torch.equal(pruned.features, merged)
    assert torch.equal(pruned.weights, sizes)
    # Weighted sums are preserved: sum_k w_k x'_k = sum_i a_i x_i, sum_k w_k = sum_i a_i.
    features = ctx.visual.features
    weighted_sum = (pruned.features * pruned.weights[..., None]).sum(1)
    torch.testing.assert_close(weighted_sum, (features * weights[..., None]).sum(1))
    torch.testing.assert_close(pruned.weights.sum(1), weights.sum(1))
    for b, clusters in enumerate(_members(features, selection.keep_idx)):
        for k, members in enumerate(clusters):
            torch.testing.assert_close(pruned.weights[b, k], weights[b, members].sum())


def test_merger_rejects_a_bad_selection() -> None:
    ctx = _ctx(batch=2, n=16, keep=2)
    with pytest.raises(ShapeError, match="nearest_merge"):
        NearestMerger().merge(ctx, Selection(torch.tensor([[0, 16], [0, 1]])))
