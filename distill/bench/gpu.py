"""One GPU: the paper's 350M PR-MoE teacher (conf/model/350m_prmoe32_64.yaml) in bf16 autocast (fp32 weights).

1. fwd+bwd tokens/s of the teacher (forward, LM loss + aux loss, backward; no optimizer step) and its model
   FLOPs utilisation: MFU = (6 * active matmul params + 12 * layers * d_model * seq) * tokens/s / peak, the
   PaLM appendix-B count (attention scores and values, fwd+bwd, not halved for the causal mask); active
   params: `GPT.num_active_params` (top_k experts per MoE layer) without the input embedding when it is
   not tied to the head (a lookup, no matmul). Peak: dense bf16 by `torch.cuda.get_device_name` (PEAK_TFLOPS;
   BENCH_GPU_PEAK_TFLOPS overrides it). Peak memory: `torch.cuda.max_memory_allocated` over the warm-up and
   timed steps.
2. The KD-on ratio: `DistillModule.training_step` + backward (the student derived by `students.mos.derive_student`,
   the same 350M as its bf16 teacher) over `LMModule.training_step` + backward of the same student, interleaved
   step by step, next to theory: 1 + `DistillModule.teacher_outputs` / (`LMModule.lm_terms` + backward).

Sizes from the environment: BENCH_GPU_BATCH (8), BENCH_GPU_SEQ (2048), BENCH_GPU_STEPS (timed steps, 10;
`--reps N` overrides), BENCH_GPU_WARMUP (3), BENCH_GPU_MODEL (a conf/model yaml), BENCH_GPU_KD=0 skips part 2.
Without CUDA the section prints one line and records nothing; BENCH_GPU_ON_CPU=1 (for tests) runs the same
code on the CPU with conf/model/tiny.yaml and tiny sizes.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distill.bench import fmt, ratios, record, reps, time_interleaved

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
PEAK_TFLOPS = {  # dense bf16 tensor-core peaks (no sparsity), by a substring of the device name
    "H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "B100": 1750.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "A10": 125.0, "L4": 121.0, "A6000": 155.0,
}
GIB = float(1 << 30)


def setting(name: str, default: int) -> int:
    return int(os.environ.get(f"BENCH_GPU_{name}", default))


def peak_flops(device_name: str) -> float | None:
    if "BENCH_GPU_PEAK_TFLOPS" in os.environ:
        return 1e12 * float(os.environ["BENCH_GPU_PEAK_TFLOPS"])
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "GH200" before "H200", "L40S" before "L40"
        if key in device_name:
            return 1e12 * PEAK_TFLOPS[key]
    return None


def flops_per_token(model, seq: int) -> float:
    """Training (fwd+bwd) FLOPs per token: 6 * active matmul params + 12 * layers * d_model * seq."""
    active = model.num_active_params()
    if model.lm_head.weight is not model.wte.weight:
        active -= model.wte.weight.numel()
    return 6.0 * active + 12.0 * model.cfg.n_layers * model.cfg.d_model * seq


def load_cfg(path: Path, vocab: int | None = None):
    from distill.models import ModelConfig

    d = OmegaConf.to_container(OmegaConf.load(path))
    if vocab is not None:
        d["vocab_size"] = vocab
    return ModelConfig.from_dict(d).validate()


def quiet_module(module) -> None:
    """Let `training_step` run without a Trainer: no logging, never a logging step."""
    module.log = lambda *args, **kwargs: None
    module.is_logging_step = lambda: False


def main() -> None:
    on_cpu = os.environ.get("BENCH_GPU_ON_CPU") == "1"
    if not on_cpu and not torch.cuda.is_available():
        print("gpu: skipped (no CUDA device)")
        return
    dev = torch.device("cpu" if on_cpu else "cuda")
    name = "cpu (BENCH_GPU_ON_CPU=1: a test of the code path, not a GPU figure)" if on_cpu else (
        torch.cuda.get_device_name(dev))
    model_path = Path(os.environ.get("BENCH_GPU_MODEL", CONF_DIR / ("tiny.yaml" if on_cpu else "350m_prmoe32_64.yaml")))
    batch, seq = setting("BATCH", 2 if on_cpu else 8), setting("SEQ", 64 if on_cpu else 2048)
    steps, warmup = reps(setting("STEPS", 2 if on_cpu else 10)), setting("WARMUP", 1 if on_cpu else 3)
    cfg = load_cfg(model_path, 512 if on_cpu else None)
    tokens = batch * seq
    print(f"{name}; model {cfg.name} ({model_path.name}), bf16 autocast over fp32 weights; batch {batch} x {seq} "
          f"tokens; {warmup} warm-up + {steps} timed steps (median, spread = farthest step from it)")
    throughput(cfg, dev, name, batch, seq, steps, warmup, tokens)
    if os.environ.get("BENCH_GPU_KD", "1") != "0":
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        kd_ratio(cfg, dev, batch, seq, steps, warmup)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def throughput(cfg, dev, name, batch, seq, steps, warmup, tokens) -> None:
    from distill.losses import lm_loss
    from distill.models import GPT

    torch.manual_seed(0)
    with torch.device(dev):
        model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = model(ids[:, :-1])
            loss = lm_loss(out.logits, ids[:, 1:]) + 0.01 * out.aux_loss
        loss.backward()
        sync(dev)

    def setup() -> None:
        model.zero_grad(set_to_none=True)
        sync(dev)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = time_interleaved({"step": step}, reps=steps, warmup=warmup, setup=setup)["step"]
    tps = [tokens / t for t in times]
    record(f"fwd+bwd tokens/s ({cfg.name}, batch {batch} x {seq})", tps, unit="tokens/s", better="higher")
    fpt = flops_per_token(model, seq)
    peak = peak_flops(name) if dev.type == "cuda" else None
    print(f"  params {model.num_params() / 1e9:.3f}B, active {model.num_active_params() / 1e9:.3f}B; "
          f"{fpt / 1e9:.2f} GFLOPs per token (fwd+bwd)")
    print(f"  fwd+bwd: {fmt(tps, 0)} tokens/s, {fmt([1e3 * t for t in times], 1)} ms/step")
    if peak is not None:
        mfu = [100 * fpt * x / peak for x in tps]
        record("MFU (bf16, fwd+bwd)", mfu, unit="%", better="higher")
        print(f"  MFU: {fmt(mfu, 1)} % of {peak / 1e12:.0f} TFLOPS dense bf16")
    else:
        print(f"  MFU: no bf16 peak known for {name!r} (set BENCH_GPU_PEAK_TFLOPS)")
    if dev.type == "cuda":
        mem = torch.cuda.max_memory_allocated(dev) / GIB
        record("peak memory, fwd+bwd", [mem], unit="GiB")
        print(f"  peak memory (max_memory_allocated): {mem:.1f} GiB")


def kd_ratio(cfg, dev, batch, seq, steps, warmup) -> None:
    from distill.config import OptimConfig
    from distill.kd import KDConfig, KDSchedule
    from distill.models import GPT
    from distill.train.distill_module import DistillModule
    from distill.train.lm_module import LMModule
    from students.config import StudentConfig
    from students.mos import derive_student

    student_cfg = derive_student(cfg, StudentConfig())
    torch.manual_seed(1)
    with torch.device(dev):
        teacher = GPT(cfg).to(torch.bfloat16)
    max_steps = 10 * (steps + warmup + 2)
    with torch.device(dev):  # built in place; .to(dev) then sets the modules' `device`
        base = LMModule(student_cfg, OptimConfig(), max_steps).to(dev)
        kd = DistillModule(student_cfg, OptimConfig(), KDSchedule(KDConfig(), max_steps),
                           teacher_loader=lambda: teacher).to(dev)
    kd.model = base.model  # one student for both steps: half the memory, the same weights
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    for m in (base, kd):
        quiet_module(m)
    kd.ensure_teacher()
    batch_ = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)}

    def run(fn):
        def timed() -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = fn()
            if loss is not None:
                loss.backward()
            sync(dev)
        return timed

    def teacher_forward() -> None:
        kd.teacher_outputs(batch_["input_ids"][:, :-1])

    def setup() -> None:
        base.zero_grad(set_to_none=True)
        kd.zero_grad(set_to_none=True)
        sync(dev)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time_interleaved({
        "kd": run(lambda: kd.training_step(batch_, 0)),
        "student": run(lambda: base.training_step(batch_, 0)),
        "lm_terms": run(lambda: base.lm_terms(batch_)[0]["loss"]),
        "teacher": run(teacher_forward),
    }, reps=steps, warmup=warmup, setup=setup)
    theory = [1 + r for r in ratios(t["teacher"], t["lm_terms"])]
    th = record("KD-on theory: 1 + teacher fwd / student fwd+bwd", theory)
    measured = ratios(t["kd"], t["student"])
    on = record("distillation / student-only step, KD on (fwd+bwd)", measured, goal=f"within 5% of {th:.3f} (theory)")
    print(f"  student {student_cfg.name} ({student_cfg.n_layers} layers), teacher {cfg.name} in bf16; steps "
          "interleaved")
    print(f"  distillation step / student-only step (fwd+bwd): {fmt(measured)}; theory "
          f"{fmt(theory)}; measured / theory {on / th:.3f} (goal: within 5%)")
    print(f"  student-only step {fmt([1e3 * x for x in t['student']], 1)} ms, distillation step "
          f"{fmt([1e3 * x for x in t['kd']], 1)} ms, teacher forward {fmt([1e3 * x for x in t['teacher']], 1)} ms")
    if dev.type == "cuda":
        mem = torch.cuda.max_memory_allocated(dev) / GIB
        record("peak memory, KD steps (bf16 teacher + student)", [mem], unit="GiB")
        print(f"  peak memory with the bf16 teacher and the student (max_memory_allocated): {mem:.1f} GiB")
