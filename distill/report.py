"""The pipeline's report: one row per model, as Markdown + JSON + a PNG of validation-loss curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLUMNS = ("params_total", "params_active", "val_loss", "val_ppl", "train_tokens_per_s", "gen_tokens_per_s")
HEADERS = ("model", "params (total)", "params (active)", "val loss", "val ppl", "train tok/s", "gen tok/s")
PERCENT = ("vqa_acc", "mc_acc")  # fractions shown as percentages (and recall@k: i2t_*, t2i_*)


def _fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key in PERCENT or key.startswith(("i2t_", "t2i_")):
        return f"{100 * v:.1f}%"
    if key.startswith("params"):
        return f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,}"
    if key.endswith("tokens_per_s"):
        return f"{v:,.0f}"
    return f"{v:.4f}" if key.startswith(("val_", "test_")) and not key.endswith("_ppl") else f"{v:.2f}"


def markdown_table(models: dict[str, dict[str, Any]], columns: tuple[str, ...] = COLUMNS,
                   headers: tuple[str, ...] = HEADERS) -> str:
    """One row per model; ``headers`` names the model column, then each of ``columns``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, row in models.items():
        lines.append("| " + " | ".join([name] + [_fmt(k, row.get(k)) for k in columns]) + " |")
    return "\n".join(lines)


def plot_curves(
    curves: dict[str, list[tuple[int, float]]], path: Path, title: str, markers: dict[str, int] | None = None,
    ylabel: str = "validation loss (nats/token)",
) -> Path:
    """Validation-loss curves (or any per-step curves); ``markers`` draws a labelled vertical line per step
    (e.g. the KD stop)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, points in curves.items():
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, marker="o", markersize=3, label=name)
    for label, step in (markers or {}).items():
        ax.axvline(step, color="grey", linestyle="--", linewidth=1)
        ax.annotate(label, (step, 0.98), xycoords=("data", "axes fraction"), ha="right", va="top",
                    rotation=90, fontsize=8, color="grey")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(
    out_dir: Path, models: dict[str, dict[str, Any]], curves: dict[str, list[tuple[int, float]]],
    notes: list[str] | None = None, markers: dict[str, int] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md and val_loss.png into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {name: {k: row.get(k) for k in (*COLUMNS, *[k for k in row if k not in COLUMNS])}
            for name, row in models.items()}
    png = plot_curves(curves, out_dir / "val_loss.png", "Mixture-of-Students: validation loss", markers)
    payload = {"models": rows, "val_curves": {k: [list(p) for p in v] for k, v in curves.items()},
               "notes": notes or []}
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2, default=float))
    # the pipeline's `evaluate=true` columns, when its models have them
    extra = [(k, h) for k, h in (("test_loss", "test loss"), ("test_ppl", "test ppl"), ("mc_acc", "MC acc"))
             if any(k in row for row in models.values())]
    table = markdown_table(models, COLUMNS + tuple(k for k, _ in extra), HEADERS + tuple(h for _, h in extra))
    md = ["# distill report", "", table, ""]
    md += [f"- {n}" for n in notes or []]
    md += ["", f"![validation loss]({png.name})", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    return {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": png}
