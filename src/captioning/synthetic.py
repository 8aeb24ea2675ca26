"""A captioned scene dataset generated offline, with ground truth.

Each image is a COCO-sized JPEG (sides in [min_side, max_side], at most 4:3) on a low-saturation
background (solid, gradient or noise), holding 1 to 3 objects that differ in shape, colour, size and
position. Each image gets captions from a small grammar with real variety: synonyms, optional size
adjectives, counts ("two red circles"), spatial relations ("left of", "above") and word order. The
scene itself is stored in the image record so a caption can be checked against the truth
(`mentioned_objects`): the scene scores below (`grounded`) exist for this dataset alone, and the
stages that score captions plug them in where the records carry scenes.

Everything is a pure function of (seed, split, index): images are generated in parallel and the
output is byte-identical for the same params.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from captioning.layout import SPLITS, captions_path, coco_captions, images_dir
from captioning.params import DataParams, ParamsError
from captioning.text import tokenize

# Saturated object colours; backgrounds below stay low-saturation so no object can vanish into one.
# Few, well-separated colours and shapes: the default must learn from scratch (no pretrained weights
# offline) on 2 CPU cores within minutes; the grammar, sizes, counts and positions supply variety.
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "dark": (60, 62, 66),
    "beige": (190, 175, 150),
    "brown": (110, 85, 65),
    "slate": (95, 110, 125),
}
# Caption words for each shape (singular, plural). Synonyms map back to one shape when grounding.
SHAPE_WORDS = {
    "circle": (("circle", "circles"), ("disk", "disks"), ("ball", "balls")),
    "square": (("square", "squares"), ("box", "boxes")),
    "triangle": (("triangle", "triangles"),),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
NUMBER_WORDS = {2: "two", 3: "three"}
# Objects keep clear of the border so the train crop (at most 12.5% of a side) never cuts one off.
MARGIN = 0.125
# Object radius as a fraction of the shorter side, per size word: a small shape keeps a radius of
# 3-4 px at the default 32 px input. Larger shapes would leave too little room for three objects.
RADIUS = {"small": (0.12, 0.14), "large": (0.16, 0.19)}
MAX_ASPECT = 4 / 3

_WORD_TO_SHAPE = {w: s for s, forms in SHAPE_WORDS.items() for pair in forms for w in pair}


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str  # "small" | "large"
    x: float  # centre, as a fraction of the width
    y: float  # centre, as a fraction of the height
    radius: float  # as a fraction of the shorter side

    def to_dict(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "size": self.size,
                "x": round(self.x, 4), "y": round(self.y, 4), "radius": round(self.radius, 4)}


# The random stream each split draws from. Test draws from its own stream, which no choice of the
# defaults has seen: choices use val and the dev images past num_val. Stream 2 stays unused: defaults
# were once compared on its images.
STREAMS = {"train": 0, "val": 1, "test": 3}


def split_seed(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[split], index])


def make_scene(rng: np.random.Generator, min_side: int, max_side: int) -> dict:
    """Image size, background and 1-3 non-overlapping objects, all drawn from `rng`."""
    # COCO's shapes: mostly 4:3 either way, never more than MAX_ASPECT. The resize stage squashes
    # every image to a square (as Show and Tell does), so a 2:1 image would shrink its objects'
    # widths to half: a small shape under 2 px wide at the network's 32 px input. (Measured: a
    # ResNet-18 trained on the scene labels, 4 epochs at 32 px, gives features a probe reads at
    # 0.66 with sides drawn independently, 0.70 with this cap.)
    width = int(rng.integers(min_side, max_side + 1))
    aspect = math.exp(float(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT))))
    height = int(min(max(round(width / aspect), min_side), max_side))
    background = str(rng.choice(list(BACKGROUNDS)))
    pattern = str(rng.choice(["solid", "gradient", "noise"]))
    count = int(rng.integers(1, 4))
    objects: list[SceneObject] = []
    # A second object copies the first's colour and shape now and then, so counts appear.
    while len(objects) < count:
        if objects and rng.random() < 0.2:
            colour, shape = objects[0].colour, objects[0].shape
        else:
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        size = str(rng.choice(["small", "large"]))
        radius = float(rng.uniform(*RADIUS[size]))
        short = min(width, height)
        mx, my = MARGIN + radius * short / width, MARGIN + radius * short / height
        for _ in range(50):
            x, y = float(rng.uniform(mx, 1 - mx)), float(rng.uniform(my, 1 - my))
            if all(_apart(x, y, radius, o, width, height) for o in objects):
                objects.append(SceneObject(colour, shape, size, x, y, radius))
                break
        else:
            count -= 1  # no room left: fewer objects, still a valid scene
    return {"width": width, "height": height, "background": background, "pattern": pattern,
            "objects": [o.to_dict() for o in objects]}


def _apart(x, y, radius, other: SceneObject, width, height) -> bool:
    short = min(width, height)
    dist = math.hypot((x - other.x) * width, (y - other.y) * height)
    # A gap of 5% of the radii: apart, and room for three objects in a fifth of the scenes.
    return dist > (radius + other.radius) * short * 1.05


def render(scene: dict, rng: np.random.Generator) -> Image.Image:
    width, height = scene["width"], scene["height"]
    base = np.array(BACKGROUNDS[scene["background"]], dtype=np.float32)
    if scene["pattern"] == "gradient":
        ramp = np.linspace(-25, 25, width if rng.random() < 0.5 else height, dtype=np.float32)
        ramp = ramp[None, :, None] if ramp.size == width else ramp[:, None, None]
        pixels = np.broadcast_to(base + ramp, (height, width, 3))
    elif scene["pattern"] == "noise":
        # Low-frequency noise: a small random field scaled up (cheap, and not confusable with objects).
        field = rng.normal(0, 12, size=(max(2, height // 32), max(2, width // 32), 3)).astype(np.float32)
        small = Image.fromarray(np.clip(base + field, 0, 255).astype(np.uint8))
        pixels = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    else:
        pixels = np.broadcast_to(base, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    for obj in scene["objects"]:
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[obj["colour"]]) + jitter, 0, 255))
        cx, cy, r = obj["x"] * width, obj["y"] * height, obj["radius"] * short
        _draw_shape(draw, obj["shape"], cx, cy, r, float(rng.uniform(-0.3, 0.3)), fill)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, turn, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.sin(turn + k * 2 * math.pi / 3), cy - r * math.cos(turn + k * 2 * math.pi / 3))
               for k in range(3)]
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ---- captions ---------------------------------------------------------------------------------


def _noun_phrase(rng, colour, shape, count=1, size=None) -> str:
    singular, plural = SHAPE_WORDS[shape][int(rng.integers(len(SHAPE_WORDS[shape])))]
    words = []
    if size and count == 1 and rng.random() < 0.4:
        words.append(str(rng.choice(SIZE_WORDS[size])))
    words += [colour, singular if count == 1 else plural]
    det = NUMBER_WORDS[count] if count > 1 else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([det, *words])


# The words for each relation the grammar states; `relation` is the one rule that picks it, for the
# captions written here and for the strict score that checks them.
RELATION_WORDS = {"left": ["to the left of", "left of"], "right": ["to the right of", "right of"],
                  "above": ["above", "over"], "below": ["below", "under"]}


def relation(a: dict, b: dict) -> str:
    """How `a` lies relative to `b`: left/right when the horizontal offset is the larger, else above/below."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _relation(a: dict, b: dict, rng) -> str:
    """How `a` lies relative to `b`, in words."""
    return str(rng.choice(RELATION_WORDS[relation(a, b)]))


def _where(obj: dict) -> str:
    """Where in the image `obj` is: "in the top left of the image", "on the right", ..."""
    col = "left" if obj["x"] < 0.4 else "right" if obj["x"] > 0.6 else ""
    row = "top" if obj["y"] < 0.4 else "bottom" if obj["y"] > 0.6 else ""
    if row and col:
        return f"in the {row} {col} of the image"
    if row:
        return f"at the {row} of the image"
    if col:
        return f"on the {col} of the image"
    return "in the center of the image"


def make_captions(scene: dict, rng: np.random.Generator, n: int) -> list[str]:
    """`n` captions for `scene`, distinct where the grammar allows."""
    objs = scene["objects"]
    groups = Counter((o["colour"], o["shape"]) for o in objs)
    bg = scene["background"]
    captions: list[str] = []
    for _ in range(n * 6):  # retry for variety; repeats are allowed once variety runs out
        caption = _one_caption(scene, objs, groups, bg, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == n:
            break
    while len(captions) < n:
        captions.append(_one_caption(scene, objs, groups, bg, rng))
    return captions


def _one_caption(scene, objs, groups, bg, rng) -> str:
    order = [int(i) for i in rng.permutation(len(objs))]
    kind = int(rng.integers(3))
    if len(groups) < len(objs):  # some (colour, shape) repeats: describe by counts
        phrases = [_noun_phrase(rng, c, s, k) for (c, s), k in groups.items()]
        phrases = [phrases[i] for i in rng.permutation(len(phrases))]
        body = _join(phrases)
    elif len(objs) == 1:
        o = objs[0]
        np_ = _noun_phrase(rng, o["colour"], o["shape"], size=o["size"])
        body = [np_, f"{np_} {_where(o)}", f"{np_} on a {bg} background"][kind]
    elif len(objs) == 2:
        a, b = (objs[i] for i in order)
        na = _noun_phrase(rng, a["colour"], a["shape"], size=a["size"])
        nb = _noun_phrase(rng, b["colour"], b["shape"], size=b["size"])
        body = [f"{na} {_relation(a, b, rng)} {nb}", f"{na} and {nb}", f"{na} next to {nb}"][kind]
    else:
        a, b, c = (objs[i] for i in order)
        na, nb, nc = (_noun_phrase(rng, o["colour"], o["shape"], size=o["size"]) for o in (a, b, c))
        body = [f"{na} {_relation(a, b, rng)} {nb} and {nc}", _join([na, nb, nc]),
                f"three shapes: {na}, {nb} and {nc}"][kind]
    lead = str(rng.choice(["", "", "there is ", "a picture of ", "an image with "]))
    if lead == "there is " and body.startswith(("two", "three")):
        lead = "there are "
    if "background" not in body and rng.random() < 0.25:
        body += f" on a {bg} background"
    return lead + body


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def mentioned_objects(caption: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names: each shape word with the colour word before it."""
    found, colour = set(), None
    for tok in tokenize(caption):
        if tok in COLOURS:
            colour = tok
        elif tok in _WORD_TO_SHAPE:
            if colour is not None:
                found.add((colour, _WORD_TO_SHAPE[tok]))
            colour = None
    return found


def scene_objects(scene: dict) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for o in scene["objects"]}


def names_scene(caption: str, scene: dict) -> bool:
    """The grounded verdict: the caption names exactly the scene's (colour, shape) objects."""
    return mentioned_objects(caption) == scene_objects(scene)


def verdict(caption: str, scene: dict) -> tuple[bool, str]:
    """The grounded verdict in words, for the gallery."""
    right = names_scene(caption, scene)
    return right, "names every object" if right else "wrong objects"


# ---- the strict score ---------------------------------------------------------------------------

_COUNTS = {"a": 1, "an": 1, "one": 1, **{w: n for n, w in NUMBER_WORDS.items()}}
_SIZES = {w: size for size, words in SIZE_WORDS.items() for w in words}
_RELATIONS = sorted(((tuple(words.split()), kind) for kind, forms in RELATION_WORDS.items() for words in forms),
                    key=lambda item: -len(item[0]))  # "to the left of" before "left of"


@dataclass(frozen=True)
class Mention:
    """A noun phrase of a caption: how many, which colour (None: not said), which shape, and the
    sizes its size words say (none said: any size; "small" and "big" together: no object's)."""

    count: int
    colour: str | None
    shape: str
    sizes: frozenset[str] = frozenset()

    def fits(self, obj: dict) -> bool:
        return (obj["shape"] == self.shape and self.colour in (None, obj["colour"])
                and self.sizes <= {obj["size"]})


def parse_caption(caption: str) -> tuple[list[Mention], list[tuple[int, str, int]], list[tuple[int, str]], list[str]]:
    """(mentions, relations (mention, kind, mention), positions (mention, _where phrase), backgrounds
    stated) of a caption in this dataset's grammar: "two red circles", "a small blue box to the left
    of a green triangle", "a red disk in the top left of the image", "... on a gray background". A
    stated background is the word before "background", whatever it is ("grey" names no scene's)."""
    tokens = tokenize(caption)
    mentions, relations, positions, backgrounds = [], [], [], []
    pending = None  # a relation waiting for the mention after it
    i = 0
    while i < len(tokens):
        where = _position_phrase(tokens, i)
        if where is not None:
            phrase, i = where
            if mentions:
                positions.append((len(mentions) - 1, phrase))
            continue
        kind = next((k for words, k in _RELATIONS if tuple(tokens[i:i + len(words)]) == words), None)
        if kind is not None and mentions:
            pending = (len(mentions) - 1, kind)
            i += len(next(words for words, k in _RELATIONS if tuple(tokens[i:i + len(words)]) == words))
            continue
        if tokens[i] == "background" and i > 0 and tokens[i - 1] not in ("a", "an", "the"):
            backgrounds.append(tokens[i - 1])
        if tokens[i] in _WORD_TO_SHAPE:
            j = i - 1
            colour = tokens[j] if j >= 0 and tokens[j] in COLOURS else None
            j -= colour is not None
            sizes = set()
            while j >= 0 and tokens[j] in _SIZES:
                sizes.add(_SIZES[tokens[j]])
                j -= 1
            count = _COUNTS.get(tokens[j], 1) if j >= 0 else 1
            mentions.append(Mention(count, colour, _WORD_TO_SHAPE[tokens[i]], frozenset(sizes)))
            if pending is not None:
                relations.append((pending[0], pending[1], len(mentions) - 1))
                pending = None
        i += 1
    return mentions, relations, positions, backgrounds


def _position_phrase(tokens: list[str], i: int) -> tuple[str, int] | None:
    """("in the top left of the image", index after it) when one starts at tokens[i]."""
    for end in range(i + 4, min(i + 8, len(tokens)) + 1):
        if tokens[end - 3:end] == ["of", "the", "image"] and tokens[i] in ("in", "at", "on") and tokens[i + 1] == "the":
            return " ".join(tokens[i:end]), end
    return None


def names_scene_strictly(caption: str, scene: dict) -> bool:
    """The strict verdict: the caption names exactly the scene's objects with their counts; every
    shape it names, with a colour or not, is there as often as it says, at the size it says; every
    relation and position it states holds by the rules the captions are written by (`relation`,
    `_where`); and the background it states, if any, is the scene's."""
    objects = scene["objects"]
    mentions, relations, positions, backgrounds = parse_caption(caption)
    if any(b != scene["background"] for b in backgrounds):
        return False
    said, coloured = Counter(), Counter()  # phrases that say the same claim their objects together
    for m in mentions:
        said[replace(m, count=1)] += m.count
        if m.colour is not None:
            coloured[(m.colour, m.shape)] += m.count
    if any(sum(m.fits(o) for o in objects) < n for m, n in said.items()):
        return False  # "and two squares" where there are fewer; "a big red circle" where it is small
    if coloured != Counter((o["colour"], o["shape"]) for o in objects):
        return False
    for a, kind, b in relations:
        if not any(relation(oa, ob) == kind for oa in objects if mentions[a].fits(oa)
                   for ob in objects if ob is not oa and mentions[b].fits(ob)):
            return False
    return all(any(_where(o) == phrase for o in objects if mentions[m].fits(o)) for m, phrase in positions)


# The scores only a stored scene allows; `train.select_metric` may name one.
SCENE_METRICS = ("grounded", "strict")


def has_scenes(records: list[dict]) -> bool:
    """Whether every record carries its scene (this dataset's records do; no real source's)."""
    return bool(records) and all("scene" in r for r in records)


def scorer(records: list[dict], select_metric: str):
    """`scene_scores` where `records` carry scenes, else None. A `train.select_metric` that needs
    scenes refuses a dataset without them."""
    if has_scenes(records):
        return scene_scores
    if select_metric in SCENE_METRICS:
        raise ParamsError(f"train.select_metric is {select_metric}, which needs the synthetic dataset's scenes; "
                          "this dataset has none: pick cider, bleu_4 or val_loss")
    return None


def scene_scores(records: list[dict], hypotheses: dict[int, str]) -> dict[str, float]:
    """Shares of captioned records (id -> caption in `hypotheses`) whose caption `grounded`: names
    exactly its scene's (colour, shape) objects; `strict`: passes `names_scene_strictly` too, which
    also checks counts, sizes, relations, positions and the background the caption states."""
    scenes = {r["id"]: r["scene"] for r in records}
    if not hypotheses:
        raise ValueError("no captions to score")
    grounded = sum(names_scene(caption, scenes[i]) for i, caption in hypotheses.items())
    strict = sum(names_scene_strictly(caption, scenes[i]) for i, caption in hypotheses.items())
    return {"grounded": grounded / len(hypotheses), "strict": strict / len(hypotheses)}


# ---- one sample -------------------------------------------------------------------------------


def make_sample(seed: int, split: str, index: int, min_side: int, max_side: int, n_captions: int):
    """(scene, captions, jpeg bytes) for one image; a pure function of its arguments."""
    rng = split_seed(seed, split, index)
    scene = make_scene(rng, min_side, max_side)
    captions = make_captions(scene, rng, n_captions)
    buf = io.BytesIO()
    render(scene, rng).save(buf, format="JPEG", quality=90)
    return scene, captions, buf.getvalue()


def write_dataset(out: Path, params: DataParams, seed: int) -> dict[str, int]:
    """Generate the dataset under `out` (which must not exist) in the pipeline's layout (see
    `captioning.layout`), each record with its scene; return images per split."""
    sizes = {"train": params.num_train, "val": params.num_val, "test": params.num_test}
    workers = params.workers or os.cpu_count() or 1
    base_id = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}  # ids unique across splits
    with ProcessPoolExecutor(workers) as pool:
        for split in SPLITS:
            folder = images_dir(out, split)
            folder.mkdir(parents=True)
            make = partial(make_sample, seed, split, min_side=params.min_side,
                           max_side=params.max_side, n_captions=params.captions_per_image)
            images, captions = [], {}
            samples = pool.map(make, range(sizes[split]), chunksize=32)
            for index, (scene, caps, jpeg) in enumerate(
                tqdm(samples, total=sizes[split], desc=f"synthetic {split}", unit="img")
            ):
                image_id = base_id[split] + index
                file_name = f"{split}_{index:06d}.jpg"
                (folder / file_name).write_bytes(jpeg)
                images.append({"id": image_id, "file_name": file_name, "width": scene["width"],
                               "height": scene["height"], "scene": scene})
                captions[image_id] = caps
            doc = coco_captions(images, captions, f"synthetic scenes, seed {seed}, split {split}")
            captions_path(out, split).write_text(json.dumps(doc, indent=None, separators=(",", ":")))
    return sizes
