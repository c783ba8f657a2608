"""The ShapesVQA v2 and v3 generators against docs/shapesvqa.md, rule by rule, on fresh seeds each
run.

Each rule is checked with code written from the spec's text, not by calling the generator's own
helpers: the pattern formulae, the patch rule and the question rules are restated here.
"""

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lvlm_prune.shapes import scenes

SPEC_COLOURS = {
    "red": (220, 50, 50),
    "green": (50, 180, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (155, 70, 200),
    "orange": (245, 145, 35),
}
SPEC_PATTERNS = ("solid", "striped", "dotted", "checkered")


def draw_scenes(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return [scenes.sample_scene(rng) for _ in range(n)]


def spec_on(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if pattern == "solid":
        return np.ones_like(u, dtype=bool)
    if pattern == "striped":
        return v % 6 < 3
    if pattern == "dotted":
        return ~((u % 6 < 2) & (v % 6 < 2))
    assert pattern == "checkered"
    return (u // 3 + v // 3) % 2 == 0


def spec_mask(obj) -> np.ndarray:
    """The outline mask on the canvas, drawn with PIL as the spec says."""
    img = Image.new("L", (scenes.CANVAS, scenes.CANVAS), 0)
    draw = ImageDraw.Draw(img)
    box = (obj.x0, obj.y0, obj.x0 + obj.size - 1, obj.y0 + obj.size - 1)
    (draw.ellipse if obj.outline == "circle" else draw.rectangle)(box, fill=255)
    return np.array(img) > 0


def test_constants_are_the_spec():
    assert scenes.COLORS == SPEC_COLOURS
    assert tuple(scenes.COLORS) == tuple(SPEC_COLOURS)  # the multiple-choice order
    assert scenes.PATTERNS == SPEC_PATTERNS
    assert scenes.OUTLINES == ("circle", "square")
    assert (scenes.CANVAS, scenes.PATCH, scenes.NUM_PATCHES) == (336, 14, 576)
    assert scenes.OPTIONS["exists"] == ("yes", "no")


def test_scene_layout_rules(seed):
    counts, outlines, sizes = [], [], []
    for scene in draw_scenes(seed, 400):
        assert 60 <= scene.background <= 180
        objs = scene.objects
        counts.append(len(objs))
        assert 2 <= len(objs) <= 4
        assert len({o.color for o in objs}) == len(objs)
        assert len({o.pattern for o in objs}) == len(objs)
        for i, a in enumerate(objs):
            outlines.append(a.outline)
            sizes.append(a.size)
            assert 20 <= a.size <= 36
            assert a.x0 + a.size <= 336 and a.y0 + a.size <= 336
            assert min(a.x0, a.y0) >= 0
            for b in objs[:i]:
                # At least 4 px of background between the two boxes along x or along y.
                gap_x = max(b.x0 - (a.x0 + a.size), a.x0 - (b.x0 + b.size))
                gap_y = max(b.y0 - (a.y0 + a.size), a.y0 - (b.y0 + b.size))
                assert max(gap_x, gap_y) >= 4, (a, b)
    assert set(counts) == {2, 3, 4}
    assert set(sizes) <= set(range(20, 37)) and len(set(sizes)) > 12
    share_circle = outlines.count("circle") / len(outlines)
    assert abs(share_circle - 0.5) < 5 * math.sqrt(0.25 / len(outlines))


def test_pixels_follow_the_outline_and_pattern_rules(seed):
    for scene in draw_scenes(seed, 12):
        clean = scene.clean_pixels()
        assert clean.shape == (336, 336, 3) and clean.dtype == np.uint8
        covered = np.zeros((336, 336), dtype=bool)
        for obj in scene.objects:
            mask = spec_mask(obj)
            covered |= mask
            ys, xs = np.nonzero(mask)
            on = spec_on(obj.pattern, xs - obj.x0, ys - obj.y0)
            colour = np.array(SPEC_COLOURS[obj.color])
            off = np.array([round(0.45 * c) for c in SPEC_COLOURS[obj.color]])
            np.testing.assert_array_equal(
                clean[ys[on], xs[on]], np.broadcast_to(colour, (on.sum(), 3))
            )
            np.testing.assert_array_equal(
                clean[ys[~on], xs[~on]], np.broadcast_to(off, ((~on).sum(), 3))
            )
            if obj.outline == "square":
                assert mask.sum() == obj.size**2
            else:  # the ellipse fills the box: touches its edges, leaves its corners
                assert not mask[obj.y0, obj.x0] and mask[obj.y0 + obj.size // 2, obj.x0]
        assert (clean[~covered] == scene.background).all()


def test_noise_is_gaussian_sigma_6_and_seeded(seed):
    scene = draw_scenes(seed, 1)[0]
    pixels = scene.pixels()
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, scene.pixels())  # the scene carries its noise seed
    assert np.asarray(scene.image()).tolist() == pixels.tolist()
    clean = scene.clean_pixels().astype(np.int16)
    unclipped = (clean > 30) & (clean < 225)
    residual = (pixels.astype(np.int16) - clean)[unclipped]
    # Rounding adds variance 1/12.
    assert abs(residual.mean()) < 0.05
    assert abs(residual.std() - math.sqrt(36 + 1 / 12)) < 0.1
    assert (residual == np.round(residual)).all()


def test_same_seed_same_scenes_new_seed_new_scenes(seed):
    a, b, c = draw_scenes(seed, 5), draw_scenes(seed, 5), draw_scenes(seed + 1, 5)
    assert a == b and a != c


def test_object_patches_are_patches_at_least_a_quarter_inside_the_outline(seed):
    for scene in draw_scenes(seed, 20):
        for obj, patches in zip(scene.objects, scene.object_patches()):
            mask = spec_mask(obj)
            expected = [
                r * 24 + c
                for r in range(24)
                for c in range(24)
                if mask[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14].sum() >= 0.25 * 196
            ]
            assert patches == expected and expected


def test_question_rules(seed):
    rng = np.random.default_rng(seed)
    types, exists_answers = [], []
    for _ in range(3000):
        scene = scenes.sample_scene(rng)
        q = scenes.sample_question(scene, rng, version="v2")
        types.append(q.type)
        pairs = {(o.color, o.pattern) for o in scene.objects}
        colours = {o.color for o in scene.objects}
        patterns = {o.pattern for o in scene.objects}
        asked = scene.objects[q.target]
        if q.type == "colour":
            assert q.text == f"What color is the {q.pattern} object?"
            assert q.pattern in patterns and q.answer == asked.color
            assert asked.pattern == q.pattern
        elif q.type == "pattern":
            assert q.text == f"What pattern is the {q.color} object?"
            assert q.color in colours and q.answer == asked.pattern
            assert asked.color == q.color
        else:
            assert q.text == f"Is there a {q.color} {q.pattern} object?"
            exists_answers.append(q.answer)
            if q.answer == "yes":
                assert (q.color, q.pattern) in pairs and asked.color == q.color
            else:
                # Exactly one of the two is in the scene; the asked object is the one with it.
                assert (q.color in colours) != (q.pattern in patterns)
                assert asked.color == q.color or asked.pattern == q.pattern
        assert q.options == scenes.OPTIONS[q.type] and q.answer in q.options
    for t in ("colour", "pattern", "exists"):
        assert abs(types.count(t) / 3000 - 1 / 3) < 5 * math.sqrt((2 / 9) / 3000)
    share_yes = exists_answers.count("yes") / len(exists_answers)
    assert abs(share_yes - 0.5) < 5 * math.sqrt(0.25 / len(exists_answers))


def test_exists_no_uses_an_absent_colour_when_all_patterns_are_present(seed):
    rng = np.random.default_rng(seed)
    seen = 0
    while seen < 30:
        scene = scenes.sample_scene(rng)
        if len(scene.objects) < 4:
            continue
        q = scenes.sample_question(scene, rng, qtype="exists", version="v2")
        if q.answer == "no":
            seen += 1
            assert q.color not in {o.color for o in scene.objects}


def test_per_type_sampling_balances_the_types(seed):
    items = scenes.sample(seed, 30, per_type=True, version="v2")
    assert [q.type for _, q in items].count("exists") == 10
    items = scenes.sample(seed, 40, per_type=True, version="v3")
    assert [q.type for _, q in items].count("location") == 10


def test_scoring_and_object_hit_rate(seed):
    scene, q = scenes.sample(seed, 1)[0]
    assert scenes.score_reply(f" {q.answer.capitalize()}.", q)
    assert scenes.score_reply(f"{q.answer}, I think", q)
    assert not scenes.score_reply(f"maybe {q.answer}", q)
    assert not scenes.score_reply("", q)
    patches = scene.object_patches()[q.target]
    assert scenes.object_hit_rate(scene, q, range(576)) == 1.0
    assert scenes.object_hit_rate(scene, q, []) == 0.0
    half = patches[: len(patches) // 2]
    assert scenes.object_hit_rate(scene, q, half) == len(half) / len(patches)


# ---- v3 ---------------------------------------------------------------------------------------

QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


def spec_centre(obj) -> tuple[float, float]:
    return obj.x0 + (obj.size - 1) / 2, obj.y0 + (obj.size - 1) / 2


def spec_eligible(scene) -> dict[str, int]:
    """v3's eligible quadrants, each with its one object, restated from the spec."""
    centres = [spec_centre(o) for o in scene.objects]
    if any(abs(x - 167.5) < 12 or abs(y - 167.5) < 12 for x, y in centres):
        return {}
    members = {q: [] for q in QUADRANTS}
    for i, (x, y) in enumerate(centres):
        name = ("top" if y < 168 else "bottom") + " " + ("left" if x < 168 else "right")
        members[name].append(i)
    return {q: m[0] for q, m in members.items() if len(m) == 1}


def test_v2_streams_are_unchanged():
    """v3 draws differently; v2 must still give the very items it gave before v3 existed."""
    items = scenes.sample(20261207, 4, version="v2")
    assert [(q.text, q.answer, s.noise_seed) for s, q in items] == [
        ("What color is the checkered object?", "blue", 63950891796487126),
        ("What color is the solid object?", "green", 8952019063144635886),
        ("Is there a blue dotted object?", "no", 3263600051477253736),
        ("What pattern is the red object?", "striped", 7149772559598443664),
    ]


def test_v3_question_rules(seed):
    n = 4000
    items = scenes.sample(seed, n, version="v3")
    types, answers, negatives = [], [], []
    for scene, q in items:
        types.append(q.type)
        colours = {o.color for o in scene.objects}
        patterns = {o.pattern for o in scene.objects}
        pairs = {(o.color, o.pattern) for o in scene.objects}
        assert q.options == scenes.OPTIONS[q.type] and q.answer in q.options
        if q.type == "location":
            eligible = spec_eligible(scene)
            assert q.quadrant in eligible, (q.quadrant, eligible)
            assert q.text == f"What color is the object in the {q.quadrant}?"
            assert q.target == eligible[q.quadrant]
            assert q.answer == scene.objects[q.target].color and q.targets == (q.target,)
        elif q.type == "exists":
            assert q.text == f"Is there a {q.color} {q.pattern} object?"
            answers.append(q.answer)
            if q.answer == "yes":
                assert (q.color, q.pattern) in pairs
                continue
            assert (q.color, q.pattern) not in pairs
            negatives.append(q.negative)
            if q.negative == "binding":  # both present, on two different objects
                a, b = (scene.objects[i] for i in q.targets)
                assert q.target != q.other and a.color == q.color and b.pattern == q.pattern
            else:
                assert q.negative == "absent" and (q.color in colours) != (q.pattern in patterns)
        else:
            assert q.other is None and q.quadrant is None
    for t in scenes.QUESTION_TYPES:
        assert abs(types.count(t) / n - 1 / 4) < 5 * math.sqrt((3 / 16) / n), t
    for share, values in (
        (answers.count("yes") / len(answers), answers),
        (negatives.count("binding") / len(negatives), negatives),
    ):
        assert abs(share - 0.5) < 5 * math.sqrt(0.25 / len(values))


def test_v3_location_quadrants_are_drawn_uniformly_from_the_eligible(seed):
    """A scene with two eligible quadrants names each about half the time."""
    rng = np.random.default_rng(seed)
    while True:
        scene = scenes.sample_scene(rng)
        eligible = spec_eligible(scene)
        if len(eligible) >= 2:
            break
    assert set(scene.eligible_quadrants()) == set(eligible)
    asked = [scenes.sample_question(scene, rng, qtype="location").quadrant for _ in range(400)]
    for q in eligible:
        share = asked.count(q) / 400
        assert abs(share - 1 / len(eligible)) < 5 * math.sqrt(0.25 / 400)


def test_v3_a_binding_negative_hits_both_objects(seed):
    rng = np.random.default_rng(seed)
    while True:
        scene, q = scenes.sample_item(rng, qtype="exists")
        if q.negative == "binding":
            break
    per_object = scene.object_patches()
    first, second = per_object[q.target], per_object[q.other]
    union = sorted(set(first) | set(second))
    assert scenes.object_hit_rate(scene, q, first) == len(first) / len(union)
    assert scenes.object_hit_rate(scene, q, union) == 1.0
    assert q.subtype == "exists/binding"


def test_a_location_question_needs_an_eligible_scene(seed):
    rng = np.random.default_rng(seed)
    while True:
        scene = scenes.sample_scene(rng)
        if not spec_eligible(scene):
            break
    with pytest.raises(ValueError, match="no eligible quadrant"):
        scenes.sample_question(scene, rng, qtype="location")
    with pytest.raises(ValueError, match="one of"):
        scenes.sample_question(scene, rng, qtype="location", version="v2")
