"""The training script's pure parts: command line, recipe, windows, tower, losses, model card."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    CLIPModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from tokenprune.toy import task
from tokenprune.toy.model import (
    ASSETS,
    PROMPT,
    TowerSize,
    build_clip_config,
    build_clip_tokenizer,
    build_llava_config,
    pixel_values,
)
from tokenprune.toy.train import (
    CAPTION_QUESTION,
    LISTING_QUESTION,
    WINDOW_SHAPES,
    DenseHeads,
    Recipe,
    Vlm,
    _status,
    binding_listing,
    encode_targets,
    parse_args,
    qa_loss,
    render_batch,
    stage_groups,
    step_crops,
    tower_features,
    window_hidden_states,
    write_model_card,
    zero_shot_single_objects,
)


def test_command_line_sets_the_recipe() -> None:
    args, recipe = parse_args(
        ["--run-dir", "RUN", "--a-lr", "0.003", "--a-target", "0.9", "--c-steps", "10", "--finish"]
    )
    assert args.finish
    assert (recipe.a_lr, recipe.a_target, recipe.c_steps) == (0.003, 0.9, 10)
    assert parse_args(["--run-dir", "RUN"])[1] == Recipe()


def test_crop_share_is_a_share() -> None:
    assert parse_args(["--run-dir", "RUN", "--crop-share", "0.25"])[1].crop_share == 0.25
    assert Recipe(crop_share=0.0).crop_share == 0.0
    assert Recipe(crop_share=1.0).crop_share == 1.0
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\] \(--crop-share\)"):
            Recipe(crop_share=bad)
    with pytest.raises(ValueError, match="crop_share"):
        parse_args(["--run-dir", "RUN", "--crop-share", "2"])


def test_status_says_where_training_stopped_and_which_targets_are_missed() -> None:
    recipe = Recipe(c_steps=2000)
    test = {"accuracy": {"attribute": 0.5, "existence": 0.95, "overall": 0.71}}
    text = _status(recipe, {"stopped_at": 700, "test": test})
    assert "step 700 of the 2000-step" in text
    assert "**not met** (attribute 0.500 < 0.9)." in text
    met = {"accuracy": {"attribute": 0.91, "existence": 0.95, "overall": 0.71}}
    assert "Targets" in _status(recipe, {"stopped_at": 2000, "test": met})
    assert "stopped" not in _status(recipe, {"stopped_at": 2000, "test": met})
    assert _status(recipe, {}) == ""


def test_binding_listing_names_every_object_once_in_a_seeded_order() -> None:
    scene = task.Scene(
        tuple(
            task.SceneObject(colour, shape, 6, 0, col, 10 + 30 * col, 10)
            for col, (colour, shape) in enumerate([("red", "star"), ("blue", "circle")])
        ),
        texture_seed=0,
    )
    a = binding_listing(scene, np.random.default_rng(1))
    assert sorted(a.split(" , ")) == ["the circle is blue", "the star is red"]
    assert a == binding_listing(scene, np.random.default_rng(1))
    orders = {binding_listing(scene, np.random.default_rng(s)) for s in range(20)}
    assert len(orders) == 2  # both orders occur: the position in the list carries no answer


def test_stage_c_adds_one_listing_group_only_when_the_recipe_asks() -> None:
    idx = [10_000_000, 10_000_001]
    scenes = [task.train_scene(0, i)[0] for i in idx]
    plain = stage_groups("c", idx, scenes, 0, Recipe(questions_per_image=3, listings_per_image=0))
    assert [len(g) for g in plain] == [6, 2]
    assert {q for q, _ in plain[1]} == {CAPTION_QUESTION}
    listed = stage_groups("c", idx, scenes, 0, Recipe(questions_per_image=3, listings_per_image=1))
    assert listed[:2] == plain
    assert [q for q, _ in listed[2]] == [LISTING_QUESTION] * 2
    for scene, (_, text) in zip(scenes, listed[2], strict=True):
        assert sorted(text.split(" , ")) == sorted(
            f"the {o.shape} is {o.colour}" for o in scene.objects
        )
    assert stage_groups("b", idx, scenes, 0, Recipe(listings_per_image=1)) == [
        [(CAPTION_QUESTION, s.caption()) for s in scenes]
    ]


def test_stage_groups_speak_of_the_window_only() -> None:
    idx = [10_000_000, 10_000_001]
    full = [task.train_scene(0, i)[0] for i in idx]
    crops = [task.sample_crop(s, 1, 2, np.random.default_rng(3)) for s in full]
    shown = [task.crop_scene(s, c) for s, c in zip(full, crops, strict=True)]
    assert all(len(s.objects) < len(f.objects) for s, f in zip(shown, full, strict=True))
    groups = stage_groups("c", idx, shown, 0, Recipe(questions_per_image=4, listings_per_image=1))
    assert groups[1] == [(CAPTION_QUESTION, s.caption()) for s in shown]
    for scene, (_, text) in zip(shown, groups[2], strict=True):
        assert sorted(text.split(" , ")) == sorted(
            f"the {o.shape} is {o.colour}" for o in scene.objects
        )
    for k, scene in enumerate(shown):
        for question, answer in groups[0][4 * k : 4 * k + 4]:
            if question.startswith("What colour is the "):
                shape = question.removeprefix("What colour is the ").removesuffix("?")
                assert [o.colour for o in scene.objects if o.shape == shape] == [answer]


# ----------------------------------------------------------------------------- windows


def _scenes(n: int, start: int = 0) -> list[task.Scene]:
    return [task.train_scene(0, i)[0] for i in range(start, start + n)]


def test_render_batch_of_full_scenes_labels_every_patch() -> None:
    scenes = _scenes(2)
    batch = render_batch(scenes)
    assert batch.scenes == scenes
    assert batch.images.shape == (2, task.IMAGE_SIZE, task.IMAGE_SIZE, 3)
    assert torch.equal(batch.patch_ids, torch.arange(task.NUM_PATCHES).expand(2, -1))
    for b, scene in enumerate(scenes):
        image, obj_map = task.render(scene)
        np.testing.assert_array_equal(batch.images[b], image)
        idx = task.patch_object_index(obj_map)
        for p in range(task.NUM_PATCHES):
            if idx[p] < 0:
                assert batch.colour[b, p] == batch.shape[b, p] == batch.largest[b, p] == 0
            else:
                o = scene.objects[idx[p]]
                assert batch.colour[b, p] == 1 + task.COLOUR_NAMES.index(o.colour)
                assert batch.shape[b, p] == 1 + task.SHAPES.index(o.shape)
                assert batch.largest[b, p] == int(o is scene.largest)
        assert int(batch.largest[b].sum()) > 0


def test_render_batch_cuts_windows_with_the_full_scene_labels() -> None:
    scenes = _scenes(3)
    rng = np.random.default_rng(0)
    crops = [task.sample_crop(s, 2, 1, rng) for s in scenes]
    full = render_batch(scenes)
    batch = render_batch(scenes, crops)
    assert batch.images.shape == (3, 2 * task.CELL, task.CELL, 3)
    assert batch.patch_ids.shape == (3, crops[0].num_patches)
    assert batch.scenes == [task.crop_scene(s, c) for s, c in zip(scenes, crops, strict=True)]
    for b, crop in enumerate(crops):
        ids = torch.from_numpy(crop.patch_ids)
        assert torch.equal(batch.patch_ids[b], ids)
        np.testing.assert_array_equal(batch.images[b], crop.pixels(full.images[b]))
        for name in ("colour", "shape", "largest"):
            assert torch.equal(getattr(batch, name)[b], getattr(full, name)[b, ids])
        shown = {(o.colour, o.shape) for o in batch.scenes[b].objects}
        labelled = {
            (task.COLOUR_NAMES[c - 1], task.SHAPES[s - 1])
            for c, s in zip(batch.colour[b].tolist(), batch.shape[b].tolist(), strict=True)
            if c
        }
        assert labelled == shown  # every object in the window is labelled, none outside


def test_render_batch_rejects_mixed_or_missing_windows() -> None:
    scenes = _scenes(2)
    with pytest.raises(ValueError, match="all of the same size"):
        render_batch(scenes, [task.Crop(0, 0, 1, 1), task.Crop(0, 0, 1, 2)])
    with pytest.raises(ValueError, match="one window per scene"):
        render_batch(scenes, [task.Crop(0, 0, 1, 1)])
    with pytest.raises(ValueError, match="one window per scene"):
        render_batch(scenes, [task.FULL, task.Crop(0, 0, 2, 2)])


def test_step_crops_are_seeded_by_stage_and_step() -> None:
    scenes = _scenes(4)
    assert step_crops(scenes, 0, "c", 5, 0.0) is None
    first = step_crops(scenes, 0, "c", 5, 1.0)
    assert first is not None
    assert first == step_crops(scenes, 0, "c", 5, 1.0)
    sizes = set()
    for step in range(20):
        crops = step_crops(scenes, 0, "a", step, 1.0)
        assert crops is not None
        assert len(crops) == len(scenes)
        size = {(c.rows, c.cols) for c in crops}
        assert len(size) == 1
        assert size <= set(WINDOW_SHAPES)
        sizes |= size
        for scene, crop in zip(scenes, crops, strict=True):
            assert task.crop_scene(scene, crop).objects
    assert len(sizes) > 1
    others = [step_crops(scenes, seed, stage, 5, 1.0) for seed, stage in ((1, "c"), (0, "a"))]
    assert all(o != first for o in others)
    shares = [step_crops(scenes, 0, "c", step, 0.5) is None for step in range(40)]
    assert 0 < sum(shares) < 40


def test_dense_heads_give_every_head_per_patch() -> None:
    heads = DenseHeads(16)
    out = heads(torch.randn(2, 5, 16))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "colour": (2, 5, len(task.COLOUR_NAMES) + 1),
        "shape": (2, 5, len(task.SHAPES) + 1),
        "largest": (2, 5, 2),
        "row": (2, 5, task.GRID),
        "col": (2, 5, task.GRID),
    }


TINY_TOWER = TowerSize(hidden=16, layers=2, heads=2, text_hidden=16, text_layers=1, projection=8)


@pytest.fixture(scope="module")
def tiny_clip() -> CLIPModel:
    """A seeded random CLIP model of the toy configuration."""
    torch.manual_seed(0)
    return CLIPModel(build_clip_config(TINY_TOWER, 16)).eval()


def test_window_hidden_states_on_full_images_are_the_towers_own(tiny_clip: CLIPModel) -> None:
    batch = render_batch(_scenes(2))
    pixels = pixel_values(batch.images)
    with torch.no_grad():
        ours = window_hidden_states(tiny_clip.vision_model, pixels, batch.patch_ids)
        theirs = tiny_clip.vision_model(pixel_values=pixels, output_hidden_states=True)
    assert len(ours) == len(theirs.hidden_states) == TINY_TOWER.layers + 1
    for a, b in zip(ours, theirs.hidden_states, strict=True):
        assert torch.equal(a, b)


def test_window_hidden_states_give_patches_their_full_image_positions(
    tiny_clip: CLIPModel,
) -> None:
    scenes = _scenes(2)
    crops = [task.Crop(1, 1, 1, 1), task.Crop(2, 0, 1, 1)]
    full = render_batch(scenes)
    window = render_batch(scenes, crops)
    vision = tiny_clip.vision_model
    with torch.no_grad():
        whole = window_hidden_states(vision, pixel_values(full.images), full.patch_ids)
        ours = window_hidden_states(vision, pixel_values(window.images), window.patch_ids)
        moved = window_hidden_states(
            vision,
            pixel_values(window.images),
            torch.from_numpy(np.stack([c.patch_ids for c in crops[::-1]])),
        )
    assert ours[-1].shape == (2, 1 + 16, TINY_TOWER.hidden)
    # the embeddings (before attention) are the full image's at the window's patches
    torch.testing.assert_close(ours[0][:, 0], whole[0][:, 0])
    for b in range(2):
        torch.testing.assert_close(ours[0][b, 1:], whole[0][b, 1 + window.patch_ids[b]])
    # the same pixels at other positions give other features
    assert not torch.allclose(ours[0][:, 1:], moved[0][:, 1:])
    assert not torch.allclose(ours[-1][:, 1:], moved[-1][:, 1:])


# ----------------------------------------------------------------------------- VLM


@pytest.fixture(scope="module")
def lm_tokenizer() -> PreTrainedTokenizerBase:
    """The shipped processor's SmolLM2 tokenizer (committed, offline)."""
    return AutoTokenizer.from_pretrained(ASSETS / "processor")


def _tiny_vlm(lm_tokenizer: PreTrainedTokenizerBase) -> Vlm:
    """A seeded random LLaVA with the shipped tokenizer and the training prompt's prefix."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=96,
        patch_size=8,
    )
    text = LlamaConfig(
        vocab_size=len(lm_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    image_id = int(lm_tokenizer.convert_tokens_to_ids("<image>"))  # type: ignore[arg-type]
    model = LlavaForConditionalGeneration(build_llava_config(vision, text, image_id))
    model.set_attn_implementation("eager")
    prefix = lm_tokenizer(PROMPT.split("<image>")[0], add_special_tokens=False)["input_ids"]
    assert prefix[0] == lm_tokenizer.bos_token_id
    return Vlm(model, SimpleNamespace(tokenizer=lm_tokenizer), prefix, lm_tokenizer.eos_token_id)


def test_qa_loss_equals_one_uncached_forward(lm_tokenizer: PreTrainedTokenizerBase) -> None:
    vlm = _tiny_vlm(lm_tokenizer)
    model = vlm.model
    lm = model.model.language_model
    scenes = _scenes(2)
    feats = torch.randn(2, 16, 16)  # windows of one cell: 16 visual tokens
    groups = [
        [(f"What colour is the {s.objects[0].shape}?", s.objects[0].colour) for s in scenes],
        [(CAPTION_QUESTION, s.caption()) for s in scenes],
    ]
    loss, stats = qa_loss(vlm, feats, groups)
    assert set(stats) == {"loss_g0", "loss_g1"}
    with torch.no_grad():
        prefix = lm.embed_tokens(torch.tensor(vlm.prefix_ids)).expand(2, -1, -1)
        image = model.model.multi_modal_projector(feats)
        expected = []
        for pairs in groups:
            ids, mask, labels = encode_targets(vlm.tok, pairs, vlm.eos_id)
            embeds = torch.cat([prefix, image, lm.embed_tokens(ids)], 1)
            p_len = prefix.shape[1] + image.shape[1]
            full_mask = torch.cat([torch.ones(2, p_len, dtype=torch.long), mask], 1)
            hidden = lm(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
            target = labels[:, 1:]
            keep = target != -100
            logits = model.lm_head(hidden[:, p_len:-1][keep])
            expected.append(F.cross_entropy(logits, target[keep]).item())
    assert [stats["loss_g0"], stats["loss_g1"]] == pytest.approx(expected, rel=1e-4)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-4)
    loss.backward()
    weight = model.model.multi_modal_projector.linear_1.weight
    assert weight.grad is not None
    assert weight.grad.abs().sum() > 0


def test_tower_features_are_the_vlms_layer_minus_two(
    lm_tokenizer: PreTrainedTokenizerBase,
) -> None:
    vlm = _tiny_vlm(lm_tokenizer)
    scenes = _scenes(2)
    full = render_batch(scenes)
    feats = tower_features(vlm, full)
    assert feats.shape == (2, task.NUM_PATCHES, 16)
    assert not feats.requires_grad
    with torch.no_grad():
        out = vlm.model.model.vision_tower(
            pixel_values=pixel_values(full.images), output_hidden_states=True
        )
    assert torch.equal(feats, out.hidden_states[-2][:, 1:])
    window = render_batch(scenes, [task.Crop(0, 0, 2, 3)] * 2)
    assert tower_features(vlm, window).shape == (2, 6 * 16, 16)


def test_model_card_states_the_optional_stage_c_targets_and_the_windows(tmp_path: Path) -> None:
    plain, extra = tmp_path / "plain", tmp_path / "extra"
    plain.mkdir()
    extra.mkdir()
    write_model_card(
        plain,
        Recipe(listings_per_image=0, crop_share=0.0),
        {"validation": {"overall": 0.5}, "step": 3},
    )
    write_model_card(
        extra,
        Recipe(listings_per_image=1, crop_share=0.5),
        {"validation": {"overall": 0.5}, "step": 3},
    )
    plain_card = (plain / "MODEL_CARD.md").read_text()
    extra_card = (extra / "MODEL_CARD.md").read_text()
    assert "8 images x (8 questions + 1 caption); the image prefix" in plain_card
    assert "binding listing" not in plain_card
    assert "in 0 % of the stage-a and stage-c" in plain_card
    assert "(8 questions + 1 caption + 1 binding listing" in extra_card
    assert "in 50 % of the stage-a and stage-c" in extra_card
    prompt = "`" + PROMPT.replace("\n", "\\n") + "`."
    for card in (plain_card, extra_card):
        assert prompt in card
        assert "Object-attention" not in card
        assert "no loss on the language model's attention" in card


def test_zero_shot_counts_every_object_and_scores_a_perfect_classifier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each object is classified once; a CLIP whose image and caption embeddings agree scores 1."""
    tok = build_clip_tokenizer()
    clip = CLIPModel(build_clip_config(TINY_TOWER, len(tok))).eval()
    scenes = [
        task.sample_scene(task.rng_for(task.SPLITS["test"], 0, "zero-shot", i)) for i in range(3)
    ]
    out = zero_shot_single_objects(clip, tok, 0, scenes=3)
    assert out["objects"] == sum(len(s.objects) for s in scenes)
    assert all(0.0 <= out[k] <= 1.0 for k in ("joint", "colour", "shape"))
    assert out["joint"] <= min(out["colour"], out["shape"])

    # An oracle CLIP: the image embedding is the one-hot of the window's object, the caption
    # embedding the one-hot of the caption's pair, so every object is recognised.
    pairs = [(c, s) for c in task.COLOUR_NAMES for s in task.SHAPES]
    shown: list[int] = []

    def fake_render(batch_scenes: list[task.Scene], crops: list[task.Crop]) -> Any:
        shown.clear()
        for scene, crop in zip(batch_scenes, crops, strict=True):
            (obj,) = task.crop_scene(scene, crop).objects
            shown.append(pairs.index((obj.colour, obj.shape)))
        return render_batch(batch_scenes, crops)

    class OneHot(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.tensor(shown), len(pairs)).float()

    import tokenprune.toy.train as train_module

    monkeypatch.setattr(train_module, "render_batch", fake_render)
    monkeypatch.setattr(clip, "visual_projection", OneHot())
    monkeypatch.setattr(clip, "text_projection", torch.nn.Identity())

    class Captions(torch.nn.Module):
        def forward(self, **_: Any) -> SimpleNamespace:
            return SimpleNamespace(pooler_output=torch.eye(len(pairs)))

    monkeypatch.setattr(clip, "text_model", Captions())
    perfect = zero_shot_single_objects(clip, tok, 0, scenes=3)
    assert (perfect["joint"], perfect["colour"], perfect["shape"]) == (1.0, 1.0, 1.0)
