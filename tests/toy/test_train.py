"""The training script's pure parts: command line, recipe, model-card status."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from tokenprune.toy import task
from tokenprune.toy.model import ASSETS, build_llava_config
from tokenprune.toy.train import (
    ATTENTION_HEADS,
    CAPTION_QUESTION,
    LISTING_QUESTION,
    Recipe,
    Vlm,
    _status,
    absent_object_positions,
    binding_listing,
    encode_targets,
    object_attention_targets,
    parse_args,
    qa_loss,
    render_batch,
    stage_groups,
    tower_features,
    write_model_card,
)


def test_command_line_sets_the_recipe() -> None:
    args, recipe = parse_args(
        ["--run-dir", "RUN", "--a-lr", "0.003", "--a-target", "0.9", "--c-steps", "10", "--finish"]
    )
    assert args.finish
    assert (recipe.a_lr, recipe.a_target, recipe.c_steps) == (0.003, 0.9, 10)
    assert parse_args(["--run-dir", "RUN"])[1] == Recipe()


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
    plain = stage_groups("c", idx, 0, Recipe(questions_per_image=3, listings_per_image=0))
    assert [len(g) for g in plain] == [6, 2]
    assert {q for q, _ in plain[1]} == {CAPTION_QUESTION}
    listed = stage_groups("c", idx, 0, Recipe(questions_per_image=3, listings_per_image=1))
    assert listed[:2] == plain
    assert [q for q, _ in listed[2]] == [LISTING_QUESTION] * 2
    for i, (_, text) in zip(idx, listed[2], strict=True):
        scene, _ = task.train_scene(0, i)
        assert sorted(text.split(" , ")) == sorted(
            f"the {o.shape} is {o.colour}" for o in scene.objects
        )
    assert stage_groups("b", idx, 0, Recipe(listings_per_image=1)) == [
        [(CAPTION_QUESTION, task.train_scene(0, i)[0].caption()) for i in idx]
    ]


@pytest.fixture(scope="module")
def lm_tokenizer() -> PreTrainedTokenizerBase:
    """The shipped processor's SmolLM2 tokenizer (committed, offline)."""
    return AutoTokenizer.from_pretrained(ASSETS / "processor")


def test_object_attention_targets_name_the_patches_of_each_word(
    lm_tokenizer: PreTrainedTokenizerBase,
) -> None:
    red, blue = (1 + task.COLOUR_NAMES.index(c) for c in ("red", "blue"))
    star, circle = (1 + task.SHAPES.index(s) for s in ("star", "circle"))
    patches = (
        torch.tensor([[0, red, red, blue, blue, 0]]),
        torch.tensor([[0, star, circle, star, star, 0]]),
        torch.tensor([[0, 0, 1, 0, 0, 0]]),
    )

    def targets(question: str, answer: str) -> list[tuple[str, list[int]]]:
        ids, _, labels = encode_targets(lm_tokenizer, [(question, answer)], 2)
        out = object_attention_targets(lm_tokenizer, ids, labels, patches)
        assert out.shape == (1, ids.shape[1], 6)
        return [
            (str(lm_tokenizer.decode([int(ids[0, t])])), out[0, t].nonzero().flatten().tolist())
            for t in range(ids.shape[1])
            if out[0, t].any()
        ]

    # the answer position (":") looks where the question points
    assert targets("What colour is the star?", "red") == [
        (" star", [1, 3, 4]),
        (":", [1, 3, 4]),
        (" red", [1, 2]),
    ]
    assert targets("Is there a blue star?", "yes") == [
        (" blue", [3, 4]),
        (" star", [3, 4]),  # after a colour word: blue stars only
        (":", [3, 4]),
    ]
    assert targets("Is there a red star?", "yes") == [
        (" red", [1, 2]),
        (" star", [1]),
        (":", [1]),  # the named object only, not every red patch
    ]
    assert targets("Is there a red cross?", "no") == [(" red", [1, 2])]  # absent: no target
    assert targets("Is there a green cross?", "no") == []  # absent: nothing to attend to
    assert targets("How many red objects?", "two") == [(" red", [1, 2]), (":", [1, 2])]
    assert targets("Is the red circle left of the blue star?", "yes") == [
        (" red", [1, 2]),
        (" circle", [2]),
        (" blue", [3, 4]),
        (" star", [3, 4]),
        (":", [2, 3, 4]),  # both named objects
    ]
    assert targets(task.DESCRIBE_QUESTION, "red circle") == [
        (":", [2]),  # names nothing: the largest object
        (" red", [1, 2]),
        (" circle", [2]),
    ]
    assert targets(LISTING_QUESTION, "the circle is red , the star is blue") == [
        (" circle", [2]),
        (" is", [2]),
        (" red", [1, 2]),
        (" star", [1, 3, 4]),
        (" is", [1, 3, 4]),
        (" blue", [3, 4]),
    ]


def _tiny_vlm(lm_tokenizer: PreTrainedTokenizerBase) -> Vlm:
    """A seeded random LLaVA with the shipped tokenizer, deep enough for ``ATTENTION_HEADS``."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=96,
        patch_size=8,
    )
    text = LlamaConfig(
        vocab_size=len(lm_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=max(layer for layer, _ in ATTENTION_HEADS) + 1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    image_id = int(lm_tokenizer.convert_tokens_to_ids("<image>"))  # type: ignore[arg-type]
    model = LlavaForConditionalGeneration(build_llava_config(vision, text, image_id))
    model.set_attn_implementation("eager")
    prefix = lm_tokenizer("USER: ", add_special_tokens=False)["input_ids"]
    vlm = Vlm(model, SimpleNamespace(tokenizer=lm_tokenizer), prefix, lm_tokenizer.eos_token_id)
    return vlm


def test_object_attention_loss_adds_the_weighted_attention_term(
    lm_tokenizer: PreTrainedTokenizerBase,
) -> None:
    vlm = _tiny_vlm(lm_tokenizer)
    model = vlm.model
    scenes = [task.train_scene(0, i)[0] for i in range(2)]
    labels = render_batch(scenes)
    feats = torch.randn(2, task.NUM_PATCHES, 16)
    groups = [[(f"What colour is the {s.objects[0].shape}?", s.objects[0].colour) for s in scenes]]
    plain, _plain_stats = qa_loss(vlm, feats, groups)
    patches = (labels.colour, labels.shape, labels.largest)
    same, same_stats = qa_loss(vlm, feats, groups, patches, 0.0)
    assert torch.equal(plain, same)
    assert set(same_stats) == {"loss_g0"}
    weighted, stats = qa_loss(vlm, feats, groups, patches, 0.5)
    assert set(stats) == {"loss_g0", "attn_g0"}
    assert stats["attn_g0"] > 0
    assert weighted.item() == pytest.approx(plain.item() + 0.5 * stats["attn_g0"], rel=1e-5)
    weighted.backward()
    key = model.model.language_model.layers[ATTENTION_HEADS[0][0]].self_attn.k_proj.weight
    assert key.grad is not None
    assert key.grad.abs().sum() > 0


def test_model_card_states_the_optional_stage_c_targets_and_losses(tmp_path: Path) -> None:
    plain, extra = tmp_path / "plain", tmp_path / "extra"
    plain.mkdir()
    extra.mkdir()
    write_model_card(
        plain,
        Recipe(listings_per_image=0, attention_weight=0.0),
        {"validation": {"overall": 0.5}, "step": 3},
    )
    write_model_card(
        extra,
        Recipe(listings_per_image=1, attention_weight=0.5, absent_targets=True),
        {"validation": {"overall": 0.5}, "step": 3},
    )
    plain_card = (plain / "MODEL_CARD.md").read_text()
    extra_card = (extra / "MODEL_CARD.md").read_text()
    assert "8 images x (8 questions + 1 caption); the image prefix" in plain_card
    assert "binding listing" not in plain_card
    assert "Object-attention" not in plain_card
    assert "(8 questions + 1 caption + 1 binding listing" in extra_card
    assert "Object-attention loss (weight 0.5)" in extra_card
    assert "keep it off the image when none of them is present" in extra_card


def test_tower_features_take_already_rendered_scenes(
    lm_tokenizer: PreTrainedTokenizerBase,
) -> None:
    vlm = _tiny_vlm(lm_tokenizer)
    idx = [10_000_000, 10_000_001]
    labels = render_batch([task.train_scene(0, i)[0] for i in idx])
    rendered_here = tower_features(vlm, idx, 0)
    assert rendered_here.shape == (2, task.NUM_PATCHES, 16)
    assert torch.equal(tower_features(vlm, idx, 0, labels.images), rendered_here)
    with pytest.raises(ValueError, match="images has 1 scenes but indices has 2"):
        tower_features(vlm, idx, 0, labels.images[:1])


def test_absent_positions_are_answers_to_questions_whose_named_objects_are_missing(
    lm_tokenizer: PreTrainedTokenizerBase,
) -> None:
    red, blue = (1 + task.COLOUR_NAMES.index(c) for c in ("red", "blue"))
    star, circle = (1 + task.SHAPES.index(s) for s in ("star", "circle"))
    patches = (
        torch.tensor([[0, red, blue]]),
        torch.tensor([[0, star, circle]]),
        torch.tensor([[0, 0, 1]]),
    )

    def absent_at(question: str, answer: str) -> list[str]:
        ids, _, labels = encode_targets(lm_tokenizer, [(question, answer)], 2)
        targets = object_attention_targets(lm_tokenizer, ids, labels, patches)
        out = absent_object_positions(lm_tokenizer, ids, labels, targets)
        return [str(lm_tokenizer.decode([int(ids[0, t])])) for t in out[0].nonzero().flatten()]

    assert absent_at("Is there a red circle?", "no") == [":"]  # both words present, apart
    assert absent_at("Is there a green cross?", "no") == [":"]
    assert absent_at("How many green objects?", "zero") == [":"]
    assert absent_at("Is there a red star?", "yes") == []
    assert absent_at("How many red objects?", "one") == []
    assert absent_at(task.DESCRIBE_QUESTION, "blue circle") == []  # names nothing
    assert absent_at(CAPTION_QUESTION, "red star , blue circle") == []


def test_absent_targets_add_the_off_image_term_only_when_asked(
    lm_tokenizer: PreTrainedTokenizerBase,
) -> None:
    vlm = _tiny_vlm(lm_tokenizer)
    scenes = [task.train_scene(0, i)[0] for i in range(2)]
    labels = render_batch(scenes)
    feats = torch.randn(2, task.NUM_PATCHES, 16)
    patches = (labels.colour, labels.shape, labels.largest)
    present = [(f"What colour is the {s.objects[0].shape}?", s.objects[0].colour) for s in scenes]
    missing = [
        (f"How many {next(c for c in task.COLOUR_NAMES if s.count(c) == 0)} objects?", "zero")
        for s in scenes
    ]
    _, plain = qa_loss(vlm, feats, [present, missing], patches, 0.5)
    _, with_absent = qa_loss(vlm, feats, [present, missing], patches, 0.5, absent=True)
    assert "attn_g1" not in plain  # nothing named is present: no target without absent
    assert with_absent["attn_g1"] > 0
    assert with_absent["attn_g0"] == pytest.approx(plain["attn_g0"])  # present: unchanged


def test_absent_targets_need_the_attention_loss() -> None:
    with pytest.raises(ValueError, match="set attention_weight > 0"):
        Recipe(absent_targets=True, attention_weight=0.0)
    _, recipe = parse_args(["--run-dir", "RUN", "--attention-weight", "0.5", "--absent-targets"])
    assert recipe.absent_targets
    assert not parse_args(["--run-dir", "RUN"])[1].absent_targets
