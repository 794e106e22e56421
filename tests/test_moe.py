"""MoE layer tests: outputs, losses and gradients against a naive per-token reference loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from distill.errors import ConfigError
from distill.moe import GroupedExperts, MoEConfig, MoELayer, MoEStats
from distill.moe.layer import sort_by_expert

D, F_HIDDEN = 16, 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids waiting on a second one when the shared machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- naive reference
def ref_act(h: torch.Tensor, activation: str, limit: float | None = None, alpha: float = 1.702) -> torch.Tensor:
    if activation == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    gate, up = h[..., 0::2], h[..., 1::2]  # SwiGLU units interleaved: gate_0, up_0, gate_1, up_1, ...
    if limit is not None:  # GPT-OSS: clamped, (up + 1) * gate * sigmoid(alpha * gate)
        gate, up = torch.clamp(gate, max=limit), torch.clamp(up, -limit, limit)
        return (up + 1) * gate * torch.sigmoid(alpha * gate)
    return gate * torch.sigmoid(gate) * up


def ref_routing(layer: MoELayer, xd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(logits, probs, [(token, expert, gate)]) in float64, token by token."""
    cfg, E, k = layer.cfg, layer.num_experts, layer.top_k
    logits = xd @ layer.router.weight.double().t()
    if cfg.router_bias:
        logits = logits + layer.router.bias.double()
    probs = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    choice = probs.detach().clone()
    if cfg.aux_free_bias:
        choice += layer.router.balance_bias.double()
    pairs = []
    for t in range(xd.shape[0]):
        eligible = list(range(E))
        if cfg.n_group:  # only the experts of the topk_group best groups
            size = E // cfg.n_group
            groups = [sorted((choice[t, e].item() for e in range(g * size, (g + 1) * size)), reverse=True)
                      for g in range(cfg.n_group)]
            score = [sum(gs[:2]) if cfg.group_score == "top2_sum" else gs[0] for gs in groups]
            best = sorted(range(cfg.n_group), key=lambda g: -score[g])[: cfg.topk_group]
            eligible = [e for e in eligible if e // size in best]
        ranked = sorted(eligible, key=lambda e: -choice[t, e].item())[:k]
        gates = [probs[t, e] for e in ranked]
        if cfg.renormalize and (k > 1 or cfg.renormalize_top1):
            total = sum(gates)
            gates = [g / total for g in gates]
        pairs += [(t, e, g * cfg.routed_scaling_factor) for e, g in zip(ranked, gates)]
    return logits, probs, pairs


def reference(
    layer: MoELayer, x: torch.Tensor, training: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's function written as a loop over tokens, in float64 (no noise): (y, aux, z)."""
    cfg, E, k = layer.cfg, layer.num_experts, layer.top_k
    T = x.shape[0]
    xd = x.double()
    logits, probs, pairs = ref_routing(layer, xd)  # (token, expert, gate)
    w_in, w_out = layer.experts.w_in.double(), layer.experts.w_out.double()
    zero_in, zero_out = torch.zeros(E, w_in.shape[2], dtype=torch.float64), torch.zeros(E, D, dtype=torch.float64)
    b_in = layer.experts.b_in.double() if cfg.expert_bias else zero_in
    b_out = layer.experts.b_out.double() if cfg.expert_bias else zero_out

    kept = pairs
    if not cfg.dropless:
        cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
        cap = min(T, max(cfg.min_capacity, math.ceil(k * cf * T / E)))
        kept = []
        for e in range(E):
            mine = [p for p in pairs if p[1] == e]
            if cfg.drop_policy == "probs" or (cfg.drop_policy == "random" and not training):
                mine.sort(key=lambda p: -p[2].item())  # stable: ties keep token order
            kept += mine[:cap]

    zero = torch.zeros(x.shape[1], dtype=torch.float64)
    rows = [zero for _ in range(T)]
    for t, e, g in kept:
        h = ref_act(xd[t] @ w_in[e] + b_in[e], cfg.activation, cfg.swiglu_limit, cfg.swiglu_alpha)
        rows[t] = rows[t] + g * (h @ w_out[e] + b_out[e])
    y = torch.stack(rows)

    def dense(mlp: torch.nn.Module, v: torch.Tensor) -> torch.Tensor:
        h = ref_act(v @ mlp.w_in.weight.double().t(), cfg.activation, cfg.swiglu_limit, cfg.swiglu_alpha)
        return h @ mlp.w_out.weight.double().t()

    if cfg.residual:
        c = (xd @ layer.coef.weight.double().t() + layer.coef.bias.double()).softmax(-1)
        y = c[:, :1] * y + c[:, 1:] * dense(layer.mlp, xd)
    if cfg.num_shared_experts:  # n separate experts, sliced out of the layer's one wide MLP
        n, f = cfg.num_shared_experts, layer.experts.w_out.shape[1]
        if cfg.shared_d_ff is not None:  # one shared MLP of its own width
            n, f = 1, cfg.shared_d_ff
        w1, w2 = layer.shared_mlp.w_in.weight.double(), layer.shared_mlp.w_out.weight.double()
        shared = torch.zeros_like(y)
        for i in range(n):
            rows_in = list(range(i * f, (i + 1) * f))
            if cfg.activation == "swiglu":  # unit j: gate row 2j, up row 2j + 1
                rows_in = [2 * j + half for j in rows_in for half in (0, 1)]
            h = ref_act(xd @ w1[rows_in].t(), cfg.activation, cfg.swiglu_limit, cfg.swiglu_alpha)
            shared = shared + h @ w2[:, i * f : (i + 1) * f].t()
        if cfg.shared_gate:
            shared = shared * torch.sigmoid(xd @ layer.shared_gate.weight.double().t())
        y = y + shared

    choice = torch.zeros(E, dtype=torch.float64)
    for _, e, _ in pairs:
        choice[e] += 1
    p = probs / probs.sum(-1, keepdim=True)
    aux = E * (choice / (T * k) * p.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    return y, aux, z


def kept_counts(layer: MoELayer, x: torch.Tensor, training: bool) -> torch.Tensor:
    """Pairs kept per expert, by the reference's rules (recomputed independently)."""
    cfg, E, k, T = layer.cfg, layer.num_experts, layer.top_k, x.shape[0]
    counts = torch.zeros(E, dtype=torch.long)
    for _, e, _ in ref_routing(layer, x.detach().double())[2]:
        counts[e] += 1
    if cfg.dropless:
        return counts
    cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
    return counts.clamp(max=min(T, max(cfg.min_capacity, math.ceil(k * cf * T / E))))


# --------------------------------------------------------------------------- helpers
def make_layer(num_experts: int = 8, seed: int = 0, router_std: float = 1.0, **cfg) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, F_HIDDEN, num_experts, MoEConfig(**cfg))
    with torch.no_grad():  # well-separated router scores: fp32 and fp64 pick the same experts
        layer.router.weight.normal_(std=router_std)
        if layer.router.bias is not None:
            layer.router.bias.normal_(std=router_std)
        for p in layer.experts.parameters():
            p.normal_(std=0.3)
        if layer.coef is not None:
            layer.coef.weight.normal_(std=0.3)
            layer.coef.bias.normal_(std=0.3)
        if layer.shared_gate is not None:
            layer.shared_gate.weight.normal_(std=0.3)
    return layer


def grads(layer: MoELayer, x: torch.Tensor, y, aux, z, g) -> list[torch.Tensor]:
    loss = (y * g).sum() + 0.3 * aux + 0.7 * z
    return torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True)


def assert_matches_reference(layer: MoELayer, T: int = 40, x: torch.Tensor | None = None) -> MoEStats:
    torch.manual_seed(1)
    x = (torch.randn(T, D) if x is None else x.clone()).requires_grad_()
    T = x.shape[0]
    g = torch.randn(T, D)
    y, stats = layer(x)
    y_ref, aux_ref, z_ref = reference(layer, x, layer.training)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.aux_loss, aux_ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.z_loss, z_ref.float(), rtol=1e-5, atol=1e-6)
    counts = kept_counts(layer, x, layer.training)
    assert torch.equal(stats.tokens_per_expert, counts)
    assert stats.drop_fraction.item() == pytest.approx(1 - counts.sum().item() / (T * layer.top_k))
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(
        names,
        grads(layer, x, y, stats.aux_loss, stats.z_loss, g),
        grads(layer, x, y_ref, aux_ref, z_ref, g.double()),
    ):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    return stats


# --------------------------------------------------------------------------- reference comparisons
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("capacity", ["dropless", "probs", "position"])
def test_matches_reference(k: int, capacity: str) -> None:
    if capacity == "dropless":
        layer = make_layer(top_k=k, dropless=True)
    else:  # capacity factor 0.5: about half the pairs are dropped
        layer = make_layer(top_k=k, capacity_factor=0.5, min_capacity=1, drop_policy=capacity)
    stats = assert_matches_reference(layer)
    assert (stats.drop_fraction.item() > 0.2) == (capacity != "dropless")


@pytest.mark.parametrize(
    "cfg",
    [
        dict(top_k=1, residual=True, capacity_factor=0.5, min_capacity=1),
        dict(top_k=2, num_shared_experts=2, activation="swiglu", dropless=True),
        dict(top_k=2, num_shared_experts=1, shared_d_ff=24, shared_gate=True, activation="swiglu"),
        dict(top_k=2, residual=True, num_shared_experts=1, capacity_factor=0.75, min_capacity=1),
        dict(top_k=2, score_func="sigmoid", activation="swiglu", capacity_factor=0.75, min_capacity=1),
        dict(top_k=2, renormalize=False, dropless=True),
        dict(top_k=2, use_grouped_mm=False, capacity_factor=0.75, min_capacity=1, residual=True),
        # the family options (DeepSeek-V2/V3, GPT-OSS), also with capacity drops
        dict(top_k=3, score_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5, aux_free_bias=True,
             activation="swiglu", num_shared_experts=2, capacity_factor=0.75, min_capacity=1),
        dict(top_k=2, n_group=4, topk_group=1, group_score="max", renormalize=False, routed_scaling_factor=1.5,
             dropless=True),
        dict(top_k=1, score_func="sigmoid", renormalize_top1=True, routed_scaling_factor=2.0, dropless=True),
        dict(top_k=2, router_bias=True, expert_bias=True, activation="swiglu", swiglu_limit=1.0,
             renormalize_top1=True, capacity_factor=0.75, min_capacity=1),
        dict(top_k=2, expert_bias=True, activation="swiglu", swiglu_limit=1.0, use_grouped_mm=False, dropless=True,
             residual=True),
    ],
    ids=["residual", "shared-swiglu", "shared-gated", "residual-shared", "sigmoid", "no-renorm", "loop-path",
         "deepseek-v3", "deepseek-v2-groups", "top1-renorm", "gpt-oss", "gpt-oss-loop"],
)
def test_matches_reference_variants(cfg: dict) -> None:
    layer = make_layer(**cfg)
    if layer.router.balance_bias is not None:  # a non-trivial score-correction bias: it changes the choice
        layer.router.balance_bias.copy_(torch.randn(layer.num_experts, generator=torch.Generator().manual_seed(3)))
    assert_matches_reference(layer)


def test_eval_uses_eval_capacity_and_is_deterministic() -> None:
    layer = make_layer(
        top_k=2,
        capacity_factor=4.0,
        eval_capacity_factor=0.5,
        min_capacity=1,
        drop_policy="random",
        jitter_eps=0.3,
        gumbel_noise=True,
    ).eval()
    x = torch.randn(40, D)
    y1, s1 = layer(x)
    y2, s2 = layer(x)
    assert torch.equal(y1, y2) and torch.equal(s1.tokens_per_expert, s2.tokens_per_expert)
    assert s1.drop_fraction > 0.2  # eval capacity factor, not the training one
    assert_matches_reference(layer)  # no noise; "random" falls back to "probs" at eval


def test_training_noise_changes_the_choice_only_in_training() -> None:
    x = torch.randn(64, D)
    for noise in (dict(jitter_eps=0.5), dict(gumbel_noise=True)):
        layer = make_layer(router_std=0.1, top_k=1, dropless=True, **noise)
        torch.manual_seed(1)
        a = layer(x)[1].tokens_per_expert
        b = layer(x)[1].tokens_per_expert
        assert not torch.equal(a, b), noise
        layer.eval()
        assert torch.equal(layer(x)[1].tokens_per_expert, layer(x)[1].tokens_per_expert)


# --------------------------------------------------------------------------- drop semantics
def one_expert_layer(policy: str) -> tuple[MoELayer, torch.Tensor]:
    """Every token routes to expert 0 (k=1), with a different gate value per token; capacity 5 of 20."""
    layer = make_layer(num_experts=4, top_k=1, capacity_factor=1.0, min_capacity=5, drop_policy=policy)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 4.0
    torch.manual_seed(3)
    x = torch.randn(20, D)
    x[:, 0] = torch.rand(20) + 0.5
    return layer, x


def kept_tokens(layer: MoELayer, x: torch.Tensor) -> set[int]:
    y, stats = layer(x)
    assert stats.tokens_per_expert.tolist() == [5, 0, 0, 0]
    assert stats.drop_fraction.item() == pytest.approx(15 / 20)
    return set(torch.nonzero(y.abs().sum(-1) > 0).flatten().tolist())


def test_drop_policy_probs_keeps_highest_gates() -> None:
    layer, x = one_expert_layer("probs")
    assert kept_tokens(layer, x) == set(x[:, 0].argsort(descending=True)[:5].tolist())


def test_drop_policy_position_keeps_first_tokens() -> None:
    layer, x = one_expert_layer("position")
    assert kept_tokens(layer, x) == {0, 1, 2, 3, 4}


def test_drop_policy_random_is_random_within_capacity() -> None:
    layer, x = one_expert_layer("random")
    seen = []
    for seed in range(8):
        torch.manual_seed(seed)
        seen.append(frozenset(kept_tokens(layer, x)))
    assert len(set(seen)) > 4  # different selections, each of exactly `capacity` tokens
    assert len(set().union(*seen)) > 10


def test_sort_by_expert_orders_and_caps() -> None:
    expert_idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])  # 4 tokens, k=2: pairs 0..7
    counts = torch.bincount(expert_idx.flatten(), minlength=4)
    order, inverse, kept = sort_by_expert(expert_idx, counts, None, capacity=None)
    assert order.tolist() == [1, 2, 6, 3, 5, 0, 4, 7]
    assert torch.equal(order[inverse], torch.arange(8))
    priority = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    order, inverse, kept = sort_by_expert(expert_idx, counts, priority, capacity=2)
    assert order.tolist() == [6, 2, 5, 3, 7, 4] and kept.tolist() == [2, 2, 2, 0]
    assert inverse.tolist() == [6, 6, 1, 3, 5, 2, 0, 4]  # dropped pairs 0 and 1 point past the end


# --------------------------------------------------------------------------- losses
def balanced_router_layer(
    num_experts: int, k: int, score_func: str = "softmax"
) -> tuple[MoELayer, torch.Tensor]:
    """T = E tokens whose scores are cyclic shifts of one vector: each expert is chosen by exactly k
    tokens and every expert's mean probability is the same."""
    layer = make_layer(num_experts=num_experts, top_k=k, dropless=True, score_func=score_func)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :num_experts] = torch.eye(num_experts)
    base = torch.linspace(2.0, -1.0, num_experts)
    x = torch.zeros(num_experts, D)
    x[:, :num_experts] = torch.stack([base.roll(i) for i in range(num_experts)])
    return layer, x


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_loss_is_one_at_perfect_balance(k: int, score_func: str) -> None:
    layer, x = balanced_router_layer(8, k, score_func)
    _, stats = layer(x)
    assert stats.tokens_per_expert.tolist() == [k] * 8
    assert stats.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    _, unbalanced = layer(x[:1].expand(8, D))  # every token makes the same choice
    assert unbalanced.aux_loss.item() > 1.2


def test_z_loss_and_stats_types() -> None:
    layer = make_layer(top_k=2)
    x = torch.randn(3, 5, D)
    y, stats = layer(x)
    assert y.shape == x.shape and isinstance(stats, MoEStats)
    assert stats.tokens_per_expert.dtype == torch.long and stats.tokens_per_expert.shape == (8,)
    logits = x.reshape(-1, D) @ layer.router.weight.t()
    assert stats.z_loss.item() == pytest.approx((torch.logsumexp(logits, -1) ** 2).mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- edge cases and paths
@pytest.mark.parametrize("grouped", [True, False])
def test_edge_cases(grouped: bool) -> None:
    unused = make_layer(top_k=2, dropless=True, use_grouped_mm=grouped)
    with torch.no_grad():
        unused.router.weight[3] = -1.0  # inputs are positive: expert 3 is never chosen
    torch.manual_seed(1)
    x = torch.randn(40, D).abs()
    y, stats = unused(x)
    assert stats.tokens_per_expert[3] == 0
    y.sum().backward()  # an expanded (stride-0) gradient, and an expert with no tokens
    assert unused.experts.w_in.grad[3].abs().sum() == 0 and unused.experts.w_in.grad.abs().sum() > 0
    unused.zero_grad()
    assert_matches_reference(unused, x=x)
    assert_matches_reference(make_layer(top_k=2, use_grouped_mm=grouped), T=3)  # fewer tokens than experts
    assert_matches_reference(make_layer(num_experts=4, top_k=4, use_grouped_mm=grouped, capacity_factor=0.5))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_mm_equals_loop(activation: str) -> None:
    torch.manual_seed(0)
    experts = GroupedExperts(6, D, F_HIDDEN, activation)
    experts.init_weights(0.3, 0.3)
    loop = copy.deepcopy(experts)
    loop.use_grouped_mm = False
    assert experts.grouped_mm_applies(torch.zeros(1, D)) and not loop.grouped_mm_applies(torch.zeros(1, D))
    counts = torch.tensor([5, 0, 9, 1, 0, 7])
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    g = torch.randn(x.shape)
    outs = []
    for module in (experts, loop):
        y = module(x, counts)
        outs.append((y, *torch.autograd.grad((y * g).sum(), [x, module.w_in, module.w_out])))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert outs[0][2][1].abs().sum() == 0  # the empty expert gets a zero gradient


@pytest.mark.parametrize("threads,dtype", [(1, torch.float64), (3, torch.float32)])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_expert_kernel_equals_loop(threads: int, dtype: torch.dtype, bias: bool) -> None:
    """The CPU kernel (one mm per expert: on 1 thread where grouped_mm does not apply, e.g. float64; with
    several intra-op threads, experts on worker threads of one thread each) gives the loop reference's
    outputs and gradients, empty experts and an expanded gradient too."""
    torch.manual_seed(0)
    experts = GroupedExperts(6, D, F_HIDDEN, "swiglu" if bias else "gelu", bias=bias).to(dtype)
    experts.init_weights(0.3, 0.3)
    if bias:
        torch.nn.init.normal_(experts.b_in)
        torch.nn.init.normal_(experts.b_out)
    loop = copy.deepcopy(experts)
    loop.use_grouped_mm = False
    counts = torch.tensor([5, 0, 9, 1, 0, 7])
    x = torch.randn(int(counts.sum()), D, dtype=dtype, requires_grad=True)
    g = torch.randn(x.shape, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = []
        for module in (experts, loop):
            y = module(x, counts)
            params = [x, *module.parameters()]
            outs.append((y, *torch.autograd.grad((y * g).sum(), params)))
            outs[-1] += torch.autograd.grad(module(x, counts).sum(), params)  # stride-0 gradient
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert outs[0][2][1].abs().sum() == 0 and outs[0][2].abs().sum() > 0  # the empty expert: zero gradient


def test_layer_with_threaded_experts_matches_reference() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_matches_reference(make_layer(top_k=2, dropless=True, expert_bias=True, activation="swiglu"))
        assert_matches_reference(make_layer(top_k=2, capacity_factor=0.75, min_capacity=1))
    finally:
        torch.set_num_threads(before)


def test_threaded_experts_under_inference_mode() -> None:
    """A frozen teacher runs under inference mode: the worker threads take it over (it is per thread), so they
    may write the inference-mode outputs; the result equals a plain forward's."""
    layer = make_layer(num_experts=6, top_k=2, dropless=True)
    x = torch.randn(40, D)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            ref = layer(x)[0]
        with torch.inference_mode():
            out = layer(x)[0]
    finally:
        torch.set_num_threads(before)
    assert out.is_inference()
    torch.testing.assert_close(out, ref)


def test_bfloat16_autocast_runs() -> None:
    layer = make_layer(top_k=2, residual=True)
    x = torch.randn(24, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = layer(x)
    assert stats.aux_loss.dtype == torch.float32 and torch.isfinite(y).all()
    y.float().sum().backward()
    assert layer.experts.w_in.grad is not None and x.grad is not None


# --------------------------------------------------------------------------- aux-loss-free balancing
def test_aux_free_bias_moves_toward_balance() -> None:
    layer = make_layer(
        num_experts=4, router_std=0.1, top_k=1, dropless=True, aux_free_bias=True, aux_free_bias_rate=0.02
    )
    with torch.no_grad():
        layer.router.weight[0] += 0.05  # expert 0 is preferred by many tokens
    torch.manual_seed(0)
    x = torch.randn(256, D).abs()

    def imbalance() -> float:
        counts = layer(x)[1].tokens_per_expert.float()
        return (counts.max() / counts.mean()).item()

    start = imbalance()
    layer.router.balance_counts.zero_()
    for _ in range(40):
        layer(x)
        layer.update_balance_bias()
        assert layer.router.balance_counts.sum() == 0
    bias = layer.router.balance_bias
    assert bias[0] < 0 and bias.argmin() == 0
    assert imbalance() < 0.5 * (start - 1) + 1
    routing = layer.router(x)  # the bias changes the choice, not the gate values
    probs = (x @ layer.router.weight.t()).softmax(-1)
    torch.testing.assert_close(routing.gates, probs.gather(-1, routing.expert_idx))
    assert (routing.expert_idx[:, 0] != probs.argmax(-1)).any()
    assert "router.balance_bias" in layer.state_dict()
    layer.router.balance_counts.zero_()
    layer.eval()
    layer(x)
    assert layer.router.balance_counts.sum() == 0  # eval passes do not count


def test_update_balance_bias_without_aux_free_is_noop() -> None:
    layer = make_layer()
    layer.update_balance_bias()
    assert layer.router.balance_bias is None


# --------------------------------------------------------------------------- dispatcher and parameters
class TwoRankDispatcher:
    """Simulates expert parallelism over two ranks in one process: this layer keeps experts [0, E/2);
    the other half lives in `remote`, which computes inside dispatch."""

    def __init__(self, remote: GroupedExperts):
        self.remote = remote

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor):
        half = counts.numel() // 2
        n_local = int(counts[:half].sum())
        return tokens[:n_local], counts[:half], self.remote(tokens[n_local:], counts[half:])

    def combine(self, expert_out: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
        return torch.cat([expert_out, handle])


def keep_experts(experts: GroupedExperts, offset: int, num_local: int) -> None:
    """Keep global experts [offset, offset + num_local) of a module that holds them all (as the
    expert-parallel strategy's sharding does)."""
    with torch.no_grad():
        experts.w_in = torch.nn.Parameter(experts.w_in[offset : offset + num_local].clone())
        experts.w_out = torch.nn.Parameter(experts.w_out[offset : offset + num_local].clone())
    experts.expert_offset = offset


def test_dispatcher_and_expert_slices_drop_in() -> None:
    full = make_layer(top_k=2, capacity_factor=0.75, min_capacity=1)
    split = copy.deepcopy(full)
    remote = copy.deepcopy(full.experts)
    keep_experts(remote, 4, 4)
    keep_experts(split.experts, 0, 4)
    split.dispatcher = TwoRankDispatcher(remote)
    assert split.experts.num_local_experts == 4 and remote.expert_offset == 4
    x = torch.randn(30, D, requires_grad=True)
    y_full, s_full = full(x)
    y_split, s_split = split(x)
    torch.testing.assert_close(y_split, y_full)
    assert torch.equal(s_split.tokens_per_expert, s_full.tokens_per_expert)
    y_full.square().sum().backward()
    y_split.square().sum().backward()
    torch.testing.assert_close(split.experts.w_in.grad, full.experts.w_in.grad[:4])
    torch.testing.assert_close(remote.w_out.grad, full.experts.w_out.grad[4:])
    torch.testing.assert_close(split.router.weight.grad, full.router.weight.grad)


def test_expert_parameters_are_recognisable() -> None:
    layer = make_layer(top_k=2, residual=True, num_shared_experts=2)
    expert_params = {id(p) for m in layer.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    for name, p in layer.named_parameters():
        assert ("experts." in name) == (id(p) in expert_params), name
    assert len(expert_params) == 2


# --------------------------------------------------------------------------- config validation
@pytest.mark.parametrize(
    "cfg, num_experts, key",
    [
        (dict(top_k=9), 8, "model.moe.top_k"),
        (dict(top_k=0), 8, "model.moe.top_k"),
        (dict(capacity_factor=0.0), 8, "model.moe.capacity_factor"),
        (dict(eval_capacity_factor=-1.0), 8, "model.moe.eval_capacity_factor"),
        (dict(drop_policy="oldest"), 8, "model.moe.drop_policy"),
        (dict(activation="relu"), 8, "model.moe.activation"),
        (dict(score_func="tanh"), 8, "model.moe.score_func"),
        (dict(min_capacity=-1), 8, "model.moe.min_capacity"),
        (dict(num_shared_experts=-1), 8, "model.moe.num_shared_experts"),
        (dict(jitter_eps=1.5), 8, "model.moe.jitter_eps"),
        (dict(d_ff=0), 8, "model.moe.d_ff"),
        (dict(), 0, "model.num_experts"),
        (dict(capacity=2.0), 8, "model.moe.capacity"),
    ],
)
def test_bad_config_raises_config_error(cfg: dict, num_experts: int, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        MoEConfig.from_dict(cfg).validate(num_experts)
    assert err.value.key == key


def test_layer_takes_its_config_as_given() -> None:
    """The layer never checks its config (the app layer validates once per run)."""
    cfg = MoEConfig(top_k=2)
    layer = MoELayer(D, F_HIDDEN, 2, cfg)
    assert layer.cfg is cfg
    with pytest.raises(ConfigError):
        cfg.validate(1)  # one expert cannot serve top-2; only validate says so


def test_cfg_d_ff_overrides_and_mapping_config() -> None:
    layer = MoELayer(D, F_HIDDEN, 4, MoEConfig.from_dict({"top_k": 2, "d_ff": 8, "activation": "swiglu"}))
    assert layer.experts.w_in.shape == (4, D, 16) and layer.experts.w_out.shape == (4, 8, D)
