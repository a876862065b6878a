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
        """Return the largest object (unique in a sampled scene; see :func:`is_large`)."""
        return max(self.objects, key=lambda o: o.radius)

    def count(self, colour: str) -> int:
        """Return how many objects have ``colour``."""
        return sum(o.colour == colour for o in self.objects)

    def caption(self) -> str:
        """Return the reading-order caption, e.g. ``"red star , blue circle"``."""
        return " , ".join(o.name for o in self.objects)


def is_large(obj: SceneObject) -> bool:
    """Return whether ``obj`` is a scene's one large object (radius in :data:`LARGE_RADII`).

    Every sampled scene has exactly one; a part of a scene (:func:`crop_scene`) may have none,
    and then no question or caption speaks of its largest object.
    """
    return obj.radius >= LARGE_RADII[0]


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


LAYOUT = 3
"""Cells per side of the layout grid; a cell is :data:`CELL` pixels (4 patches) wide."""


@dataclass(frozen=True)
class Crop:
    """A window of whole layout-grid cells: the part of a scene that an image shows.

    Objects never leave their cell, so a window holds each object wholly or not at all. The
    window keeps the scene's absolute geometry: its patches are a sub-grid of the full 12x12
    grid (:attr:`patch_ids`), so a tower can give them their full-image position embeddings.

    Args:
        row: Top cell row.
        col: Left cell column.
        rows: Height in cells (1-3).
        cols: Width in cells (1-3).

    Examples:
        >>> Crop(1, 0, 1, 2).patch_ids[:3].tolist(), Crop(1, 0, 1, 2).num_patches
        ([48, 49, 50], 32)
        >>> FULL.num_patches == NUM_PATCHES
        True
    """

    row: int
    col: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        """Reject windows that leave the layout grid."""
        if not (
            self.rows >= 1
            and self.cols >= 1
            and 0 <= self.row <= LAYOUT - self.rows
            and 0 <= self.col <= LAYOUT - self.cols
        ):
            raise ValueError(f"{self} does not fit the {LAYOUT}x{LAYOUT} layout grid")

    @property
    def num_patches(self) -> int:
        """Return the number of patches the window shows."""
        return self.rows * self.cols * (CELL // PATCH_SIZE) ** 2

    @property
    def patch_ids(self) -> np.ndarray:
        """Return the raster indices (in the full 12x12 grid) of the window's patches, in order.

        Shape:
            ``(num_patches,)``.
        """
        per = CELL // PATCH_SIZE
        r = np.arange(self.row * per, (self.row + self.rows) * per)
        c = np.arange(self.col * per, (self.col + self.cols) * per)
        return (r[:, None] * GRID + c[None, :]).reshape(-1)

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """Return the window of a full-scene image (or object map).

        Shape:
            ``(96, 96, ...)`` -> ``(32 * rows, 32 * cols, ...)``.
        """
        return image[
            self.row * CELL : (self.row + self.rows) * CELL,
            self.col * CELL : (self.col + self.cols) * CELL,
        ]

    def holds(self, obj: SceneObject) -> bool:
        """Return whether the object's cell lies inside the window."""
        return (
            self.row <= obj.row < self.row + self.rows
            and self.col <= obj.col < self.col + self.cols
        )


FULL = Crop(0, 0, LAYOUT, LAYOUT)
"""The whole scene."""


def crop_scene(scene: Scene, crop: Crop) -> Scene:
    """Return the part of ``scene`` that ``crop`` shows (same texture, absolute coordinates).

    Args:
        scene: The scene.
        crop: The window.

    Returns:
        The scene of the objects inside the window (possibly none).
    """
    return Scene(tuple(o for o in scene.objects if crop.holds(o)), scene.texture_seed)


def sample_crop(scene: Scene, rows: int, cols: int, rng: np.random.Generator) -> Crop:
    """Return a ``rows`` x ``cols`` window of ``scene`` that shows at least one object.

    Args:
        scene: The scene (at least one object).
        rows: Window height in cells.
        cols: Window width in cells.
        rng: Random generator (advanced in place).

    Returns:
        A window drawn uniformly among those showing an object.

    Raises:
        ValueError: If the scene has no object.
    """
    options = [
        Crop(r, c, rows, cols)
        for r in range(LAYOUT - rows + 1)
        for c in range(LAYOUT - cols + 1)
        if any(Crop(r, c, rows, cols).holds(o) for o in scene.objects)
    ]
    if not options:
        raise ValueError("sample_crop needs a scene with at least one object")
    return options[int(rng.integers(len(options)))]


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
    if target != o.colour or not is_large(o):
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


_SHAPE_RE = "|".join(SHAPES)
_COLOUR_RE = "|".join(COLOUR_NAMES)
_OBJECT_RE = rf"(?P<{{0}}c>{_COLOUR_RE}) (?P<{{0}}s>{_SHAPE_RE})"
_QUESTION_PATTERNS = {
    "attribute": re.compile(rf"What colour is the (?P<s>{_SHAPE_RE})\?"),
    "existence": re.compile(rf"Is there a {_OBJECT_RE.format('')}\?"),
    "counting": re.compile(rf"How many (?P<c>{_COLOUR_RE}) objects\?"),
    "spatial": re.compile(
        rf"Is the {_OBJECT_RE.format('a')} (?:{'|'.join(RELATIONS)}) the {_OBJECT_RE.format('b')}\?"
    ),
    "describe": re.compile(re.escape(DESCRIBE_QUESTION)),
}


def named_objects(scene: Scene, question: Question) -> tuple[SceneObject, ...]:
    """Return the objects a question is about: where its answer is in the image.

    * attribute -- the object with the named shape;
    * existence -- the named object if present; if absent, the objects that share its colour or
      its shape (what a model must look at to answer "no"; none when no object shares either);
    * counting -- the objects of the named colour (none when the answer is "zero");
    * spatial -- both named objects;
    * describe -- the largest object.

    Args:
        scene: The scene the question is about.
        question: A question of one of the :data:`FAMILIES` templates.

    Returns:
        The objects, in reading order (possibly none).

    Raises:
        ValueError: If the question does not follow its family's template.

    Examples:
        >>> ex = make_example("test", 0, "attribute", 0)
        >>> ex.question.text, [o.name for o in named_objects(ex.scene, ex.question)]
        ('What colour is the square?', ['red square'])
    """
    pattern = _QUESTION_PATTERNS.get(question.family)
    m = pattern.fullmatch(question.text) if pattern is not None else None
    if m is None:
        raise ValueError(
            f"{question.text!r} is not a {question.family!r} question of the shapes task"
        )
    g = m.groupdict()
    objs = scene.objects
    if question.family == "attribute":
        return tuple(o for o in objs if o.shape == g["s"])
    if question.family == "existence":
        exact = tuple(o for o in objs if (o.colour, o.shape) == (g["c"], g["s"]))
        return exact or tuple(o for o in objs if o.colour == g["c"] or o.shape == g["s"])
    if question.family == "counting":
        return tuple(o for o in objs if o.colour == g["c"])
    if question.family == "spatial":
        pair = {(g["ac"], g["as"]), (g["bc"], g["bs"])}
        return tuple(o for o in objs if (o.colour, o.shape) in pair)
    return (scene.largest,)


def relevant_patches(scene: Scene, question: Question, obj_map: np.ndarray) -> np.ndarray:
    """Return, per patch, how many pixels of the question's :func:`named_objects` it covers.

    A patch is *relevant* when its count is positive (it overlaps a named object).

    Args:
        scene: The scene.
        question: The question.
        obj_map: The scene's object map from :func:`render`.

    Returns:
        Pixel counts in raster order (``int64``).

    Shape:
        ``(144,)``.
    """
    index = {id(o): i for i, o in enumerate(scene.objects)}
    wanted = [index[id(o)] for o in named_objects(scene, question)]
    return patch_pixel_counts(np.isin(obj_map, wanted))


def patch_pixel_counts(mask: np.ndarray) -> np.ndarray:
    """Return how many pixels of a boolean pixel mask fall in each patch.

    Args:
        mask: Per-pixel mask of a full scene.

    Returns:
        Counts in raster order (``int64``, 0 to 64).

    Shape:
        ``(96, 96)`` -> ``(144,)``.

    Examples:
        >>> m = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool); m[:8, :12] = True
        >>> patch_pixel_counts(m)[:3].tolist()
        [64, 32, 0]
    """
    blocks = mask.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).sum((1, 3))
    return np.asarray(blocks.reshape(NUM_PATCHES), dtype=np.int64)


ANSWER_VOCABULARY: dict[str, frozenset[str]] = {
    "attribute": frozenset(COLOUR_NAMES),
    "existence": frozenset({"yes", "no"}),
    "counting": frozenset(NUMBER_WORDS),
    "spatial": frozenset({"yes", "no"}),
    "describe": frozenset(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES),
}
"""Every answer a family can have (after :func:`normalize_answer`)."""


def is_well_formed(prediction: str, family: str) -> bool:
    """Return whether a prediction is an answer its family can have, right or wrong.

    Examples:
        >>> is_well_formed("Yes.", "existence"), is_well_formed("two", "existence")
        (True, False)
    """
    return normalize_answer(prediction) in ANSWER_VOCABULARY[family]


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
    listing = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
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
    if is_large(big):
        parts.append(f"what colour is the largest object ? {big.colour} , the {big.shape} .")
    one = objs[int(rng.integers(len(objs)))]
    parts.append(f"the {one.shape} is {one.colour} .")
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
