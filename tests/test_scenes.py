"""Rendered scenes (checked against their pixels and an independent parser) and image-text datasets."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

import distill.data.scenes as scenes_mod
from distill.data.scenes import ANSWERS, COLOURS, build_scenes, render_scene, scene_seed
from distill.data.vl_config import VLDataConfig
from distill.errors import ConfigError

BACKGROUND = (30, 30, 30)
CLAUSE = re.compile(r"^a (small|large) (\w+) (\w+) (left of|right of|above|below) a (small|large) (\w+) (\w+)$")


def scene_cfg(tmp_path: Path, **overrides) -> VLDataConfig:
    base = dict(num_scenes=200, image_size=32, cache_dir=str(tmp_path / "cache"), val_fraction=0.1, test_fraction=0.1)
    return VLDataConfig(**{**base, **overrides}).validate()


def counting(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[int]:
    """Wrap module.name so that calls are counted; returns the one-element counter."""
    calls, fn = [0], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# --- an independent reading of the pixels -----------------------------------------------------------


def read_objects(image: np.ndarray, grid: int) -> list[dict]:
    """Objects recovered from an HWC image: one per grid cell that holds non-background pixels."""
    names = {rgb: name for name, rgb in COLOURS.items()}
    cell = image.shape[0] / grid
    found = []
    for row in range(grid):
        for col in range(grid):
            y0, y1, x0, x1 = (round(v * cell) for v in (row, row + 1, col, col + 1))
            patch = image[y0:y1, x0:x1]
            mask = np.any(patch != BACKGROUND, axis=-1)
            if not mask.any():
                continue
            colours = {tuple(int(c) for c in p) for p in patch[mask]}
            assert len(colours) == 1, f"cell {row},{col} mixes colours {colours}"
            ys, xs = np.nonzero(mask)
            box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            h, w = box.shape
            if box[0, 0]:
                shape = "square"
            elif box[-1].all():
                shape = "triangle"
            elif box.sum() / (h * w) > 0.65:
                shape = "circle"
            else:
                shape = "diamond"
            size = "large" if w > 0.6 * cell else "small"
            found.append({"shape": shape, "colour": names[colours.pop()], "size": size, "row": row, "col": col})
    return found


def holds(rel: str, a: dict, b: dict) -> bool:
    return {"left of": a["col"] < b["col"], "right of": a["col"] > b["col"],
            "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[rel]


def is_true(caption: str, objects: list[dict]) -> bool:
    """Every clause names two distinct objects in that relation."""
    for clause in caption.split(" and "):
        m = CLAUSE.match(clause)
        assert m, clause
        sa, ca, ha, rel, sb, cb, hb = m.groups()
        if not any(x is not y and (x["size"], x["colour"], x["shape"]) == (sa, ca, ha)
                   and (y["size"], y["colour"], y["shape"]) == (sb, cb, hb) and holds(rel, x, y)
                   for x in objects for y in objects):
            return False
    return True


def answer(question: str, objects: list[dict]) -> str:
    """The answer to a question, recomputed from the object list."""
    def the(**attrs) -> dict:
        (match,) = [o for o in objects if all(o[k] == v for k, v in attrs.items())]
        return match

    def desc(words: str) -> dict:
        return dict(zip(("size", "colour", "shape"), words.split()))

    if m := re.match(r"what colour is the (\w+) (\w+)\?$", question):
        return the(size=m[1], shape=m[2])["colour"]
    if m := re.match(r"what shape is the (\w+) (\w+) object\?$", question):
        return the(size=m[1], colour=m[2])["shape"]
    if m := re.match(r"what size is the (\w+) (\w+)\?$", question):
        return the(colour=m[1], shape=m[2])["size"]
    if m := re.match(r"how many (\w+)s are there\?$", question):
        return str(sum(o["shape"] == m[1] for o in objects))
    if m := re.match(r"how many (\w+) objects are there\?$", question):
        return str(sum(o["colour"] == m[1] for o in objects))
    if m := re.match(r"is the (\w+ \w+ \w+) (left of|right of|above|below) the (\w+ \w+ \w+)\?$", question):
        return "yes" if holds(m[2], the(**desc(m[1])), the(**desc(m[3]))) else "no"
    if m := re.match(r"is there a (\w+ \w+ \w+)\?$", question):
        return "yes" if any(all(o[k] == v for k, v in desc(m[1]).items()) for o in objects) else "no"
    raise AssertionError(f"unknown question {question!r}")


# --- scenes ---------------------------------------------------------------------------------------------


def test_render_is_deterministic() -> None:
    cfg = VLDataConfig()
    a, b = render_scene(123, cfg), render_scene(123, cfg)
    assert a.image.dtype == np.uint8 and a.image.shape == (3, 32, 32)
    assert np.array_equal(a.image, b.image)
    assert (a.objects, a.caption, a.distractors, a.qa) == (b.objects, b.caption, b.distractors, b.qa)
    c = render_scene(124, cfg)
    assert not np.array_equal(a.image, c.image) or a.caption != c.caption


@pytest.mark.parametrize("image_size", [32, 64])
def test_pixels_caption_distractors_and_answers_agree(image_size: int) -> None:
    cfg = VLDataConfig(image_size=image_size)
    kinds, answers = Counter(), Counter()
    for index in range(300):
        scene = render_scene(scene_seed(0, index), cfg)
        seen = read_objects(scene.image.transpose(1, 2, 0), cfg.grid)
        stored = [{k: getattr(o, k) for k in ("shape", "colour", "size", "row", "col")} for o in scene.objects]
        assert sorted(map(str, seen)) == sorted(map(str, stored)), scene.seed
        assert cfg.min_objects <= len(seen) <= cfg.max_objects
        assert len(scene.caption.split(" and ")) == len(seen) - 1  # the caption mentions every object
        assert is_true(scene.caption, seen), scene.caption
        assert len(scene.distractors) == cfg.num_distractors
        words = scene.caption.split()
        for distractor, kind in zip(scene.distractors, scene.distractor_kinds):
            other = distractor.split()
            diff = [(a, b) for a, b in zip(words, other) if a != b]
            assert len(other) == len(words) and len(diff) == 1, (scene.caption, distractor)
            a, b = diff[0]
            expected = ("colour" if a in COLOURS else "size" if a in ("small", "large")
                        else "relation" if a in ("left", "right", "above", "below") else "shape")
            assert kind == expected and (b in COLOURS) == (a in COLOURS)
            assert not is_true(distractor, seen), (scene.caption, distractor)
            kinds[kind] += 1
        assert len(scene.qa) == cfg.qa_per_scene
        for question, given in scene.qa:
            assert given == answer(question, seen), (question, given, seen)
            answers[given] += 1
    assert set(kinds) == {"colour", "shape", "size", "relation"}
    assert set(answers) <= set(ANSWERS)
    # Room to compare models: the most common answer is far from a majority.
    assert answers.most_common(1)[0][1] / sum(answers.values()) < 0.3, answers


def test_build_splits_are_stable_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = scene_cfg(tmp_path)
    renders = counting(monkeypatch, scenes_mod, "render_scene")
    data = build_scenes(cfg)
    assert renders[0] == 200 and sum(len(data[s]) for s in data) == 200
    for split, n in (("validation", 20), ("test", 20)):
        assert abs(len(data[split]) - n) <= 12, {s: len(d) for s, d in data.items()}
    row = data["train"][0]
    scene = render_scene(row["seed"], cfg)
    assert np.array_equal(np.asarray(row["image"]).transpose(2, 0, 1), scene.image)
    assert (row["caption"], row["distractors"]) == (scene.caption, scene.distractors)
    assert [ANSWERS[i] for i in row["answer_ids"]] == row["answers"] == [a for _, a in scene.qa]

    renders[0] = 0
    again = build_scenes(cfg)
    assert renders[0] == 0  # the second build reads the cache
    assert again["train"].cache_files == data["train"].cache_files

    grown = build_scenes(scene_cfg(tmp_path, num_scenes=300))
    assert renders[0] == 300
    split_of = {seed: s for s in data for seed in data[s]["seed"]}
    grown_split = {seed: s for s in grown for seed in grown[s]["seed"]}
    assert len(grown_split) == 300 and set(split_of) < set(grown_split)
    assert all(grown_split[seed] == s for seed, s in split_of.items())
    reseeded = build_scenes(scene_cfg(tmp_path, split_seed=1))
    assert {seed: s for s in reseeded for seed in reseeded[s]["seed"]} != split_of


# --- image-text datasets --------------------------------------------------------------------------------


def image_folder(root: Path, n: int = 30) -> Path:
    root.mkdir()
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            PILImage.new("RGB", (8, 8), (8 * i, 100, 50)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) + "\n")
    return root


def test_imagefolder_loads_through_the_same_api(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "pics")
    cfg = scene_cfg(tmp_path, source="imagefolder", path=str(folder), val_fraction=0.2, test_fraction=0.2)
    data = build_scenes(cfg)
    assert all(data[s].column_names == ["image", "caption"] for s in data)
    rows = [r for s in data for r in data[s]]
    assert sorted(r["caption"] for r in rows) == sorted(f"picture {i}" for i in range(30))
    for r in rows:
        i = int(r["caption"].split()[1])
        assert np.asarray(r["image"])[0, 0].tolist() == [8 * i, 100, 50]
    assert min(len(data[s]) for s in data) > 0


def test_dataset_with_named_columns(tmp_path: Path) -> None:
    images = [PILImage.new("RGB", (4, 4), (i, 0, 0)) for i in range(40)]
    features = Features({"pic": Image(), "words": Value("string"), "id": Value("int64")})
    table = Dataset.from_dict({"pic": images, "words": [f"w{i}" for i in range(40)], "id": list(range(40))},
                              features=features)
    (tmp_path / "local").mkdir()
    table.to_parquet(str(tmp_path / "local" / "data.parquet"))
    cfg = scene_cfg(tmp_path, source="hub", path=str(tmp_path / "local"), image_column="pic", text_column="words",
                    val_fraction=0.2, test_fraction=0.2)
    data = build_scenes(cfg)
    assert sum(len(data[s]) for s in data) == 40 and data["train"].column_names == ["image", "caption"]
    with pytest.raises(ConfigError, match=r"data\.image_column.*'image'.*\['pic', 'words', 'id'\]"):
        build_scenes(scene_cfg(tmp_path, source="hub", path=str(tmp_path / "local"), text_column="words"))


def test_bad_input_names_the_key_or_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.path.*missing"):
        scene_cfg(tmp_path, source="imagefolder", path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"data\.path.*missing"):
        build_scenes(VLDataConfig(source="imagefolder", path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match=r"data\.path"):
        scene_cfg(tmp_path, source="imagefolder")
    folder = image_folder(tmp_path / "pics")
    with pytest.raises(ConfigError, match=r"data\.text_column.*'caption'.*\['image', 'text'\]"):
        build_scenes(scene_cfg(tmp_path, source="imagefolder", path=str(folder), text_column="caption"))
    with pytest.raises(ConfigError, match=r"data\.image_column.*'img'"):
        build_scenes(scene_cfg(tmp_path, source="imagefolder", path=str(folder), image_column="img"))
    (folder / "broken.png").write_text("not an image")
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "broken"}) + "\n")
    with pytest.raises(ConfigError, match=r"data\.path.*broken\.png"):
        build_scenes(scene_cfg(tmp_path, source="imagefolder", path=str(folder)))
    for key, value in (("source", "video"), ("val_fraction", 0.0), ("max_objects", 10), ("min_objects", 1),
                       ("image_size", 12), ("num_scenes", 0), ("grid", 1)):
        with pytest.raises(ConfigError, match=rf"data\.{key}"):
            scene_cfg(tmp_path, **{key: value})


def test_hydra_group_composes_into_the_config(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        scenes = compose(overrides=["+data=scenes", "data.num_scenes=50"])
        folder = compose(overrides=["+data=imagefolder"])
    cfg = VLDataConfig(**OmegaConf.to_container(scenes.data)).validate()
    assert (cfg.source, cfg.num_scenes, cfg.image_size) == ("scenes", 50, 48)
    with pytest.raises(ConfigError, match=r"data\.path"):
        VLDataConfig(**OmegaConf.to_container(folder.data)).validate()
    path = str(image_folder(tmp_path / "pics"))
    assert VLDataConfig(**{**OmegaConf.to_container(folder.data), "path": path}).validate().path == path
