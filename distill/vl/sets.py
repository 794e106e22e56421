"""The held-out (and training) sets of the downstream tasks, as plain tensors: the VL data module builds them
(`distill.vl.data`), the fine-tuning code reads them (`distill.vl.downstream`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class VQASet:
    """Visual question answering as answer classification: one row per (image, question)."""

    images: Tensor  # float32 [N, C, H, W] in [-1, 1]
    question_ids: Tensor  # long [N, L]: [CLS] + question tokens, right-padded with the pad id
    question_mask: Tensor  # bool [N, L]: True on real tokens ([CLS] included)
    answers: Tensor  # long [N]: index into the answer vocabulary (distill.data.scenes.ANSWERS)

    def __len__(self) -> int:
        return len(self.answers)


@dataclass
class RetrievalSet:
    """Image-text pairs: image i goes with caption i; `distractor_ids[i]` are captions that are false for
    image i (one attribute or relation changed), used as extra negatives of image-to-text retrieval."""

    images: Tensor  # float32 [N, C, H, W] in [-1, 1]
    caption_ids: Tensor  # long [N, L]
    caption_mask: Tensor  # bool [N, L]
    distractor_ids: Tensor  # long [N, K, L] (K = 0 when the source has no distractors)
    distractor_mask: Tensor  # bool [N, K, L]

    def __len__(self) -> int:
        return len(self.caption_ids)


def trim_padding(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the columns after the longest text of a right-padded batch (ids, mask [..., L]): padding is never
    attended to, so the model computes the same for the real tokens, on fewer positions."""
    longest = int(mask.sum(-1).max()) if mask.numel() else 0
    return ids[..., : max(longest, 1)], mask[..., : max(longest, 1)]
