"""The toy world: a procedural image generator with captions, instance masks and questions.

Every sample is a pure function of (seed, image_size, index): 1 to `max_objects` objects (shape, color,
texture, size), at most one per image quadrant, drawn on a noisy gray background; a caption that names
every object's shape and nothing else (so CLIP-style training must learn shapes); instance masks [N, H, W];
and questions about the objects.

Each asked kind is owned by one teacher family's *learned* skill, and none is a plain pixel statistic:
- `shape` (CLIP: the captions name it): circle, square, triangle or cross, under random colour, texture
  and size;
- `texture` (DINO: self-distillation across crops, rotations and colour changes): solid, striped, dotted
  or checkered, each drawn with a random period, orientation, phase and contrast, so two textures differ
  in structure, not in how many dark pixels they have (striped and checkered both darken half);
- `size` (SAM: object extent from its masks): small, medium or large radius, under shapes whose areas
  differ by up to 1.8x at one radius and textures that darken up to half the object;
- `fusion` ("what shape and texture is the object in the top left?" -> "striped circle"): two families at once.
Colour is drawn but never named or asked: a nuisance every tower sees. Questions refer to an object by its
quadrant ("the object in the top left"), which every tower with a spatial token grid can resolve.
Questions are asked only about occupied quadrants and their answers are the attributes of one object;
objects' attributes are drawn independently, so no question's text gives away another's answer.

Seeds: training data uses seed 0 (`TRAIN_SEED`), held-out evaluation uses seed 1000 (`HELDOUT_SEED`).

    from distill.toy.world import ToyWorld
    sample = ToyWorld(seed=0)[12]   # .image (PIL RGB 64x64), .objects, .masks, .caption, .qa

`unitower toy export OUT --count N` writes samples (images, captions, QA) to look at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

TRAIN_SEED = 0
HELDOUT_SEED = 1000

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
TEXTURES = ("solid", "striped", "dotted", "checkered")
SIZES = ("small", "medium", "large")
COLOR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
# Texture pattern pixels are the object color scaled by a factor drawn from this range (a darker shade, same hue).
SHADE_RANGE = (0.25, 0.55)
# Texture period (pixels at 64 px) is drawn from this range; orientation and phase uniformly.
PERIOD_RANGE_AT_64 = (4.0, 7.0)
NUMBER_WORDS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
QA_KINDS = ("shape", "texture", "size", "fusion")
# The attributes a fusion answer joins, in answer order ("striped circle").
FUSION_PARTS = ("texture", "shape")
ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "texture": TEXTURES, "size": SIZES}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


def _choices(words: tuple[str, ...], article: str = "") -> str:
    """'a, b, c or d' (each word after `article`)."""
    named = [f"{article}{w}" for w in words]
    return ", ".join(named[:-1]) + " or " + named[-1]


# The kind's question template (formatted with q=the quadrant words). Every question lists its answer's options
# (multiple choice, as the size question always did): a reader then matches what the image holds against words
# it was given, which the toy LM learns in a few hundred steps, instead of naming an attribute from nothing, which
# it had not learned in 600 (world v4: size, the one listed kind, was read fully by every tower; shape and texture
# were not, even from ground-truth tokens). The answers are unchanged.
QUESTION_TEMPLATES = {
    "shape": f"is the object in the {{q}} {_choices(SHAPES, 'a ')}?",
    "texture": f"is the object in the {{q}} {_choices(TEXTURES)}?",
    "size": f"is the object in the {{q}} {_choices(SIZES)}?",
    "fusion": f"which texture ({_choices(TEXTURES)}) and shape ({_choices(SHAPES)}) is the object in the {{q}}?",
}

# Radius ranges in pixels at 64 px; scaled linearly with image_size.
_RADIUS_AT_64 = {"small": (5.0, 7.0), "medium": (8.5, 10.5), "large": (12.0, 14.0)}
# Centres stay this far (pixels at 64 px) inside the quadrant edges beyond the radius, so objects never touch.
_QUADRANT_MARGIN_AT_64 = 1.5
_VIRTUAL_LENGTH = 1_000_000


@dataclass
class ToyObject:
    """One drawn object. `x`, `y` are the center in [0, 1] (fraction of width / height);
    `radius` is in pixels; `bbox` is (x0, y0, x1, y1) in pixels, inclusive-exclusive, from the mask."""

    shape: str
    color: str
    texture: str
    size: str
    x: float
    y: float
    radius: float = 0.0
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)
    quadrant: int = 0
    period: float = 4.0
    angle: float = 0.0
    phase: tuple[float, float] = (0.0, 0.0)
    shade: float = 0.4

    @property
    def name(self) -> str:
        """The words that name the object in captions, e.g. 'red circle'."""
        return f"{self.color} {self.shape}"

    def answer(self, kind: str) -> str:
        """The answer to a question of `kind` (one of QA_KINDS) about this object."""
        return " ".join(getattr(self, part) for part in FUSION_PARTS) if kind == "fusion" else getattr(self, kind)


@dataclass
class QA:
    """A question with a short answer about the object in `quadrant` (index into QUADRANTS). `kind` is
    one of QA_KINDS; `options` lists every possible answer of that kind (candidates for likelihood scoring)."""

    question: str
    answer: str
    kind: str
    options: list[str] | None = None
    quadrant: int = 0


@dataclass
class ToySample:
    """One generated image with its objects, instance masks [N, H, W] bool (aligned with
    `objects`), caption and question/answer pairs."""

    index: int
    image: Image.Image | None  # None from ToyWorld.describe
    objects: list[ToyObject]
    masks: np.ndarray | None  # None from ToyWorld.describe
    caption: str
    qa: list[QA] = field(default_factory=list)

    def questions(self, rng: np.random.Generator) -> list[QA]:
        """A training record's turns (objects in quadrant order): per object, either its shape, texture and
        size questions or its fusion and size questions (at random). Fusion's answer holds the texture and
        shape, so it never shares a record with them; every other pair of answers is independent."""
        bundles = (tuple(k for k in QA_KINDS if k != "fusion"), ("fusion",) + tuple(k for k in QA_KINDS if k not in ("fusion",) + FUSION_PARTS))
        return [make_question(obj, kind) for obj in self.objects for kind in bundles[rng.integers(2)]]


def shape_mask(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """Boolean [height, width] mask of `shape` centered at pixel (cx, cy) with radius r."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        arm = max(r / 3.0, 1.0)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "triangle":
        # Upward triangle: apex at top, base at 0.8 r below the center; inside = below both edges.
        base_y, half_w = 0.8 * r, 0.95 * r
        slope = half_w / (base_y + r)
        return (dy <= base_y) & (np.abs(dx) <= (dy + r) * slope)
    raise ValueError(f"shape_mask: unknown shape {shape!r}; expected one of {SHAPES}")


def texture_pattern(texture: str, height: int, width: int, period: float, angle: float = 0.0,
                    phase: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Boolean [height, width] map of the pixels drawn in the darker shade for `texture`: stripes, a dot
    lattice or a checkerboard of `period` pixels, rotated by `angle` radians and shifted by `phase` (fractions
    of a period along and across the pattern)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    u = (xs * np.cos(angle) + ys * np.sin(angle)) / period + phase[0]
    v = (-xs * np.sin(angle) + ys * np.cos(angle)) / period + phase[1]
    if texture == "solid":
        return np.zeros((height, width), dtype=bool)
    if texture == "striped":
        return np.floor(2 * u) % 2 == 1
    if texture == "checkered":
        return (np.floor(2 * u) + np.floor(2 * v)) % 2 == 1
    if texture == "dotted":
        return (u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 <= 0.3 ** 2
    raise ValueError(f"texture_pattern: unknown texture {texture!r}; expected one of {TEXTURES}")


class ToyWorld:
    """Deterministic virtual dataset of toy scenes.

    Args:
        seed: world seed; 0 for training (TRAIN_SEED), 1000 for held-out evaluation (HELDOUT_SEED).
        image_size: side of the square RGB images in pixels (object sizes scale with it).
        max_objects: most objects per image (1..max_objects, uniformly), one per quadrant, so at most 4.
    """

    def __init__(self, seed: int = 0, image_size: int = 64, max_objects: int = 4):
        if image_size < 32:
            raise ValueError(f"ToyWorld: image_size={image_size} is too small to draw textures; use >= 32.")
        if not 1 <= max_objects <= len(QUADRANTS):
            raise ValueError(f"ToyWorld: max_objects={max_objects} must be in 1..4 (one object per quadrant).")
        self.seed = seed
        self.image_size = image_size
        self.max_objects = max_objects
        self.scale = image_size / 64.0

    def __len__(self) -> int:
        return _VIRTUAL_LENGTH

    def __getitem__(self, index: int) -> ToySample:
        if not 0 <= index < _VIRTUAL_LENGTH:
            raise IndexError(f"ToyWorld index {index} out of range [0, {_VIRTUAL_LENGTH}).")
        rng = np.random.default_rng([self.seed, self.image_size, self.max_objects, int(index)])
        size = self.image_size
        image = self._background(rng)
        objects, masks = self._place_objects(rng)
        for obj, mask in zip(objects, masks):
            rgb = np.array(COLOR_RGB[obj.color], dtype=np.float32)
            dark = texture_pattern(obj.texture, size, size, obj.period, obj.angle, obj.phase) & mask
            image[mask] = rgb
            image[dark] = rgb * obj.shade
        pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")
        caption = make_caption(objects, rng)
        qa = [make_question(obj, kind) for obj in objects for kind in QA_KINDS]
        stacked = np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)
        return ToySample(index=index, image=pil, objects=objects, masks=stacked, caption=caption, qa=qa)

    def describe(self, index: int) -> ToySample:
        """Sample `index` without drawing it: the same objects (but `bbox` left at zeros), caption and questions
        as `self[index]`, with `image` and `masks` None. The random draws are the same, so this is ~20x cheaper
        for code that needs only the scene's description (LLaVA records on cached visual tokens)."""
        if not 0 <= index < _VIRTUAL_LENGTH:
            raise IndexError(f"ToyWorld index {index} out of range [0, {_VIRTUAL_LENGTH}).")
        rng = np.random.default_rng([self.seed, self.image_size, self.max_objects, int(index)])
        self._background(rng)  # discarded: it only keeps the random draws in step with self[index]
        objects, _ = self._place_objects(rng, draw_masks=False)
        caption = make_caption(objects, rng)
        qa = [make_question(obj, kind) for obj in objects for kind in QA_KINDS]
        return ToySample(index=index, image=None, objects=objects, masks=None, caption=caption, qa=qa)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        size = self.image_size
        level = rng.uniform(70, 150)
        tint = rng.uniform(-10, 10, size=3)
        noise = rng.normal(0, 12, size=(size, size, 3))
        return (level + tint + noise).astype(np.float32)

    def _place_objects(self, rng: np.random.Generator, draw_masks: bool = True) -> tuple[list[ToyObject], list[np.ndarray]]:
        """1..max_objects objects in distinct random quadrants (listed in quadrant order), every attribute
        drawn independently, centred with a random offset that keeps the object inside its quadrant; each object's
        texture gets its own period, orientation, phase and shade."""
        size = self.image_size
        half = size / 2.0
        count = int(rng.integers(1, self.max_objects + 1))
        quadrants = sorted(int(q) for q in rng.choice(len(QUADRANTS), size=count, replace=False))
        objects: list[ToyObject] = []
        masks: list[np.ndarray] = []
        for quadrant in quadrants:
            shape = SHAPES[rng.integers(len(SHAPES))]
            color = COLORS[rng.integers(len(COLORS))]
            texture = TEXTURES[rng.integers(len(TEXTURES))]
            size_word = SIZES[rng.integers(len(SIZES))]
            lo, hi = _RADIUS_AT_64[size_word]
            r = rng.uniform(lo, hi) * self.scale
            slack = max(half / 2.0 - r - _QUADRANT_MARGIN_AT_64 * self.scale, 0.0)
            left, top = (quadrant % 2) * half, (quadrant // 2) * half
            cx = left + half / 2.0 + rng.uniform(-slack, slack)
            cy = top + half / 2.0 + rng.uniform(-slack, slack)
            period = rng.uniform(*PERIOD_RANGE_AT_64) * self.scale
            angle, phase = rng.uniform(0, np.pi), (float(rng.uniform()), float(rng.uniform()))
            shade = rng.uniform(*SHADE_RANGE)
            bbox = (0, 0, 0, 0)
            if draw_masks:  # the rest of the draws do not depend on the mask
                mask = shape_mask(shape, cx, cy, r, size, size)
                ys, xs = np.nonzero(mask)
                bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
                masks.append(mask)
            objects.append(ToyObject(shape, color, texture, size_word, cx / size, cy / size, r, bbox, quadrant,
                                     period, angle, phase, shade))
        return objects, masks


def with_article(name: str) -> str:
    """'a red circle' / 'an orange circle'."""
    return ("an " if name[0] in "aeiou" else "a ") + name


def _join(words: list[str]) -> str:
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def make_caption(objects: list[ToyObject], rng: np.random.Generator) -> str:
    """Caption naming every object's shape and nothing else ("a picture of a circle and a cross."): contrastive
    training can match captions to images only by telling shapes apart (with colour in the captions, the toy CLIP
    learned colour and left shape at the untrained level)."""
    order = rng.permutation(len(objects))
    names = _join([with_article(objects[i].shape) for i in order])
    templates = ("{names}.", "a picture of {names}.", "there is {names}.", "an image with {names}.")
    return templates[rng.integers(len(templates))].format(names=names)


def answer_options(kind: str) -> list[str]:
    """Every possible answer of a question kind (the candidates ranked by likelihood scoring)."""
    if kind == "fusion":
        first, second = (ATTRIBUTES[part] for part in FUSION_PARTS)
        return [f"{a} {b}" for a in first for b in second]
    return list(ATTRIBUTES[kind])


def make_question(obj: ToyObject, kind: str) -> QA:
    """The question of `kind` about `obj`, referring to it by its quadrant."""
    if kind not in QUESTION_TEMPLATES:
        raise ValueError(f"make_question: unknown kind {kind!r}; use one of {QA_KINDS}.")
    text = QUESTION_TEMPLATES[kind].format(q=QUADRANTS[obj.quadrant])
    return QA(text, obj.answer(kind), kind, answer_options(kind), obj.quadrant)


def world_texts(world: ToyWorld, count: int) -> list[str]:
    """Captions and 'question answer' lines of the first `count` samples (LM pretraining text)."""
    texts: list[str] = []
    for index in range(count):
        sample = world[index]
        texts.append(sample.caption)
        texts.extend(f"{q.question} {q.answer}" for q in sample.qa)
    return texts


def sample_pool(seed: int, count: int, image_size: int = 64, max_objects: int = 4) -> tuple[np.ndarray, list[ToySample]]:
    """The first `count` samples of ToyWorld(seed, image_size, max_objects) and their images stacked as
    uint8 [count, H, W, 3] (what the toy teacher trainers and the skill report iterate over)."""
    world = ToyWorld(seed=seed, image_size=image_size, max_objects=max_objects)
    samples = [world[i] for i in range(count)]
    images = np.stack([np.asarray(s.image) for s in samples]) if samples else np.zeros((0, image_size, image_size, 3), np.uint8)
    return images, samples
