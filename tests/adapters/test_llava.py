"""The adapter contract on tiny seeded random LLaVA models (``tokenprune.testing.tiny_llava``).

Most tests use 32 px images with patch 8 (16 visual tokens per image); the acceptance test uses
LLaVA-1.5's 336 px / patch 14 (576 tokens). ``model`` is a fresh model per test; ``reference`` is
an identically seeded model that is never pruned.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokenprune
from tokenprune import AdapterError, PruneContext, PruneHandle, Runtime, Scorer, StageConfig
from tokenprune.plugin import hookimpl
from tokenprune.testing import IMAGE_TOKEN_ID, llava_prompts, tiny_llava

N = 16  # visual tokens per image of the default tiny model (32 px, patch 8)
Positions = Literal["contiguous", "original"]


def config(keep: int, positions: Positions = "contiguous", **scorer: Any) -> dict[str, Any]:
    return {
        "scorer": {"name": "cls_attention", **scorer},
        "selector": {"name": "topk"},
        "keep": keep,
        "positions": positions,
    }


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads cost more in synchronisation than they save.

    On a busy 2-core machine this makes the module about 3x faster; the setting is restored.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(autoload=False)


@pytest.fixture
def model() -> nn.Module:
    return tiny_llava()


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    """Never pruned: the ground truth for every comparison."""
    return tiny_llava()


class Recorder:
    """Observer plugin: keeps the context and result of every pruning call."""

    def __init__(self) -> None:
        self.calls: list[tuple[PruneContext, tokenprune.PrunedTokens]] = []

    @hookimpl
    def tokenprune_after_prune(
        self, ctx: PruneContext, pruned: tokenprune.PrunedTokens, pipeline: tokenprune.Pipeline
    ) -> None:
        self.calls.append((ctx, pruned))


class LMInputs:
    """Forward pre-hook on the language model that records its keyword arguments."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handle = model.model.language_model.register_forward_pre_hook(
            self._hook, with_kwargs=True
        )

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls.append(dict(kwargs))

    def __enter__(self) -> LMInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def expected_length(
    batch: dict[str, torch.Tensor], images_per_row: list[int], keep: int, n: int = N
) -> int:
    """Length of the re-padded batch: the longest row after dropping ``n - keep`` per image."""
    real = batch["attention_mask"].sum(-1)
    return max(int(r) - i * (n - keep) for r, i in zip(real, images_per_row, strict=True))


def assert_close_on(mask: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Compare logits on real tokens only (logits at padding positions carry no meaning)."""
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-5)


LAYOUTS = {
    "one-each": ([(2, 3), (1, 5)], [1, 1]),
    "0-1-2-images": ([(2, 3), (1, 5), (3, 1)], [0, 1, 2]),
    "2-0-images": ([(1, 2), (4, 4)], [2, 0]),
}


# -- equivalence: keeping every token changes nothing -------------------------------------------
@pytest.mark.parametrize("positions", ["contiguous", "original"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("layout", ["one-each", "0-1-2-images"])
def test_keep_all_equals_unpruned_forward(
    model: nn.Module,
    reference: nn.Module,
    runtime: Runtime,
    positions: Positions,
    padding_side: str,
    layout: str,
) -> None:
    lengths, images = LAYOUTS[layout]
    batch = llava_prompts(model, lengths, images_per_row=images, padding_side=padding_side)
    with torch.no_grad():
        expected = reference(**batch).logits
        with tokenprune.apply(model, config(N, positions), runtime=runtime):
            actual = model(**batch).logits
    assert actual.shape == expected.shape
    assert_close_on(batch["attention_mask"], actual, expected)


@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_keep_all_equals_unpruned_generate(
    model: nn.Module, reference: nn.Module, runtime: Runtime, positions: Positions
) -> None:
    batch = llava_prompts(model, [(2, 3), (1, 5), (3, 1)], images_per_row=[1, 2, 0])
    with torch.no_grad():
        expected = reference.generate(**batch, max_new_tokens=5, do_sample=False)
        with tokenprune.apply(model, config(N, positions), runtime=runtime):
            actual = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(actual, expected)


# -- K < N: shorter sequences, different outputs ------------------------------------------------
@pytest.mark.parametrize("positions", ["contiguous", "original"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pruning_drops_n_minus_k_tokens_per_image(
    model: nn.Module,
    reference: nn.Module,
    runtime: Runtime,
    positions: Positions,
    padding_side: str,
    layout: str,
) -> None:
    keep = 4
    lengths, images = LAYOUTS[layout]
    batch = llava_prompts(model, lengths, images_per_row=images, padding_side=padding_side)
    with torch.no_grad():
        full = reference(**batch).logits
        with (
            tokenprune.apply(model, config(keep, positions), runtime=runtime),
            LMInputs(model) as lm,
        ):
            pruned = model(**batch).logits
    assert pruned.shape[1] == expected_length(batch, images, keep)
    (call,) = lm.calls
    mask = call["attention_mask"]
    removed = torch.tensor(images) * (N - keep)
    assert torch.equal(mask.sum(-1), batch["attention_mask"].sum(-1) - removed)
    # The batch is re-padded on the side it was padded on: 0..0 1..1 (left) or 1..1 0..0.
    assert torch.equal(mask, mask.sort(dim=-1, descending=padding_side == "right").values)
    assert not bool(mask.all())
    for row, n_images in enumerate(images):
        last_pruned = pruned[row, mask[row].nonzero().max()]
        last_full = full[row, batch["attention_mask"][row].nonzero().max()]
        if n_images:
            assert not torch.allclose(last_pruned, last_full, atol=1e-4)
        else:  # a row without images only moves (RoPE is relative): same prediction
            torch.testing.assert_close(last_pruned, last_full, rtol=0, atol=1e-4)


def test_generate_on_pruned_multi_image_rows(model: nn.Module, runtime: Runtime) -> None:
    batch = llava_prompts(model, [(2, 3), (1, 5), (3, 1)], images_per_row=[0, 1, 2])
    prompt = batch["input_ids"]
    with (
        torch.no_grad(),
        tokenprune.apply(model, config(4), runtime=runtime),
        LMInputs(model) as lm,
    ):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    assert out.shape[1] == prompt.shape[1] + 3
    assert lm.calls[0]["inputs_embeds"].shape[1] == expected_length(batch, [0, 1, 2], 4)


# -- acceptance: LLaVA-1.5 geometry (576 tokens), keep 64, generate -----------------------------
@pytest.fixture(scope="module")
def llava15_pair() -> tuple[nn.Module, nn.Module]:
    """A tiny LLaVA at 336 px / patch 14 (576 tokens) and an identical never-pruned twin."""
    return tiny_llava(336, 14), tiny_llava(336, 14)


def test_acceptance_llava15_576_tokens_keep_64_generate(
    llava15_pair: tuple[nn.Module, nn.Module],
) -> None:
    model, reference = llava15_pair
    n, keep, new = 576, 64, 4
    recorder = Recorder()
    runtime = Runtime([recorder], autoload=False)
    batch = llava_prompts(model, [(3, 9), (1, 4)], padding_side="left")
    prompt = batch["input_ids"]
    assert (prompt == IMAGE_TOKEN_ID).sum().item() == 2 * n
    assert batch["attention_mask"][1, 0] == 0  # the shorter prompt is left padded

    def run(m: nn.Module, sample: bool) -> torch.Tensor:
        torch.manual_seed(1234)
        return m.generate(
            **batch, max_new_tokens=new, min_new_tokens=new, do_sample=sample, use_cache=True
        )

    with torch.no_grad():
        handle = tokenprune.apply(model, config(keep), runtime=runtime)
        with LMInputs(model) as lm:
            greedy = run(model, sample=False)
        sampled = run(model, sample=True)
        sampled_again = run(model, sample=True)
        handle.remove()
        after = {sample: run(model, sample) for sample in (False, True)}
        truth = {sample: run(reference, sample) for sample in (False, True)}

    for out in (greedy, sampled):
        assert out.shape == (2, prompt.shape[1] + new)
        assert torch.equal(out[:, : prompt.shape[1]], prompt)  # the caller's prompt, unpruned
    assert torch.equal(sampled, sampled_again)  # seeded sampling is reproducible while pruned
    # Pruned once, before prefill; the prefill saw 64 tokens per image, decoding used the cache.
    assert len(recorder.calls) == 3
    assert all(pruned.keep_idx.shape == (2, keep) for _, pruned in recorder.calls)
    prefill, *steps = lm.calls
    assert prefill["inputs_embeds"].shape[1] == expected_length(batch, [1, 1], keep, n)
    assert len(steps) == new - 1
    assert all(step["inputs_embeds"].shape[1] == 1 for step in steps)
    # Removed: exactly the never-pruned model again, greedy and sampled.
    assert torch.equal(after[False], truth[False])
    assert torch.equal(after[True], truth[True])


# -- pruning runs once per call -----------------------------------------------------------------
def test_prunes_once_per_generate_never_per_token(model: nn.Module) -> None:
    recorder = Recorder()
    runtime = Runtime([recorder], autoload=False)
    tower_calls: list[int] = []
    hook = model.model.vision_tower.register_forward_hook(lambda *_: tower_calls.append(1))
    batch = llava_prompts(model, [(2, 3), (1, 5)])
    with torch.no_grad(), tokenprune.apply(model, config(4), runtime=runtime):
        model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert len(recorder.calls) == 1
        model(**batch)
        assert len(recorder.calls) == 2
    hook.remove()
    assert len(tower_calls) == 2  # one vision pass per call as well


# -- position policies --------------------------------------------------------------------------
def kept_columns(
    batch: dict[str, torch.Tensor], images: list[int], keep_idx: torch.Tensor
) -> list[torch.Tensor]:
    """Independent reference: the unpruned columns each row keeps, in order."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image = 0
    rows = []
    for row in range(ids.shape[0]):
        cols = [c for c in range(ids.shape[1]) if mask[row, c] and ids[row, c] != IMAGE_TOKEN_ID]
        starts = (ids[row] == IMAGE_TOKEN_ID).nonzero().flatten()[::N].tolist()
        assert len(starts) == images[row]
        for start in starts:
            cols += (start + keep_idx[image]).tolist()
            image += 1
        rows.append(torch.tensor(sorted(cols)))
    return rows


def real_positions(call: dict[str, Any]) -> list[torch.Tensor]:
    pos, mask = call["position_ids"], call["attention_mask"]
    return [pos[row][mask[row].bool()] for row in range(mask.shape[0])]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_original_positions_forward(model: nn.Module, padding_side: str) -> None:
    recorder = Recorder()
    runtime = Runtime([recorder], autoload=False)
    images = [1, 2]
    batch = llava_prompts(model, [(2, 3), (1, 5)], images_per_row=images, padding_side=padding_side)
    pipeline = config(4, "original")
    with torch.no_grad(), tokenprune.apply(model, pipeline, runtime=runtime), LMInputs(model) as lm:
        model(**batch)
    ((_, pruned),) = recorder.calls
    length = batch["input_ids"].shape[1]
    unpruned = torch.arange(length)  # what a forward pass numbers its tokens with
    expected = [unpruned[cols] for cols in kept_columns(batch, images, pruned.keep_idx)]
    for got, want in zip(real_positions(lm.calls[0]), expected, strict=True):
        assert torch.equal(got, want)


def test_original_positions_generate(model: nn.Module, reference: nn.Module) -> None:
    recorder = Recorder()
    runtime = Runtime([recorder], autoload=False)
    images = [1, 1, 2]
    batch = llava_prompts(model, [(2, 3), (1, 5), (4, 1)], images_per_row=images)
    with torch.no_grad():
        with LMInputs(reference) as ref_lm:
            reference.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        pipeline = config(4, "original")
        with tokenprune.apply(model, pipeline, runtime=runtime), LMInputs(model) as lm:
            model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    ((_, pruned),) = recorder.calls
    unpruned = real_positions(ref_lm.calls[0])
    full_cols = [batch["attention_mask"][r].nonzero().flatten() for r in range(len(images))]
    expected = []
    for row, cols in enumerate(kept_columns(batch, images, pruned.keep_idx)):
        lookup = dict(zip(full_cols[row].tolist(), unpruned[row].tolist(), strict=True))
        expected.append(torch.tensor([lookup[c] for c in cols.tolist()]))
    for got, want in zip(real_positions(lm.calls[0]), expected, strict=True):
        assert torch.equal(got, want)
    # Decoding continues after the last original position, exactly like the unpruned model.
    for ours, theirs in zip(lm.calls[1:], ref_lm.calls[1:], strict=True):
        assert torch.equal(ours["position_ids"], theirs["position_ids"])


def test_contiguous_positions(model: nn.Module, runtime: Runtime) -> None:
    images = [1, 2]
    batch = llava_prompts(model, [(2, 3), (1, 5)], images_per_row=images)
    with torch.no_grad(), tokenprune.apply(model, config(4, "contiguous"), runtime=runtime):
        with LMInputs(model) as lm:
            model(**batch)
        forward = lm.calls[0]
        if forward.get("position_ids") is not None:  # the model may number them itself
            length = forward["inputs_embeds"].shape[1]
            assert torch.equal(forward["position_ids"], torch.arange(length).expand(2, -1))
        with LMInputs(model) as lm:
            model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    real = batch["attention_mask"].sum(-1) - torch.tensor(images) * (N - 4)
    for row, got in enumerate(real_positions(lm.calls[0])):
        assert torch.equal(got, torch.arange(int(real[row])))  # 0..L'-1, no gaps
    for step, call in enumerate(lm.calls[1:]):
        assert torch.equal(call["position_ids"].flatten(), real + step)


# -- exact restore ------------------------------------------------------------------------------
def warmed_snapshot(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """:func:`snapshot` after one unpruned forward pass.

    transformers installs its own output-capturing hooks on the vision blocks on the first call
    that asks for hidden states; those are the model's, not ours, so the baseline includes them.
    """
    with torch.no_grad():
        model(**batch)
    return snapshot(model)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Every hook dict and the instance attribute names of every submodule (the model too)."""
    return {
        name: (
            dict(m._forward_pre_hooks),
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks_with_kwargs),
            dict(m._forward_hooks_with_kwargs),
            sorted(m.__dict__),
        )
        for name, m in model.named_modules()
    }


def test_remove_restores_exactly(model: nn.Module, reference: nn.Module, runtime: Runtime) -> None:
    batch = llava_prompts(model, [(2, 3), (1, 5)])
    before = warmed_snapshot(model, batch)
    handle = tokenprune.apply(model, config(4), runtime=runtime)
    assert isinstance(handle, PruneHandle)
    assert handle.active
    assert snapshot(model) != before
    with torch.no_grad():
        model(**batch)
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    handle.remove()
    assert not handle.active
    assert snapshot(model) == before
    assert "generate" not in model.__dict__
    handle.remove()  # idempotent
    assert snapshot(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)


def test_with_block_restores_exactly(model: nn.Module, runtime: Runtime) -> None:
    batch = llava_prompts(model, [(2, 3)])
    before = warmed_snapshot(model, batch)
    with tokenprune.apply(model, config(4), runtime=runtime) as handle, torch.no_grad():
        model(**batch)
    assert not handle.active
    assert snapshot(model) == before


class BoomScorerConfig(StageConfig):
    name: Literal["boom"] = "boom"


class BoomScorer(Scorer[BoomScorerConfig]):
    """Raises in the middle of the pruned forward pass."""

    name: ClassVar[str] = "boom"
    Config: ClassVar[type[StageConfig]] = BoomScorerConfig

    def score(self, ctx: PruneContext) -> torch.Tensor:
        raise RuntimeError("boom")


class BoomPlugin:
    @hookimpl
    def tokenprune_register_stages(self, registry: Any) -> None:
        registry.add(BoomScorer)


def test_restore_after_a_stage_raises(model: nn.Module, reference: nn.Module) -> None:
    runtime = Runtime([BoomPlugin()], autoload=False)
    batch = llava_prompts(model, [(2, 3), (1, 5)])
    before = warmed_snapshot(model, batch)
    cfg = {"scorer": {"name": "boom"}, "selector": {"name": "topk"}, "keep": 4}
    handle = tokenprune.apply(model, cfg, runtime=runtime)
    installed = snapshot(model)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            model.generate(**batch, max_new_tokens=2)
        assert snapshot(model) == installed  # no temporary hook left behind
        with pytest.raises(RuntimeError, match="boom"), handle:  # leaving `with` removes it
            model(**batch)
        assert snapshot(model) == before
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
        torch.testing.assert_close(
            model.generate(**batch, max_new_tokens=3, do_sample=False),
            reference.generate(**batch, max_new_tokens=3, do_sample=False),
        )


def test_installing_twice_raises(model: nn.Module, runtime: Runtime) -> None:
    handle = tokenprune.apply(model, config(4), runtime=runtime)
    with pytest.raises(AdapterError, match="already has a tokenprune pipeline"):
        tokenprune.apply(model, config(8), runtime=runtime)
    handle.remove()
    tokenprune.apply(model, config(8), runtime=runtime).remove()  # free again


def test_two_models_do_not_interfere(
    model: nn.Module, reference: nn.Module, runtime: Runtime
) -> None:
    other = tiny_llava()
    batch = llava_prompts(model, [(2, 3), (1, 5)])
    with torch.no_grad():
        expected = reference(**batch).logits
        expected_gen = reference.generate(**batch, max_new_tokens=3, do_sample=False)
        with tokenprune.apply(model, config(4), runtime=runtime):
            assert "generate" not in other.__dict__
            assert model(**batch).logits.shape[1] == expected.shape[1] - (N - 4)
            torch.testing.assert_close(other(**batch).logits, expected)
            assert torch.equal(
                other.generate(**batch, max_new_tokens=3, do_sample=False), expected_gen
            )
            with tokenprune.apply(other, config(8), runtime=runtime):
                assert other(**batch).logits.shape[1] == expected.shape[1] - (N - 8)
                assert model(**batch).logits.shape[1] == expected.shape[1] - (N - 4)
            torch.testing.assert_close(other(**batch).logits, expected)


# -- [CLS] attention under SDPA -----------------------------------------------------------------
@pytest.mark.parametrize("layer", [-2, -1, 0])
def test_cls_attention_matches_eager_attention_weights(model: nn.Module, layer: int) -> None:
    seen: dict[str, Any] = {}

    class Probe:
        @hookimpl
        def tokenprune_after_prune(self, ctx: PruneContext, pruned: Any, pipeline: Any) -> None:
            seen["cls"] = ctx.cls_attention(layer)
            seen["impl"] = model.model.vision_tower.config._attn_implementation

    runtime = Runtime([Probe()], autoload=False)
    eager = tiny_llava(attn_implementation="eager")
    batch = llava_prompts(model, [(2, 3), (1, 5)])
    with torch.no_grad():
        with tokenprune.apply(model, config(4, layer=layer), runtime=runtime):
            model(**batch)
        attentions = eager.model.vision_tower(
            batch["pixel_values"], output_attentions=True
        ).attentions
    assert seen["impl"] == "sdpa"  # the tower was not switched to eager to get the weights
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    expected = attentions[layer][:, :, 0, 1:].mean(1)  # [CLS] row, patches only, head mean
    torch.testing.assert_close(seen["cls"], expected, rtol=1e-5, atol=1e-6)


# -- errors -------------------------------------------------------------------------------------
@pytest.fixture
def pruned(model: nn.Module, runtime: Runtime) -> Iterator[nn.Module]:
    """``model`` with a keep-4 pipeline installed for the duration of the test."""
    with tokenprune.apply(model, config(4), runtime=runtime):
        yield model


def test_more_images_than_placeholder_spans(pruned: nn.Module) -> None:
    batch = llava_prompts(pruned, [(2, 3), (1, 5)])
    batch["pixel_values"] = torch.cat([batch["pixel_values"], batch["pixel_values"][:1]])
    with pytest.raises(AdapterError, match=r"placeholders for 2 image\(s\).*pixel_values hold 3"):
        pruned(**batch)


def test_more_placeholders_than_images(pruned: nn.Module) -> None:
    batch = llava_prompts(pruned, [(2, 3), (1, 5)])
    batch["pixel_values"] = batch["pixel_values"][:1]
    with pytest.raises(AdapterError, match=r"more image placeholders than the 1 image"):
        pruned(**batch)


def test_truncated_placeholder_span(pruned: nn.Module) -> None:
    batch = llava_prompts(pruned, [(2, 3)])
    ids = batch["input_ids"]
    first = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    ids[0, first] = 5  # 15 placeholders left for a 16-token image
    with pytest.raises(AdapterError, match="shorter than the 16 tokens of image 0"):
        pruned(**batch)


def test_missing_input_ids(pruned: nn.Module) -> None:
    batch = llava_prompts(pruned, [(2, 3)])
    embeds = pruned.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(AdapterError, match="needs input_ids"):
        pruned(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        )


def test_query_of_wrong_length(pruned: nn.Module) -> None:
    batch = llava_prompts(pruned, [(2, 3), (1, 5)])
    with pytest.raises(AdapterError, match=r"1 string\(s\) but the batch has 2 prompt"):
        pruned(**batch, tokenprune_query=["what is it?"])
    with pytest.raises(AdapterError, match="string or a list of strings"):
        pruned.generate(**batch, tokenprune_query=[1, 2], max_new_tokens=1)
    # The right length is accepted and never reaches the model.
    with torch.no_grad():
        out = pruned(**batch, tokenprune_query=["what is it?", "and this?"])
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - (N - 4)


def test_unsupported_model_lists_the_adapters(runtime: Runtime) -> None:
    with pytest.raises(AdapterError, match=r"Linear.*llava \(LlavaForConditionalGeneration\)"):
        tokenprune.apply(nn.Linear(2, 2), config(4), runtime=runtime)


@pytest.mark.parametrize("layer", [2, 5, -3])
def test_vision_layer_out_of_range(model: nn.Module, runtime: Runtime, layer: int) -> None:
    before = snapshot(model)
    with pytest.raises(AdapterError, match=rf"vision layer {layer} does not exist.*2 blocks"):
        tokenprune.apply(model, config(4, layer=layer), runtime=runtime)
    assert snapshot(model) == before  # nothing installed


def test_full_select_strategy_is_refused(model: nn.Module, runtime: Runtime) -> None:
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(AdapterError, match="vision_feature_select_strategy='full'"):
        tokenprune.apply(model, config(4), runtime=runtime)
    assert "generate" not in model.__dict__


def _labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == IMAGE_TOKEN_ID)] = -100
    return labels


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_labels_are_shrunk_with_the_inputs(
    model: nn.Module, reference: nn.Module, runtime: Runtime, padding_side: str
) -> None:
    keep = 4
    images = [1, 2]
    batch = llava_prompts(model, [(2, 3), (1, 5)], images_per_row=images, padding_side=padding_side)
    labels = _labels(batch)
    with torch.no_grad():
        expected = reference(**batch, labels=labels).loss
        with tokenprune.apply(model, config(N), runtime=runtime):
            same = model(**batch, labels=labels).loss
        with tokenprune.apply(model, config(keep), runtime=runtime), LMInputs(model) as lm:
            out = model(**batch, labels=labels)
    torch.testing.assert_close(same, expected)
    assert torch.isfinite(out.loss)
    # Independent reference: the labels of the kept columns (image labels are all -100).
    mask = lm.calls[0]["attention_mask"].bool()
    first_k = torch.arange(keep).expand(sum(images), keep)
    shrunk = torch.full(mask.shape, -100)
    for row, cols in enumerate(kept_columns(batch, images, first_k)):
        shrunk[row, mask[row]] = labels[row, cols]
    manual = F.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), shrunk[:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, manual)


def test_text_only_calls_pass_through(
    model: nn.Module, reference: nn.Module, runtime: Runtime
) -> None:
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad(), tokenprune.apply(model, config(4), runtime=runtime):
        out = model(input_ids=ids, tokenprune_query="q").logits
    torch.testing.assert_close(out, reference(input_ids=ids).logits)
