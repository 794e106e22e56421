"""The VL data module: batch kinds and formats, visual and text tokens, exact resume, caches, downstream sets."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from PIL import Image as PILImage

import distill.data.image_tokenizer as image_tokenizer_mod
import distill.vl.data as data_mod
import distill.vl.text_tokenizer as text_tokenizer_mod
from distill.data.image_tokenizer import ImageTokenizerConfig
from distill.data.scenes import ANSWERS
from distill.data.vl_config import VLDataConfig
from distill.errors import ConfigError
from distill.vl.data import KINDS, VLDataModule
from distill.vl.text_tokenizer import encode_padded, pad_texts

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
KEYS = {"image": {"kind", "images", "visual_tokens"}, "text": {"kind", "text_ids", "text_mask"},
        "pair": {"kind", "images", "visual_tokens", "text_ids", "text_mask"}}


def tiny_cfg(cache: Path, **overrides) -> VLDataConfig:
    tok = ImageTokenizerConfig(codebook_size=16, iterations=5, sample_patches=4096)
    base = dict(num_scenes=90, image_size=32, val_fraction=0.1, test_fraction=0.1, vocab_size=120, max_text_len=48,
                batch_size=8, image_tokenizer=tok, cache_dir=str(cache))
    return VLDataConfig(**{**base, **overrides}).validate()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vl-cache")


@pytest.fixture(scope="module")
def dm(cache: Path) -> VLDataModule:
    module = VLDataModule(tiny_cfg(cache), seed=3)
    module.prepare_data()
    module.setup("fit")
    return module


def fresh(dm: VLDataModule, seed: int = 3) -> VLDataModule:
    """A module at the start of the train stream (the shared `dm` moves on as tests read from it)."""
    module = VLDataModule(dm.cfg, seed=seed)
    module.setup()
    return module


def counting(monkeypatch: pytest.MonkeyPatch, module, name: str, calls: dict[str, int]) -> None:
    """Wrap module.name so that calls[name] counts its calls."""
    fn = getattr(module, name)
    calls[name] = 0

    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round().to(torch.uint8)


def take(loader, n: int) -> list[dict]:
    out: list[dict] = []
    while len(out) < n:  # a pass over the loader is one epoch: start the next like Lightning does
        out += [b for _, b in zip(range(n - len(out)), loader)]
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] if k == "kind" else torch.equal(a[k], b[k]) for k in a)


def test_kinds_cycle_with_only_their_keys_shapes_and_dtypes(dm: VLDataModule) -> None:
    batches = take(dm.train_dataloader(), 2 * dm.epoch_batches + 3)
    assert [b["kind"] for b in batches] == [KINDS[i % 3] for i in range(len(batches))]
    n_patches, length = (32 // dm.patch_size) ** 2, dm.cfg.max_text_len
    for b in batches:
        assert set(b) == KEYS[b["kind"]]
        if "images" in b:
            assert b["images"].shape == (8, 3, 32, 32) and b["images"].dtype == torch.float32
            assert b["images"].min() >= -1 and b["images"].max() <= 1
            assert b["visual_tokens"].shape == (8, n_patches) and b["visual_tokens"].dtype == torch.long
            assert 0 <= b["visual_tokens"].min() and b["visual_tokens"].max() < dm.visual_vocab_size
        if "text_ids" in b:
            ids, mask = b["text_ids"], b["text_mask"]
            assert ids.shape == mask.shape and ids.dtype == torch.long and mask.dtype == torch.bool
            assert ids.shape[0] == 8 and ids.shape[1] == mask.sum(1).max() <= length  # padding columns trimmed
            assert (ids[:, 0] == dm.cls_id).all() and mask[:, 0].all()
            assert torch.equal(mask, ids != dm.pad_id)
            assert torch.equal(mask, mask.cummin(1).values), "real tokens first, then padding"
            assert ids.max() < dm.vocab_size


def test_batches_hold_matching_images_tokens_and_captions(dm: VLDataModule) -> None:
    train = dm.data["train"]
    by_pixels = {bytes(img.numpy().tobytes()): i for i, img in enumerate(dm.images["train"])}
    captions = set(train["caption"])
    seen = {kind: [] for kind in KINDS}
    for b in take(fresh(dm).train_dataloader(), dm.epoch_batches):
        if "images" in b:
            uint8 = to_uint8(b["images"])
            assert torch.equal(b["visual_tokens"], dm.image_tokenizer.encode(uint8))
            rows = [by_pixels[bytes(img.numpy().tobytes())] for img in uint8]
            seen[b["kind"]] += rows
        if "text_ids" in b:
            texts = [dm.tokenizer.decode(ids[mask]) for ids, mask in zip(b["text_ids"], b["text_mask"])]
            assert all(t in captions for t in texts)
            if b["kind"] == "pair":
                assert texts == [train[r]["caption"] for r in rows]
    n = len(train)
    for kind in ("image", "pair"):  # each kind walks its own permutation: the first pass covers the split
        assert sorted(seen[kind][:n]) == list(range(n))
    assert seen["image"][:n] != seen["pair"][:n]


def test_text_ids_round_trip_and_truncate(dm: VLDataModule) -> None:
    tok = dm.tokenizer
    texts = dm.data["train"]["caption"][:20] + ["what colour is the circle?"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    ids, mask = encode_padded(tok, texts, 6)
    for row, text in zip(range(len(texts)), texts):
        want = [tok.cls_id, *tok.encode(text)][:6]
        assert ids[row, : len(want)].tolist() == want and mask[row].sum() == len(want)
    ids, mask = pad_texts([[7, 8], []], 4, cls_id=1, pad_id=0)
    assert ids.tolist() == [[1, 7, 8, 0], [1, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert {tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id} == {0, 1, 2, 3}
    assert (tok.save(Path(dm.cfg.cache_dir) / "saved")).is_file()


@pytest.mark.parametrize("consumed", [0, 5, 31, 70])  # an epoch is 27 batches: resume inside later epochs
def test_restored_module_continues_with_the_next_batch(dm: VLDataModule, consumed: int) -> None:
    reference = take(fresh(dm).train_dataloader(), consumed + 7)
    first = fresh(dm)
    assert all(same(a, b) for a, b in zip(take(first.train_dataloader(), consumed), reference))
    state = first.state_dict()
    resumed = VLDataModule(dm.cfg, seed=3)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    after = take(resumed.train_dataloader(), 7)
    assert all(same(a, b) for a, b in zip(after, reference[consumed:], strict=True))
    other = take(fresh(dm, seed=4).train_dataloader(), 4)
    assert not same(other[0], reference[0]), "the seed changes the stream"


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[str, int]] = []

    def training_step(self, batch, index):
        key = "text_ids" if "text_ids" in batch else "visual_tokens"
        self.seen.append((batch["kind"], int(batch[key].sum())))
        return self.w.sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_resume_from_a_mid_epoch_checkpoint(dm: VLDataModule, tmp_path: Path) -> None:
    """Trainer checkpoints store the data module's position; no batch is fetched ahead and lost."""

    def trainer(d: Path) -> L.Trainer:
        every = ModelCheckpoint(dirpath=d, every_n_train_steps=1, save_top_k=-1, filename="{step}")
        return L.Trainer(max_steps=36, logger=False, enable_progress_bar=False, limit_val_batches=0,
                         num_sanity_val_steps=0, enable_model_summary=False, callbacks=[every])

    full = Recorder()
    trainer(tmp_path / "a").fit(full, VLDataModule(dm.cfg, seed=3))
    for step in (11, 30):
        again = Recorder()
        trainer(tmp_path / f"b{step}").fit(again, VLDataModule(dm.cfg, seed=3), ckpt_path=tmp_path / f"a/step={step}.ckpt")
        assert again.seen == full.seen[step:]


def test_val_loader_is_the_split_in_order_in_three_kinds(dm: VLDataModule) -> None:
    loader = dm.val_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) and [b["kind"] for b in batches] == [KINDS[i % 3] for i in range(len(batches))]
    images = torch.cat([b["images"] for b in batches if b["kind"] == "image"])
    paired = torch.cat([b["images"] for b in batches if b["kind"] == "pair"])
    assert torch.equal(to_uint8(images), dm.images["validation"]) and torch.equal(images, paired)
    texts = [dm.tokenizer.decode(i[m]) for b in batches if b["kind"] == "text" for i, m in zip(b["text_ids"], b["text_mask"])]
    assert texts == dm.data["validation"]["caption"]
    assert [b["kind"] for b in dm.val_dataloader()] == [b["kind"] for b in batches]


def test_vqa_set_matches_the_questions_and_answers(dm: VLDataModule) -> None:
    data = dm.data["validation"]
    vqa = dm.vqa_set("validation")
    assert dm.num_answers == len(ANSWERS) and len(vqa) == sum(len(q) for q in data["questions"])
    assert vqa.answers.tolist() == [a for ans in data["answer_ids"] for a in ans]
    assert [ANSWERS[a] for a in vqa.answers] == [a for ans in data["answers"] for a in ans]
    questions = [dm.tokenizer.decode(i[m]) for i, m in zip(vqa.question_ids, vqa.question_mask)]
    assert questions == [q for qs in data["questions"] for q in qs]
    scenes = [i for i, qs in enumerate(data["questions"]) for _ in qs]
    assert torch.equal(to_uint8(vqa.images), dm.images["validation"][scenes])
    assert (vqa.question_ids[:, 0] == dm.cls_id).all() and vqa.images.dtype == torch.float32


def test_retrieval_set_has_the_caption_and_distractors_that_differ(dm: VLDataModule) -> None:
    data = dm.data["test"]
    ret = dm.retrieval_set("test")
    n, k, length = ret.distractor_ids.shape
    assert (n, k, length) == (len(data), dm.cfg.num_distractors, dm.cfg.max_text_len) and len(ret) == n
    assert ret.distractor_mask.shape == ret.distractor_ids.shape and ret.caption_ids.shape == (n, length)
    assert torch.equal(to_uint8(ret.images), dm.images["test"])
    for i, row in enumerate(data):
        assert dm.tokenizer.decode(ret.caption_ids[i][ret.caption_mask[i]]) == row["caption"]
        for j in range(k):
            text = dm.tokenizer.decode(ret.distractor_ids[i, j][ret.distractor_mask[i, j]])
            assert text == row["distractors"][j] != row["caption"]
            assert not torch.equal(ret.distractor_ids[i, j], ret.caption_ids[i])


def test_second_module_reuses_the_cached_tokenizers_and_images(dm: VLDataModule, monkeypatch) -> None:
    assert len(dm.fingerprint) == 16 and dm.corpus is None
    calls: dict[str, int] = {}
    for module, name in ((data_mod, "decode_images"), (image_tokenizer_mod, "_fit"), (text_tokenizer_mod, "_train_bpe"),
                         (data_mod, "build_scenes")):
        counting(monkeypatch, module, name, calls)
    again = VLDataModule(dm.cfg, seed=3)
    again.prepare_data()
    again.setup("fit")
    again.setup("validate")
    assert again.text_tokenizer_cached and again.image_tokenizer_cached
    assert calls == {"decode_images": 0, "_fit": 0, "_train_bpe": 0, "build_scenes": 1}, "built once, nothing refitted"
    assert again.fingerprint == dm.fingerprint and again.tokenizer.fingerprint == dm.tokenizer.fingerprint
    assert torch.equal(again.visual_tokens["train"], dm.visual_tokens["train"])
    stats = again.stats()
    assert stats["examples"] == {s: len(dm.data[s]) for s in dm.data} and stats["vocab_size"] == dm.vocab_size
    assert 0 < stats["image_tokenizer_mse"] < stats["mean_patch_mse"]
    assert "reconstruction MSE" in again.summary()
    other = VLDataModule(tiny_cfg(Path(dm.cfg.cache_dir), vocab_size=100))
    other.setup()
    assert not other.text_tokenizer_cached and other.image_tokenizer_cached and other.fingerprint != dm.fingerprint


def test_imagefolder_source(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    root.mkdir()
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(30):
            PILImage.new("RGB", (8, 8), (8 * i, 100, 50)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) + "\n")
    cfg = tiny_cfg(tmp_path / "cache", source="imagefolder", path=str(root), image_size=24, val_fraction=0.2,
                   test_fraction=0.2, max_text_len=8)
    module = VLDataModule(cfg)
    module.setup()
    assert module.num_answers is None and module.vqa_set("validation") is None
    assert module.retrieval_set("test").distractor_ids.shape == (len(module.data["test"]), 0, 8)
    batch = take(module.train_dataloader(), 3)[2]
    assert batch["kind"] == "pair" and batch["images"].shape == (8, 3, 24, 24) and batch["visual_tokens"].shape == (8, 9)
    for image, ids, mask in zip(to_uint8(batch["images"]), batch["text_ids"], batch["text_mask"]):
        i = int(module.tokenizer.decode(ids[mask]).split()[1])
        assert (image == torch.tensor([8 * i, 100, 50], dtype=torch.uint8)[:, None, None]).all()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(image_size=36), "data.image_size"),
        (dict(image_tokenizer=ImageTokenizerConfig(codebook_size=0)), "data.image_tokenizer.codebook_size"),
        (dict(vocab_size=4), "data.vocab_size"),
        (dict(max_text_len=1), "data.max_text_len"),
    ],
)
def test_bad_settings_name_their_key(tmp_path: Path, overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        tiny_cfg(tmp_path, **overrides)
    assert err.value.key == key and (key != "data.image_size" or "patch_size" in err.value.fix)


@pytest.mark.parametrize("name", ["scenes", "imagefolder"])
def test_structured_config_reads_the_yaml(name: str) -> None:
    node = OmegaConf.merge(OmegaConf.structured(VLDataConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, VLDataConfig) and isinstance(cfg.image_tokenizer, ImageTokenizerConfig)
    assert (cfg.vocab_size, cfg.max_text_len, cfg.image_tokenizer.codebook_size) == (1000, 40, 256)
    plain = VLDataConfig(**OmegaConf.to_container(node))  # a dict node becomes the nested dataclass
    assert plain.image_tokenizer == cfg.image_tokenizer
