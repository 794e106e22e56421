"""Students with fewer experts per MoE layer than their teacher: which experts to keep, and how.

REAP (Cerebras, 2025) scores each teacher expert on calibration tokens by the router-weighted norm of
its output: the mean over the (token, choice) pairs the router sends to expert e of
``gate(t, e) * ||expert_e(x_t)||_2`` (0 for an expert that receives no token). A student MoE layer of N
experts then keeps, per layer:

- ``"importance"``: the N highest-scoring experts (ties: lower teacher index first);
- ``"merge"``: the same N, each dropped expert merged into a kept one (`shrink_moe_state`);
- ``"first"``: experts 0..N-1 (what a Hugging Face teacher gets today).

The kept experts are always in ascending teacher order, and the student router's rows (and per-expert
router buffers such as the aux-free `balance_bias`) are the kept experts' rows, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.errors import ConfigError
from distill.moe import MoELayer, Routing
from distill.moe.layer import sort_by_expert

METHODS = ("importance", "merge", "first")
_PER_EXPERT = ("router.", "experts.")  # state-dict prefixes of a MoE layer whose dim 0 is the expert


@dataclass
class ExpertStats:
    """Calibration statistics of one MoE layer: REAP `score` [E] float, routed (token, choice) pairs `tokens` [E] long."""

    score: torch.Tensor
    tokens: torch.Tensor


@torch.no_grad()
def expert_importance(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], max_batches: int | None = None
) -> dict[int, ExpertStats]:
    """REAP scores of every routed expert of a GPT, keyed by MoE block index, over `batches` of token ids [B, L].

    Runs the model in eval mode without gradients; a forward hook on each router sees the layer's input
    [T, d] and its `Routing`, and the experts' outputs are computed with the layer's own `GroupedExperts`
    forward (so they are what the layer computes). A pair counts as routed to an expert when the router
    chooses it, before capacity: a capacity drop is a batch-size artefact, not a property of the expert.
    Gates are the Routing's gate values (renormalised over the k choices when the router does so).
    """
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}

    def hook_for(i: int, layer: MoELayer):
        def hook(_router: torch.nn.Module, args: tuple[torch.Tensor, ...], routing: Routing) -> None:
            x, k = args[0], routing.expert_idx.shape[1]
            order, _, n = sort_by_expert(routing.expert_idx, routing.choice_counts, None, None)
            rows = x.index_select(0, order.div(k, rounding_mode="floor"))
            out = layer.experts(rows, n).float()
            weighted = routing.gates.flatten()[order] * out.norm(dim=-1)
            experts = routing.expert_idx.flatten()[order]
            sums[i].index_add_(0, experts.cpu(), weighted.double().cpu())
            counts[i] += n.cpu()

        return hook

    handles = []
    for i, block in enumerate(model.blocks):
        if getattr(block, "is_moe", False):
            layer = block.ffn
            if layer.experts.num_local_experts != layer.num_experts:
                raise ValueError(f"MoE block {i} holds a slice of its experts; score an unsharded model.")
            sums[i] = torch.zeros(layer.num_experts, dtype=torch.float64)
            counts[i] = torch.zeros(layer.num_experts, dtype=torch.long)
            handles.append(layer.router.register_forward_hook(hook_for(i, layer)))
    was_training = model.training
    model.eval()
    try:
        for b, idx in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            model(idx.to(model.wte.weight.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {
        i: ExpertStats(score=(sums[i] / counts[i].clamp(min=1)).float(), tokens=counts[i]) for i in sums
    }


def keep_experts(stats: ExpertStats | None, n: int, method: str) -> list[int]:
    """The n teacher experts a student layer keeps, ascending: top-n by score ("importance", "merge";
    ties go to the lower index) or the first n ("first", where `stats` may be None)."""
    if method not in METHODS:
        raise ValueError(f"unknown expert selection method {method!r}; use one of {list(METHODS)}.")
    if method == "first":
        if stats is not None and not 1 <= n <= stats.score.numel():
            raise ValueError(f"cannot keep {n} of {stats.score.numel()} experts.")
        return list(range(n))
    if stats is None:
        raise ValueError(f"method {method!r} needs calibration statistics (`expert_importance`).")
    score = stats.score.tolist()
    if not 1 <= n <= len(score):
        raise ValueError(f"cannot keep {n} of {len(score)} experts.")
    ranked = sorted(range(len(score)), key=lambda e: (-score[e], e))
    return sorted(ranked[:n])


def merge_targets(router_weight: torch.Tensor, keep: list[int]) -> dict[int, int]:
    """Each dropped expert -> the position in `keep` of the kept expert whose router row is most
    cosine-similar to its own (ties: the earlier position). Router rows are used because they decide
    where the dropped expert's tokens go in the student: to the kept experts whose rows align with it."""
    rows = router_weight.float()
    dropped = [e for e in range(rows.shape[0]) if e not in set(keep)]
    if not dropped:
        return {}
    sim = F.cosine_similarity(rows[dropped].unsqueeze(1), rows[keep].unsqueeze(0), dim=-1)  # [D, K]
    return dict(zip(dropped, sim.argmax(dim=1).tolist()))


def _is_per_expert(key: str, value: torch.Tensor, num_experts: int) -> bool:
    name = key.rsplit(".", 2)
    module = name[-2] + "." if len(name) > 1 else ""
    return module in _PER_EXPERT and value.dim() >= 1 and value.shape[0] == num_experts


@torch.no_grad()
def shrink_moe_state(
    layer_state: dict[str, torch.Tensor], keep: list[int], method: str, tokens: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """A MoE layer's state dict (`MoELayer.state_dict()`) with only the experts `keep` (in that order).

    Entries of `router` and `experts` whose dim 0 is the expert (router rows, `balance_bias`, stacked
    expert weights) are indexed with `keep`; every other entry (residual MLP, coef, shared experts) is
    copied. With method "merge", each dropped expert is merged into the kept expert chosen by
    `merge_targets` (router-row cosine similarity): the kept expert's weights become the average of its
    group's weights, weighted by `tokens` [E] (routed pairs per expert in calibration); a group whose
    experts received no token keeps its kept expert unchanged. Router rows and buffers are never merged.
    """
    router_key = next(k for k in layer_state if k == "router.weight" or k.endswith(".router.weight"))
    num_experts = layer_state[router_key].shape[0]
    if len(set(keep)) != len(keep) or not all(0 <= e < num_experts for e in keep):
        raise ValueError(f"keep={keep} is not a list of distinct expert ids below {num_experts}.")
    if method not in METHODS:
        raise ValueError(f"unknown expert selection method {method!r}; use one of {list(METHODS)}.")
    groups = [[e] for e in keep]
    if method == "merge":
        if tokens is None:
            raise ValueError("method 'merge' needs the calibration token counts per expert.")
        for e, pos in merge_targets(layer_state[router_key], keep).items():
            groups[pos].append(e)
    index = torch.tensor(keep, dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    for key, value in layer_state.items():
        if not _is_per_expert(key, value, num_experts):
            out[key] = value.clone()
            continue
        out[key] = value.index_select(0, index.to(value.device)).clone()
        if method != "merge" or key.split(".")[-2] != "experts":
            continue
        for pos, group in enumerate(groups):
            w = tokens[group].to(torch.float64)
            if len(group) > 1 and w.sum() > 0:
                w = (w / w.sum()).to(value.device)
                merged = (value[group].double() * w.view(-1, *[1] * (value.dim() - 1))).sum(0)
                out[key][pos] = merged.to(value.dtype)
    return out


@torch.no_grad()
def init_student_experts(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    mapping: list[int],
    method: str,
    stats: dict[int, ExpertStats] | None = None,
) -> dict[int, list[int]]:
    """Copy the teacher blocks of the student's MoE blocks into ``student``, shrinking their experts.

    `mapping[si]` is the teacher block index of student block si, one entry per student block (as
    `students.mos.default_teacher_layers` returns); only the student's MoE blocks are touched, each from
    a teacher MoE block: its attention and norms as they are, its MoE layer as they are (equal expert
    counts) or through `keep_experts` + `shrink_moe_state` (fewer). `stats` is `expert_importance` of the
    teacher, keyed by teacher block (needed unless method == "first"). Dense blocks, embeddings and the
    final norm are left to the caller (`init_student_from_teacher`). Returns {student block: kept
    teacher experts}. More student than teacher experts raises ConfigError on `student.num_experts`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown expert selection method {method!r}; use one of {list(METHODS)}.")
    t_blocks, s_blocks = list(teacher.blocks), list(student.blocks)
    if len(mapping) != len(s_blocks):
        raise ConfigError("student.teacher_layers", f"has {len(mapping)} entries for a student of "
                          f"{len(s_blocks)} layers.", "give one teacher block index per student block.")
    kept: dict[int, list[int]] = {}
    for si, ti in enumerate(mapping):
        if not s_blocks[si].is_moe:
            continue
        if not 0 <= ti < len(t_blocks) or not t_blocks[ti].is_moe:
            raise ConfigError("student.teacher_layers", f"student MoE block {si} is mapped to teacher "
                              f"block {ti}, which is not a teacher MoE block.", "map MoE blocks to MoE blocks.")
        n_s, n_t = s_blocks[si].ffn.num_experts, t_blocks[ti].ffn.num_experts
        if n_s > n_t:
            raise ConfigError(
                "student.num_experts",
                f"student MoE block {si} has {n_s} experts but its teacher block {ti} has only {n_t}.",
                f"give student block {si} at most {n_t} experts.",
            )
        state = t_blocks[ti].state_dict()
        keep = list(range(n_t))
        if n_s < n_t:
            layer_stats = stats.get(ti) if stats is not None else None
            keep = keep_experts(layer_stats, n_s, method)
            ffn = {k[len("ffn."):]: v for k, v in state.items() if k.startswith("ffn.")}
            tokens = layer_stats.tokens if layer_stats is not None else None
            shrunk = shrink_moe_state(ffn, keep, method, tokens)
            state = {k: v for k, v in state.items() if not k.startswith("ffn.")}
            state.update({f"ffn.{k}": v for k, v in shrunk.items()})
        s_blocks[si].load_state_dict(state)
        kept[si] = keep
    return kept
