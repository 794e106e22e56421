"""Peak temporary memory of one AdamW step: untiled (torch's single-tensor AdamW) vs `TiledAdamW`, and torch's
fused AdamW (the app's choice on CPU without `optim.tile_size`, `distill.train.optim`).

The model is a stack of E experts (w_in [E, d, f], w_out [E, f, d], d = f = 256) plus a dense part
(an embedding and a few matrices, the same for every E). Each measurement runs in a fresh process:
one step creates the optimizer state, then the peak resident memory of a second `opt.step()` alone is
read as the kernel's high-water mark (VmHWM after `echo 5 > /proc/self/clear_refs`) minus the resident
memory just before it. glibc's mmap threshold is pinned at 64 KiB in that process
(`MALLOC_MMAP_THRESHOLD_`), so freed buffers go back to the kernel and each step's temporaries are
faulted in anew instead of reusing pages kept from the first step: the number is what the step
allocates at its peak, to the page. Untiled, denominator buffers dominate: the sqrt and the quotient
of the largest tensor plus the previous tensor's quotient, still referenced (3 * E*d*f*4 bytes here);
tiled, two tiles. The children run one compute thread: memory does not depend on it, and on a loaded
machine every op split over threads waits milliseconds for a descheduled thread, hundreds of times a
step when tiled. The step times printed are that one thread's (median of the repeats).

Recorded (`distill.bench.record`): for each E, the untiled and tiled peaks (MiB) and step times (ms) of every
repeat in the child (`--reps N`: N repeats, default 3); the fused step's too.
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from distill.bench import fmt, record, reps

D = F_HIDDEN = 256
EXPERTS = (8, 32, 128)
TILE = 65536  # elements (256 KiB in fp32)
DENSE = {"embed": (2048, D), "qkv": (D, 3 * D), "proj": (D, D), "norm": (D,)}
REPEATS = 3
FUSED = -1  # `child`'s tile_size for torch's fused AdamW
MIB = float(1 << 20)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def build(num_experts: int) -> torch.nn.Module:
    model = torch.nn.Module()
    for name, shape in DENSE.items():
        model.register_parameter(name, torch.nn.Parameter(torch.randn(shape)))
    model.w_in = torch.nn.Parameter(torch.randn(num_experts, D, F_HIDDEN))
    model.w_out = torch.nn.Parameter(torch.randn(num_experts, F_HIDDEN, D))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def child(num_experts: int, tile_size: int, repeats: int = REPEATS) -> dict[str, object]:
    """In a fresh process: peak RSS increase (bytes) during `opt.step()` once the state exists. `tile_size`:
    > 0 TiledAdamW, 0 torch's single-tensor AdamW, FUSED torch's fused AdamW."""
    from distill.models import configure_optimizer_groups
    from distill.train.tiled_adamw import TiledAdamW

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(num_experts)
    groups = configure_optimizer_groups(model, 0.1)
    if tile_size == FUSED:
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=1e-3, fused=True)
    elif tile_size:
        opt = TiledAdamW(groups, lr=1e-3, tile_size=tile_size)
    else:
        opt = torch.optim.AdamW(groups, lr=1e-3, foreach=False)  # what foreach=None picks on CPU
    opt.step()  # creates exp_avg / exp_avg_sq: from here on only temporaries are allocated
    temps, times = [], []
    for _ in range(repeats):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _status_kb("VmRSS")
        start = time.thread_time()
        opt.step()
        times.append(time.thread_time() - start)
        temps.append(1024 * (_status_kb("VmHWM") - before))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return {"params": params, "largest": largest, "temp": statistics.median(temps),
            "ms": 1e3 * statistics.median(times), "temps": temps, "times_ms": [1e3 * t for t in times]}


def measure(num_experts: int, tile_size: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", THP_MEM_ALLOC_ENABLE="0")
    out = subprocess.run(
        [sys.executable, "-m", "distill.bench.optim", str(num_experts), str(tile_size), str(reps(REPEATS))],
        env=env, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if not os.path.exists("/proc/self/clear_refs"):
        print("skipped: needs Linux /proc/self/clear_refs to read a step's peak resident memory")
        return
    print("AdamW step peak temporary memory (RSS high-water mark during opt.step(), fresh process each);")
    print(f"  E experts of w_in [E,{D},{F_HIDDEN}] + w_out [E,{F_HIDDEN},{D}], plus a fixed dense part "
          f"({sum(torch.Size(s).numel() for s in DENSE.values()) * 4 / MIB:.1f} MiB); fp32")
    print(f"  untiled = torch.optim.AdamW(foreach=False) (torch's CPU default); tiled = TiledAdamW(tile_size={TILE});")
    print("  fused = torch.optim.AdamW(fused=True) (the app's CPU choice without optim.tile_size)")
    header = (f"{'E':>4} {'params MiB':>10} {'largest MiB':>11} {'untiled MiB':>20} {'tiled MiB':>20} "
              f"{'ratio':>6} {'untiled ms':>20} {'tiled ms':>20} {'fused MiB':>10} {'fused ms':>20}")
    print(header)
    print("-" * len(header))
    tiled_peaks = []
    bound = 2 * TILE * 4 + (1 << 20)  # two fp32 tiles (sqrt and quotient) + 1 MiB of slack
    for num_experts in EXPERTS:
        untiled, tiled, fused = measure(num_experts, 0), measure(num_experts, TILE), measure(num_experts, FUSED)
        tiled_peaks.append(tiled["temp"])
        record(f"untiled AdamW step peak temp, E={num_experts}", [t / MIB for t in untiled["temps"]], unit="MiB")
        record(f"tiled AdamW step peak temp, E={num_experts}", [t / MIB for t in tiled["temps"]], unit="MiB",
               goal=f"<= {bound / MIB:.2f} MiB (2 tiles + 1 MiB)")
        record(f"untiled AdamW step ms, E={num_experts}", untiled["times_ms"], unit="ms")
        record(f"tiled AdamW step ms, E={num_experts}", tiled["times_ms"], unit="ms")
        record(f"fused AdamW step peak temp, E={num_experts}", [t / MIB for t in fused["temps"]], unit="MiB")
        record(f"fused AdamW step ms, E={num_experts}", fused["times_ms"], unit="ms")
        print(
            f"{num_experts:>4} {untiled['params'] / MIB:>10.1f} {untiled['largest'] / MIB:>11.1f} "
            f"{fmt([t / MIB for t in untiled['temps']], 2):>20} {fmt([t / MIB for t in tiled['temps']], 2):>20} "
            f"{untiled['temp'] / max(tiled['temp'], 4096):>6.1f} {fmt(untiled['times_ms'], 1):>20} "
            f"{fmt(tiled['times_ms'], 1):>20} {fused['temp'] / MIB:>10.2f} {fmt(fused['times_ms'], 1):>20}",
            flush=True,
        )
    flat = max(tiled_peaks) <= bound
    print(
        f"goal: tiled flat in E (every tiled peak <= 2 tiles + 1 MiB = {bound / MIB:.2f} MiB): "
        f"{'met' if flat else 'NOT met'}; max tiled {max(tiled_peaks) / MIB:.2f} MiB, "
        f"tiled E={EXPERTS[-1]} / E={EXPERTS[0]} = {tiled_peaks[-1] / max(tiled_peaks[0], 4096):.2f}"
    )


if __name__ == "__main__":
    print(json.dumps(child(*(int(a) for a in sys.argv[1:4]))))
