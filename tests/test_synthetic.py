import dataclasses
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from captioning import synthetic
from captioning.layout import SPLITS, captions_path, read_split
from captioning.params import DataParams, ParamsError


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_params_and_seed_give_byte_identical_files(tmp_path, tiny_data):
    params = dataclasses.replace(DataParams(), num_train=48, num_val=12, num_test=12, workers=2)
    synthetic.write_dataset(tmp_path / "again", params, seed=7)  # the fixture used 1 worker: parallelism must not matter
    assert _digest(tmp_path / "again") == _digest(tiny_data)
    synthetic.write_dataset(tmp_path / "other", params, seed=8)
    assert _digest(tmp_path / "other") != _digest(tiny_data)


def test_splits_sizes_images_and_coco_format(tiny_data):
    sizes = {"train": 48, "val": 12, "test": 12}
    all_ids = set()
    for split in SPLITS:
        coco = COCO(str(captions_path(tiny_data, split)))  # the official reader accepts it
        assert len(coco.getImgIds()) == sizes[split]
        data = read_split(tiny_data, split)
        for record in data.images:
            assert len(data.captions[record["id"]]) == 5
            with Image.open(data.image_path(record)) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert 300 <= min(image.size) and max(image.size) <= 640
                assert max(image.size) / min(image.size) <= 4 / 3 + 0.01  # COCO-shaped, see MAX_ASPECT
                assert image.size == (record["width"], record["height"])
            assert 1 <= len(record["scene"]["objects"]) <= 3
        all_ids |= {r["id"] for r in data.images}
    assert len(all_ids) == sum(sizes.values())  # ids unique across splits


def test_every_reference_caption_names_exactly_its_scene(tiny_data):
    for split in SPLITS:
        data = read_split(tiny_data, split)
        for record in data.images:
            for caption in data.captions[record["id"]]:
                assert synthetic.mentioned_objects(caption) == synthetic.scene_objects(record["scene"]), caption


def test_grammar_has_variety():
    captions, objects = set(), []
    for i in range(200):
        scene, caps, _ = synthetic.make_sample(0, "train", i, 300, 640, 5)
        captions.update(caps)
        objects.append(len(scene["objects"]))
    text = " ".join(captions)
    for phrase in ("left of", "right of", "above", "below", "two ", "disk", "box", "big", "little", "background"):
        assert phrase in text, phrase
    assert len(captions) > 800  # 1000 captions, nearly all distinct
    assert set(objects) == {1, 2, 3}


def test_relation_words_match_positions():
    scene = {"objects": [{"x": 0.2, "y": 0.5}, {"x": 0.8, "y": 0.5}]}
    rng = synthetic.split_seed(0, "train", 0)
    assert "left" in synthetic._relation(scene["objects"][0], scene["objects"][1], rng)
    assert "right" in synthetic._relation(scene["objects"][1], scene["objects"][0], rng)
    above = synthetic._relation({"x": 0.5, "y": 0.2}, {"x": 0.5, "y": 0.8}, rng)
    assert above in ("above", "over")


def test_mentioned_objects_reads_counts_synonyms_and_plurals():
    found = synthetic.mentioned_objects("two red disks left of a big blue box and a yellow triangle")
    assert found == {("red", "circle"), ("blue", "square"), ("yellow", "triangle")}
    assert synthetic.mentioned_objects("a circle on a gray background") == set()


def test_scene_json_is_kept(tiny_data):
    doc = json.loads(captions_path(tiny_data, "test").read_text())
    obj = doc["images"][0]["scene"]["objects"][0]
    assert set(obj) == {"colour", "shape", "size", "x", "y", "radius"}


def test_grounded_score_counts_exact_object_sets():
    records = [{"id": 1, "scene": {"background": "gray", "objects": [
                   {"colour": "red", "shape": "circle", "size": "small", "x": 0.2, "y": 0.5},
                   {"colour": "blue", "shape": "square", "size": "large", "x": 0.7, "y": 0.4}]}},
               {"id": 2, "scene": {"background": "dark", "objects": [
                   {"colour": "green", "shape": "triangle", "size": "small", "x": 0.5, "y": 0.5}]}}]
    assert synthetic.scene_scores(records, {1: "a blue box right of a red disk", 2: "a green triangle"})["grounded"] == 1.0
    assert synthetic.scene_scores(records, {1: "a red circle", 2: "a green triangle"})["grounded"] == 0.5
    assert synthetic.verdict("a red circle", records[0]["scene"]) == (False, "wrong objects")


def test_only_records_with_scenes_have_scene_scores(tiny_data):
    split = read_split(tiny_data, "val")
    assert synthetic.has_scenes(split.captioned())
    assert not synthetic.has_scenes([{k: v for k, v in r.items() if k != "scene"} for r in split.images])
    assert not synthetic.has_scenes([])


def test_scene_scores_are_plugged_in_where_the_records_carry_scenes():
    scene = {"objects": [{"colour": "red", "shape": "circle", "x": 0.5, "y": 0.5}], "background": "white"}
    assert synthetic.scorer([{"id": 1, "scene": scene}], "grounded") is synthetic.scene_scores
    assert synthetic.scorer([{"id": 1}], "cider") is None
    with pytest.raises(ParamsError, match="train.select_metric is strict, which needs the synthetic dataset's scenes"):
        synthetic.scorer([{"id": 1}], "strict")


def test_generic_modules_do_not_import_the_synthetic_dataset():
    # Scene scores are plugged in by the stages where records carry scenes; the library's
    # training, metrics and report code works for any dataset.
    import ast

    from conftest import REPO

    for path in sorted((REPO / "src" / "captioning").glob("*.py")):
        if path.stem == "synthetic":
            continue
        imported = {n.module for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, ast.ImportFrom) and n.module for a in n.names}
        assert "captioning.synthetic" not in imported, path.name


# A scene of two red circles side by side and a blue square below them, drawn by the grammar's rules.
TWO_RED_AND_A_BLUE = {"background": "gray", "objects": [
    {"colour": "red", "shape": "circle", "size": "small", "x": 0.2, "y": 0.3},
    {"colour": "red", "shape": "circle", "size": "large", "x": 0.5, "y": 0.3},
    {"colour": "blue", "shape": "square", "size": "large", "x": 0.5, "y": 0.8}]}
RED_LEFT_OF_GREEN = {"background": "gray", "objects": [
    {"colour": "red", "shape": "circle", "size": "small", "x": 0.2, "y": 0.5},
    {"colour": "green", "shape": "triangle", "size": "large", "x": 0.8, "y": 0.55}]}


@pytest.mark.parametrize("caption, strict, grounded", [
    # counts: "a red circle" does not pass for two
    ("two red circles and a blue square", True, True),
    ("a red circle and a blue square", False, True),
    ("three red circles and a blue box", False, True),
    # shapes named without a colour must be there, as often as said
    ("two red circles and a blue square and a circle", True, True),
    ("two red circles and a blue square and a triangle", False, True),
    ("two red circles and a blue square and two squares", False, True),
])
def test_strict_counts_objects_and_every_shape_named(caption, strict, grounded):
    assert synthetic.names_scene_strictly(caption, TWO_RED_AND_A_BLUE) is strict
    assert synthetic.names_scene(caption, TWO_RED_AND_A_BLUE) is grounded


@pytest.mark.parametrize("caption, strict", [
    ("a red circle to the left of a green triangle", True),
    ("a red disk left of a green triangle", True),
    ("a green triangle to the right of a red ball", True),
    ("a red circle to the right of a green triangle", False),  # the grounded score passes it
    ("a red circle above a green triangle", False),  # |dx| > |dy|: the grammar says left, never above
    ("a green triangle under a red circle", False),
    ("a red circle next to a green triangle", True),  # says nothing about the side
    ("a red circle on the left of the image and a green triangle", True),
    ("a red circle on the right of the image and a green triangle", False),
    ("a green triangle on the right of the image and a red circle on a gray background", True),
])
def test_strict_checks_relations_and_positions_by_the_generators_rule(caption, strict):
    assert synthetic.names_scene_strictly(caption, RED_LEFT_OF_GREEN) is strict
    assert synthetic.names_scene(caption, RED_LEFT_OF_GREEN)  # the lenient score passes them all


def test_every_reference_caption_passes_the_strict_score(tiny_data):
    for split in SPLITS:
        data = read_split(tiny_data, split)
        for record in data.images:
            for caption in data.captions[record["id"]]:
                assert synthetic.names_scene_strictly(caption, record["scene"]), caption


def test_scene_scores_report_strict_beside_grounded():
    records = [{"id": 1, "scene": TWO_RED_AND_A_BLUE}, {"id": 2, "scene": RED_LEFT_OF_GREEN}]
    scores = synthetic.scene_scores(records, {1: "a red circle and a blue square",
                                              2: "a red circle left of a green triangle"})
    assert scores == {"grounded": 1.0, "strict": 0.5}


def test_every_caption_the_grammar_writes_passes_both_scores():
    # 2,700 scenes, 13,500 captions (no images drawn): sizes and backgrounds stated on real scenes.
    stated = {"size": 0, "background": 0}
    for seed in (0, 1, 42):
        for split in SPLITS:
            for index in range(300):
                rng = synthetic.split_seed(seed, split, index)
                scene = synthetic.make_scene(rng, 300, 640)
                for caption in synthetic.make_captions(scene, rng, 5):
                    assert synthetic.names_scene_strictly(caption, scene), (caption, scene)
                    assert synthetic.names_scene(caption, scene), (caption, scene)
                    mentions, _, _, backgrounds = synthetic.parse_caption(caption)
                    stated["size"] += any(m.sizes for m in mentions)
                    stated["background"] += bool(backgrounds)
    assert min(stated.values()) > 2000, stated  # both checks were exercised, not skipped


def _generated_scene(fits):
    """The first train scene of seed 0 that `fits` (a real scene, drawn as the dataset draws it)."""
    for index in range(1000):
        scene = synthetic.make_scene(synthetic.split_seed(0, "train", index), 300, 640)
        if fits(scene):
            return scene
    raise AssertionError("no such scene in 1,000")


def test_strict_checks_the_size_and_background_a_caption_states():
    scene = _generated_scene(lambda s: len(s["objects"]) == 1)
    obj, background = scene["objects"][0], scene["background"]
    other_size = next(size for size in synthetic.SIZE_WORDS if size != obj["size"])
    other_background = next(b for b in synthetic.BACKGROUNDS if b != background)
    noun = f"{obj['colour']} {obj['shape']}"
    for word in synthetic.SIZE_WORDS[obj["size"]]:
        assert synthetic.names_scene_strictly(f"a {word} {noun}", scene)
    for word in synthetic.SIZE_WORDS[other_size]:
        assert not synthetic.names_scene_strictly(f"a {word} {noun}", scene)
        assert synthetic.names_scene(f"a {word} {noun}", scene)  # the grounded score reads no sizes
    assert not synthetic.names_scene_strictly(f"a small big {noun}", scene)  # no object is both
    assert synthetic.names_scene_strictly(f"a {noun}", scene)  # no size and no background said
    assert synthetic.names_scene_strictly(f"a {noun} on a {background} background", scene)
    assert not synthetic.names_scene_strictly(f"a {noun} on a {other_background} background", scene)
    assert not synthetic.names_scene_strictly(f"a {noun} on a grey background", scene)  # no scene's word
    assert synthetic.names_scene(f"a {noun} on a {other_background} background", scene)


def _alike_but_for_size(scene):
    """Three objects of one colour and shape, two of one size and one of the other."""
    objects = scene["objects"]
    return (len(objects) == 3 and len({(o["colour"], o["shape"]) for o in objects}) == 1
            and len({o["size"] for o in objects}) == 2)


def test_strict_sizes_hold_over_the_whole_caption():
    # Phrases that say the same size claim their objects together, whatever count each says.
    scene = _generated_scene(_alike_but_for_size)
    sizes = Counter(o["size"] for o in scene["objects"])
    (most, _), (one, _) = sizes.most_common()
    noun = f"{scene['objects'][0]['colour']} {scene['objects'][0]['shape']}"
    assert synthetic.names_scene_strictly(f"three {noun}s", scene)
    assert synthetic.names_scene_strictly(f"two {most} {noun}s and a {one} {noun}", scene)
    assert synthetic.names_scene_strictly(f"a {most} {noun}, a {one} {noun} and a {noun}", scene)
    assert not synthetic.names_scene_strictly(f"two {most} {noun}s and a {most} {noun}", scene)
    assert not synthetic.names_scene_strictly(f"a {one} {noun}, a {one} {noun} and a {most} {noun}", scene)
    assert not synthetic.names_scene_strictly(f"three {most} {noun}s", scene)


def test_test_split_draws_from_a_stream_no_choice_has_seen():
    # Train and val (with the dev images past num_val) keep their streams bit for bit; test's
    # images are new, none of them the old stream's (2).
    for index in (0, 1, 199, 200, 700, 1199):
        for split, stream in (("train", 0), ("val", 1)):
            assert (synthetic.split_seed(42, split, index).bit_generator.state
                    == np.random.default_rng([42, stream, index]).bit_generator.state)
    for seed in (0, 42):
        for index in range(50):
            new = synthetic.make_scene(synthetic.split_seed(seed, "test", index), 300, 640)
            assert new != synthetic.make_scene(np.random.default_rng([seed, 2, index]), 300, 640)
            assert new not in (synthetic.make_scene(np.random.default_rng([seed, s, index]), 300, 640) for s in (0, 1))
