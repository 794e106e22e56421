"""Image tokenizer: k-means against brute force, reconstruction, determinism, files, cache, bad input.

Synthetic 32x32 images of flat-coloured 8x8 blocks, made here; CPU only, a few seconds in all.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from distill.data import image_tokenizer as it
from distill.data.image_tokenizer import (
    ImageTokenizer,
    ImageTokenizerConfig,
    fit,
    kmeans,
    mean_patch_error,
    train_or_load,
)
from distill.errors import ConfigError


def block_images(n: int, colours: int = 6, block: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, size, size]: each block x block cell one of `colours` flat colours (one palette)."""
    palette = torch.randint(0, 256, (colours, 3), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, colours, (n, size // block, size // block), generator=gen)
    img = palette[cells].permute(0, 3, 1, 2)  # [n, 3, cells, cells]
    return img.repeat_interleave(block, 2).repeat_interleave(block, 3).contiguous()


def textured_images(n: int, seed: int = 0) -> torch.Tensor:
    """4x4 blocks of 3 colours plus pixel noise: 81 kinds of 8x8 patch, none reconstructed exactly."""
    img = block_images(n, colours=3, block=4, seed=seed).int()
    noise = torch.randint(-12, 13, img.shape, generator=torch.Generator().manual_seed(seed + 1000))
    return (img + noise).clamp(0, 255).to(torch.uint8)


def cfg(**kw: object) -> ImageTokenizerConfig:
    return ImageTokenizerConfig(**{"codebook_size": 16, "iterations": 20, "sample_patches": 4096, **kw})


def test_encode_decode_shapes() -> None:
    images = block_images(10)
    tok = fit(images, cfg())
    codes = tok.encode(images)
    assert codes.shape == (10, 16) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 16
    recon = tok.decode(codes)
    assert recon.shape == (10, 3, 32, 32) and recon.dtype == torch.float32
    assert 0 <= recon.min() and recon.max() <= 1


def test_patch_order_is_row_major() -> None:
    """Code j of an image is the patch in row j // (W/p), column j % (W/p)."""
    images = block_images(4, colours=16)
    tok = fit(images, cfg())
    codes = tok.encode(images)
    for j in range(16):
        r, c = divmod(j, 4)
        assert torch.equal(codes[:, j], tok.encode(images[:, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8])[:, 0])


def test_exact_recovery_when_codebook_covers_the_distinct_patches() -> None:
    images = block_images(20, colours=5)
    for k in (5, 7):  # k = the number of distinct patches, and more (k-means++ then duplicates one)
        tok = fit(images, cfg(codebook_size=k))
        assert tok.reconstruction_error(images) < 1e-10
        assert torch.allclose(tok.decode(tok.encode(images)), images.float() / 255, atol=1e-5)


def test_error_far_below_mean_patch_and_decreasing_with_codebook_size() -> None:
    train, held_out = textured_images(64, seed=0), textured_images(16, seed=1)
    baseline = mean_patch_error(held_out, 8)
    errors = [fit(train, cfg(codebook_size=k)).reconstruction_error(held_out) for k in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.5 * baseline and errors[2] < 0.2 * baseline, (errors, baseline)


def test_deterministic_by_seed() -> None:
    images = textured_images(32)
    a, b, c = fit(images, cfg()), fit(images, cfg()), fit(images, cfg(seed=1))
    assert torch.equal(a.codebook, b.codebook) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.codebook, c.codebook)


def test_batches_give_the_tensor_result() -> None:
    """The patch sample (hence the fit) does not depend on how the images are batched."""
    images = textured_images(32)
    small = cfg(sample_patches=100)
    assert torch.equal(fit(images, small).codebook, fit(iter(images.split(5)), small).codebook)


def test_save_load_round_trip(tmp_path: Path) -> None:
    images = textured_images(16)
    tok = fit(images, cfg())
    loaded = ImageTokenizer.load(tok.save(tmp_path / "t" / "tok.safetensors"))
    assert torch.equal(loaded.encode(images), tok.encode(images))
    assert torch.equal(loaded.decode(tok.encode(images)), tok.decode(tok.encode(images)))
    assert (loaded.patch_size, loaded.image_size, loaded.fingerprint) == (8, (32, 32), tok.fingerprint)


def test_cache_by_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []
    real_fit = it._fit
    monkeypatch.setattr(it, "_fit", lambda *a: calls.append(1) or real_fit(*a))
    images = textured_images(16)
    with caplog.at_level(logging.INFO, logger="distill.data.image_tokenizer"):
        tok, cached = train_or_load(images, cfg(), tmp_path, "data-a")
    assert (cached, len(calls)) == (False, 1)
    logged = re.search(r"MSE ([\d.]+) \(mean-patch baseline ([\d.]+)\)", caplog.text)
    mse, baseline = map(float, logged.groups())
    assert 0 < mse < 0.5 * baseline
    assert not list(tmp_path.rglob(".image_tokenizer.*"))  # the temp file was renamed into place
    again, cached = train_or_load(iter(()), cfg(), tmp_path, "data-a")  # images not read when cached
    assert (cached, len(calls)) == (True, 1)
    assert torch.equal(again.encode(images), tok.encode(images))
    _, cached = train_or_load(images, cfg(), tmp_path, "data-b")
    assert (cached, len(calls)) == (False, 2)
    _, cached = train_or_load(images, cfg(seed=3), tmp_path, "data-a")  # the settings are in the key too
    assert (cached, len(calls)) == (False, 3)


def test_pretrained(tmp_path: Path) -> None:
    images = block_images(8)
    path = fit(images, cfg()).save(tmp_path / "tok.safetensors")
    tok, cached = train_or_load(iter(()), cfg(kind="pretrained", path=str(path)), tmp_path / "c", "x")
    assert cached and tok.codebook_size == 16
    with pytest.raises(ConfigError) as err:
        train_or_load(images, cfg(kind="pretrained", path=str(path), codebook_size=32), tmp_path, "x")
    assert err.value.key == "data.image_tokenizer.codebook_size"


def test_bad_config() -> None:
    with pytest.raises(ConfigError) as err:
        cfg(codebook_size=0).validate()
    assert err.value.key == "data.image_tokenizer.codebook_size"
    with pytest.raises(ConfigError) as err:
        ImageTokenizerConfig(kind="pretrained").validate()
    assert err.value.key == "data.image_tokenizer.path"
    with pytest.raises(ConfigError) as err:
        fit(block_images(2), cfg(codebook_size=0))
    assert err.value.key == "data.image_tokenizer.codebook_size"
    with pytest.raises(ConfigError) as err:
        fit(block_images(2), cfg(codebook_size=100))  # 32 patches for 100 codes
    assert err.value.key == "data.image_tokenizer.codebook_size"


def test_image_size_not_divisible_by_patch_size() -> None:
    with pytest.raises(ConfigError) as err:
        fit(block_images(4), cfg(patch_size=5))
    assert err.value.key == "data.image_tokenizer.patch_size" and "32x32" in str(err.value)
    tok = fit(block_images(4), cfg())
    with pytest.raises(ConfigError) as err:
        tok.encode(torch.zeros(1, 3, 30, 32, dtype=torch.uint8))
    assert err.value.key == "data.image_tokenizer.patch_size"


@pytest.mark.parametrize("content", [None, b"", b"not a safetensors file at all", "foreign"])
def test_pretrained_path_missing_or_garbage(tmp_path: Path, content: bytes | str | None) -> None:
    path = tmp_path / "tok.safetensors"
    if content == "foreign":  # a valid safetensors file that is not an image tokenizer
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(path))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        train_or_load(block_images(2), cfg(kind="pretrained", path=str(path)), tmp_path, "x")
    assert err.value.key == "data.image_tokenizer.path" and str(path) in str(err.value)


def points() -> torch.Tensor:
    """400 2-D points around 4 centres."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 6.0], [6.0, 0.0]])
    return (centres[torch.randint(0, 4, (400,), generator=gen)] + torch.randn(400, 2, generator=gen)).double()


def test_kmeans_against_brute_force() -> None:
    """On 2-D points: the final assignment is each point's nearest centroid; inertia never increases."""
    x = points()
    for k in (2, 4, 7):
        centroids, assign, inertia = kmeans(x, k, iterations=100, seed=k)
        brute = torch.stack([((x - c) ** 2).sum(1) for c in centroids], 1)
        assert torch.equal(assign, brute.argmin(1))
        assert inertia[-1] == pytest.approx(brute.min(1).values.sum().item())
        # Converged: every centroid is the mean of its points.
        for j in range(k):
            assert torch.allclose(centroids[j], x[assign == j].mean(0))
        assert all(b <= a + 1e-9 for a, b in zip(inertia, inertia[1:]))
        assert len(inertia) < 101  # stopped early
    assert kmeans(x, 4, 100, seed=4)[2][-1] < 0.5 * kmeans(x, 2, 100, seed=2)[2][-1]


def test_kmeans_reseeds_empty_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three centroids start far from every point: their clusters are empty until re-seeded."""
    x = points()

    def far_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
        return torch.cat([x[:1], torch.full((k - 1, 2), 100.0, dtype=x.dtype)])

    monkeypatch.setattr(it, "_kmeans_pp", far_init)
    centroids, assign, inertia = kmeans(x, 4, iterations=100)
    assert torch.bincount(assign, minlength=4).min() > 0
    assert torch.equal(assign, torch.cdist(x, centroids).argmin(1))
    assert all(b <= a + 1e-9 for a, b in zip(inertia, inertia[1:]))
    monkeypatch.undo()
    assert inertia[-1] < 1.5 * kmeans(x, 4, iterations=100)[2][-1]
