"""Tests of the toy world generator (determinism, masks, captions, answers) and its exports.

    /work/venv/bin/pytest tests/test_toy_world.py -q
"""

import dataclasses
import json
import tarfile

import numpy as np
import pytest

from distill.toy.shards import export_llava_json, export_shards, sample_conversation
from distill.toy.world import (ATTRIBUTES, COLOR_RGB, COLORS, FUSION_PARTS, QA_KINDS, QUADRANTS, QUESTION_TEMPLATES,
                               SHADE_RANGE, SHAPES, TEXTURES, ToyWorld, answer_options, texture_pattern)

INDICES = range(40)


@pytest.fixture(scope="module")
def samples():
    world = ToyWorld(seed=0)
    return [world[i] for i in INDICES]


def test_same_seed_and_index_give_identical_samples():
    a, b = ToyWorld(seed=3)[17], ToyWorld(seed=3)[17]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.masks, b.masks)
    assert a.caption == b.caption and a.qa == b.qa and a.objects == b.objects


def test_different_index_or_seed_give_different_images():
    world = ToyWorld(seed=0)
    assert not np.array_equal(np.asarray(world[0].image), np.asarray(world[1].image))
    assert not np.array_equal(np.asarray(world[0].image), np.asarray(ToyWorld(seed=1000)[0].image))


def test_image_size_and_object_count(samples):
    counts = set()
    for s in samples:
        assert s.image.mode == "RGB" and s.image.size == (64, 64)
        assert s.masks.shape == (len(s.objects), 64, 64) and s.masks.dtype == bool
        assert 1 <= len(s.objects) <= 4
        counts.add(len(s.objects))
    assert counts == {1, 2, 3, 4}
    big = ToyWorld(seed=0, image_size=96)[5]
    assert big.image.size == (96, 96) and big.masks.shape[1:] == (96, 96)


def test_masks_match_objects_and_pixels(samples):
    for s in samples:
        pixels = np.asarray(s.image).astype(int)
        assert not (s.masks.sum(axis=0) > 1).any(), "objects must not overlap"
        for obj, mask in zip(s.objects, s.masks):
            assert mask.sum() > 0
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.bbox
            cx, cy = obj.x * 64, obj.y * 64
            assert abs(xs.mean() - cx) < obj.radius and abs(ys.mean() - cy) < obj.radius
            rgb = np.array(COLOR_RGB[obj.color])
            colors = pixels[mask]
            assert SHADE_RANGE[0] <= obj.shade <= SHADE_RANGE[1]
            is_color = (colors == rgb).all(axis=1)
            is_shade = (np.abs(colors - rgb * obj.shade) <= 1).all(axis=1)
            assert (is_color | is_shade).all(), f"sample {s.index}: mask pixels of {obj.name} have other colors"
            assert is_color.mean() >= 0.3
            if obj.texture == "solid":
                assert is_color.all()
            else:
                assert is_shade.any()


def test_textures_differ_in_structure_not_in_dark_share():
    """Striped and checkered darken half of a large area, dotted about 0.28 (pi 0.3^2), solid none, at any
    period, angle and phase; checkered is dark where the stripes along both axes differ."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        period, angle, phase = rng.uniform(4, 7), rng.uniform(0, np.pi), (rng.uniform(), rng.uniform())
        maps = {t: texture_pattern(t, 256, 256, period, angle, phase) for t in TEXTURES}
        assert not maps["solid"].any()
        assert abs(maps["striped"].mean() - 0.5) < 0.03 and abs(maps["checkered"].mean() - 0.5) < 0.03
        assert abs(maps["dotted"].mean() - np.pi * 0.09) < 0.03
        across = texture_pattern("striped", 256, 256, period, angle + np.pi / 2, (phase[1], phase[0]))
        assert (maps["checkered"] == (maps["striped"] ^ ~across)).mean() > 0.97 or \
               (maps["checkered"] == (maps["striped"] ^ across)).mean() > 0.97
    with pytest.raises(ValueError, match="unknown texture 'plaid'"):
        texture_pattern("plaid", 8, 8, 4.0)


def test_caption_names_every_objects_shape_and_nothing_else(samples):
    for s in samples:
        named = [word for word in s.caption.replace(",", " ").replace(".", " ").split() if word in SHAPES]
        assert sorted(named) == sorted(obj.shape for obj in s.objects)
        assert not any(color in s.caption for color in COLORS)
        assert not any(texture in s.caption for texture in TEXTURES)
        assert not any(size in s.caption for size in ("small", "medium", "large"))
        assert s.caption == s.caption.lower()


def test_one_object_per_quadrant_inside_it(samples):
    for s in samples:
        quadrants = [o.quadrant for o in s.objects]
        assert quadrants == sorted(set(quadrants))
        for obj, mask in zip(s.objects, s.masks):
            ys, xs = np.nonzero(mask)
            top, left = (obj.quadrant // 2) * 32, (obj.quadrant % 2) * 32
            assert left <= xs.min() and xs.max() < left + 32 and top <= ys.min() and ys.max() < top + 32


def test_every_object_gets_every_kind_with_its_answer(samples):
    for s in samples:
        assert len(s.qa) == len(QA_KINDS) * len(s.objects)
        for q in s.qa:
            obj = next(o for o in s.objects if o.quadrant == q.quadrant)
            assert QUADRANTS[q.quadrant] in q.question and q.answer in q.options
            expected = {"shape": obj.shape, "texture": obj.texture, "size": obj.size,
                        "fusion": f"{obj.texture} {obj.shape}"}[q.kind]
            assert q.answer == expected
            # The text depends only on the kind and quadrant: it lists every option, never the scene's colour.
            assert q.question == QUESTION_TEMPLATES[q.kind].format(q=QUADRANTS[q.quadrant])
            parts = FUSION_PARTS if q.kind == "fusion" else (q.kind,)
            assert all(option in q.question for part in parts for option in ATTRIBUTES[part])
            assert not set(COLORS) & set(q.question.replace("?", " ").replace(",", " ").split())
    assert len(answer_options("fusion")) == 16 and answer_options("size") == ["small", "medium", "large"]
    assert "striped circle" in answer_options("fusion")


def test_question_text_gives_away_no_answer(samples):
    """The text of a question depends only on its kind and quadrant, never on the scene."""
    texts = {(q.kind, q.quadrant): q.question for s in samples for q in s.qa}
    for s in samples:
        for q in s.qa:
            assert texts[(q.kind, q.quadrant)] == q.question
    assert len(set(texts.values())) == len(QA_KINDS) * len(QUADRANTS)


def test_training_questions_never_pair_fusion_with_its_parts(samples):
    rng = np.random.default_rng(0)
    bundles = set()
    for s in samples:
        asked = s.questions(rng)
        for obj in s.objects:
            kinds = tuple(q.kind for q in asked if q.quadrant == obj.quadrant)
            assert kinds in {("shape", "texture", "size"), ("fusion", "size")}
            bundles.add(kinds)
    assert len(bundles) == 2


def test_vocabulary_is_small_and_lowercase(samples):
    words = set()
    for s in samples:
        for text in [s.caption] + [q.question + " " + q.answer for q in s.qa]:
            words.update(text.replace(",", " ").replace(".", " ").replace("?", " ").replace(":", " ").split())
    assert all(w == w.lower() for w in words)
    assert set(SHAPES) | set(TEXTURES) | {"small", "medium", "large"} <= words
    assert not set(COLORS) & words  # colour is drawn, never named
    assert len(words) < 80


def test_shards_and_llava_json_round_trip(tmp_path):
    world = ToyWorld(seed=1000)
    shards = export_shards(world, tmp_path / "shards", count=5, shard_size=3)
    assert [p.name for p in shards] == ["000000.tar", "000001.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        record = json.load(tar.extractfile("00000000.json"))
    assert "00000000.png" in names and "00000000.masks.npy" in names
    assert record["caption"] == world[0].caption and len(record["objects"]) == len(world[0].objects)

    json_file = export_llava_json(world, tmp_path / "llava", count=3)
    records = json.loads(json_file.read_text())
    assert records[1] == sample_conversation(world[1], "images/00000001.png")
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")
    assert [t["from"] for t in records[0]["conversations"][:2]] == ["human", "gpt"]
    assert (tmp_path / "llava" / records[2]["image"]).is_file()


def test_describe_gives_the_samples_description_without_drawing_it():
    for world in (ToyWorld(seed=0), ToyWorld(seed=1000, max_objects=1), ToyWorld(seed=3, image_size=96)):
        for index in range(40):
            drawn, described = world[index], world.describe(index)
            assert described.image is None and described.masks is None
            assert described.caption == drawn.caption and described.qa == drawn.qa
            for a, b in zip(described.objects, drawn.objects, strict=True):
                assert a.bbox == (0, 0, 0, 0)
                assert dataclasses.replace(a, bbox=b.bbox) == b
