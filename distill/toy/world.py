"""The toy world: a procedural image generator with captions, instance masks and questions.

Every sample is a pure function of (seed, image_size, index): 1 to `max_objects` non-overlapping
objects (shape, color, texture, size, position) drawn on a noisy gray background, a caption that names
only color and shape, or only shape (so CLIP-style training learns those, while texture is left to
DINO and masks to SAM), instance masks [N, H, W] and short question/answer pairs (single words, numbers, yes/no).

Seeds: training data uses seed 0 (`TRAIN_SEED`), held-out evaluation uses seed 1000 (`HELDOUT_SEED`).

    from distill.toy.world import ToyWorld
    sample = ToyWorld(seed=0)[12]   # .image (PIL RGB 64x64), .objects, .masks, .caption, .qa

Run `python -m distill.toy.world` to print a few samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

TRAIN_SEED = 0
HELDOUT_SEED = 1000

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
TEXTURES = ("solid", "striped", "dotted")
SIZES = ("small", "large")
COLOR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
# Texture pattern pixels are the object color scaled by this factor (a darker shade, same hue).
SHADE = 0.35
NUMBER_WORDS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
QA_KINDS = ("color", "shape", "texture", "count", "position", "relation", "existence", "choice")

# Radius ranges in pixels at 64 px; scaled linearly with image_size.
_RADIUS_AT_64 = {"small": (5.0, 7.0), "large": (10.0, 13.0)}
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

    @property
    def name(self) -> str:
        """The words that identify the object in captions and questions, e.g. 'red circle'."""
        return f"{self.color} {self.shape}"


@dataclass
class QA:
    """A question with a short answer. `kind` is one of QA_KINDS; `options` is set for 'choice'
    (the answer is one of them and they are also listed in the question text)."""

    question: str
    answer: str
    kind: str
    options: list[str] | None = None


@dataclass
class ToySample:
    """One generated image with its objects, instance masks [N, H, W] bool (aligned with
    `objects`), caption and question/answer pairs."""

    index: int
    image: Image.Image
    objects: list[ToyObject]
    masks: np.ndarray
    caption: str
    qa: list[QA] = field(default_factory=list)


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


def texture_pattern(texture: str, height: int, width: int, scale: float) -> np.ndarray:
    """Boolean [height, width] map of the pixels drawn in the darker shade for `texture`."""
    ys, xs = np.mgrid[0:height, 0:width]
    period = max(int(round(4 * scale)), 2)
    if texture == "solid":
        return np.zeros((height, width), dtype=bool)
    if texture == "striped":
        return ((xs + ys) // (period // 2)) % 2 == 1
    if texture == "dotted":
        dot = max(period // 2, 1)
        return ((xs % period) < dot) & ((ys % period) < dot)
    raise ValueError(f"texture_pattern: unknown texture {texture!r}; expected one of {TEXTURES}")


class ToyWorld:
    """Deterministic virtual dataset of toy scenes.

    Args:
        seed: world seed; 0 for training (TRAIN_SEED), 1000 for held-out evaluation (HELDOUT_SEED).
        image_size: side of the square RGB images in pixels (object sizes scale with it).
        max_objects: most objects per image (1..max_objects, uniformly); at most 6 fit reliably.
    """

    def __init__(self, seed: int = 0, image_size: int = 64, max_objects: int = 4):
        if image_size < 32:
            raise ValueError(f"ToyWorld: image_size={image_size} is too small to draw textures; use >= 32.")
        if not 1 <= max_objects <= 6:
            raise ValueError(f"ToyWorld: max_objects={max_objects} must be in 1..6 (more do not fit without overlap).")
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
            dark = texture_pattern(obj.texture, size, size, self.scale) & mask
            image[mask] = rgb
            image[dark] = rgb * SHADE
        pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")
        caption = make_caption(objects, rng)
        qa = make_questions(objects, rng)
        stacked = np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)
        return ToySample(index=index, image=pil, objects=objects, masks=stacked, caption=caption, qa=qa)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        size = self.image_size
        level = rng.uniform(70, 150)
        tint = rng.uniform(-10, 10, size=3)
        noise = rng.normal(0, 12, size=(size, size, 3))
        return (level + tint + noise).astype(np.float32)

    def _place_objects(self, rng: np.random.Generator) -> tuple[list[ToyObject], list[np.ndarray]]:
        size = self.image_size
        count = int(rng.integers(1, self.max_objects + 1))
        objects: list[ToyObject] = []
        masks: list[np.ndarray] = []
        taken: set[tuple[str, str]] = set()
        for _ in range(count):
            # (color, shape) is unique per image so captions and questions name objects unambiguously.
            while True:
                color, shape = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
                if (color, shape) not in taken:
                    break
            texture = TEXTURES[rng.integers(len(TEXTURES))]
            size_word = SIZES[rng.integers(len(SIZES))]
            placed = self._find_spot(rng, size_word, objects)
            if placed is None and size_word == "large":
                size_word = "small"
                placed = self._find_spot(rng, size_word, objects)
            if placed is None:
                continue
            cx, cy, r = placed
            mask = shape_mask(shape, cx, cy, r, size, size)
            ys, xs = np.nonzero(mask)
            bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            taken.add((color, shape))
            objects.append(ToyObject(shape, color, texture, size_word, cx / size, cy / size, r, bbox))
            masks.append(mask)
        return objects, masks

    def _find_spot(
        self, rng: np.random.Generator, size_word: str, objects: list[ToyObject]
    ) -> tuple[float, float, float] | None:
        size = self.image_size
        lo, hi = _RADIUS_AT_64[size_word]
        r = rng.uniform(lo, hi) * self.scale
        gap = 2.0 * self.scale
        for _ in range(60):
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(
                np.hypot(cx - o.x * size, cy - o.y * size) > r + o.radius + gap for o in objects
            ):
                return float(cx), float(cy), float(r)
        return None


def with_article(name: str) -> str:
    """'a red circle' / 'an orange circle'."""
    return ("an " if name[0] in "aeiou" else "a ") + name


def _join(words: list[str]) -> str:
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def make_caption(objects: list[ToyObject], rng: np.random.Generator) -> str:
    """Caption naming color and shape of every object (70 %) or only their shapes (30 %; without them
    color alone would explain most captions and contrastive training would never need shape)."""
    order = rng.permutation(len(objects))
    full = rng.random() < 0.7
    names = _join([with_article(objects[i].name if full else objects[i].shape) for i in order])
    templates = ("{names}.", "a picture of {names}.", "there is {names}.", "an image with {names}.")
    return templates[rng.integers(len(templates))].format(names=names)


def _side(obj: ToyObject) -> tuple[str, float]:
    """The side word (left/right/top/bottom) of the object's larger offset from the image center."""
    dx, dy = obj.x - 0.5, obj.y - 0.5
    if abs(dx) >= abs(dy):
        return ("left" if dx < 0 else "right"), abs(dx)
    return ("top" if dy < 0 else "bottom"), abs(dy)


def _ask_attribute(objects: list[ToyObject], target: ToyObject, ask: str, by: str, phrasings: tuple[str, str, str]) -> QA:
    """A question for `target`'s `ask` attribute naming it by its `by` attribute; adds its texture when
    `by` alone is ambiguous, and asks how many objects share `by` when even that is. `phrasings` are
    the three templates (formatted with o=target)."""
    same = [o for o in objects if getattr(o, by) == getattr(target, by)]
    if len(same) == 1:
        return QA(phrasings[0].format(o=target), getattr(target, ask), ask)
    if sum(o.texture == target.texture for o in same) == 1:
        return QA(phrasings[1].format(o=target), getattr(target, ask), ask)
    return QA(phrasings[2].format(o=target), str(len(same)), "count")


def make_questions(objects: list[ToyObject], rng: np.random.Generator) -> list[QA]:
    """Questions of every kind the scene supports; existence gives one present and one absent object."""
    qa: list[QA] = []
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]

    qa.append(_ask_attribute(objects, objects[rng.integers(len(objects))], "color", "shape", (
        "what color is the {o.shape}?", "what color is the {o.texture} {o.shape}?", "how many {o.shape}s are there?")))
    qa.append(_ask_attribute(objects, objects[rng.integers(len(objects))], "shape", "color", (
        "what shape is the {o.color} object?", "what is the shape of the {o.texture} {o.color} object?",
        "how many {o.color} objects are there?")))
    target = objects[rng.integers(len(objects))]
    qa.append(QA(f"what is the texture of the {target.name}?", target.texture, "texture"))
    target = objects[rng.integers(len(objects))]
    qa.append(QA(f"is the {target.name} small or large?", target.size, "choice", list(SIZES)))

    qa.append(QA("how many objects are there?", str(len(objects)), "count"))

    target = objects[rng.integers(len(objects))]
    side, _ = _side(target)
    qa.append(QA(f"where is the {target.name}?", side, "position"))

    if len(objects) >= 2:
        a, b = (objects[i] for i in rng.choice(len(objects), size=2, replace=False))
        if rng.random() < 0.5:
            qa.append(QA(f"is the {a.name} left of the {b.name}?", "yes" if a.x < b.x else "no", "relation"))
        else:
            qa.append(QA(f"is the {a.name} above the {b.name}?", "yes" if a.y < b.y else "no", "relation"))

    present = objects[rng.integers(len(objects))]
    taken = {(o.color, o.shape) for o in objects}
    absent_pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in taken]
    # POPE-style "adversarial" negatives: half the time reuse a shape or color that is in the image.
    near = [p for p in absent_pairs if p[0] in colors or p[1] in shapes]
    pool = near if near and rng.random() < 0.5 else absent_pairs
    color, shape = pool[rng.integers(len(pool))]
    existence = [
        QA(f"is there {with_article(present.name)} in the image?", "yes", "existence"),
        QA(f"is there {with_article(color + ' ' + shape)} in the image?", "no", "existence"),
    ]
    qa.extend(existence[i] for i in rng.permutation(2))

    target = objects[rng.integers(len(objects))]
    if colors.count(target.color) == 1:
        qa.append(_choice_question(target, "shape", SHAPES, "what shape is the {o.color} object? options: {options}.", rng))
    elif shapes.count(target.shape) == 1:
        qa.append(_choice_question(target, "color", COLORS, "what color is the {o.shape}? options: {options}.", rng))
    return qa


def _choice_question(target: ToyObject, ask: str, values: tuple[str, ...], template: str, rng: np.random.Generator) -> QA:
    """A 3-option multiple-choice question for `target`'s `ask` attribute: the answer plus two other
    `values`, shuffled; `template` is formatted with o=target and the comma-joined options."""
    answer = getattr(target, ask)
    others = [v for v in values if v != answer]
    options = [answer] + [others[i] for i in rng.choice(len(others), size=2, replace=False)]
    options = [options[i] for i in rng.permutation(3)]
    return QA(template.format(o=target, options=", ".join(options)), answer, "choice", options)


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


if __name__ == "__main__":
    toy = ToyWorld(seed=TRAIN_SEED)
    for i in range(3):
        s = toy[i]
        print(i, s.caption, [(o.name, o.texture, o.size, round(o.x, 2), round(o.y, 2)) for o in s.objects])
        for q in s.qa:
            print("   ", q.kind, "|", q.question, "->", q.answer)
