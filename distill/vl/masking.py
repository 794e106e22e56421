"""Masks for masked data modeling: BERT's token masking for text, BEiT's block-wise masking for images.

`mask_text` picks exactly round(text_ratio * n_eligible) positions per row (at least one when any is
eligible); of those, each becomes [MASK] with probability `replace_mask`, a token drawn uniformly from the
vocabulary with probability `replace_random`, and stays unchanged otherwise (BERT's 80/10/10).
`block_mask` adds random rectangles until ceil(image_ratio * n_patches) patches are masked (BEiT's
MaskingGenerator). The result feeds `VLMoE.forward(text_ids=inputs, image_mask=mask)`; the masked
positions' targets are the original text ids and the visual tokens (`distill.data.image_tokenizer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.errors import ConfigError

IGNORE_INDEX = -100  # targets of positions that are not predicted (cross_entropy's ignore_index)
Block = tuple[int, int, int, int]  # (top, left, height, width) in patches


@dataclass
class MaskingConfig:
    text_ratio: float = 0.15  # fraction of the eligible text tokens chosen for prediction
    image_ratio: float = 0.4  # fraction of the patches masked
    min_block_patches: int = 16  # smallest block BEiT places (clipped to the grid and the remaining count)
    min_aspect: float = 0.3  # block aspect ratios are log-uniform in [min_aspect, 1 / min_aspect]
    replace_mask: float = 0.8  # chosen text token -> [MASK]
    replace_random: float = 0.1  # chosen text token -> a random token; the rest stay unchanged

    def validate(self) -> MaskingConfig:
        """Raise ConfigError naming the first bad key (`mask.*`); return self."""
        for key in ("text_ratio", "image_ratio"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"mask.{key}", f"must be in (0, 1), got {value!r}.", f"e.g. mask.{key}=0.15.")
        for key in ("replace_mask", "replace_random"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"mask.{key}", f"is a probability and must be in [0, 1], got {value!r}.")
        if self.replace_mask + self.replace_random > 1.0:
            raise ConfigError(
                "mask.replace_random",
                f"mask.replace_mask + mask.replace_random = {self.replace_mask + self.replace_random} > 1.",
                "lower one of them (BERT: 0.8 and 0.1; the rest stay unchanged).",
            )
        if not isinstance(self.min_block_patches, int) or self.min_block_patches < 1:
            raise ConfigError("mask.min_block_patches", f"must be an integer >= 1, got {self.min_block_patches!r}.")
        if not 0.0 < self.min_aspect <= 1.0:
            raise ConfigError("mask.min_aspect", f"must be in (0, 1], got {self.min_aspect!r}.", "e.g. 0.3.")
        return self


def mask_text(
    ids: Tensor,
    cfg: MaskingConfig,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    special: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking of ids [B, L] -> (inputs, targets), both [B, L] long.

    `special` [B, L] bool marks positions never chosen (padding, [CLS], [SEP]). `targets` holds the
    original id at the chosen positions and -100 elsewhere; `inputs` is `ids` with the chosen positions
    replaced as described in the module docstring. Random draws use `generator` (on its device).
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be [B, L], got shape {tuple(ids.shape)}.")
    if special is not None and special.shape != ids.shape:
        raise ValueError(f"special must have ids' shape {tuple(ids.shape)}, got {tuple(special.shape)}.")
    device = generator.device if generator is not None else ids.device
    eligible = torch.ones_like(ids, dtype=torch.bool) if special is None else ~special.bool()
    eligible = eligible.to(device)
    n_eligible = eligible.sum(dim=1)
    k = torch.round(cfg.text_ratio * n_eligible.double()).long()
    k = torch.where(n_eligible > 0, k.clamp(min=1), k)
    # Exactly k[b] uniformly chosen eligible positions: rank random scores, ineligible ones ranked last.
    scores = torch.rand(ids.shape, generator=generator, device=device).masked_fill(~eligible, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    chosen = rank < k[:, None]
    u = torch.rand(ids.shape, generator=generator, device=device)
    to_mask = chosen & (u < cfg.replace_mask)
    to_random = chosen & (u >= cfg.replace_mask) & (u < cfg.replace_mask + cfg.replace_random)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator, device=device)
    chosen, to_mask, to_random, random_ids = (t.to(ids.device) for t in (chosen, to_mask, to_random, random_ids))
    inputs = torch.where(to_random, random_ids, ids).masked_fill(to_mask, mask_id)
    targets = ids.masked_fill(~chosen, IGNORE_INDEX)
    return inputs, targets


def _uniform(generator: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator | None, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=generator).item())


def block_mask(
    n_rows: int,
    n_cols: int,
    cfg: MaskingConfig,
    generator: torch.Generator | None = None,
    return_blocks: bool = False,
) -> Tensor | tuple[Tensor, list[Block]]:
    """BEiT's block-wise mask: a bool [n_rows, n_cols] (CPU) with at least ceil(image_ratio * n) True.

    Each step draws a block of s patches, s uniform in [min(min_block_patches, remaining), remaining]
    (remaining = target - masked), aspect r log-uniform in [min_aspect, 1 / min_aspect], h =
    round(sqrt(s r)), w = round(sqrt(s / r)), each clipped to [1, grid side] (so a 4x4 grid works with
    min_block_patches=16), placed uniformly where it fits. A block that adds no new patch is redrawn,
    up to 10 times as in BEiT; then (unlike BEiT, which stops short) one unmasked patch, chosen
    uniformly, is masked as a 1x1 block, so the target is always reached. Rounding can overshoot the
    target by less than the last block's area. `return_blocks` also returns the blocks that added
    patches, as (top, left, h, w); the mask is exactly their union.
    """
    mask, blocks = _block_mask(n_rows, n_cols, cfg.validate(), generator)
    return (mask, blocks) if return_blocks else mask


def _block_mask(
    n_rows: int, n_cols: int, cfg: MaskingConfig, generator: torch.Generator | None
) -> tuple[Tensor, list[Block]]:
    if n_rows < 1 or n_cols < 1:
        raise ValueError(f"the patch grid must be at least 1x1, got {n_rows}x{n_cols}.")
    n = n_rows * n_cols
    target = math.ceil(cfg.image_ratio * n - 1e-9)  # the epsilon keeps e.g. 0.15 * 20 at 3
    log_aspect = (math.log(cfg.min_aspect), -math.log(cfg.min_aspect))
    mask = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    blocks: list[Block] = []
    count = 0
    while count < target:
        remaining = target - count
        for _ in range(10):
            s = _uniform(generator, min(cfg.min_block_patches, remaining), remaining)
            r = math.exp(_uniform(generator, *log_aspect))
            h = min(max(round(math.sqrt(s * r)), 1), n_rows)
            w = min(max(round(math.sqrt(s / r)), 1), n_cols)
            top, left = _randint(generator, 0, n_rows - h), _randint(generator, 0, n_cols - w)
            window = mask[top : top + h, left : left + w]
            added = h * w - int(window.sum())
            if added > 0:
                window.fill_(True)
                break
        else:  # ten blocks fell on masked patches only: mask one unmasked patch
            free = (~mask).flatten().nonzero().squeeze(1)
            idx = int(free[_randint(generator, 0, free.numel() - 1)])
            top, left, h, w, added = idx // n_cols, idx % n_cols, 1, 1, 1
            mask[top, left] = True
        blocks.append((top, left, h, w))
        count += added
    return mask, blocks


def mask_images(
    batch: int,
    grid: int | tuple[int, int],
    cfg: MaskingConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`batch` independent block masks as bool [batch, n_patches] (CPU), each flattened row-major like
    the patch embeddings; `grid` is (n_rows, n_cols) or one side of a square grid."""
    n_rows, n_cols = (grid, grid) if isinstance(grid, int) else grid
    cfg.validate()
    out = torch.zeros(batch, n_rows * n_cols, dtype=torch.bool)
    for b in range(batch):
        out[b] = _block_mask(n_rows, n_cols, cfg, generator)[0].flatten()
    return out
