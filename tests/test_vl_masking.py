"""Masks for masked data modeling (`distill.vl.masking`): BERT token masking and BEiT block masking."""

from __future__ import annotations

import math

import pytest
import torch

from distill.errors import ConfigError
from distill.vl.masking import MaskingConfig, block_mask, mask_images, mask_text

V = 1000  # vocabulary size; ids are drawn from [0, V - 1), so the [MASK] id V - 1 never occurs in them
MASK_ID = V - 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(b: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V - 1, (b, length), generator=_gen(seed))


# ----------------------------------------------------------------------------------------- text (BERT)


def test_mask_text_exact_count_per_row_and_special_never_chosen():
    lengths = [0, 1, 3, 7, 10, 20, 33, 64]  # real tokens per row; the rest is padding
    ids = _ids(len(lengths), 64)
    special = torch.arange(64)[None, :] >= torch.tensor(lengths)[:, None]
    special[:, 0] = True  # [CLS]
    cfg = MaskingConfig()
    inputs, targets = mask_text(ids, cfg, MASK_ID, V, _gen(1), special=special)
    for row, n_real in enumerate(lengths):
        n_eligible = max(n_real - 1, 0)
        expected = max(round(0.15 * n_eligible), 1) if n_eligible else 0
        assert int((targets[row] != -100).sum()) == expected, (row, n_eligible)
    chosen = targets != -100
    assert not (chosen & special).any()
    assert torch.equal(inputs[special], ids[special])
    assert torch.equal(targets[chosen], ids[chosen])
    assert (inputs[~chosen] == ids[~chosen]).all()  # only chosen positions ever change


def test_targets_ignore_exactly_off_the_masked_positions():
    """With replace_mask=1 every chosen position (and no other) holds [MASK]: an independent witness."""
    ids = _ids(16, 50, seed=2)
    cfg = MaskingConfig(text_ratio=0.3, replace_mask=1.0, replace_random=0.0)
    inputs, targets = mask_text(ids, cfg, MASK_ID, V, _gen(3))
    assert torch.equal(targets != -100, inputs == MASK_ID)
    assert ((inputs == MASK_ID).sum(dim=1) == 15).all()  # round(0.3 * 50)
    assert torch.equal(targets[inputs == MASK_ID], ids[inputs == MASK_ID])


def test_80_10_10_split():
    ids = _ids(200, 1000, seed=4)  # 200 x 150 = 30k chosen positions
    inputs, targets = mask_text(ids, MaskingConfig(), MASK_ID, V, _gen(5))
    chosen = targets != -100
    n = int(chosen.sum())
    assert n == 200 * 150
    masked = (inputs[chosen] == MASK_ID).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()  # a random draw equal to it: 0.1 / V
    randomised = 1.0 - masked - kept
    assert abs(masked - 0.8) < 0.015 and abs(randomised - 0.1) < 0.015 and abs(kept - 0.1) < 0.015


def test_random_replacements_uniform_over_vocab():
    vocab = 20
    ids = torch.zeros(400, 100, dtype=torch.long)
    cfg = MaskingConfig(text_ratio=0.5, replace_mask=0.0, replace_random=1.0)
    inputs, targets = mask_text(ids, cfg, mask_id=vocab - 1, vocab_size=vocab, generator=_gen(6))
    draws = inputs[targets != -100]
    counts = torch.bincount(draws, minlength=vocab).double()
    assert counts.numel() == vocab and (counts > 0).all()  # never outside [0, vocab)
    expected = draws.numel() / vocab  # 1000 per id
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60.0  # 19 degrees of freedom: mean 19, P(chi2 > 60) ~ 4e-6


def test_mask_text_deterministic_by_seed():
    ids = _ids(4, 40)
    a = mask_text(ids, MaskingConfig(), MASK_ID, V, _gen(7))
    b = mask_text(ids, MaskingConfig(), MASK_ID, V, _gen(7))
    c = mask_text(ids, MaskingConfig(), MASK_ID, V, _gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


# ---------------------------------------------------------------------------------------- image (BEiT)


def _check_union_of_blocks(mask: torch.Tensor, blocks: list[tuple[int, int, int, int]]) -> None:
    n_rows, n_cols = mask.shape
    union = torch.zeros_like(mask)
    for top, left, h, w in blocks:
        assert h >= 1 and w >= 1 and 0 <= top <= n_rows - h and 0 <= left <= n_cols - w
        assert mask[top : top + h, left : left + w].all()  # each block is a full rectangle of the mask
        union[top : top + h, left : left + w] = True
    assert torch.equal(union, mask)  # and the mask is nothing but the blocks


@pytest.mark.parametrize(
    "n_rows,n_cols,ratio,min_block",
    [(14, 14, 0.4, 16), (14, 14, 0.75, 16), (16, 16, 0.15, 4), (4, 4, 0.4, 16), (6, 10, 0.5, 8), (1, 7, 0.3, 2)],
)
def test_block_mask_reaches_ratio_within_one_block_and_is_union_of_rectangles(n_rows, n_cols, ratio, min_block):
    cfg = MaskingConfig(image_ratio=ratio, min_block_patches=min_block)
    target = math.ceil(ratio * n_rows * n_cols)
    g = _gen(9)
    for _ in range(50):
        mask, blocks = block_mask(n_rows, n_cols, cfg, g, return_blocks=True)
        assert mask.shape == (n_rows, n_cols) and mask.dtype == torch.bool
        count = int(mask.sum())
        assert target <= count < target + max(h * w for _, _, h, w in blocks)
        _check_union_of_blocks(mask, blocks)


def test_blocks_hold_at_least_min_block_patches_while_that_many_remain():
    """Replaying the blocks: one drawn while >= 16 patches remained has s >= 16 and, after rounding h and
    w, area >= 11 (s - (sqrt(s r) + sqrt(s / r)) / 2 + 1/4 at r = 0.3); a 1x1 is the rare fallback."""
    cfg = MaskingConfig(min_block_patches=16)
    target = math.ceil(0.4 * 196)
    g = _gen(10)
    areas = []
    for _ in range(50):
        _, blocks = block_mask(14, 14, cfg, g, return_blocks=True)
        replay = torch.zeros(14, 14, dtype=torch.bool)
        for top, left, h, w in blocks:
            if target - int(replay.sum()) >= 16:
                areas.append(h * w)
            replay[top : top + h, left : left + w] = True
    assert len(areas) >= 50 and all(a == 1 or a >= 11 for a in areas)
    assert sum(a >= 11 for a in areas) / len(areas) > 0.95


def test_tiny_grid_with_large_min_block():
    cfg = MaskingConfig()  # min_block_patches=16 on the tiny model's 4x4 grid: clipped to the 7 needed
    masks = mask_images(32, 4, cfg, _gen(11))
    counts = masks.sum(dim=1)
    assert masks.shape == (32, 16)
    assert (counts >= 7).all() and (counts < 16).all()


def test_block_mask_deterministic_by_seed():
    cfg = MaskingConfig()
    assert torch.equal(block_mask(14, 14, cfg, _gen(12)), block_mask(14, 14, cfg, _gen(12)))
    assert not torch.equal(block_mask(14, 14, cfg, _gen(12)), block_mask(14, 14, cfg, _gen(13)))
    assert torch.equal(mask_images(4, (14, 14), cfg, _gen(14)), mask_images(4, (14, 14), cfg, _gen(14)))


def test_mask_images_per_sample_masks_flattened_row_major():
    cfg = MaskingConfig()
    masks = mask_images(8, (6, 10), cfg, _gen(15))
    assert masks.shape == (8, 60) and masks.dtype == torch.bool
    assert len({tuple(m.tolist()) for m in masks}) == 8  # every sample its own mask
    assert (masks.sum(dim=1) >= 24).all()
    g = _gen(16)
    first = block_mask(6, 10, cfg, _gen(16))
    assert torch.equal(mask_images(1, (6, 10), cfg, g)[0], first.reshape(-1))  # row r -> r * 10 + c


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"text_ratio": 0.0}, "mask.text_ratio"),
        ({"text_ratio": 1.0}, "mask.text_ratio"),
        ({"image_ratio": 0.0}, "mask.image_ratio"),
        ({"image_ratio": 1.2}, "mask.image_ratio"),
        ({"replace_mask": -0.1}, "mask.replace_mask"),
        ({"replace_random": 1.5}, "mask.replace_random"),
        ({"replace_mask": 0.8, "replace_random": 0.3}, "mask.replace_random"),
        ({"min_block_patches": 0}, "mask.min_block_patches"),
        ({"min_aspect": 0.0}, "mask.min_aspect"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        MaskingConfig(**overrides).validate()
    assert err.value.key == key and key in str(err.value)
    with pytest.raises(ConfigError):
        block_mask(4, 4, MaskingConfig(**overrides))


def test_default_config_is_valid():
    assert MaskingConfig().validate() == MaskingConfig()
