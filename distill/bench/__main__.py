"""`python -m distill.bench [section ...] [--out bench.json] [--compare old.json] [--reps N]`.

Runs the benchmark sections (all of SECTIONS by default) with framework banners, warnings and progress bars
silenced, then prints a summary of every figure that has a goal. The figures (`distill.bench.record`) go to
`--out` (default bench.json; written atomically), laid out as

    {"schema": 1, "machine": {torch, python, platform, threads, cpus, cpus_usable, loadavg_start, loadavg_end,
                              date, git_commit, cuda_device, argv, reps},
     "sections": {section: {figure: {median, min, max, spread, max_dev, n, samples, unit, goal, better, met}}},
     "errors": {section: "ExceptionType: message"}}

`--compare old.json` then prints, for each figure in both files, the old and new medians, new/old, and
better / worse (by the figure's `better`) or "within spread" (a change no larger than either run's max_dev).
An unknown section or an unreadable --compare file exits with status 2 before anything runs; a section that
raises is reported, the others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import distill.bench as bench

# modules of distill.bench with a main(); add yours here
SECTIONS = ["moe", "train", "targets", "generation", "parallel", "optim", "alltoall", "gpu"]
QUIET_ENV = {  # inherited by the processes sections start (workers, children)
    "PYTHONWARNINGS": "ignore",
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "DATASETS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "GLOG_minloglevel": "2",
    "WANDB_SILENT": "true",
    # Lightning reads Trainer defaults from PL_TRAINER_<ARG> (an explicit argument still wins): no progress
    # bar, no model summary (with `rich` installed its summary is printed, not logged)
    "PL_TRAINER_ENABLE_PROGRESS_BAR": "False",
    "PL_TRAINER_ENABLE_MODEL_SUMMARY": "False",
}
QUIET_LOGGERS = (
    "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric",
    "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda", "lightning.pytorch.callbacks.model_summary",
    "torch.distributed", "datasets", "transformers", "distill",
)


def quiet() -> None:
    """Silence Lightning's banners ('GPU available', 'LOCAL_RANK', summaries), warnings and progress bars.
    Called again after each section is imported: importing Lightning resets its loggers to INFO and adds
    its own warning filters."""
    os.environ.update(QUIET_ENV)
    warnings.filterwarnings("ignore")
    warnings.showwarning = lambda *args, **kwargs: None
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def git_commit() -> str | None:
    """The checked-out commit, read from .git (no git process); None outside a checkout."""
    root = Path(__file__).resolve().parents[2] / ".git"
    try:
        if root.is_file():  # a worktree: "gitdir: <path>"
            root = Path(root.read_text().split(":", 1)[1].strip())
        head = (root / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (root / ref).exists():
            return (root / ref).read_text().strip()
        common = Path((root / "commondir").read_text().strip()) if (root / "commondir").exists() else root
        common = common if common.is_absolute() else root / common
        for src in (common / ref, common / "packed-refs"):
            if src.name == "packed-refs" and src.exists():
                for line in src.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
            elif src.exists():
                return src.read_text().strip()
    except (OSError, IndexError):
        return None
    return None


def machine_info() -> dict[str, Any]:
    import platform

    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_start": list(os.getloadavg()), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(), "cuda_device": cuda,
    }


def _finite(x: Any) -> Any:
    """NaN and infinities (not JSON) as null, everywhere in `x`."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` atomically: a temporary file in the same directory, then a rename."""
    data = _finite(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False, default=float)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("sections"), dict):
        raise ValueError("not a bench.json (no 'sections' object)")
    return data


def _table(head: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns as wide as their widest cell; the columns in `right` right-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [line(head), "  " + "-" * (sum(widths) + 2 * len(widths) - 2), *(line(r) for r in rows)]


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The table of --compare: each figure in both runs, old median, new median, new/old and which way
    ("within spread" when the change is no larger than either run's farthest sample from its median)."""
    rows = []
    for section, figures in new["sections"].items():
        for name, s in figures.items():
            o = old["sections"].get(section, {}).get(name)
            if o is None:
                continue
            ratio = s["median"] / o["median"] if o["median"] else float("nan")
            noise = max(o.get("max_dev") or 0.0, s.get("max_dev") or 0.0)  # either run's farthest sample
            if ratio != ratio or abs(ratio - 1) < 1e-9:
                way = ""
            elif abs(ratio - 1) <= noise:
                way = "within spread"
            else:
                way = "better" if (ratio < 1) == (s.get("better", "lower") == "lower") else "worse"
            rows.append([f"{section}: {name}", f"{o['median']:.4g}", f"{s['median']:.4g}", f"{ratio:.3f}", way])
    if not rows:
        return "compare: no figure is in both runs"
    when = old.get("machine", {}).get("date", "?")
    return "\n".join([f"== compare with the run of {when} (medians; new/old) ==",
                      *_table(["figure", "old", "new", "new/old", ""], rows, {1, 2, 3})])


def summary(sections: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One line per figure that has a goal: median, spread (max deviation from the median), goal, met."""
    rows = []
    for section, figures in sections.items():
        for name, s in figures.items():
            if s.get("goal"):
                met = {True: "met", False: "NOT met", None: "?"}[s.get("met")]
                rows.append([f"{section}: {name}", bench.fmt_stats(s), s.get("unit") or "", s["goal"], met])
    if not rows:
        return ""
    return "\n".join(["== summary: goals ==", *_table(["figure", "median (±max dev, n)", "unit", "goal", "result"],
                                                        rows, {1})])


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distill.bench", description=__doc__.split("\n")[0])
    p.add_argument("sections", nargs="*", metavar="section", help=f"any of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="results file (default: bench.json)")
    p.add_argument("--compare", type=Path, metavar="OLD_JSON", help="print new/old of each figure in both runs")
    p.add_argument("--reps", type=int, metavar="N", help="repeats per figure (default: each section's own)")
    args = p.parse_args(argv)
    unknown = [n for n in args.sections if n not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    if args.compare is not None:
        try:
            args.old = load_results(args.compare)
        except (OSError, ValueError) as e:
            p.error(f"--compare {args.compare}: {e}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    quiet()
    bench.REPS = args.reps
    info = {**machine_info(), "argv": argv, "reps": args.reps}
    errors: dict[str, str] = {}
    for name in args.sections or SECTIONS:
        print(f"== {name} ==", flush=True)
        bench.begin_section(name)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"distill.bench.{name}")
            quiet()
            module.main()
        except (Exception, SystemExit) as e:  # one broken section must not hide the others' figures
            traceback.print_exc(file=sys.stderr)
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"section {name} FAILED: {errors[name]}", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)\n", flush=True)
    info["loadavg_end"] = list(os.getloadavg())
    data = {"schema": 1, "machine": info, "sections": {k: v for k, v in bench.results.items() if v},
            "errors": errors}
    write_json(args.out, data)
    text = summary(data["sections"])
    if text:
        print(text)
    if errors:
        print(f"\nFAILED sections (no figures, traceback on stderr): {', '.join(errors)}")
    if args.compare is not None:
        print("\n" + compare(args.old, data))
    print(f"\nresults written to {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
