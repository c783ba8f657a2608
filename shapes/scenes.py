"""ShapesVQA v2 and v3: scenes, questions, answers and the per-object facts the metrics need.

The task is specified in full in ``docs/shapesvqa.md``; this module implements it exactly,
each version under its own name (``"v2"``, ``"v3"``: v3 adds binding negatives to ``exists`` and
the ``location`` type; v2's streams are unchanged, so v2 stays reproducible). Everything is drawn
from a seed, so anyone can make fresh held-out scenes:

    items = sample(seed, 100, version="v3")   # [(scene, question)]
    scene, question = items[0]
    image = scene.image()            # PIL, 336 x 336 RGB, noise included
    score_reply("Red.", question)    # True when the answer is red

A scene keeps its own noise seed, so ``scene.pixels()`` is the same array every time.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

VERSIONS = {"v2": "ShapesVQA v2", "v3": "ShapesVQA v3"}
LATEST = "v3"

CANVAS = 336
PATCH = 14
GRID = CANVAS // PATCH  # 24 patches a side, 576 in all
NUM_PATCHES = GRID * GRID

OUTLINES = ("circle", "square")
COLORS = {
    "red": (220, 50, 50),
    "green": (50, 180, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (155, 70, 200),
    "orange": (245, 145, 35),
}
COLOR_NAMES = tuple(COLORS)
PATTERNS = ("solid", "striped", "dotted", "checkered")

BACKGROUND_RANGE = (60, 180)  # grey level, inclusive
COUNT_RANGE = (2, 4)  # objects per scene, inclusive
SIZE_RANGE = (20, 36)  # bounding-box side in px, inclusive
MIN_GAP = 4  # px of background between two boxes, along x or along y
OFF_SHADE = 0.45  # off pixels of a pattern: round(0.45 x colour)
NOISE_SIGMA = 6.0
PATCH_COVER = 0.25  # an object's patches: at least this share of the patch in its mask

QUESTION_TYPES = ("colour", "pattern", "exists", "location")
"""Every type of every version, in table order (a v2 table keeps ``location``, empty)."""
VERSION_TYPES = {"v2": QUESTION_TYPES[:3], "v3": QUESTION_TYPES}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
TEMPLATES = {
    "colour": "What color is the {pattern} object?",
    "pattern": "What pattern is the {color} object?",
    "exists": "Is there a {color} {pattern} object?",
    "location": "What color is the object in the {quadrant}?",
}
OPTIONS = {
    "colour": COLOR_NAMES,
    "pattern": PATTERNS,
    "exists": ("yes", "no"),
    "location": COLOR_NAMES,
}
"""The multiple-choice form: the options of each question type, in the spec's order."""
CHANCE = {t: 1 / len(o) for t, o in OPTIONS.items()}
STREAMS = {
    "train/vision": 0,
    "train/lm": 1,
    "train/join": 2,
    "train/eval": 3,
    "train/alignment-check": 98,
    "train/heldout": 99,
    "evaluation": 0x45564C,  # "EVL"
    "fidelity": 0x464944,  # "FID"
}
"""Every random stream of the task, by name: ``stream(seed, name)`` is
``default_rng([seed, STREAMS[name]])``. The second word names the use, so two uses never share a
stream for any seeds, and no named stream is ``default_rng(seed)`` (numpy pads entropy with
zeros: ``[seed, 0]`` and ``seed`` give one stream, which is why no name may be 0 but the
training stage that always had it). The training values are the ones the released weights were
trained with."""


def stream(seed: int, name: str) -> np.random.Generator:
    """The generator of stream ``name`` (``STREAMS``) for ``seed``."""
    return np.random.default_rng([seed, STREAMS[name]])


MIDLINE = (CANVAS - 1) / 2  # 167.5: left of it is the left half, above it the top half
MIDLINE_MARGIN = 12  # v3 location: no object centre closer than this to either midline


@dataclasses.dataclass(frozen=True)
class SceneObject:
    outline: str
    color: str
    pattern: str
    size: int
    x0: int
    y0: int

    @property
    def centre(self) -> tuple[float, float]:
        """``(x0 + (s - 1) / 2, y0 + (s - 1) / 2)``: where v3's location rules place it."""
        return self.x0 + (self.size - 1) / 2, self.y0 + (self.size - 1) / 2

    @property
    def box(self) -> tuple[int, int, int, int]:
        """PIL's inclusive box ``(x0, y0, x1, y1)``."""
        return (self.x0, self.y0, self.x0 + self.size - 1, self.y0 + self.size - 1)

    def outline_mask(self) -> np.ndarray:
        """[s, s] bool: the pixels of the box inside the outline (PIL, no antialiasing)."""
        mask = Image.new("1", (self.size, self.size), 0)
        draw = ImageDraw.Draw(mask)
        box = (0, 0, self.size - 1, self.size - 1)
        if self.outline == "circle":
            draw.ellipse(box, fill=1)
        else:
            draw.rectangle(box, fill=1)
        return np.array(mask, dtype=bool)

    def pattern_on(self) -> np.ndarray:
        """[s, s] bool: the pattern's "on" pixels, indexed [v, u] relative to the box corner."""
        v, u = np.mgrid[0 : self.size, 0 : self.size]
        if self.pattern == "solid":
            return np.ones((self.size, self.size), dtype=bool)
        if self.pattern == "striped":
            return v % 6 < 3
        if self.pattern == "dotted":
            return ~((u % 6 < 2) & (v % 6 < 2))
        if self.pattern == "checkered":
            return (u // 3 + v // 3) % 2 == 0
        raise ValueError(f"unknown pattern {self.pattern!r}")


def _gap(a: SceneObject, b: SceneObject) -> int:
    """Background pixels between two boxes along the axis that separates them most
    (negative when the boxes overlap on both axes)."""
    gap_x = max(b.x0 - (a.x0 + a.size), a.x0 - (b.x0 + b.size))
    gap_y = max(b.y0 - (a.y0 + a.size), a.y0 - (b.y0 + b.size))
    return max(gap_x, gap_y)


@dataclasses.dataclass(frozen=True)
class Scene:
    background: int
    objects: tuple[SceneObject, ...]
    noise_seed: int

    def object_masks(self) -> list[np.ndarray]:
        """One [336, 336] bool outline mask per object, on the canvas."""
        masks = []
        for obj in self.objects:
            mask = np.zeros((CANVAS, CANVAS), dtype=bool)
            mask[obj.y0 : obj.y0 + obj.size, obj.x0 : obj.x0 + obj.size] = obj.outline_mask()
            masks.append(mask)
        return masks

    def clean_pixels(self) -> np.ndarray:
        """[336, 336, 3] uint8 before noise."""
        img = np.full((CANVAS, CANVAS, 3), self.background, dtype=np.uint8)
        for obj in self.objects:
            colour = np.array(COLORS[obj.color], dtype=np.float64)
            off = np.round(OFF_SHADE * colour).astype(np.uint8)
            on = colour.astype(np.uint8)
            mask = obj.outline_mask()
            patch = img[obj.y0 : obj.y0 + obj.size, obj.x0 : obj.x0 + obj.size]
            lit = obj.pattern_on()
            patch[mask & lit] = on
            patch[mask & ~lit] = off
        return img

    def pixels(self) -> np.ndarray:
        """[336, 336, 3] uint8: the scene with its Gaussian noise (sigma 6), rounded and clipped."""
        rng = np.random.default_rng(self.noise_seed)
        noisy = rng.standard_normal((CANVAS, CANVAS, 3), dtype=np.float32)
        noisy *= NOISE_SIGMA
        noisy += self.clean_pixels()
        np.rint(noisy, out=noisy)
        return np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)

    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels(), mode="RGB")

    def patch_coverage(self) -> np.ndarray:
        """[n_objects, 576] float: the share of each 14 px patch inside each object's outline."""
        masks = np.stack(self.object_masks()).astype(np.float32)
        per_patch = masks.reshape(len(self.objects), GRID, PATCH, GRID, PATCH).mean(axis=(2, 4))
        return per_patch.reshape(len(self.objects), NUM_PATCHES)

    def quadrant_objects(self) -> dict[str, list[int]]:
        """v3 ``location``: each quadrant's objects, by their centres."""
        out: dict[str, list[int]] = {q: [] for q in QUADRANTS}
        for i, obj in enumerate(self.objects):
            cx, cy = obj.centre
            out[QUADRANTS[2 * (cy >= MIDLINE) + (cx >= MIDLINE)]].append(i)
        return out

    def eligible_quadrants(self) -> list[str]:
        """Quadrants a ``location`` question may name: exactly one object's centre in it, and
        no object's centre in the scene within 12 px of either midline."""
        for obj in self.objects:
            cx, cy = obj.centre
            if abs(cx - MIDLINE) < MIDLINE_MARGIN or abs(cy - MIDLINE) < MIDLINE_MARGIN:
                return []
        return [q for q, objs in self.quadrant_objects().items() if len(objs) == 1]

    def object_patches(self) -> list[list[int]]:
        """Per object, its patches (row-major ``r * 24 + c``): at least 25 % inside its outline."""
        coverage = self.patch_coverage()
        return [np.flatnonzero(c >= PATCH_COVER).tolist() for c in coverage]

    def find(self, *, color: str | None = None, pattern: str | None = None) -> int | None:
        """Index of the object with this colour (or pattern), or None."""
        for i, obj in enumerate(self.objects):
            if (color is None or obj.color == color) and (
                pattern is None or obj.pattern == pattern
            ):
                return i
        return None


@dataclasses.dataclass(frozen=True)
class Question:
    type: str  # colour | pattern | exists | location
    text: str
    answer: str
    color: str | None  # the colour word in the question, if any
    pattern: str | None  # the pattern word in the question, if any
    target: int  # index of the asked object in scene.objects
    quadrant: str | None = None  # location: the quadrant named
    negative: str | None = None  # exists / no: "absent" or (v3) "binding"
    other: int | None = None  # exists / no / binding: the object with the named pattern

    @property
    def options(self) -> tuple[str, ...]:
        return OPTIONS[self.type]

    @property
    def targets(self) -> tuple[int, ...]:
        """The asked objects (both of a binding negative's) for the object hit rate."""
        return (self.target,) if self.other is None else (self.target, self.other)

    @property
    def subtype(self) -> str:
        """``type``, with an exists question's answer and kind of negative: exists/yes,
        exists/absent, exists/binding (the per-kind accuracy rows)."""
        if self.type != "exists":
            return self.type
        return "exists/yes" if self.answer == "yes" else f"exists/{self.negative}"

    @property
    def words(self) -> tuple[str, ...]:
        """The attribute words the question names (colour first, as written)."""
        return tuple(w for w in (self.color, self.pattern) if w is not None)


def sample_scene(rng: np.random.Generator) -> Scene:
    """One scene as docs/shapesvqa.md specifies it."""
    background = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    count = int(rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
    colours = rng.choice(len(COLOR_NAMES), size=count, replace=False)
    patterns = rng.choice(len(PATTERNS), size=count, replace=False)
    objects: list[SceneObject] = []
    for i in range(count):
        outline = OUTLINES[int(rng.integers(len(OUTLINES)))]
        size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
        while True:  # redraw the position while the box is closer than 4 px to a placed one
            x0 = int(rng.integers(0, CANVAS - size + 1))
            y0 = int(rng.integers(0, CANVAS - size + 1))
            obj = SceneObject(outline, COLOR_NAMES[colours[i]], PATTERNS[patterns[i]], size, x0, y0)
            if all(_gap(obj, other) >= MIN_GAP for other in objects):
                break
        objects.append(obj)
    noise_seed = int(rng.integers(2**63))
    return Scene(background, tuple(objects), noise_seed)


def sample_question(
    scene: Scene, rng: np.random.Generator, *, qtype: str | None = None, version: str = LATEST
) -> Question:
    """One question about ``scene``; the type is uniform over the version's types unless given.
    A ``location`` question needs a scene with an eligible quadrant (``sample`` draws one)."""
    types = VERSION_TYPES[version]
    if qtype is None:
        qtype = types[int(rng.integers(len(types)))]
    if qtype not in types:
        raise ValueError(f"question type must be one of {types} in {version}, got {qtype!r}")
    objs = scene.objects
    if qtype == "location":
        eligible = scene.eligible_quadrants()
        if not eligible:
            raise ValueError("this scene has no eligible quadrant for a location question")
        quadrant = eligible[int(rng.integers(len(eligible)))]
        (i,) = scene.quadrant_objects()[quadrant]
        text = TEMPLATES[qtype].format(quadrant=quadrant)
        return Question(qtype, text, objs[i].color, None, None, i, quadrant=quadrant)
    if qtype == "colour":
        i = int(rng.integers(len(objs)))
        p = objs[i].pattern
        return Question(qtype, TEMPLATES[qtype].format(pattern=p), objs[i].color, None, p, i)
    if qtype == "pattern":
        i = int(rng.integers(len(objs)))
        c = objs[i].color
        return Question(qtype, TEMPLATES[qtype].format(color=c), objs[i].pattern, c, None, i)
    text = TEMPLATES["exists"]
    if rng.random() < 0.5:  # yes: an object's own pair
        i = int(rng.integers(len(objs)))
        c, p = objs[i].color, objs[i].pattern
        return Question(qtype, text.format(color=c, pattern=p), "yes", c, p, i)
    if version != "v2" and rng.random() < 0.5:  # no / binding: both present, on two objects
        i, j = (int(x) for x in rng.choice(len(objs), size=2, replace=False))
        c, p = objs[i].color, objs[j].pattern
        return Question(
            qtype, text.format(color=c, pattern=p), "no", c, p, i, negative="binding", other=j
        )
    # no: exactly one of the two is in the scene (on one object); the other is in none.
    present_c = {o.color for o in objs}
    present_p = {o.pattern for o in objs}
    absent_c = [c for c in COLOR_NAMES if c not in present_c]  # never empty: <= 4 of 6 used
    absent_p = [p for p in PATTERNS if p not in present_p]  # empty when 4 objects
    i = int(rng.integers(len(objs)))
    keep_colour = not absent_p or rng.random() < 0.5
    if keep_colour and absent_p:
        c, p = objs[i].color, absent_p[int(rng.integers(len(absent_p)))]
    else:
        c, p = absent_c[int(rng.integers(len(absent_c)))], objs[i].pattern
    return Question(qtype, text.format(color=c, pattern=p), "no", c, p, i, negative="absent")


def sample_item(
    rng: np.random.Generator, *, qtype: str | None = None, version: str = LATEST
) -> tuple[Scene, Question]:
    """One (scene, question). v2: the scene, then the question (v2's stream). v3: the type
    first, then scenes until one can ask it (a location question needs an eligible quadrant),
    so the types stay equally likely."""
    if version == "v2":
        scene = sample_scene(rng)
        return scene, sample_question(scene, rng, qtype=qtype, version=version)
    types = VERSION_TYPES[version]
    if qtype is None:
        qtype = types[int(rng.integers(len(types)))]
    scene = sample_scene(rng)
    while qtype == "location" and not scene.eligible_quadrants():
        scene = sample_scene(rng)
    return scene, sample_question(scene, rng, qtype=qtype, version=version)


def sample(
    seed: int,
    n: int,
    *,
    per_type: bool = False,
    version: str = LATEST,
    stream_name: str = "evaluation",
) -> list[tuple[Scene, Question]]:
    """``n`` fresh (scene, question) pairs from ``seed``, one scene each.

    With ``per_type``, the types cycle (colour / pattern / exists / location in v3) so each has
    n / types (the fidelity harness wants equal counts); otherwise each type is equally likely.
    v3 draws from the named stream (``STREAMS``: never a training stream); v2 from
    ``default_rng(seed)`` as it always did, which for seed 0 is the v2 model's vision-stage
    training stream.
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {tuple(VERSIONS)}, got {version!r}")
    types = VERSION_TYPES[version]
    rng = np.random.default_rng(seed) if version == "v2" else stream(seed, stream_name)
    return [
        sample_item(rng, qtype=types[k % len(types)] if per_type else None, version=version)
        for k in range(n)
    ]


def example(seed: int = 0) -> tuple[Scene, Question]:
    """The first scene drawn from ``seed`` that has a striped object, with the question
    "What color is the striped object?" (a newcomer's first request)."""
    rng = np.random.default_rng(seed)
    while True:
        scene = sample_scene(rng)
        i = scene.find(pattern="striped")
        if i is not None:
            text = TEMPLATES["colour"].format(pattern="striped")
            return scene, Question("colour", text, scene.objects[i].color, None, "striped", i)


def first_word(reply: str) -> str:
    """A reply's first word, lowercased, punctuation stripped (docs/shapesvqa.md's scoring)."""
    words = reply.strip().split()
    if not words:
        return ""
    return words[0].lower().strip(string.punctuation)


def score_reply(reply: str, question: Question) -> bool:
    return first_word(reply) == question.answer


def object_hit_rate(
    scene: Scene,
    question: Question,
    kept: Sequence[int],
    per_object: list[list[int]] | None = None,
) -> float:
    """Share of the asked object's patches (both objects' of a binding negative) among the kept
    image-token indices; ``per_object``: ``scene.object_patches()`` when the caller has it."""
    per_object = scene.object_patches() if per_object is None else per_object
    patches = sorted({p for i in question.targets for p in per_object[i]})
    if not patches:
        return 1.0
    kept_set = set(int(k) for k in kept)
    return sum(p in kept_set for p in patches) / len(patches)
