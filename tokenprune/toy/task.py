"""The procedurally generated ``shapes`` task of the shipped toy VLM.

Scenes are 96x96 RGB images (a 12x12 grid of 8-pixel patches) holding 3-9 flat objects on a
textured grey background. Objects sit in distinct cells of a 3x3 layout grid (so they never
overlap) with random jitter, colour, shape and size; exactly one object is clearly the largest.
Everything is deterministic from integer seeds; no files are read.

Question families (answers are short words, scored by exact match after :func:`normalize_answer`):

* ``attribute``  -- "What colour is the star?" -> colour of the only star.
* ``existence``  -- "Is there a blue triangle?" -> yes / no (half the negatives share the shape or
  the colour with an object of the scene).
* ``counting``   -- "How many red objects?" -> zero / one / two / three.
* ``spatial``    -- "Is the red circle left of the blue star?" -> yes / no (layout-grid relation).
* ``describe``   -- "Describe the image." -> colour and shape of the largest object.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE
NUM_PATCHES = GRID * GRID
CELL = IMAGE_SIZE // 3

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 50, 185),
    "orange": (245, 140, 30),
    "white": (242, 242, 242),
    "black": (22, 22, 22),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
FAMILIES: tuple[str, ...] = ("attribute", "existence", "counting", "spatial", "describe")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
MAX_PER_COLOUR = 3
SPLITS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}
SMALL_RADII = (8, 11)
LARGE_RADII = (13, 15)


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Args:
        colour: Colour name, one of :data:`COLOURS`.
        shape: Shape name, one of :data:`SHAPES`.
        radius: Half extent in pixels.
        row: Layout-grid row (0 top .. 2 bottom).
        col: Layout-grid column (0 left .. 2 right).
        cx: Centre x in pixels.
        cy: Centre y in pixels.
    """

    colour: str
    shape: str
    radius: int
    row: int
    col: int
    cx: int
    cy: int

    @property
    def name(self) -> str:
        """Return ``"<colour> <shape>"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene: objects in reading order plus the seed of its background texture.

    Args:
        objects: Objects sorted by (row, col) of the layout grid.
        texture_seed: Seed of the background and pixel noise.
    """

    objects: tuple[SceneObject, ...]
    texture_seed: int

    @property
    def largest(self) -> SceneObject:
        """Return the (unique) largest object."""
        return max(self.objects, key=lambda o: o.radius)

    def count(self, colour: str) -> int:
        """Return how many objects have ``colour``."""
        return sum(o.colour == colour for o in self.objects)

    def caption(self) -> str:
        """Return the reading-order caption, e.g. ``"red star , blue circle"``."""
        return " , ".join(o.name for o in self.objects)


@dataclass(frozen=True)
class Question:
    """One question about a scene.

    Args:
        family: One of :data:`FAMILIES`.
        text: The question.
        answer: The normalised reference answer.
    """

    family: str
    text: str
    answer: str


@dataclass(frozen=True)
class Example:
    """A scene with one question (evaluation splits).

    Args:
        scene: The scene.
        question: The question about it.
        seed_key: The integers the example was derived from (split code, seed, index).
    """

    scene: Scene
    question: Question
    seed_key: tuple[int, int, int]


def rng_for(*key: int | str) -> np.random.Generator:
    """Return a numpy generator seeded from a tuple of ints/strings (stable across runs).

    Args:
        key: Integers or strings; strings are hashed with CRC32.

    Returns:
        A fresh ``np.random.Generator``.
    """
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in key]
    return np.random.default_rng(ints)


def sample_scene(rng: np.random.Generator) -> Scene:
    """Sample a scene layout: 3-9 objects, colours drawn from a small palette (counts <= 3).

    Args:
        rng: Random generator (advanced in place).

    Returns:
        The scene, objects in reading order, (colour, shape) pairs unique.
    """
    n = int(rng.integers(3, 10))
    cells = sorted(rng.choice(9, size=n, replace=False).tolist())
    n_palette = int(rng.integers(-(-n // MAX_PER_COLOUR), min(n, 5) + 1))
    palette = rng.choice(len(COLOUR_NAMES), size=n_palette, replace=False).tolist()
    colours = list(palette)
    while len(colours) < n:
        c = palette[int(rng.integers(n_palette))]
        if colours.count(c) < MAX_PER_COLOUR:
            colours.append(c)
    rng.shuffle(colours)
    used: set[tuple[int, int]] = set()
    largest = int(rng.integers(n))
    objects = []
    for i, (cell, c) in enumerate(zip(cells, colours, strict=True)):
        s = int(rng.integers(len(SHAPES)))
        while (c, s) in used:
            s = int(rng.integers(len(SHAPES)))
        used.add((c, s))
        lo, hi = LARGE_RADII if i == largest else SMALL_RADII
        r = int(rng.integers(lo, hi + 1))
        row, col = divmod(cell, 3)
        slack = CELL // 2 - r - 1
        cx = col * CELL + CELL // 2 + int(rng.integers(-slack, slack + 1))
        cy = row * CELL + CELL // 2 + int(rng.integers(-slack, slack + 1))
        objects.append(SceneObject(COLOUR_NAMES[c], SHAPES[s], r, row, col, cx, cy))
    return Scene(tuple(objects), int(rng.integers(2**31)))


def _shape_mask(shape: str, cx: int, cy: int, r: int) -> np.ndarray:
    """Rasterise one shape to a boolean (96, 96) mask."""
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "square":
        a = round(0.85 * r)
        d.rectangle([cx - a, cy - a, cx + a, cy + a], fill=1)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=1)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            ang = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
        d.polygon(pts, fill=1)
    elif shape == "cross":
        w = round(0.33 * r)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=1)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=1)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        q = round(0.55 * r)
        d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(img, dtype=bool)


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene and its per-pixel object map.

    Args:
        scene: The scene.

    Returns:
        ``(image, object_map)``: uint8 image and int16 map (-1 background, else object index).

    Shape:
        image ``(96, 96, 3)``, object_map ``(96, 96)``.
    """
    rng = rng_for(scene.texture_seed)
    base = rng.uniform(95, 155) + rng.uniform(-12, 12, size=3)
    coarse = rng.normal(0, 14, size=(GRID // 2, GRID // 2, 3))
    low = np.kron(coarse, np.ones((2 * PATCH_SIZE, 2 * PATCH_SIZE, 1)))
    img = base + low
    obj_map = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int16)
    for i, o in enumerate(scene.objects):
        mask = _shape_mask(o.shape, o.cx, o.cy, o.radius)
        img[mask] = np.asarray(COLOURS[o.colour], dtype=float) + rng.uniform(-12, 12, size=3)
        obj_map[mask] = i
    img = img + rng.normal(0, 7, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), obj_map


def patch_object_index(obj_map: np.ndarray, min_pixels: int = 16) -> np.ndarray:
    """Return the object index under each patch (-1 where it covers < ``min_pixels`` pixels).

    Args:
        obj_map: Per-pixel object map from :func:`render`.
        min_pixels: Minimum number of object pixels for a patch to be labelled with it.

    Returns:
        Int array in raster order.

    Shape:
        obj_map ``(96, 96)`` -> ``(144,)``.
    """
    n_obj = int(obj_map.max()) + 1
    grid = obj_map.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).transpose(0, 2, 1, 3)
    blocks = grid.reshape(NUM_PATCHES, PATCH_SIZE * PATCH_SIZE)
    counts = np.stack([(blocks == i).sum(1) for i in range(n_obj)], 1)
    best = counts.argmax(1)
    return np.where(counts.max(1) >= min_pixels, best, -1)


def _attribute(scene: Scene, rng: np.random.Generator, target: str) -> Question | None:
    shapes = [o.shape for o in scene.objects]
    cands = [o for o in scene.objects if o.colour == target and shapes.count(o.shape) == 1]
    if not cands:
        return None
    o = cands[int(rng.integers(len(cands)))]
    return Question("attribute", f"What colour is the {o.shape}?", o.colour)


def _existence(scene: Scene, rng: np.random.Generator, target: str) -> Question | None:
    present = {(o.colour, o.shape) for o in scene.objects}
    if target == "yes":
        colour, shape = sorted(present)[int(rng.integers(len(present)))]
    else:
        kind = int(rng.integers(3))
        pool = [
            (c, s)
            for c in COLOUR_NAMES
            for s in SHAPES
            if (c, s) not in present
            and (
                kind == 2
                or (kind == 0 and any(o.shape == s for o in scene.objects))
                or (kind == 1 and any(o.colour == c for o in scene.objects))
            )
        ]
        colour, shape = pool[int(rng.integers(len(pool)))]
    return Question("existence", f"Is there a {colour} {shape}?", target)


def _counting(scene: Scene, rng: np.random.Generator, target: str) -> Question | None:
    n = NUMBER_WORDS.index(target)
    cands = [c for c in COLOUR_NAMES if scene.count(c) == n]
    if not cands:
        return None
    return Question("counting", f"How many {cands[int(rng.integers(len(cands)))]} objects?", target)


def holds(a: SceneObject, relation: str, b: SceneObject) -> bool | None:
    """Return whether ``a <relation> b`` on the layout grid (None if undecidable).

    Args:
        a: First object.
        relation: One of :data:`RELATIONS`.
        b: Second object.

    Returns:
        True / False, or None when both share the compared row/column.
    """
    da, db = (a.col, b.col) if relation in ("left of", "right of") else (a.row, b.row)
    if da == db:
        return None
    return (da < db) if relation in ("left of", "above") else (da > db)


def _spatial(scene: Scene, rng: np.random.Generator, target: str) -> Question | None:
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    want = target == "yes"
    pairs = [
        (a, b)
        for a in scene.objects
        for b in scene.objects
        if a is not b and holds(a, relation, b) is want
    ]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    return Question("spatial", f"Is the {a.name} {relation} the {b.name}?", target)


DESCRIBE_QUESTION = "Describe the image."
"""The weak-text-cue question: it names nothing to look at."""


def _describe(scene: Scene, rng: np.random.Generator, target: str) -> Question | None:
    del rng
    o = scene.largest
    if target != o.colour:
        return None
    return Question("describe", DESCRIBE_QUESTION, o.name)


_MAKERS = {
    "attribute": _attribute,
    "existence": _existence,
    "counting": _counting,
    "spatial": _spatial,
    "describe": _describe,
}


def answer_targets(family: str) -> tuple[str, ...]:
    """Return the values a family's answers are balanced over.

    For ``describe`` this is the colour of the largest object (the shape is uniform anyway).

    Args:
        family: One of :data:`FAMILIES`.

    Returns:
        Tuple of target values.

    Raises:
        ValueError: If the family is unknown.
    """
    table = {
        "attribute": COLOUR_NAMES,
        "existence": ("yes", "no"),
        "counting": NUMBER_WORDS,
        "spatial": ("yes", "no"),
        "describe": COLOUR_NAMES,
    }
    if family not in table:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return table[family]


def make_question(
    scene: Scene, family: str, rng: np.random.Generator, target: str | None = None
) -> Question | None:
    """Make a question of ``family`` about ``scene``.

    Args:
        scene: The scene.
        family: One of :data:`FAMILIES`.
        rng: Random generator (advanced in place).
        target: Balanced target value (see :func:`answer_targets`); random when None.

    Returns:
        The question, or None when the scene cannot give the requested target.
    """
    targets = answer_targets(family)
    if target is None:
        target = targets[int(rng.integers(len(targets)))]
    return _MAKERS[family](scene, rng, target)


def training_questions(scene: Scene, rng: np.random.Generator, k: int) -> list[Question]:
    """Return ``k`` questions about one scene, families cycled, answers near-balanced.

    Each question draws its balanced target first and falls back to any target the scene allows.

    Args:
        scene: The scene.
        rng: Random generator (advanced in place).
        k: Number of questions.

    Returns:
        List of ``k`` questions (duplicates possible).
    """
    out: list[Question] = []
    start = int(rng.integers(len(FAMILIES)))
    for i in range(k):
        family = FAMILIES[(start + i) % len(FAMILIES)]
        q = make_question(scene, family, rng)
        if q is None:
            for t in rng.permutation(answer_targets(family)).tolist():
                q = make_question(scene, family, rng, str(t))
                if q is not None:
                    break
        if q is None:
            q = make_question(scene, "existence", rng)
        assert q is not None
        out.append(q)
    return out


def make_example(split: str, seed: int, family: str, index: int) -> Example:
    """Return example ``index`` of ``family`` in an evaluation split (answers exactly balanced).

    The target answer cycles through :func:`answer_targets`; scenes are resampled until one can
    ask for it.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
        seed: Dataset seed.
        family: One of :data:`FAMILIES`.
        index: Example index.

    Returns:
        The example.

    Raises:
        ValueError: If ``split`` is unknown.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    key = (SPLITS[split], seed, index)
    rng = rng_for(*key, family)
    targets = answer_targets(family)
    target = targets[index % len(targets)]
    while True:
        scene = sample_scene(rng)
        q = make_question(scene, family, rng, target)
        if q is not None:
            return Example(scene, q, key)


def make_split(split: str, seed: int, per_family: int) -> list[Example]:
    """Return a fixed evaluation split: ``per_family`` examples of every family.

    Args:
        split: ``"validation"`` or ``"test"`` (or ``"train"``).
        seed: Dataset seed.
        per_family: Examples per family.

    Returns:
        Examples, grouped by family in :data:`FAMILIES` order.
    """
    return [make_example(split, seed, f, i) for f in FAMILIES for i in range(per_family)]


def train_scene(seed: int, index: int) -> tuple[Scene, np.random.Generator]:
    """Return training scene ``index`` and a generator for its questions.

    Args:
        seed: Dataset seed.
        index: Scene index.

    Returns:
        ``(scene, rng)``.
    """
    rng = rng_for(SPLITS["train"], seed, index)
    return sample_scene(rng), rng


_WORD_NUMBERS = {str(i): w for i, w in enumerate(NUMBER_WORDS)}
_SYNONYMS = {"color": "colour", "grey": "gray", "true": "yes", "false": "no"}


def normalize_answer(text: str) -> str:
    """Normalise a free-form answer for exact match.

    Lower-cases, drops punctuation and articles, maps digits 0-3 to words, collapses spaces.

    Args:
        text: Model output or reference.

    Returns:
        The normalised answer.
    """
    words = re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()
    words = [_SYNONYMS.get(_WORD_NUMBERS.get(w, w), _WORD_NUMBERS.get(w, w)) for w in words]
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def is_correct(prediction: str, answer: str) -> bool:
    """Return whether ``prediction`` matches ``answer`` after normalisation."""
    return normalize_answer(prediction) == normalize_answer(answer)


def caption_variants(scene: Scene, rng: np.random.Generator) -> str:
    """Return a varied natural caption of the scene for contrastive (CLIP) training.

    The captions use every word that the question families use, in varied phrasing.

    Args:
        scene: The scene.
        rng: Random generator (advanced in place).

    Returns:
        The caption.
    """
    objs = list(scene.objects)
    rng.shuffle(objs)
    names = [f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.name}" for o in objs]
    listing = ", ".join(names[:-1]) + f" and {names[-1]}"
    head = ["there is ", "the image shows ", "in the image : ", ""][int(rng.integers(4))]
    parts = [head + listing + " ."]
    a, b = objs[0], objs[-1]
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    ok = holds(a, relation, b)
    if ok is not None:
        parts.append(f"is the {a.name} {relation} the {b.name} ? {'yes' if ok else 'no'} .")
    colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    parts.append(f"how many {colour} objects ? {NUMBER_WORDS[scene.count(colour)]} .")
    big = scene.largest
    parts.append(f"what colour is the largest object ? {big.colour} , the {big.shape} .")
    keep = [parts[0]] + [p for p in parts[1:] if rng.random() < 0.5]
    return " ".join(keep)


def vocabulary() -> list[str]:
    """Return every word that captions and questions use (for the CLIP text tokenizer).

    Returns:
        Sorted list of words and punctuation tokens.
    """
    words = set(COLOUR_NAMES) | set(SHAPES) | set(NUMBER_WORDS)
    words |= set(" ".join(RELATIONS).split())
    words |= {
        "what",
        "colour",
        "is",
        "the",
        "how",
        "many",
        "objects",
        "there",
        "a",
        "an",
        "describe",
        "image",
        ".",
        ",",
        "?",
        ":",
        "yes",
        "no",
        "in",
        "shows",
        "and",
        "largest",
        "object",
    }
    return sorted(words)
