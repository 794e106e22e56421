"""Procedurally rendered scenes: images of shapes with compositional captions, distractors and QA.

Scene `seed` places 2-4 objects (shape, colour, size) in distinct cells of a coarse grid (so they never
overlap) with a little jitter inside the cell, and draws them with Pillow (no antialiasing: every object
pixel has its colour's exact RGB). The caption chains the objects by spatial relations ("a large red
circle left of a small blue square and ..."); each distractor changes ONE word of it (a colour, shape,
size or relation) and is false for the scene; questions have answers in the fixed `ANSWERS` vocabulary.
`build_scenes` renders `num_scenes` scenes into cached train/validation/test splits (or, for the other
sources, loads an image-text dataset: `distill.data.vl_data`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw

from distill.data.config import SPLITS, digest
from distill.data.corpus import split_of
from distill.data.vl_config import VLDataConfig, vl_cache_root

logger = logging.getLogger(__name__)

SCENES_VERSION = 1  # bump when a change here changes what a rendered scene looks like or says
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "cyan": (40, 210, 220),
}
SHAPES = ("square", "circle", "triangle", "diamond")
SIZES = ("small", "large")
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUND = (30, 30, 30)
HALF_EXTENT = {"small": 0.22, "large": 0.42}  # half the object's width, as a fraction of a cell
ANSWERS = ("no", "yes", *COLOURS, *SHAPES, *SIZES, *(str(n) for n in range(10)))
FEATURES = Features(
    {
        "seed": Value("int64"),
        "image": Image(),
        "caption": Value("string"),
        "distractors": List(Value("string")),
        "distractor_kinds": List(Value("string")),  # "colour" | "shape" | "size" | "relation"
        "questions": List(Value("string")),
        "answers": List(Value("string")),
        "answer_ids": List(Value("int64")),  # indices into ANSWERS
        "objects": List(
            {k: Value("string") for k in ("shape", "colour", "size")}
            | {k: Value("int64") for k in ("row", "col", "cx", "cy")}
        ),
    }
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int  # grid cell
    col: int
    cx: int  # centre pixel (x right, y down)
    cy: int

    @property
    def words(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)


@dataclass
class Scene:
    seed: int
    image: np.ndarray  # uint8 [3, H, W]
    objects: list[SceneObject]
    caption: str
    distractors: list[str] = field(default_factory=list)
    distractor_kinds: list[str] = field(default_factory=list)
    qa: list[tuple[str, str]] = field(default_factory=list)


def holds(rel: str, a: SceneObject, b: SceneObject) -> bool:
    """Whether `a rel b` holds, judged on grid cells (rows grow downwards)."""
    checks = {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}
    return checks[rel]


def clause_true(words: list[str], objects: list[SceneObject]) -> bool:
    """Whether "a S C H <rel> a S C H" describes two distinct objects of the scene."""
    desc_a, rel, desc_b = tuple(words[1:4]), " ".join(words[4:-4]), tuple(words[-3:])
    return any(
        x is not y and x.words == desc_a and y.words == desc_b and holds(rel, x, y)
        for x in objects
        for y in objects
    )


def caption_true(caption: str, objects: list[SceneObject]) -> bool:
    """Whether every " and "-joined clause of a caption holds for the scene."""
    return all(clause_true(c.split(), objects) for c in caption.split(" and "))


def scene_seed(base: int, index: int) -> int:
    """The seed of scene `index` of a build with `data.seed = base` (independent of num_scenes)."""
    return int.from_bytes(hashlib.blake2b(f"scene:{base}:{index}".encode(), digest_size=6).digest(), "big")


def render_scene(seed: int, cfg: VLDataConfig) -> Scene:
    """Scene `seed`: image, objects, caption, distractors and question/answer pairs (deterministic)."""
    rng = random.Random(seed)
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cell = cfg.image_size / cfg.grid
    objects = []
    for index in rng.sample(range(cfg.grid**2), n):
        row, col = divmod(index, cfg.grid)
        size = rng.choice(SIZES)
        slack = (0.5 - HALF_EXTENT[size]) * cell - 1  # jitter that keeps the object inside its cell
        cx = int((col + 0.5) * cell + rng.uniform(-slack, slack))
        cy = int((row + 0.5) * cell + rng.uniform(-slack, slack))
        objects.append(SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), size, row, col, cx, cy))
    image = _draw(objects, cfg.image_size, cell)
    caption = _caption(objects, rng)
    distractors = _distractors(caption, objects, rng, cfg.num_distractors)
    return Scene(
        seed=seed,
        image=image,
        objects=objects,
        caption=caption,
        distractors=[d for d, _ in distractors],
        distractor_kinds=[k for _, k in distractors],
        qa=_questions(objects, rng, cfg.qa_per_scene),
    )


def _draw(objects: list[SceneObject], size: int, cell: float) -> np.ndarray:
    img = PILImage.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        h = round(HALF_EXTENT[o.size] * cell)
        box = (o.cx - h, o.cy - h, o.cx + h, o.cy + h)
        fill = COLOURS[o.colour]
        if o.shape == "square":
            draw.rectangle(box, fill=fill)
        elif o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(o.cx, o.cy - h), (o.cx + h, o.cy + h), (o.cx - h, o.cy + h)], fill=fill)
        else:
            draw.polygon([(o.cx, o.cy - h), (o.cx + h, o.cy), (o.cx, o.cy + h), (o.cx - h, o.cy)], fill=fill)
    return np.asarray(img).transpose(2, 0, 1).copy()


def _relation(a: SceneObject, b: SceneObject, rng: random.Random) -> str:
    """A relation that holds between two objects in different cells (random among those that do)."""
    return rng.choice([rel for rel in RELATIONS if holds(rel, a, b)])


def _caption(objects: list[SceneObject], rng: random.Random) -> str:
    order = rng.sample(objects, len(objects))
    clauses = [
        f"a {' '.join(a.words)} {_relation(a, b, rng)} a {' '.join(b.words)}" for a, b in zip(order, order[1:])
    ]
    return " and ".join(clauses)


def _distractors(caption: str, objects: list[SceneObject], rng: random.Random, k: int) -> list[tuple[str, str]]:
    """Up to k false captions, each the caption with one attribute word or one relation changed.

    Kinds (colour, shape, size, relation) take turns in a random order while false candidates remain.
    """
    clauses = [c.split() for c in caption.split(" and ")]  # "a S C H <rel> a S C H"
    slots = (("size", SIZES, 0), ("colour", tuple(COLOURS), 1), ("shape", SHAPES, 2))
    false: dict[str, list[str]] = {"colour": [], "shape": [], "size": [], "relation": []}
    for ci, words in enumerate(clauses):
        rel = " ".join(words[4:-4])
        changes = [(kind, words[:p] + [v] + words[p + 1 :]) for kind, values, offset in slots
                   for p in (1 + offset, len(words) - 3 + offset) for v in values if v != words[p]]
        changes.append(("relation", words[:4] + RELATIONS[rel].split() + words[-4:]))
        for kind, changed in changes:
            if not clause_true(changed, objects):
                false[kind].append(" and ".join(" ".join(changed if i == ci else w) for i, w in enumerate(clauses)))
    chosen: list[tuple[str, str]] = []
    kinds = rng.sample(list(false), len(false))
    while len(chosen) < k and any(false.values()):
        for kind in kinds:
            if false[kind] and len(chosen) < k:
                text = false[kind].pop(rng.randrange(len(false[kind])))
                if all(text != c for c, _ in chosen):
                    chosen.append((text, kind))
    return chosen


def _unique(objects: list[SceneObject], o: SceneObject, attrs: tuple[str, ...]) -> bool:
    return sum(all(getattr(x, a) == getattr(o, a) for a in attrs) for x in objects) == 1


def _questions(objects: list[SceneObject], rng: random.Random, k: int) -> list[tuple[str, str]]:
    """k question/answer pairs, cycling over question types in a random order."""
    full = [o for o in objects if _unique(objects, o, ("size", "colour", "shape"))]
    makers = {
        "colour": [(f"what colour is the {o.size} {o.shape}?", o.colour)
                   for o in objects if _unique(objects, o, ("size", "shape"))],
        "shape": [(f"what shape is the {o.size} {o.colour} object?", o.shape)
                  for o in objects if _unique(objects, o, ("size", "colour"))],
        "size": [(f"what size is the {o.colour} {o.shape}?", o.size)
                 for o in objects if _unique(objects, o, ("colour", "shape"))],
        "count": [(f"how many {s}s are there?", str(sum(o.shape == s for o in objects))) for s in SHAPES]
        + [(f"how many {c} objects are there?", str(sum(o.colour == c for o in objects))) for c in COLOURS],
        "relation": [(f"is the {' '.join(a.words)} {rel} the {' '.join(b.words)}?", "yes" if holds(rel, a, b) else "no")
                     for a in full for b in full if a is not b for rel in RELATIONS],
        "exists": [(f"is there a {s} {c} {h}?", "yes" if any(o.words == (s, c, h) for o in objects) else "no")
                   for s in SIZES for c in COLOURS for h in SHAPES],
    }
    kinds = [kind for kind in makers if makers[kind]]
    rng.shuffle(kinds)
    qa: list[tuple[str, str]] = []
    for i in range(k):
        pool = makers[kinds[i % len(kinds)]]
        if pool[0][1] in ("yes", "no"):  # balance yes/no: pick the answer first
            answer = rng.choice([a for a in ("yes", "no") if any(p[1] == a for p in pool)])
            pool = [p for p in pool if p[1] == answer]
        qa.append(rng.choice(pool))
    return qa


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _scene_rows(cfg: VLDataConfig, split: str) -> Iterator[dict[str, Any]]:
    for index in range(cfg.num_scenes):
        seed = scene_seed(cfg.seed, index)
        if split_of(str(seed), cfg.split_seed, cfg.val_fraction, cfg.test_fraction) != split:
            continue
        scene = render_scene(seed, cfg)
        yield {
            "seed": seed,
            "image": {"bytes": _png(scene.image), "path": None},
            "caption": scene.caption,
            "distractors": scene.distractors,
            "distractor_kinds": scene.distractor_kinds,
            "questions": [q for q, _ in scene.qa],
            "answers": [a for _, a in scene.qa],
            "answer_ids": [ANSWERS.index(a) for _, a in scene.qa],
            "objects": [vars(o) for o in scene.objects],
        }


def build_scenes(cfg: VLDataConfig) -> DatasetDict:
    """The VL data of `cfg` as splits train/validation/test with at least columns "image" and "caption".

    Scenes are rendered once and cached under <cache>/datasets by a fingerprint of every key that
    changes them; other sources go through `distill.data.vl_data.load_image_text`.
    """
    if cfg.source != "scenes":
        from distill.data.vl_data import load_image_text

        return load_image_text(cfg)
    start = time.perf_counter()
    keys = ("num_scenes", "image_size", "grid", "min_objects", "max_objects", "num_distractors",
            "qa_per_scene", "seed", "val_fraction", "test_fraction", "split_seed")
    scene_cfg = VLDataConfig(**{k: getattr(cfg, k) for k in keys})  # what the generator sees and hashes
    splits = {
        split: Dataset.from_generator(
            _scene_rows,
            features=FEATURES,
            gen_kwargs={"cfg": scene_cfg, "split": split},
            cache_dir=str(vl_cache_root(cfg) / "datasets"),
            fingerprint=digest("scenes", SCENES_VERSION, {k: getattr(cfg, k) for k in keys}, split),
            split=split,
        )
        for split in SPLITS
    }
    logger.info("scenes: %s in %.1f s", {s: len(d) for s, d in splits.items()}, time.perf_counter() - start)
    return DatasetDict(splits)
