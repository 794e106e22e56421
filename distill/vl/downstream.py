"""Downstream fine-tuning of a pretrained VL-MoE with every router and expert frozen (plain tensors, no Lightning).

VQA: a classifier over the answer vocabulary on the pair forward's image [CLS] and text [CLS] states.
Retrieval: a dual encoder as in BEiT-3 / VLMo: the image-only and the text-only forwards' [CLS] states, each
through a linear projection, L2-normalised, trained with the symmetric InfoNCE loss and a learnable
temperature. Both work on a deep copy of the model: the caller's model is never changed. Each returns its
figures and `frozen_ok`, whether every parameter of every MoE layer of the copy is bit-identical after
fine-tuning to what it was before (checked, not assumed).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill.models.vlmoe import VLMoE, freeze_moe
from distill.vl.config import DownstreamConfig
from distill.vl.sets import RetrievalSet, VQASet, trim_padding


# --------------------------------------------------------------------------------- shared pieces
def _start(model: VLMoE, cfg: DownstreamConfig, make_head: Any) -> tuple[VLMoE, dict[str, Tensor], nn.Module,
                                                                        torch.optim.Optimizer, torch.Generator]:
    """A frozen-MoE copy of `model` in train mode, the snapshot of its MoE parameters, the task's head (built
    from d_model under a seeded RNG that leaves the caller's stream alone), their optimizer, the batch RNG."""
    cfg.validate()
    model, before = _frozen_copy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = make_head(model.cfg.d_model).to(_device(model))
    opt = _optimizer([model, head], cfg)
    model.train()
    return model, before, head, opt, torch.Generator().manual_seed(cfg.seed)


def _frozen_copy(model: VLMoE) -> tuple[VLMoE, dict[str, Tensor]]:
    """A deep copy with its MoE layers frozen, and a snapshot of those layers' parameters."""
    model = copy.deepcopy(model)
    freeze_moe(model)
    return model, {name: p.detach().clone() for name, p in _moe_parameters(model)}


def _moe_parameters(model: VLMoE) -> list[tuple[str, Tensor]]:
    return [(f"{lname}.{pname}", p) for lname, layer in model.moe_layers for pname, p in layer.named_parameters()]


def _frozen_ok(model: VLMoE, before: dict[str, Tensor]) -> bool:
    after = dict(_moe_parameters(model))
    return after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _optimizer(modules: Sequence[nn.Module], cfg: DownstreamConfig) -> torch.optim.AdamW:
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _n_image_tokens(model: VLMoE) -> int:
    return model.cfg.n_patches + 1


# --------------------------------------------------------------------------------- VQA
class VQAHead(nn.Module):
    """Answer logits from [image CLS state ; text CLS state] of the pair forward (an MLP as in VLMo)."""

    def __init__(self, d_model: int, num_answers: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(2 * d_model), nn.Linear(2 * d_model, 2 * d_model), nn.GELU(),
                                 nn.Linear(2 * d_model, num_answers))  # fmt: skip

    def forward(self, model: VLMoE, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        ids, mask = trim_padding(ids, mask)
        h = model(images=images, text_ids=ids, text_mask=mask).hidden
        return self.net(torch.cat([h[:, 0], h[:, _n_image_tokens(model)]], dim=-1))


def finetune_vqa(model: VLMoE, train: VQASet, test: VQASet, num_answers: int, cfg: DownstreamConfig,
                 progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Fine-tune a frozen-MoE copy of `model` and a `VQAHead` for `cfg.vqa_steps` steps on seeded random
    batches of `train`; return ``{"vqa_acc", "vqa_curve": [(step, train loss)], "frozen_ok"}``, the accuracy
    being measured on `test`."""
    model, before, head, opt, g = _start(model, cfg, lambda d: VQAHead(d, num_answers))
    device = _device(model)
    curve: list[tuple[int, float]] = []
    for step in tqdm(range(cfg.vqa_steps), desc="vqa", disable=not progress):
        idx = torch.randint(0, len(train), (min(cfg.batch_size, len(train)),), generator=g)
        logits = head(model, train.images[idx].to(device), train.question_ids[idx].to(device),
                      train.question_mask[idx].to(device))  # fmt: skip
        loss = F.cross_entropy(logits.float(), train.answers[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append((step, float(loss.detach())))
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), cfg.eval_batch_size):
            sl = slice(i, i + cfg.eval_batch_size)
            logits = head(model, test.images[sl].to(device), test.question_ids[sl].to(device),
                          test.question_mask[sl].to(device))  # fmt: skip
            correct += int((logits.argmax(-1).cpu() == test.answers[sl]).sum())
    return {"vqa_acc": correct / max(len(test), 1), "vqa_curve": curve, "frozen_ok": _frozen_ok(model, before)}


# --------------------------------------------------------------------------------- retrieval
def recall_at_k(scores: Tensor, positives: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k of queries against a gallery: ``scores`` [Q, G] (higher = better), ``positives`` [Q] long,
    the gallery index of each query's one positive. A query is a hit at k when fewer than k OTHER items score
    at least as high as its positive (ties count against it, so constant scores give no free hits)."""
    if scores.dim() != 2 or positives.shape != scores.shape[:1]:
        raise ValueError(f"scores must be [Q, G] and positives [Q]; got {tuple(scores.shape)}, "
                         f"{tuple(positives.shape)}.")  # fmt: skip
    pos = scores.gather(1, positives[:, None].long())
    rank = (scores >= pos).sum(dim=1) - 1  # items other than the positive that score at least as high
    return {k: float((rank < k).float().mean()) if len(rank) else 0.0 for k in ks}


class DualEncoder(nn.Module):
    """Linear projections of the image-only and text-only [CLS] states, and a learnable temperature."""

    def __init__(self, d_model: int, dim: int | None = None):
        super().__init__()
        self.image_proj = nn.Linear(d_model, dim or d_model, bias=False)
        self.text_proj = nn.Linear(d_model, dim or d_model, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def images(self, model: VLMoE, images: Tensor) -> Tensor:
        return F.normalize(self.image_proj(model(images=images).hidden[:, 0]).float(), dim=-1)

    def texts(self, model: VLMoE, ids: Tensor, mask: Tensor) -> Tensor:
        ids, mask = trim_padding(ids, mask)
        return F.normalize(self.text_proj(model(text_ids=ids, text_mask=mask).hidden[:, 0]).float(), dim=-1)

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


def _encode(fn: Any, tensors: Sequence[Tensor], batch: int, device: torch.device) -> Tensor:
    n = len(tensors[0])
    if n == 0:
        return torch.zeros(0, 0)
    with torch.no_grad():
        return torch.cat([fn(*(t[i : i + batch].to(device) for t in tensors)).cpu() for i in range(0, n, batch)])


def finetune_retrieval(model: VLMoE, train: RetrievalSet, test: RetrievalSet, cfg: DownstreamConfig,
                       progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Fine-tune a frozen-MoE copy of `model` as a dual encoder for `cfg.retrieval_steps` steps; evaluate on
    `test`: image-to-text recall@1/@5 against all test captions plus all test distractors (a hit: the image's
    own caption within k), text-to-image recall@1/@5 against the test images. Returns ``{"i2t_r1", "i2t_r5",
    "t2i_r1", "t2i_r5", "retrieval_curve": [(step, train loss)], "gallery_size", "frozen_ok"}``."""
    model, before, enc, opt, g = _start(model, cfg, DualEncoder)
    device = _device(model)
    curve: list[tuple[int, float]] = []
    for step in tqdm(range(cfg.retrieval_steps), desc="retrieval", disable=not progress):
        idx = torch.randperm(len(train), generator=g)[: cfg.batch_size]
        img = enc.images(model, train.images[idx].to(device))
        txt = enc.texts(model, train.caption_ids[idx].to(device), train.caption_mask[idx].to(device))
        logits = enc.scale() * img @ txt.T
        labels = torch.arange(len(idx), device=device)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append((step, float(loss.detach())))
    model.eval()
    bs = cfg.eval_batch_size
    img = _encode(lambda x: enc.images(model, x), [test.images], bs, device)
    cap = _encode(lambda i, m: enc.texts(model, i, m), [test.caption_ids, test.caption_mask], bs, device)
    d_ids, d_mask = test.distractor_ids.flatten(0, 1), test.distractor_mask.flatten(0, 1)
    real = d_mask.any(dim=-1)  # rows of padding (no token) are no captions
    dis = _encode(lambda i, m: enc.texts(model, i, m), [d_ids[real], d_mask[real]], bs, device)
    gallery = torch.cat([cap, dis]) if len(dis) else cap
    own = torch.arange(len(test))
    i2t = recall_at_k(img @ gallery.T, own, (1, 5))
    t2i = recall_at_k(cap @ img.T, own, (1, 5))
    return {"i2t_r1": i2t[1], "i2t_r5": i2t[5], "t2i_r1": t2i[1], "t2i_r5": t2i[5], "retrieval_curve": curve,
            "gallery_size": len(gallery), "frozen_ok": _frozen_ok(model, before)}
