"""The activation estimate: the bytes autograd keeps for the backward of one micro-batch on one rank, counted
op by op from the model's real modules (by `parallel.activation_checkpointing`), with the element sizes of the
parameter dtypes and the routed rows a MoE layer keeps under uniform routing.
"""

from __future__ import annotations

from distill.models import GPT
from distill.models.config import ModelConfig
from distill.moe import MoELayer
from distill.parallel.config import ParallelConfig
from distill.parallel.mesh import layer_group_size

DTYPE_BYTES = {None: 4, "float32": 4, "bfloat16": 2, "float16": 2}


def _dtype_bytes(name: str | None) -> int:
    return DTYPE_BYTES[name]


def sequence_parallel(layout: ParallelConfig) -> bool:
    """Whether `parallel.sequence_parallel` splits the residual stream: it does only with tp > 1."""
    return bool(getattr(layout, "sequence_parallel", False)) and layout.tp > 1


def _routed_rows(layer: MoELayer, tokens: int) -> int:
    """(token, choice) rows a layer keeps of `tokens` tokens: k x T, at most E x capacity (uniform routing)."""
    cap = layer.capacity(tokens)  # the layer's own rule (training mode)
    rows = layer.top_k * tokens
    return rows if cap is None else min(rows, layer.num_experts * cap)


def activation_bytes(model: GPT, layout: ParallelConfig, micro_batch: int, seq_len: int) -> dict[str, int]:
    """Bytes saved for the backward of one micro-batch on one rank, by part (`total` included).

    Counted from what each op keeps (T = micro_batch x seq_len tokens, e = the activation element size, every
    routed expert receiving its k x T / E rows), per block:

    - norm: LayerNorm T·d·e + 2T fp32 (mean, rstd); RMSNorm T·d·(4 + e) + T fp32 (fp32 input and its scaled copy).
    - attention: its input T·d·e; per tp rank the fused q/k/v output (v keeps it whole), the rotated q and k,
      the attention output (flash / memory-efficient attention keeps no s x s matrix): T·(3d + 3·kv)/tp·e,
      kv = key/value width; the log-sum-exp T·heads/tp fp32.
    - dense MLP: its input T·d·e, the hidden activations m·T·f/tp·e (m = 2 for GELU, 4 for SwiGLU).
    - MoE layer: its input (fp32 for the router), router probabilities and logits 2·T·E fp32, gate values and
      choices, the routed rows R·d·e and the experts' hidden m·R·f_e/tp·e (R = k·T, at most E x capacity),
      the combined pairs k·T·d·e, index tensors (int64) of the sort and the dispatch; the residual MLP
      (m·T·f/tp·e, its output and the routed output T·d·e each, the mixing coefficients) and the shared
      experts (m·T·f_s/tp·e, with a gate its output and T·d·e).
    - the head: the final norm, the head's input T·d·e, fp32 log-probabilities T·V/tp·4, the targets.

    This is Korthikanti et al. (2022)'s count (``34·s·b·h + 5·a·s²·b`` bytes per layer in 16-bit, the
    tensor-parallel parts / tp) for this model's ops. Their dropout masks and attention matrices appear only
    with ``model.dropout > 0`` (every training config has 0): then, as on GPUs, a one-byte mask per dropout
    (two per block, one after the embedding) and the attention's s x s probabilities, their mask and the
    dropped probabilities, ``micro_batch·heads/tp·s²·(2e + 1)`` (flash attention does not take dropout here).
    `parallel.activation_checkpointing`: ``full`` keeps each block's input T·d·e and recomputes one block at a
    time (the largest is added); ``moe_only`` keeps MoE blocks except their attention's inside, recomputed
    with the dense blocks.

    `parallel.sequence_parallel` (tp > 1) divides by tp what is saved per position on the residual stream,
    outside the tensor-parallel linears: the norms (ln_1, ln_2, ln_f), the dropout masks after the embedding,
    the attention and the FFN, and a checkpointed block's (or attention's) input. The rest is as without it:
    the column-parallel linears and the head keep their all-gathered input T·d·e, a MoE layer its whole
    micro-batch; with ``moe_only`` the recomputed attention also holds its all-gathered input T·d·e.
    """
    cfg: ModelConfig = model.cfg
    tp, e = layout.tp, _dtype_bytes(layout.param_dtype)
    T, d = micro_batch * seq_len, cfg.d_model
    kv = cfg.kv_heads * cfg.head_dim
    sp = sequence_parallel(layout)
    Ts = T // tp if sp else T  # positions per rank on the residual stream

    def norm() -> int:
        return Ts * d * (4 + e) + 4 * Ts if cfg.norm == "rmsnorm" else Ts * d * e + 8 * Ts

    def hidden(width: int, activation: str, rows: int) -> int:
        return (4 if activation == "swiglu" else 2) * rows * width // tp * e

    inner_attn = T * (3 * d + 3 * kv) // tp * e + 4 * T * cfg.n_heads // tp
    dropout = cfg.dropout > 0
    if dropout:  # the attention probabilities, their mask, the dropped ones; a mask after attention and the FFN
        inner_attn += micro_batch * cfg.n_heads // tp * seq_len**2 * (2 * e + 1)
    attn_outer = norm() + dropout * Ts * d  # ln_1 and the dropout after the attention
    attn = attn_outer + T * d * e + inner_attn
    ffn_dense = norm() + T * d * e + hidden(cfg.ffn_dim, cfg.mlp_activation, T) + dropout * Ts * d
    blocks: list[tuple[bool, int]] = []  # (is_moe, bytes of its FFN part)
    for block in model.blocks:
        if not block.is_moe:
            blocks.append((False, ffn_dense))
            continue
        layer, moe = block.ffn, cfg.moe
        E, k = layer.num_experts, layer.top_k
        R = _routed_rows(layer, T)
        f_e = layer.experts.w_out.shape[1]
        g = layer_group_size(E, layout.ep)
        x = T * d * 4  # the router's fp32 input (the input itself in fp32)
        if e != 4 and (layer.mlp is not None or layer.shared_mlp is not None):
            x += T * d * e  # ... and the input the dense branches keep
        router = 2 * T * E * 4 + T * k * 8 + (T * k * 4 + 4 * T if k > 1 and moe.renormalize else 0) + 4 * T
        indices = T * k * 8 + R * 8 + (2 * R * 8 if g > 1 else 0)
        experts = R * d * e + hidden(f_e, moe.activation, R)
        combine = T * k * d * e + T * k * e
        part = norm() + x + router + indices + experts + combine + dropout * Ts * d
        if layer.mlp is not None:
            part += hidden(layer.mlp.w_out.in_features, moe.activation, T) + 2 * T * d * e + 2 * T * e
        if layer.shared_mlp is not None:
            part += hidden(layer.shared_mlp.w_out.in_features, moe.activation, T)
            part += (T * e + T * d * e) if layer.shared_gate is not None else 0
        blocks.append((True, part))
    head = norm() + T * d * e + T * cfg.vocab_size // tp * 4 + T * 8 + T
    fixed = T * 8 + 2 * seq_len * cfg.head_dim * 4 + dropout * Ts * d  # token ids, rotary tables, embedding dropout
    mode = layout.activation_checkpointing
    if mode == "none":
        kept = sum(attn + ffn for _, ffn in blocks)
        recompute = 0
    elif mode == "full":
        kept = len(blocks) * Ts * d * e
        recompute = max(attn + ffn for _, ffn in blocks)
    else:  # moe_only: MoE blocks keep all but their attention's inside; dense blocks keep their input
        kept = sum(attn_outer + Ts * d * e + ffn if moe else Ts * d * e for moe, ffn in blocks)  # attention: its input
        recompute = max([attn + ffn for moe, ffn in blocks if not moe] + [inner_attn + sp * T * d * e])
    parts = {"blocks": kept, "recomputed block": recompute, "head": head, "ids and rotary tables": fixed}
    parts["total"] = sum(parts.values())
    return parts
