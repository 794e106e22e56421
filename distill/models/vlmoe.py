"""VL-MoE (Shen et al., 2023): a BEiT-3-style multiway encoder with modality-specific sparse experts.

One bidirectional transformer over image patches, text tokens, or both ([image tokens | text tokens],
attending jointly). Attention is shared; the FFNs are per modality (`distill.models.vl_layers`). Image
tokens: a learned [CLS] token, then the patch embeddings (a conv over P x P patches, masked positions
replaced by a learned [MASK] embedding), plus learned positions. Text tokens: the caller's ids (its
tokenizer supplies [CLS]/[MASK] ids) plus learned positions. Heads: masked text tokens over the text
vocabulary (tied to the text embedding, as in BERT) and masked patches over the visual codebook. As in
`GPT`, the forward returns logits, losses of the routers and their statistics; no training concerns.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from distill.models.vl_config import VLMoEConfig
from distill.models.vl_layers import PoolStats, VLBlock
from distill.moe import MoELayer


class VLOutput(NamedTuple):
    text_logits: torch.Tensor | None  # [B, L, text_vocab_size], None without text
    image_logits: torch.Tensor | None  # [B, n_patches, visual_vocab_size] (no [CLS]), None without images
    aux_loss: torch.Tensor  # scalar: sum of the MoE pools' load-balancing losses (0 without MoE)
    z_loss: torch.Tensor  # scalar: sum of the MoE pools' router z-losses
    moe_stats: list[PoolStats]  # one per MoE pool that received tokens, in depth order, "v" before "t"
    hidden: torch.Tensor  # [B, T, d] the final normed states ([image CLS, patches] then text); heads read these


class VLMoE(nn.Module):
    """The encoder of a VLMoEConfig, used as given (`VLMoEConfig.validate` runs once, before building).

    A forward takes one kind of input for the whole batch: images only, text only, or image-text pairs.
    """

    def __init__(self, cfg: VLMoEConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.patch_embed = nn.Conv2d(cfg.channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.image_cls = nn.Parameter(torch.empty(1, 1, d))
        self.image_mask_embed = nn.Parameter(torch.empty(d))
        self.image_pos = nn.Parameter(torch.empty(1, cfg.n_patches + 1, d))
        self.text_embed = nn.Embedding(cfg.text_vocab_size, d)
        self.text_pos = nn.Parameter(torch.empty(1, cfg.max_text_len, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([VLBlock(cfg, i) for i in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.visual_head = nn.Linear(d, cfg.visual_vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) weights and embeddings, zero biases, output projections of residual branches
        N(0, init_std / sqrt(2 * n_layers)); the MoE layers initialise themselves with these two stds."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for p in (self.patch_embed.weight, self.image_cls, self.image_mask_embed, self.image_pos,
                  self.text_embed.weight, self.text_pos, self.visual_head.weight):  # fmt: skip
            nn.init.normal_(p, std=std)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.zeros_(self.visual_head.bias)
        for block in self.blocks:
            block.init_weights(std, out_std)
        self.ln_f.reset_parameters()

    # -- bookkeeping ---------------------------------------------------------------------------------

    @property
    def moe_layers(self) -> list[tuple[str, MoELayer]]:
        """(qualified name, layer) of every MoE pool layer in depth order, e.g. ("blocks.1.v_ffn", ...)."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, MoELayer)]

    @staticmethod
    def _per_expert(layer: MoELayer) -> int:
        return sum(p.numel() for p in layer.experts.parameters()) // layer.experts.num_local_experts

    def num_params(self) -> int:
        """All parameters (the text head is tied to the text embedding: counted once), every expert of every
        pool counted also when expert parallelism keeps only a slice here."""
        held = sum(p.numel() for p in self.parameters())
        return held + sum((m.num_experts - m.experts.num_local_experts) * self._per_expert(m)
                          for _, m in self.moe_layers)  # fmt: skip

    def num_active_params(self) -> int:
        """Parameters of one token's forward, GPT's convention (`GPT.num_active_params`) per MoE block: every
        non-expert parameter counts (both embeddings and heads, attention, norms, the routers of both pools,
        and every dense FFN: V-, T- and VL-FFN, although one token uses one of them per block), plus `top_k`
        routed experts of ONE pool per MoE block (a token reaches only its own modality's pool; both pools'
        experts have the same size)."""
        k = self.cfg.moe.top_k
        routed = sum(m.num_experts * self._per_expert(m) for _, m in self.moe_layers)
        used = sum(
            k * max(self._per_expert(b.v_ffn), self._per_expert(b.t_ffn)) for b in self.blocks if b.is_moe
        )
        return self.num_params() - routed + used

    def _ffn_params(self, ffn: nn.Module | None, per_token: bool) -> int:
        """An FFN branch's parameters: all of them (every expert), or those one token uses (top_k experts)."""
        if ffn is None:
            return 0
        if not isinstance(ffn, MoELayer):
            return sum(p.numel() for p in ffn.parameters())
        rest = sum(p.numel() for n, p in ffn.named_parameters() if not n.startswith("experts."))
        return rest + (self.cfg.moe.top_k if per_token else ffn.num_experts) * self._per_expert(ffn)

    def num_token_params(self) -> int:
        """Parameters on one token's path, the compute measure: every non-FFN parameter (embeddings, heads,
        attention, norms) plus, per block, the one FFN branch a token takes (V, T or VL; for a MoE pool its
        router and `top_k` experts), the largest of them. A dense model of the same shape has the same figure
        (the routers aside), where `num_active_params` counts all of its modality FFNs."""
        blocks = [(b.v_ffn, b.t_ffn, b.vl_ffn) for b in self.blocks]
        every = sum(self._ffn_params(f, per_token=False) for ffns in blocks for f in ffns)
        path = sum(max(self._ffn_params(f, per_token=True) for f in ffns) for ffns in blocks)
        return self.num_params() - every + path

    # -- forward -------------------------------------------------------------------------------------

    def embed_images(self, images: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        """images [B, C, H, W] -> tokens [B, 1 + n_patches, d]: [CLS], then patches (masked ones replaced)."""
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, n_patches, d]
        if patches.shape[1] != self.cfg.n_patches:
            raise ValueError(
                f"images of shape {tuple(images.shape)} give {patches.shape[1]} patches; the model "
                f"expects {self.cfg.image_size}x{self.cfg.image_size} ({self.cfg.n_patches} patches)."
            )
        if image_mask is not None:
            if image_mask.shape != patches.shape[:2]:
                raise ValueError(
                    f"image_mask must be [B, n_patches]={tuple(patches.shape[:2])}, "
                    f"got {tuple(image_mask.shape)}."
                )
            patches = torch.where(image_mask[..., None], self.image_mask_embed.to(patches.dtype), patches)
        cls = self.image_cls.expand(patches.shape[0], -1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.image_pos

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """text_ids [B, L] -> tokens [B, L, d]."""
        L = text_ids.shape[1]
        if L > self.cfg.max_text_len:
            raise ValueError(f"text of {L} tokens exceeds model.max_text_len={self.cfg.max_text_len}.")
        return self.text_embed(text_ids) + self.text_pos[:, :L]

    def forward(
        self,
        images: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> VLOutput:
        """Encode images [B, C, H, W], text ids [B, L], or both (one image-text pair per sample).

        `text_mask` [B, L] bool: True for real tokens, False for padding (not attended to, not routed).
        `image_mask` [B, n_patches] bool: patches replaced by the learned [MASK] embedding (masked image
        modeling). Text is masked by the caller, by replacing ids with its [MASK] id.
        """
        if images is None and text_ids is None:
            raise ValueError("give images, text_ids or both.")
        if images is not None and text_ids is not None and images.shape[0] != text_ids.shape[0]:
            raise ValueError(
                f"{images.shape[0]} images but {text_ids.shape[0]} texts; pairs need one of each."
            )
        if text_mask is not None and (text_ids is None or text_mask.shape != text_ids.shape):
            raise ValueError("text_mask must have text_ids' shape [B, L].")
        if image_mask is not None and images is None:
            raise ValueError("image_mask needs images.")
        parts = []
        if images is not None:
            parts.append(self.embed_images(images, image_mask))
        if text_ids is not None:
            parts.append(self.embed_text(text_ids))
        x = self.drop(torch.cat(parts, dim=1))
        n_image = parts[0].shape[1] if images is not None else 0
        key_mask = None
        if text_mask is not None:
            key_mask = torch.cat([text_mask.new_ones(x.shape[0], n_image), text_mask.bool()], dim=1)
        stats: list[PoolStats] = []
        for block in self.blocks:
            x, s = block(x, n_image, text_mask.bool() if text_mask is not None else None, key_mask)
            stats.extend(s)
        h = self.ln_f(x)
        text_logits = F.linear(h[:, n_image:], self.text_embed.weight) if text_ids is not None else None
        image_logits = self.visual_head(h[:, 1:n_image]) if images is not None else None
        zero = h.new_zeros((), dtype=torch.float32)
        aux = torch.stack([s.stats.aux_loss for s in stats]).sum() if stats else zero
        z = torch.stack([s.stats.z_loss for s in stats]).sum() if stats else zero
        return VLOutput(text_logits, image_logits, aux, z, stats, h)


def freeze_moe(model: nn.Module) -> None:
    """Set requires_grad=False on every parameter of every MoE layer of `model` (routers, experts, and any
    residual or shared MLPs of the layer): fine-tuning with the MoE frozen. Dense V/T/VL-FFNs stay trainable."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.requires_grad_(False)
