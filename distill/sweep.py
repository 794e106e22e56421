"""Sweeps: the report of a Hydra multirun.

    python -m distill.sweep multirun/kd_stop_2026-01-31_12-00-00 [--metric val_loss] [--x kd.stop_fraction]

reads every job of the multirun (``<job>/.hydra/overrides.yaml`` and the ``summary.json`` each stage
writes, see distill/tracking/summary.py), prints one table of every run's overrides and final metrics sorted
by the metric, and writes ``sweep_report.md``, ``sweep_report.json`` and ``sweep_report.png`` (the metric
against the swept parameter) into the multirun directory. ``--wandb`` also logs the table and the plot
as a run of the sweep's wandb group.

The Hydra callback that writes this report when a multirun ends (and keeps cluster sweeps consistent) is
:class:`distill.sweep_callback.SweepCallback`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import ConfigError, exit_on_config_error

REPORT = "sweep_report"
# Metric columns of the report, in this order, when any run has them.
METRICS = ("val_loss", "best_val_loss", "val_ppl", "step", "val_kl_teacher", "val_top1_agree",
           "train_tokens_per_s", "params_total", "params_active")
SKIP_DIRS = {"wandb", ".submitit", ".hydra", "checkpoints", "export", "csv"}


@dataclass
class Run:
    """One stage of one job of a sweep."""

    job: str  # the job's directory, relative to the sweep directory
    overrides: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)  # empty: no summary.json (failed or not started)

    @property
    def stage(self) -> str:
        return str(self.summary.get("stage", "-"))

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "missing"))

    def get(self, key: str) -> Any:
        return self.summary.get(key)


def parse_override(text: str) -> tuple[str, str]:
    """``key=value`` (also ``+key=value``, ``++key=value``, ``~key``) -> (key, value)."""
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Directories under ``sweep_dir`` that hold a Hydra job (``.hydra/overrides.yaml``), in job order."""
    found = [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")
             if not SKIP_DIRS.intersection(p.relative_to(sweep_dir).parts[:-2])]

    def order(p: Path) -> tuple:
        rel = p.relative_to(sweep_dir).parts
        return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in rel)

    return sorted(found, key=order)


def stage_summaries(job_dir: Path) -> list[Path]:
    """The job's summary.json files: one per stage (the job itself, or a pipeline's stage directories)."""
    out = []
    for path in sorted(job_dir.rglob("summary.json")):
        rel = path.relative_to(job_dir).parts[:-1]
        if not SKIP_DIRS.intersection(rel):
            out.append(path)
    return out


def collect_runs(sweep_dir: Path) -> list[Run]:
    import yaml

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError("multirun_dir", f"{sweep_dir} is not a directory.",
                          "pass the multirun's directory (hydra.sweep.dir), e.g. multirun/kd_stop_<date>.")
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise ConfigError("multirun_dir", f"no Hydra job (.hydra/overrides.yaml) under {sweep_dir}.",
                          "pass the directory of a multirun started with -m.")
    runs = []
    for job in jobs:
        overrides = dict(parse_override(o) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or [])
        rel = str(job.relative_to(sweep_dir)) or "."
        summaries = stage_summaries(job)
        if not summaries:
            runs.append(Run(rel, overrides))
        for path in summaries:
            try:
                summary = json.loads(path.read_text())
            except ValueError:
                summary = {"status": "unreadable"}
            runs.append(Run(rel, overrides, summary))
    return runs


def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between jobs (in the order they first appear)."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.overrides if k not in keys]
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def sort_runs(runs: list[Run], metric: str) -> list[Run]:
    def key(r: Run) -> tuple:
        v = r.get(metric)
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return (not ok, v if ok else 0.0)

    return sorted(runs, key=key)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4f}"
    return str(v)


def report_columns(runs: list[Run]) -> tuple[list[str], list[str]]:
    """(override columns, metric columns) of the table."""
    swept = swept_keys(runs)
    keys = swept or list(dict.fromkeys(k for r in runs for k in r.overrides))
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in runs)]
    return keys, metrics


def markdown_table(runs: list[Run], keys: list[str], metrics: list[str]) -> str:
    head = ["job", "stage", "status", *keys, *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r.job, r.stage, r.status, *[r.overrides.get(k, "-") for k in keys], *[_fmt(r.get(m)) for m in metrics]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "null") else None
    except ValueError:
        return None


def plot_metric(runs: list[Run], x: str | None, metric: str, path: Path, title: str) -> Path:
    """The metric against the swept parameter ``x``: one line per stage and value of the other swept keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = swept_keys(runs)
    others = [k for k in swept if k != x]
    done = [r for r in runs if isinstance(r.get(metric), (int, float)) and math.isfinite(r.get(metric))]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if x is None:  # nothing swept: one bar per run
        ax.bar([f"{r.job}:{r.stage}" for r in done], [r.get(metric) for r in done])
        ax.set_xlabel("run")
    else:
        labels = list(dict.fromkeys(r.overrides.get(x, "-") for r in runs))
        numeric = all(_number(v) is not None for v in labels)
        series: dict[str, list[tuple[float, float]]] = {}
        for r in done:
            name = ", ".join([r.stage] * (len({q.stage for q in runs}) > 1) + [f"{k}={r.overrides.get(k, '-')}" for k in others])
            xv = _number(r.overrides.get(x)) if numeric else labels.index(r.overrides.get(x, "-"))
            series.setdefault(name or metric, []).append((xv, r.get(metric)))
        for name, points in series.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=name)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set_xlabel(x)
        if len(series) > 1:
            ax.legend(fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_sweep_report(sweep_dir: Path, metric: str = "val_loss", x: str | None = None) -> dict[str, Any]:
    """Write sweep_report.{md,json,png} into ``sweep_dir``; returns their paths and the Markdown table."""
    sweep_dir = Path(sweep_dir)
    runs = sort_runs(collect_runs(sweep_dir), metric)
    keys, metrics = report_columns(runs)
    swept = swept_keys(runs)
    if x is not None and x not in swept:
        raise ConfigError("--x", f"{x!r} is not a swept key of this multirun.",
                          f"use one of {', '.join(swept) or '(none: nothing varies)'}.")
    x = x or (swept[0] if swept else None)
    common = {k: v for k, v in runs[0].overrides.items() if k not in swept}
    table = markdown_table(runs, keys, metrics)
    png = plot_metric(runs, x, metric, sweep_dir / f"{REPORT}.png", f"{sweep_dir.name}: {metric}")
    md = [f"# sweep {sweep_dir.name}", "", f"{len({r.job for r in runs})} jobs, sorted by {metric}.", ""]
    if common:
        md += ["Common overrides: " + " ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    md += [table, "", f"![{metric} vs {x or 'run'}]({png.name})", ""]
    from distill.claims import study_claims, write_claims

    if study_claims(sweep_dir) == "paper":  # conf/study/paper_claims.yaml: mean +- std per model, each claim checked
        md += [write_claims(sweep_dir)["md"]]
    (sweep_dir / f"{REPORT}.md").write_text("\n".join(md))
    payload = {"sweep_dir": str(sweep_dir), "metric": metric, "x": x, "swept": swept, "common": common,
               "runs": [{"job": r.job, "stage": r.stage, "status": r.status, "overrides": r.overrides,
                         **{k: v for k, v in r.summary.items() if k not in ("stage", "status", "metrics")}}
                        for r in runs]}
    (sweep_dir / f"{REPORT}.json").write_text(json.dumps(payload, indent=2) + "\n")
    return {"md": sweep_dir / f"{REPORT}.md", "json": sweep_dir / f"{REPORT}.json", "png": png,
            "table": table, "runs": runs, "columns": (keys, metrics)}


def log_sweep_to_wandb(sweep_dir: Path, report: dict[str, Any]) -> None:
    """The sweep table and plot as a ``sweep_report`` run in the sweep's wandb group (offline by default)."""
    from omegaconf import OmegaConf

    from distill.tracking import log_report

    sweep_dir = Path(sweep_dir)
    runs: list[Run] = report["runs"]
    first = sweep_dir / runs[0].job / ".hydra" / "config.yaml"
    lcfg = OmegaConf.load(first).logger
    if lcfg.group is None:
        OmegaConf.update(lcfg, "group", sweep_dir.name, force_add=True)
    keys, metrics = report["columns"]
    rows = [[r.job, r.stage, r.status, *[r.overrides.get(k) for k in keys], *[r.get(m) for m in metrics]] for r in runs]
    best = runs[0]
    log_report(lcfg, sweep_dir, job_type="sweep_report", name="sweep_report",
               table=(["job", "stage", "status", *keys, *metrics], rows), images={"plot": report["png"]},
               summary={"best_job": best.job, "best_val_loss": best.get("val_loss"), "jobs": len({r.job for r in runs})})


@exit_on_config_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m distill.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", type=Path, help="the multirun's directory (hydra.sweep.dir)")
    parser.add_argument("--metric", default="val_loss", help="sort by and plot this summary key (default val_loss)")
    parser.add_argument("--x", default=None, help="the swept key on the plot's x axis (default: the first one)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plot to the sweep's wandb group")
    args = parser.parse_args(argv)
    report = write_sweep_report(args.multirun_dir, args.metric, args.x)
    if args.wandb:
        log_sweep_to_wandb(args.multirun_dir, report)
    print(report["table"])
    print(f"\nreport: {report['md']}  {report['json'].name}  {report['png'].name}", flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
