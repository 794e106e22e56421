"""The DeepSpeed-MoE paper's claims, checked on a multirun of the `paper_claims` study over seeds.

    python -m distill.claims multirun/paper_claims_<date>

reads each job's pipeline report (``<job>/report.json``; one job per seed, conf/sweep/paper_claims.yaml), and
writes ``claims.md`` and ``claims.json`` into the multirun directory (also called by the sweep report when the
study's ``claims`` is ``paper``): per model, the mean and standard deviation over seeds of the validation and test
loss and of the quality kept relative to the teacher, then each claim with its difference, two standard errors
of that difference (paired by seed: the same data order and teacher) and a verdict:

1. PR-MoE (`teacher`) reaches the quality of a standard top-2 MoE (`standard_moe`) with fewer expert parameters: a
   non-inferiority claim, held when its val loss is at most `MARGIN` nats (1% perplexity) worse beyond noise
   (mean + 2 SE <= MARGIN), not held when it is worse beyond noise (mean - 2 SE > 0), inconclusive otherwise.
2. A Mixture-of-Students at 87.5% of the teacher's depth with staged KD keeps >= 99% of the teacher's quality
   (quality kept = teacher perplexity / student perplexity = exp(loss_teacher - loss_student)).
3. Staged KD beats KD kept to the end (each stop point and depth against the same student with full KD).

A difference "exceeds noise" when |mean| > 2 SE, SE = std(paired differences) / sqrt(seeds).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from distill.errors import ConfigError, exit_on_config_error

TEACHER, BASELINE = "teacher", "standard_moe"
KEEP = 0.99  # the paper's Mixture-of-Students keeps 99% of its teacher's quality
MARGIN = -math.log(KEEP)  # claim 1's non-inferiority margin in nats: the same 1% of perplexity


def job_reports(sweep_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{seed: {model: its row of report.json}} of every finished job of the multirun."""
    import yaml

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for report in sorted(Path(sweep_dir).glob("*/report.json")):
        cfg = report.parent / ".hydra" / "config.yaml"
        seed = str(yaml.safe_load(cfg.read_text()).get("seed")) if cfg.is_file() else report.parent.name
        out[seed] = json.loads(report.read_text())["models"]
    if not out:
        raise ConfigError("multirun_dir", f"no job of {sweep_dir} has a report.json (no pipeline job finished).",
                          "pass the directory of a `make science` multirun once a job has finished.")
    return out


def _stats(xs: list[float]) -> dict[str, float]:
    n = len(xs)
    mean = statistics.fmean(xs) if xs else math.nan
    std = statistics.stdev(xs) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "se": std / math.sqrt(n) if n > 1 else math.nan}


def _paired(jobs: dict[str, dict[str, dict[str, Any]]], a: str, b: str, key: str = "val_loss") -> dict[str, float]:
    """Stats of a - b over the seeds that have both (a's metric minus b's)."""
    d = [m[a][key] - m[b][key] for m in jobs.values() if a in m and b in m and m[a].get(key) is not None
         and m[b].get(key) is not None]
    return _stats(d)


def _exceeds(s: dict[str, float]) -> bool:
    return s["n"] > 1 and abs(s["mean"]) > 2 * s["se"]


def per_model(jobs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per model (in the reports' order): mean/std of val and test loss, quality kept, parameters."""
    names = list(dict.fromkeys(n for m in jobs.values() for n in m))
    rows = {}
    for name in names:
        got = [m[name] for m in jobs.values() if name in m]
        row: dict[str, Any] = {k: _stats([g[k] for g in got if g.get(k) is not None]) for k in ("val_loss", "test_loss")}
        row["kept"] = _stats([math.exp(m[TEACHER]["val_loss"] - m[name]["val_loss"]) for m in jobs.values()
                              if name in m and TEACHER in m])
        row["params_total"] = got[0].get("params_total")
        row["params_experts"] = got[0].get("params_experts")
        rows[name] = row
    return rows


def check_claims(jobs: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each claim: what was compared, the paired difference (mean, 2 SE), and the verdict."""
    rows = per_model(jobs)
    claims: list[dict[str, Any]] = []
    if TEACHER in rows and BASELINE in rows:
        d = _paired(jobs, TEACHER, BASELINE)
        fewer = (rows[TEACHER]["params_experts"] or 0) < (rows[BASELINE]["params_experts"] or 0)
        worse = _exceeds(d) and d["mean"] > 0
        close = d["n"] > 1 and d["mean"] + 2 * d["se"] <= MARGIN
        verdict = "did not hold" if worse or not fewer else "held" if close else "inconclusive"
        claims.append({"claim": 1, "what": "PR-MoE val loss - standard top-2 MoE val loss", "diff": d,
                       "exceeds_2se": _exceeds(d), "verdict": verdict,
                       "detail": f"expert parameters {rows[TEACHER]['params_experts']:,} vs "
                                 f"{rows[BASELINE]['params_experts']:,}; PR-MoE "
                                 + ("worse beyond noise" if worse else "better beyond noise" if _exceeds(d)
                                    else "within noise") + f"; held needs mean + 2 SE <= {MARGIN:.4f}"})
    for name in [n for n in rows if re.fullmatch(r"mos\d+_kd\d+", n)]:
        kept = rows[name]["kept"]
        below = kept["n"] > 1 and kept["mean"] + 2 * kept["se"] < KEEP
        verdict = "held" if kept["mean"] >= KEEP else "did not hold" if below else "inconclusive"
        claims.append({"claim": 2, "what": f"{name}: quality kept (teacher ppl / student ppl)", "diff": kept,
                       "exceeds_2se": below or (kept["n"] > 1 and kept["mean"] - 2 * kept["se"] > KEEP),
                       "verdict": verdict, "detail": f"goal >= {KEEP:.2f}"})
    for name in rows:
        m = re.fullmatch(r"(mos\d+)_kd(\d+)(_decay)?", name)
        if not m or f"{m.group(1)}_kd_full" not in rows:
            continue
        d = _paired(jobs, name, f"{m.group(1)}_kd_full")
        verdict = ("held" if _exceeds(d) and d["mean"] < 0 else "did not hold" if _exceeds(d) else "inconclusive")
        claims.append({"claim": 3, "what": f"{name} val loss - {m.group(1)}_kd_full val loss", "diff": d,
                       "exceeds_2se": _exceeds(d), "verdict": verdict,
                       "detail": "staged better" if d["mean"] < 0 else "full KD better"})
    for name in rows:  # context: what KD itself gives each student (not a claim of the paper's)
        m = re.fullmatch(r"(mos\d+)_kd(\d+|_full)", name)
        if m and f"{m.group(1)}_no_kd" in rows:
            d = _paired(jobs, name, f"{m.group(1)}_no_kd")
            claims.append({"claim": "kd", "what": f"{name} val loss - {m.group(1)}_no_kd val loss", "diff": d,
                           "exceeds_2se": _exceeds(d), "verdict": "KD helps" if _exceeds(d) and d["mean"] < 0
                           else "KD hurts" if _exceeds(d) else "within noise", "detail": "not a claim: context"})
    return claims


def _pm(s: dict[str, float], digits: int = 4) -> str:
    if s["n"] == 0:
        return "-"
    std = "" if math.isnan(s["std"]) else f" ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{std}"


def claims_markdown(jobs: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows, claims = per_model(jobs), check_claims(jobs)
    md = [f"## The paper's claims ({len(jobs)} seeds: {', '.join(sorted(jobs))}; mean ± std)", "",
          "| model | val loss | test loss | quality kept vs teacher | params (total) | params (experts) |",
          "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {_pm(r['val_loss'])} | {_pm(r['test_loss'])} | {_pm(r['kept'], 4)} | "
                  f"{r['params_total'] or 0:,} | {r['params_experts'] or 0:,} |")
    md += ["", "| claim | compared | mean ± 2 SE (paired by seed) | beyond 2 SE | verdict | |", "|---|---|---|---|---|---|"]
    if TEACHER in rows and any(r["kept"]["n"] and r["kept"]["mean"] > 1 for n, r in rows.items() if n != TEACHER):
        md.insert(1, "\nNote: some students beat their teacher (quality kept > 1): the teacher is weaker than what it "
                     "teaches at this budget, so claim 2 says little here; compare each KD student with its no-KD twin.")
    for c in claims:
        d = c["diff"]
        sign = "+" if c["claim"] != 2 else ""  # claim 2 compares a ratio with 0.99, the others are differences
        md.append(f"| {c['claim']} | {c['what']} | {d['mean']:{sign}.4f} ± {2 * d['se']:.4f} | "
                  f"{'yes' if c['exceeds_2se'] else 'no'} | {c['verdict']} | {c['detail']} |")
    return "\n".join(md) + "\n"


def write_claims(sweep_dir: Path) -> dict[str, Any]:
    """claims.md and claims.json in ``sweep_dir``; returns the Markdown and the paths."""
    sweep_dir = Path(sweep_dir)
    jobs = job_reports(sweep_dir)
    md = claims_markdown(jobs)
    (sweep_dir / "claims.md").write_text(md)
    payload = {"seeds": sorted(jobs), "models": per_model(jobs), "claims": check_claims(jobs)}
    (sweep_dir / "claims.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return {"md": md, "paths": [sweep_dir / "claims.md", sweep_dir / "claims.json"]}


def study_claims(sweep_dir: Path) -> str | None:
    """The study's `claims` setting of the multirun's first job (None when it has none)."""
    import yaml

    for cfg in sorted(Path(sweep_dir).glob("*/.hydra/config.yaml")):
        return (yaml.safe_load(cfg.read_text()).get("study") or {}).get("claims")
    return None


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise ConfigError("multirun_dir", "expected one argument.", "python -m distill.claims multirun/paper_claims_<date>")
    out = write_claims(Path(args[0]))
    print(out["md"] + f"\nwritten: {', '.join(str(p) for p in out['paths'])}", flush=True)


if __name__ == "__main__":
    main()
