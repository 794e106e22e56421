"""Expert MLPs: a dense FFN and the routed experts stored as stacked parameters ([E, d, f], [E, f, d]).

The routed experts compute over rows already grouped by expert (`counts[e]` consecutive rows each):

- on CPU with several intra-op threads, `grouped_linear`: one `mm` per expert into a shared output buffer
  (forward and backward), the experts spread over that many worker threads, each matmul on one thread
  (MKL runs a matmul of ~100 rows poorly on several threads, and each of its parallel regions waits for
  a descheduled thread on a busy machine; experts side by side on one thread each keep every core busy);
- on one thread, and on accelerators, `torch.nn.functional.grouped_mm` where dtype and shapes allow (on
  CPU a C++ loop of the same matmuls; `grouped_linear` where it does not apply);
- else (or `use_grouped_mm=False`, the reference) split + a loop over `weight.unbind(0)` (never `w[e]` in a
  loop: each index's backward allocates a full-size zero gradient).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_ok = False
_pool_lock = threading.Lock()


def _reset_pool() -> None:  # a forked child has none of the parent's threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


os.register_at_fork(after_in_child=_reset_pool)


def _one_thread() -> None:
    torch.get_num_threads()  # torch's lazy per-thread init first: it would later reset this thread to the default
    torch.set_num_threads(1)


def _expert_pool(threads: int) -> ThreadPoolExecutor | None:
    """`threads` worker threads that run torch ops with one intra-op thread each (made once per size);
    None where a worker could not be limited to one thread."""
    global _pool, _pool_size, _pool_ok
    with _pool_lock:
        if _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="distill-experts", initializer=_one_thread)
            ready = threading.Barrier(threads)
            # start (and initialise) every thread; each reports its intra-op threads
            got = [f.result() for f in [_pool.submit(lambda: (ready.wait(), torch.get_num_threads())[1])
                                        for _ in range(threads)]]
            torch.set_num_threads(threads)  # the workers' set_num_threads(1) also set torch's global default
            _pool_size, _pool_ok = threads, all(n == 1 for n in got)
        return _pool if _pool_ok else None


def run_experts(sizes: list[int], work: Callable[[int], Any], device: torch.device) -> None:
    """work(e) for every expert e (rows: sizes[e]); on CPU with several intra-op threads, on that many
    worker threads of one intra-op thread each, the largest experts first, taken in turn as workers free."""
    threads = torch.get_num_threads()
    busy = sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True)
    if device.type != "cpu" or threads <= 1 or sum(1 for n in sizes if n) < 2:
        with torch.no_grad():
            for e in busy:
                work(e)
        return
    queue = iter(busy)  # next() on a list iterator is atomic under the GIL
    # grad and inference mode are per thread: a worker takes the caller's, so that it may write the outputs
    # of a forward run under inference mode (a teacher's; they are inference tensors)
    inference = torch.is_inference_mode_enabled()

    def worker() -> None:
        with torch.inference_mode(inference), torch.no_grad():
            for e in queue:
                work(e)

    pool = _expert_pool(threads)
    if pool is None:
        worker()
        return
    for f in [pool.submit(worker) for _ in range(threads)]:
        f.result()


class _GroupedLinear(torch.autograd.Function):
    """x [N, a] grouped by expert (sizes[e] rows each) -> [N, b], rows of expert e times w[e] ([E, a, b])."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty(x.shape[0], w.shape[2])
        xs, ws, outs = x.split(sizes), w.unbind(0), out.split(sizes)
        run_experts(sizes, lambda e: torch.mm(xs[e], ws[e], out=outs[e]), x.device)
        ctx.save_for_backward(x, w)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w = ctx.saved_tensors
        sizes = ctx.sizes
        grad = grad.contiguous()  # an expanded (stride-0) gradient, e.g. from a sum
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        xs, gs, ws = x.split(sizes), grad.split(sizes), w.unbind(0)
        gxs = grad_x.split(sizes) if grad_x is not None else None
        gws = grad_w.unbind(0) if grad_w is not None else None

        def work(e: int) -> None:
            if gxs is not None:
                torch.mm(gs[e], ws[e].t(), out=gxs[e])
            if gws is not None:
                if sizes[e]:
                    torch.mm(xs[e].t(), gs[e], out=gws[e])
                else:
                    gws[e].zero_()

        run_experts(sizes, work, x.device)
        return grad_x, grad_w, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """x [N, a] grouped by expert (sizes[e] consecutive rows each) -> [N, b]: expert e's rows @ w[e]."""
    return _GroupedLinear.apply(x, w, sizes)


def activate(h: torch.Tensor, activation: str, swiglu_limit: float | None = None,
             swiglu_alpha: float = 1.702) -> torch.Tensor:
    """GELU on h [.., f], or SwiGLU on h [.., 2f] -> silu(gate) * up.

    SwiGLU's gate and up units are interleaved (gate_0, up_0, gate_1, up_1, ...), so that any contiguous
    slice of whole pairs is a smaller SwiGLU of its own: a tensor-parallel rank's slice of the input
    projection computes its slice of the hidden units (`distill.parallel.tensor`).

    With a `swiglu_limit`, GPT-OSS's clamped SwiGLU (transformers' GptOssExperts._apply_gate): gate clamped
    to at most the limit, up to [-limit, limit], then (up + 1) * gate * sigmoid(swiglu_alpha * gate)."""
    if activation == "swiglu":
        gate, up = h.unflatten(-1, (-1, 2)).unbind(-1)
        if swiglu_limit is None:
            return F.silu(gate) * up
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * swiglu_alpha))
    return F.gelu(h)


def in_width(d_ff: int, activation: str) -> int:
    """Width of the input projection: SwiGLU projects to gate and up at once (interleaved, see `activate`)."""
    return 2 * d_ff if activation == "swiglu" else d_ff


class MLP(nn.Module):
    """A dense FFN without biases, the same function as one routed expert (residual and shared experts)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", swiglu_limit: float | None = None,
                 swiglu_alpha: float = 1.702):
        super().__init__()
        self.activation = activation
        self.swiglu_limit, self.swiglu_alpha = swiglu_limit, swiglu_alpha
        self.w_in = nn.Linear(d_model, in_width(d_ff, activation), bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in.weight, std=std)
        nn.init.normal_(self.w_out.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation, self.swiglu_limit, self.swiglu_alpha))


class GroupedExperts(nn.Module):
    """This process's routed experts: `w_in` [E_local, d, f or 2f], `w_out` [E_local, f, d]; with `bias`
    (GPT-OSS) also `b_in` [E_local, f or 2f] and `b_out` [E_local, d], added after each projection.

    `w_in`'s SwiGLU columns are interleaved (gate_0, up_0, ...; see `activate`): transformers' GPT-OSS
    `gate_up_proj` [E, d, 2f] (gate at even, up at odd columns) is `w_in` as it is, `gate_up_proj_bias`
    [E, 2f] is `b_in`, `down_proj` [E, f, d] is `w_out`, `down_proj_bias` [E, d] is `b_out` (`gpt_oss_weights`).

    `expert_offset` is the global id of local expert 0; expert parallelism keeps a dim-0 slice of each
    parameter as a DTensor (`distill.parallel.parallelize.shard_experts`, which also swaps the local tensors
    in for the forward). Every expert parameter lives in a module of this class, so a layout can find them.
    """

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu", use_grouped_mm: bool = True,
        bias: bool = False, swiglu_limit: float | None = None, swiglu_alpha: float = 1.702,
    ):
        super().__init__()
        self.activation = activation
        self.swiglu_limit, self.swiglu_alpha = swiglu_limit, swiglu_alpha
        self.use_grouped_mm = use_grouped_mm
        self.expert_offset = 0
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, in_width(d_ff, activation)))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_in = nn.Parameter(torch.zeros(num_experts, in_width(d_ff, activation))) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None

    @property
    def num_local_experts(self) -> int:
        return self.w_in.shape[0]

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std)
        if self.b_in is not None:
            nn.init.zeros_(self.b_in)
            nn.init.zeros_(self.b_out)

    def act(self, h: torch.Tensor) -> torch.Tensor:
        return activate(h, self.activation, self.swiglu_limit, self.swiglu_alpha)

    def grouped_mm_applies(self, x: torch.Tensor) -> bool:
        """grouped_mm needs fp32/bf16/fp16 (bf16 on accelerators) and 16-byte aligned row strides."""
        if not self.use_grouped_mm or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if x.device.type != "cpu" and x.dtype != torch.bfloat16:
            return False
        row_elems = 16 // x.element_size()
        d, f = self.w_out.shape[2], self.w_out.shape[1]
        return d % row_elems == 0 and f % row_elems == 0

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, d] grouped by local expert (`counts` [E_local] rows each, summing to N) -> [N, d]."""
        w_in, w_out, b_in, b_out = self.w_in, self.w_out, self.b_in, self.b_out
        if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's lists
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
            if b_in is not None:
                b_in, b_out = b_in.to(dtype), b_out.to(dtype)
        mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        if self.use_grouped_mm and x.device.type == "cpu" and (
            torch.get_num_threads() > 1 or not self.grouped_mm_applies(x)
        ):  # one thread: grouped_mm's loop in C++ (the same matmuls, less overhead)
            sizes = counts.tolist()
            mm = lambda a, w: grouped_linear(a, w, sizes)  # noqa: E731
        elif self.grouped_mm_applies(x):
            offs = counts.cumsum(0).to(torch.int32)
            mm = lambda a, w: F.grouped_mm(a.contiguous(), w, offs=offs)  # noqa: E731
        if mm is not None:
            h = mm(x, w_in)
            if b_in is not None:
                h = h + b_in.repeat_interleave(counts, dim=0, output_size=x.shape[0])
            out = mm(self.act(h), w_out)
            if out.requires_grad:  # grouped_mm's backward rejects stride-0 (expanded) gradients
                out.register_hook(torch.Tensor.contiguous)
            if b_out is not None:
                out = out + b_out.repeat_interleave(counts, dim=0, output_size=x.shape[0])
            return out
        chunks = x.split(counts.tolist())
        if b_in is None:
            return torch.cat([self.act(xe @ w1) @ w2 for xe, w1, w2 in zip(chunks, w_in.unbind(0), w_out.unbind(0))])
        return torch.cat([
            (self.act(xe @ w1 + c1) @ w2 + c2)
            for xe, w1, w2, c1, c2 in zip(chunks, w_in.unbind(0), w_out.unbind(0), b_in.unbind(0), b_out.unbind(0))
        ])
