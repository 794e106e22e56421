"""Image tokenizer: a k-means patch codebook fitted on the training images (cached), or a saved one.

BEiT's masked image modeling predicts the discrete visual token of each masked patch. Its pretrained
tokenizer (a dVAE) cannot be downloaded here, so the project fits its own: every patch_size x patch_size
patch is normalised per channel and replaced by its nearest of codebook_size centroids, which Lloyd's
k-means (k-means++ init, seeded) finds on a sample of patches. A tokenizer is one safetensors file:
the codebook, the channel mean/std, and the settings in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from distill.data.config import digest
from distill.errors import ConfigError

logger = logging.getLogger(__name__)

FORMAT = "distill-image-tokenizer-v1"  # the metadata "format" of a saved tokenizer
_CHUNK = 16384  # patches per distance matrix (16384 x codebook_size floats)


@dataclass
class ImageTokenizerConfig:
    kind: str = "kmeans"  # "kmeans" (fitted on the training images, cached) | "pretrained" (a saved file)
    codebook_size: int = 256  # number of visual tokens
    patch_size: int = 8  # patches are patch_size x patch_size; image height and width must be multiples
    iterations: int = 30  # at most this many Lloyd iterations (stops early when no patch changes code)
    sample_patches: int = 65536  # patches drawn (uniformly, by seed) from the training images to fit on
    seed: int = 0
    path: str | None = None  # pretrained: a file written by ImageTokenizer.save

    def validate(self) -> ImageTokenizerConfig:
        """Check the values; raise ConfigError naming the key to fix; return self."""
        if self.kind not in ("kmeans", "pretrained"):
            problem = f"unknown kind {self.kind!r}."
            raise ConfigError("data.image_tokenizer.kind", problem, "use kmeans or pretrained.")
        for key in ("codebook_size", "patch_size", "iterations", "sample_patches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.image_tokenizer.{key}", f"must be >= 1, got {getattr(self, key)}.")
        if self.kind == "pretrained" and not self.path:
            raise ConfigError("data.image_tokenizer.path", "kind 'pretrained' needs a saved tokenizer file.")
        return self


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """uint8 [N, C, H, W] -> float [N, n_patches, C*p*p] in [0, 1]; patches row-major, values (c, y, x)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ConfigError(
            "data.image_tokenizer.patch_size",
            f"images of {h}x{w} pixels do not divide into {p}x{p} patches.",
            "pick a patch size that divides the image height and width, or resize the images.",
        )
    x = images.float().div_(255).reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)


def mean_patch_error(images: Tensor, patch_size: int) -> float:
    """The trivial baseline: MSE (pixels in [0, 1]) of replacing every patch by the images' mean patch."""
    x = patchify(images, patch_size).flatten(0, 1)
    return (x - x.mean(0)).square().mean().item()


def _patch_scale(mean: Tensor, std: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std broadcast over a flattened (c, y, x) patch."""
    return mean.repeat_interleave(p * p), std.repeat_interleave(p * p)


def _nearest(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Index of and squared distance to the nearest centroid of each row of x (chunked)."""
    c_sq = centroids.square().sum(1)
    best = [(c.square().sum(1, keepdim=True) - 2 * c @ centroids.T + c_sq).min(1) for c in x.split(_CHUNK)]
    return torch.cat([b.indices for b in best]), torch.cat([b.values for b in best]).clamp_min_(0)


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each centroid a point drawn with probability ~ D^2 (point 0 once all are taken)."""
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype)
    centroids[0] = x[torch.randint(len(x), (1,), generator=gen)]
    d2 = (x - centroids[0]).square().sum(1)
    for i in range(1, k):
        j = torch.multinomial(d2, 1, generator=gen) if d2.sum() > 0 else torch.zeros(1, dtype=torch.long)
        centroids[i] = x[j]
        d2 = torch.minimum(d2, (x - centroids[i]).square().sum(1))
    return centroids


def kmeans(x: Tensor, k: int, iterations: int, seed: int = 0) -> tuple[Tensor, Tensor, list[float]]:
    """Lloyd's k-means of the rows of x: (centroids [k, D], assignment [n], inertia after init and each step).

    Seeded k-means++ init (on at most 32 random points per centroid); an empty cluster is re-seeded with
    the point farthest from its centroid (inertia never increases). Stops when no assignment changes.
    """
    if len(x) < k:
        raise ConfigError("data.image_tokenizer.codebook_size", f"{k} codes, {len(x)} patches.")
    gen = torch.Generator().manual_seed(seed)
    init = x[torch.randperm(len(x), generator=gen)[: 32 * k]] if len(x) > 32 * k else x
    centroids = _kmeans_pp(init, k, gen)
    assign, dist = _nearest(x, centroids)
    inertia = [dist.sum().item()]
    for _ in range(iterations):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        empty = (~filled).nonzero().flatten()
        far = dist.argsort(descending=True)[: len(empty)]
        far = far[dist[far] > 0]  # none: every point sits on a centroid, the spare codes stay duplicates
        centroids[empty[: len(far)]] = x[far]
        new_assign, dist = _nearest(x, centroids)
        inertia.append(dist.sum().item())
        if torch.equal(new_assign, assign) and not len(far):
            break
        assign = new_assign
    return centroids, assign, inertia


@dataclass(eq=False, repr=False)
class ImageTokenizer:
    """A patch codebook: `encode` images to visual tokens, `decode` tokens back to images."""

    codebook: Tensor  # float32 [codebook_size, 3*p*p], in normalised patch space
    mean: Tensor  # float32 [3]: per-channel pixel mean, pixels in [0, 1]
    std: Tensor  # float32 [3]
    patch_size: int
    image_size: tuple[int, int]  # (H, W) it was fitted on: what `decode` tiles by default

    @property
    def codebook_size(self) -> int:
        return len(self.codebook)

    @property
    def fingerprint(self) -> str:
        """A hash of the whole definition (codebook, normalisation, patch size)."""
        blob = b"".join(t.numpy().tobytes() for t in (self.codebook, self.mean, self.std))
        return hashlib.sha256(blob + str(self.patch_size).encode()).hexdigest()[:16]

    def encode(self, images: Tensor) -> Tensor:
        """uint8 [N, 3, H, W] -> LongTensor [N, (H/p)*(W/p)] of codes, patches in row-major order."""
        x = patchify(images, self.patch_size)
        mean, std = _patch_scale(self.mean, self.std, self.patch_size)
        codes, _ = _nearest(((x - mean) / std).flatten(0, 1), self.codebook)
        return codes.view(x.shape[0], x.shape[1])

    def decode(self, codes: Tensor, image_size: tuple[int, int] | None = None) -> Tensor:
        """LongTensor [N, n_patches] -> float images [N, 3, H, W] in [0, 1] (H, W: fitted size by default)."""
        (h, w), p = image_size or self.image_size, self.patch_size
        if codes.shape[1] != (h // p) * (w // p):
            raise ValueError(f"{codes.shape[1]} codes do not tile {h}x{w} pixels in {p}x{p} patches")
        mean, std = _patch_scale(self.mean, self.std, self.patch_size)
        x = (self.codebook[codes] * std + mean).reshape(len(codes), h // p, w // p, -1, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(len(codes), -1, h, w).clamp_(0, 1)  # patchify's inverse

    def reconstruction_error(self, images: Tensor) -> float:
        """MSE between images and decode(encode(images)), pixels in [0, 1]."""
        recon = self.decode(self.encode(images), tuple(images.shape[-2:]))
        return (recon - images.float() / 255).square().mean().item()

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (codebook, mean, std; settings in its metadata); return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sizes = {"patch_size": str(self.patch_size), "image_size": json.dumps(list(self.image_size))}
        tensors = {"codebook": self.codebook, "mean": self.mean, "std": self.std}
        save_file(tensors, str(path), metadata={"format": FORMAT, **sizes})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImageTokenizer:
        """Read a file `save` wrote; ConfigError on data.image_tokenizer.path if missing or unreadable."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError("data.image_tokenizer.path", f"{path} does not exist.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"metadata format is {meta.get('format')!r}, not {FORMAT!r}")
                tensors = {name: f.get_tensor(name) for name in ("codebook", "mean", "std")}
            image_size = tuple(json.loads(meta["image_size"]))
            return cls(*tensors.values(), int(meta["patch_size"]), image_size)
        except Exception as err:  # safetensors, json and KeyError all signal a file that is not ours
            raise ConfigError("data.image_tokenizer.path", f"cannot load {path}: {err}") from err

    def __repr__(self) -> str:
        return f"ImageTokenizer(codes={self.codebook_size}, patch={self.patch_size}, size={self.image_size})"


Images = Tensor | Iterable[Tensor]  # uint8 [N, 3, H, W], or an iterable of such batches


def sample_patches(images: Images, cfg: ImageTokenizerConfig) -> tuple[Tensor, tuple[int, int], int]:
    """A uniform sample (by seed) of up to cfg.sample_patches patches, in one pass over the batches.

    Each patch gets a random key; the sample keeps the smallest keys. Returns (patches [n, C*p*p] in
    [0, 1], the image size, the number of patches seen).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    keep, keys, size, seen = torch.empty(0), torch.empty(0), None, 0
    for batch in [images] if isinstance(images, Tensor) else images:
        if size is not None and tuple(batch.shape[-2:]) != size:
            raise ValueError(f"images of {tuple(batch.shape[-2:])} pixels after images of {size}")
        size = tuple(batch.shape[-2:])
        x = patchify(batch, cfg.patch_size).flatten(0, 1)
        seen += len(x)
        keep = torch.cat([keep.view(-1, x.shape[1]), x])
        keys = torch.cat([keys, torch.rand(len(x), generator=gen)])
        if len(keys) > cfg.sample_patches:
            keys, top = keys.topk(cfg.sample_patches, largest=False, sorted=False)
            keep = keep[top]
    if size is None:
        raise ValueError("no images to fit the image tokenizer on")
    order = keys.argsort()  # a sample that does not depend on how the images were batched
    return keep[order], size, seen


def fit(images: Images, cfg: ImageTokenizerConfig) -> ImageTokenizer:
    """Fit a k-means patch codebook on uint8 images [N, 3, H, W] (a tensor or an iterable of batches)."""
    return _fit(images, cfg)[0]


def _fit(images: Images, cfg: ImageTokenizerConfig) -> tuple[ImageTokenizer, Tensor, int]:
    """`fit`, also returning the sampled patches it was fitted on and how many patches it saw."""
    cfg.validate()
    x, size, seen = sample_patches(images, cfg)
    channels = x.shape[1] // cfg.patch_size**2
    pixels = x.view(len(x), channels, -1).transpose(0, 1).flatten(1)  # [C, n * p * p]
    mean, std = pixels.mean(1), pixels.std(1).clamp_min(1e-3)  # a flat channel must not divide by zero
    m, s = _patch_scale(mean, std, cfg.patch_size)
    codebook, _, _ = kmeans((x - m) / s, cfg.codebook_size, cfg.iterations, cfg.seed)
    return ImageTokenizer(codebook, mean, std, cfg.patch_size, size), x, seen


def load_pretrained(cfg: ImageTokenizerConfig) -> ImageTokenizer:
    """The saved tokenizer at cfg.path; its patch and codebook size must match the config's."""
    tok = ImageTokenizer.load(cfg.path or "")
    for key, have in (("patch_size", tok.patch_size), ("codebook_size", tok.codebook_size)):
        if have != getattr(cfg, key):
            raise ConfigError(
                f"data.image_tokenizer.{key}",
                f"the tokenizer at {cfg.path} has {key} {have}, the config {getattr(cfg, key)}.",
                f"set data.image_tokenizer.{key}={have}.",
            )
    logger.info("image tokenizer: pretrained %s (%r)", cfg.path, tok)
    return tok


def train_or_load(
    images: Images, cfg: ImageTokenizerConfig, cache_dir: str | os.PathLike, fingerprint: str
) -> tuple[ImageTokenizer, bool]:
    """The tokenizer cfg names, and whether it came from a file (cached or pretrained) rather than a fit.

    A k-means tokenizer is fitted on `images` once and cached under `cache_dir`, keyed by `fingerprint`
    (of the images) and the fitting settings; `images` is not read when the cache holds it.
    """
    if cfg.validate().kind == "pretrained":
        return load_pretrained(cfg), True
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("kind", "path")}
    name = f"kmeans-{cfg.codebook_size}-p{cfg.patch_size}-{digest(fingerprint, settings)}"
    path = Path(cache_dir).expanduser() / "image_tokenizers" / name / "image_tokenizer.safetensors"
    if path.is_file():
        logger.info("image tokenizer: cached %s", path)
        return ImageTokenizer.load(path), True
    start = time.perf_counter()
    logger.info("image tokenizer: fitting %d codes, patch size %d", cfg.codebook_size, cfg.patch_size)
    tok, x, seen = _fit(images, cfg)
    tmp = path.with_name(f".image_tokenizer.{os.getpid()}.safetensors")  # atomic: never a partial file
    tok.save(tmp)
    os.replace(tmp, path)
    # Measured on the fitted sample: `images` may be a generator, good for one pass only.
    m, s = _patch_scale(tok.mean, tok.std, tok.patch_size)
    recon = tok.codebook[_nearest((x - m) / s, tok.codebook)[0]] * s + m
    logger.info(
        "image tokenizer: fitted on %d of %d patches in %.1f s: MSE %.5f (mean-patch baseline %.5f); %s",
        len(x), seen, time.perf_counter() - start, (recon - x).square().mean().item(),
        (x - x.mean(0)).square().mean().item(), path,
    )
    return tok, False
