"""Tests of the ``shapes`` task generator: determinism, answer correctness, balance, splits."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from tokenprune.toy import task

PER_FAMILY = 24


@pytest.fixture(scope="module")
def validation() -> list[task.Example]:
    """A small validation split."""
    return task.make_split("validation", 0, PER_FAMILY)


def _find(scene: task.Scene, colour: str, shape: str) -> task.SceneObject | None:
    hits = [o for o in scene.objects if o.colour == colour and o.shape == shape]
    assert len(hits) <= 1, "(colour, shape) pairs must be unique in a scene"
    return hits[0] if hits else None


def _recompute(scene: task.Scene, q: task.Question) -> str:
    """Answer a question from the scene description alone (independent of the generator)."""
    colours, shapes = "|".join(task.COLOUR_NAMES), "|".join(task.SHAPES)
    if q.family == "attribute":
        shape = re.fullmatch(rf"What colour is the ({shapes})\?", q.text)
        assert shape is not None
        hits = [o for o in scene.objects if o.shape == shape.group(1)]
        assert len(hits) == 1, "attribute questions must name a unique shape"
        return hits[0].colour
    if q.family == "existence":
        m = re.fullmatch(rf"Is there a ({colours}) ({shapes})\?", q.text)
        assert m is not None
        return "yes" if _find(scene, m.group(1), m.group(2)) else "no"
    if q.family == "counting":
        m = re.fullmatch(rf"How many ({colours}) objects\?", q.text)
        assert m is not None
        return task.NUMBER_WORDS[sum(o.colour == m.group(1) for o in scene.objects)]
    if q.family == "spatial":
        m = re.fullmatch(
            rf"Is the ({colours}) ({shapes}) (left of|right of|above|below) "
            rf"the ({colours}) ({shapes})\?",
            q.text,
        )
        assert m is not None
        a, b = _find(scene, m.group(1), m.group(2)), _find(scene, m.group(4), m.group(5))
        assert a is not None
        assert b is not None
        horizontal = m.group(3) in ("left of", "right of")
        ka, kb = (a.cx, b.cx) if horizontal else (a.cy, b.cy)
        assert abs(ka - kb) >= 10, "spatial pairs must be clearly separated"
        before = ka < kb
        return "yes" if before == (m.group(3) in ("left of", "above")) else "no"
    assert q.family == "describe"
    assert q.text == "Describe the image."
    radii = sorted((o.radius for o in scene.objects), reverse=True)
    assert radii[0] >= task.LARGE_RADII[0], "describe needs the scene's large object"
    assert len(radii) == 1 or radii[0] > radii[1], "the largest object must be unique"
    big = max(scene.objects, key=lambda o: o.radius)
    return f"{big.colour} {big.shape}"


def test_generator_is_deterministic() -> None:
    """The same (split, seed, family, index) gives the same scene, question and pixels."""
    for family in task.FAMILIES:
        a = task.make_example("test", 3, family, 5)
        b = task.make_example("test", 3, family, 5)
        assert a == b
        np.testing.assert_array_equal(task.render(a.scene)[0], task.render(b.scene)[0])
    assert task.make_example("test", 3, "counting", 5) != task.make_example(
        "test", 4, "counting", 5
    )


def test_answers_recomputed_from_scene(validation: list[task.Example]) -> None:
    """Every reference answer equals the answer recomputed from the scene's objects."""
    for ex in validation:
        assert _recompute(ex.scene, ex.question) == ex.question.answer, ex.question


def test_training_questions_are_correct() -> None:
    """Training questions (several per scene) are also correct."""
    for i in range(30):
        scene, rng = task.train_scene(0, i)
        for q in task.training_questions(scene, rng, 8):
            assert _recompute(scene, q) == q.answer, q


def test_scene_constraints() -> None:
    """3-9 objects, no overlap, >= 6 shapes and >= 8 colours in the vocabulary."""
    assert len(task.SHAPES) >= 6
    assert len(task.COLOUR_NAMES) >= 8
    for i in range(50):
        scene, _ = task.train_scene(1, i)
        assert 3 <= len(scene.objects) <= 9
        cells = [(o.row, o.col) for o in scene.objects]
        assert len(set(cells)) == len(cells)
        image, obj_map = task.render(scene)
        assert image.shape == (96, 96, 3)
        assert image.dtype == np.uint8
        for k, o in enumerate(scene.objects):
            assert (obj_map == k).sum() > 0.25 * o.radius**2, "objects must stay visible"


def test_answers_balanced(validation: list[task.Example]) -> None:
    """Within each family the balanced targets occur equally often."""
    for family in ("attribute", "existence", "counting", "spatial"):
        counts = Counter(e.question.answer for e in validation if e.question.family == family)
        assert max(counts.values()) - min(counts.values()) <= 1, (family, counts)
        assert set(counts) == set(task.answer_targets(family))


def test_splits_disjoint(validation: list[task.Example]) -> None:
    """No scene is shared between the train, validation and test splits."""
    test = task.make_split("test", 0, PER_FAMILY)
    train = [task.train_scene(0, i)[0] for i in range(500)]
    seeds = [
        {s.texture_seed for s in split}
        for split in (train, [e.scene for e in validation], [e.scene for e in test])
    ]
    assert not seeds[0] & seeds[1]
    assert not seeds[0] & seeds[2]
    assert not seeds[1] & seeds[2]


def test_patch_labels_match_objects() -> None:
    """The patch under a solid object's centre is labelled with that object."""
    scene, _ = task.train_scene(0, 7)
    _, obj_map = task.render(scene)
    idx = task.patch_object_index(obj_map)
    assert idx.shape == (task.NUM_PATCHES,)
    for k, o in enumerate(scene.objects):
        if o.shape in ("circle", "square"):
            assert idx[(o.cy // task.PATCH_SIZE) * task.GRID + o.cx // task.PATCH_SIZE] == k


@pytest.mark.parametrize(
    ("prediction", "answer", "ok"),
    [
        (" Red.", "red", True),
        ("2", "two", True),
        ("the blue star", "blue star", True),
        ("Yes!", "yes", True),
        ("blue", "red", False),
        ("red star", "red", False),
    ],
)
def test_normalize_answer(prediction: str, answer: str, ok: bool) -> None:
    """Normalisation lower-cases, strips punctuation/articles and maps digits."""
    assert task.is_correct(prediction, answer) is ok


def test_caption_words_in_vocabulary() -> None:
    """Captions and questions only use words of the CLIP vocabulary."""
    vocab = set(task.vocabulary())
    rng = np.random.default_rng(0)
    for i in range(20):
        scene, qrng = task.train_scene(0, i)
        texts = [task.caption_variants(scene, rng)] + [
            q.text for q in task.training_questions(scene, qrng, 5)
        ]
        for t in texts:
            assert set(re.findall(r"\w+|[^\w\s]", t.lower())) <= vocab, t


def _object(colour: str, shape: str, row: int, col: int, radius: int = 9) -> task.SceneObject:
    """An object at the centre of its layout cell."""
    half = task.CELL // 2
    return task.SceneObject(
        colour, shape, radius, row, col, col * task.CELL + half, row * task.CELL + half
    )


def test_sampled_scenes_have_exactly_one_large_object() -> None:
    for i in range(50):
        scene, _ = task.train_scene(0, i)
        assert sum(task.is_large(o) for o in scene.objects) == 1
        assert task.is_large(scene.largest)


def test_crop_patch_ids_are_the_windows_raster_indices() -> None:
    assert task.Crop(1, 0, 1, 2).patch_ids.tolist() == [
        r * task.GRID + c for r in range(4, 8) for c in range(8)
    ]
    assert task.Crop(0, 2, 3, 1).patch_ids.tolist() == [
        r * task.GRID + c for r in range(12) for c in range(8, 12)
    ]
    np.testing.assert_array_equal(task.FULL.patch_ids, np.arange(task.NUM_PATCHES))
    assert task.Crop(2, 1, 1, 1).num_patches == task.Crop(2, 1, 1, 1).patch_ids.size == 16
    # the window's pixels, patch by patch in raster order, are the full image's patches at patch_ids
    raster = np.arange(task.NUM_PATCHES).reshape(task.GRID, task.GRID)
    image = np.repeat(np.repeat(raster, task.PATCH_SIZE, 0), task.PATCH_SIZE, 1)
    for rows in range(1, 4):
        for cols in range(1, 4):
            for row in range(4 - rows):
                for col in range(4 - cols):
                    crop = task.Crop(row, col, rows, cols)
                    seen = crop.pixels(image)[:: task.PATCH_SIZE, :: task.PATCH_SIZE]
                    np.testing.assert_array_equal(seen.reshape(-1), crop.patch_ids)


@pytest.mark.parametrize(
    ("row", "col", "rows", "cols"),
    [(2, 0, 2, 1), (0, 1, 1, 3), (-1, 0, 1, 1), (0, 3, 1, 1), (0, 0, 0, 1), (0, 0, 1, 0)],
)
def test_crop_outside_the_layout_grid_raises(row: int, col: int, rows: int, cols: int) -> None:
    with pytest.raises(ValueError, match="does not fit the 3x3 layout grid"):
        task.Crop(row, col, rows, cols)


def test_crop_pixels_slices_whole_cells() -> None:
    image = np.arange(96 * 96 * 3).reshape(96, 96, 3)
    window = task.Crop(1, 2, 2, 1).pixels(image)
    assert window.shape == (64, 32, 3)
    np.testing.assert_array_equal(window, image[32:96, 64:96])
    np.testing.assert_array_equal(task.Crop(0, 0, 1, 2).pixels(image[..., 0]), image[:32, :64, 0])
    np.testing.assert_array_equal(task.FULL.pixels(image), image)


def test_crop_scene_keeps_exactly_the_objects_inside() -> None:
    for i in range(20):
        scene, _ = task.train_scene(0, i)
        for rows, cols in ((1, 1), (1, 2), (2, 3), (3, 1)):
            for row in range(4 - rows):
                for col in range(4 - cols):
                    part = task.crop_scene(scene, task.Crop(row, col, rows, cols))
                    assert part.texture_seed == scene.texture_seed
                    assert part.objects == tuple(
                        o
                        for o in scene.objects
                        if row <= o.row < row + rows and col <= o.col < col + cols
                    )
        assert task.crop_scene(scene, task.FULL) == scene


def test_sample_crop_shows_an_object() -> None:
    rng = np.random.default_rng(0)
    for i in range(30):
        scene, _ = task.train_scene(0, i)
        for rows, cols in ((1, 1), (2, 1), (3, 2)):
            crop = task.sample_crop(scene, rows, cols, rng)
            assert (crop.rows, crop.cols) == (rows, cols)
            assert task.crop_scene(scene, crop).objects
    corner = task.Scene((_object("red", "star", 0, 0),), 0)
    assert {task.sample_crop(corner, 1, 1, rng) for _ in range(20)} == {task.Crop(0, 0, 1, 1)}
    assert {task.sample_crop(corner, 2, 2, rng) for _ in range(20)} == {task.Crop(0, 0, 2, 2)}
    centre = task.Scene((_object("red", "star", 1, 1),), 0)
    drawn = {task.sample_crop(centre, 2, 2, rng) for _ in range(60)}
    assert drawn == {task.Crop(r, c, 2, 2) for r in range(2) for c in range(2)}
    with pytest.raises(ValueError, match="at least one object"):
        task.sample_crop(task.Scene((), 0), 1, 1, rng)


def test_describe_needs_the_large_object() -> None:
    small = task.Scene((_object("red", "star", 0, 0, 11), _object("blue", "ring", 0, 1, 8)), 0)
    rng = np.random.default_rng(0)
    assert all(
        task.make_question(small, "describe", rng, colour) is None for colour in task.COLOUR_NAMES
    )
    assert task.make_question(small, "describe", rng) is None
    big = task.Scene((_object("red", "star", 0, 0, 11), _object("blue", "ring", 0, 1, 14)), 0)
    q = task.make_question(big, "describe", rng, "blue")
    assert q == task.Question("describe", task.DESCRIBE_QUESTION, "blue ring")
    for _ in range(10):
        assert all(q.family != "describe" for q in task.training_questions(small, rng, 5))


def test_questions_about_windows_are_correct() -> None:
    """Questions about the part of a scene that a window shows are right about that part."""
    rng = np.random.default_rng(0)
    families: Counter[str] = Counter()
    for i in range(40):
        scene, qrng = task.train_scene(0, i)
        size = [(1, 1), (1, 2), (2, 1), (2, 2)][i % 4]
        part = task.crop_scene(scene, task.sample_crop(scene, *size, rng))
        for q in task.training_questions(part, qrng, 8):
            assert _recompute(part, q) == q.answer, (part, q)
            families[q.family] += 1
    assert set(families) == set(task.FAMILIES)


def test_captions_of_one_object_and_of_a_window_without_the_large_object() -> None:
    one = task.Scene((_object("orange", "star", 1, 1),), 0)
    captions = {task.caption_variants(one, np.random.default_rng(s)) for s in range(30)}
    for caption in captions:
        assert " and " not in caption
        assert re.match(r"(there is |the image shows |in the image : )?an orange star \.", caption)
        assert "largest" not in caption  # a small object is no scene's large object
    assert any("the star is orange ." in c for c in captions)
    big = task.Scene((_object("orange", "star", 1, 1, 14),), 0)
    assert any(
        "what colour is the largest object ? orange , the star ." in c
        for c in (task.caption_variants(big, np.random.default_rng(s)) for s in range(30))
    )
    two = task.Scene((_object("red", "star", 0, 0), _object("blue", "ring", 0, 1)), 0)
    assert all(
        re.search(r"a (red star|blue ring) and a (red star|blue ring) \.", c)
        for c in (task.caption_variants(two, np.random.default_rng(s)) for s in range(10))
    )


# -- where the answer is: named_objects, relevant_patches, is_well_formed --------------------------

STAR = _object("red", "star", 0, 0)
CIRCLE = _object("blue", "circle", 0, 2)
RING = _object("red", "ring", 1, 1)
BIG_SQUARE = task.SceneObject("green", "square", 14, 2, 0, 16, 80)  # the largest object
TRIANGLE = _object("yellow", "triangle", 2, 2)
HAND_SCENE = task.Scene((STAR, CIRCLE, RING, BIG_SQUARE, TRIANGLE), 11)

NAMED = [
    (task.Question("attribute", "What colour is the star?", "red"), (STAR,)),
    (task.Question("existence", "Is there a blue circle?", "yes"), (CIRCLE,)),
    # absent: what shares its colour (red star, red ring) or its shape (blue circle)
    (task.Question("existence", "Is there a red circle?", "no"), (STAR, CIRCLE, RING)),
    (task.Question("existence", "Is there a purple square?", "no"), (BIG_SQUARE,)),
    (task.Question("existence", "Is there a purple cross?", "no"), ()),
    (task.Question("counting", "How many red objects?", "two"), (STAR, RING)),
    (task.Question("counting", "How many orange objects?", "zero"), ()),
    (
        task.Question("spatial", "Is the red star left of the yellow triangle?", "yes"),
        (STAR, TRIANGLE),
    ),
    (task.Question("describe", task.DESCRIBE_QUESTION, "green square"), (BIG_SQUARE,)),
]


@pytest.mark.parametrize(("question", "expected"), NAMED, ids=lambda v: getattr(v, "text", ""))
def test_named_objects_on_a_hand_built_scene(
    question: task.Question, expected: tuple[task.SceneObject, ...]
) -> None:
    assert task.named_objects(HAND_SCENE, question) == expected


def _pixels_per_patch(obj_map: np.ndarray, wanted: set[int]) -> np.ndarray:
    """Object pixels of ``wanted`` under each patch, counted patch by patch."""
    out = np.zeros(task.NUM_PATCHES, dtype=np.int64)
    for r in range(task.GRID):
        for c in range(task.GRID):
            block = obj_map[
                r * task.PATCH_SIZE : (r + 1) * task.PATCH_SIZE,
                c * task.PATCH_SIZE : (c + 1) * task.PATCH_SIZE,
            ]
            out[r * task.GRID + c] = sum(int((block == i).sum()) for i in wanted)
    return out


@pytest.mark.parametrize(("question", "expected"), NAMED, ids=lambda v: getattr(v, "text", ""))
def test_relevant_patches_count_the_named_objects_pixels(
    question: task.Question, expected: tuple[task.SceneObject, ...]
) -> None:
    _, obj_map = task.render(HAND_SCENE)
    wanted = {HAND_SCENE.objects.index(o) for o in expected}
    rel = task.relevant_patches(HAND_SCENE, question, obj_map)
    assert rel.shape == (task.NUM_PATCHES,)
    assert rel.dtype == np.int64
    np.testing.assert_array_equal(rel, _pixels_per_patch(obj_map, wanted))
    assert int(rel.sum()) == int(np.isin(obj_map, list(wanted)).sum())
    assert (rel.sum() > 0) == bool(expected)


def test_relevant_patches_of_a_square_count_64_inside_and_the_overlap_at_its_edges() -> None:
    # round(0.85 * 14) = 12: the square spans pixels 4..28 (x) and 68..92 (y), inclusive
    scene = task.Scene((BIG_SQUARE,), 3)
    _, obj_map = task.render(scene)
    question = task.Question("describe", task.DESCRIBE_QUESTION, "green square")
    rel = task.relevant_patches(scene, question, obj_map).reshape(task.GRID, task.GRID)
    expected = np.zeros((task.GRID, task.GRID), dtype=np.int64)
    expected[8:12, 0:4] = np.outer([4, 8, 8, 5], [4, 8, 8, 5])
    np.testing.assert_array_equal(rel, expected)
    assert rel[9, 1] == rel[10, 2] == task.PATCH_SIZE**2  # patches wholly inside the square


@pytest.mark.parametrize(
    "question",
    [
        task.Question("attribute", "What colour is the dog?", "red"),
        task.Question("counting", "Is there a red star?", "yes"),  # another family's template
        task.Question("existence", "Is there a red star", "yes"),  # no question mark
        task.Question("shade", task.DESCRIBE_QUESTION, "red star"),  # unknown family
    ],
)
def test_malformed_questions_raise(question: task.Question) -> None:
    with pytest.raises(ValueError, match="is not a"):
        task.named_objects(HAND_SCENE, question)
    with pytest.raises(ValueError, match="is not a"):
        task.relevant_patches(HAND_SCENE, question, task.render(HAND_SCENE)[1])


@pytest.mark.parametrize(
    ("family", "good", "bad"),
    [
        ("attribute", ["Red.", "the purple"], ["yes", "red star", "pink"]),
        ("existence", ["Yes.", "no", "true"], ["two", "red", "maybe"]),
        ("counting", ["2", "zero", "Three!"], ["four", "5", "yes"]),
        ("spatial", ["no", "YES"], ["left", "red"]),
        ("describe", ["the blue star", "Red ring."], ["blue", "blue dog", "yes"]),
    ],
)
def test_is_well_formed_per_family(family: str, good: list[str], bad: list[str]) -> None:
    assert all(task.is_well_formed(p, family) for p in good)
    assert not any(task.is_well_formed(p, family) for p in bad)
    assert task.ANSWER_VOCABULARY[family] == set(
        map(task.normalize_answer, task.ANSWER_VOCABULARY[family])
    )


def test_every_generated_answer_is_well_formed(validation: list[task.Example]) -> None:
    for ex in validation:
        assert task.is_well_formed(ex.question.answer, ex.question.family), ex.question
