"""Turn per-run study results into the comparison table (Markdown + CSV), a bar plot and a short reading.

A run record is a dict:
    {"variant": "clip", "kind": "single" | "ensemble" | "student", "seed": 0, "status": "ok" | "failed",
     "error": str | None, "metrics": {"color": 0.8, ...}, "cost": {"tower_params_m": ..., ...},
     "projector_params": int, "train_seconds": float}

    summary = aggregate(records)
    write_report(summary, out_dir, header="...")   # results.md, results.csv, results.png
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from distill.io import atomic_write

COST_KEYS = ("tower_params_m", "gflops_per_image", "ms_per_image")
SPEED_KEYS = ("align_steps_per_s", "finetune_steps_per_s")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate(records: list[dict]) -> list[dict]:
    """One row per variant (in first-seen order): mean/std of every metric over its finished seeds."""
    rows: dict[str, dict] = {}
    for rec in records:
        row = rows.setdefault(rec["variant"], {"variant": rec["variant"], "kind": rec.get("kind", ""), "runs": [], "errors": []})
        (row["runs"] if rec["status"] == "ok" else row["errors"]).append(rec)
    out = []
    for row in rows.values():
        runs = row.pop("runs")
        row["seeds"] = len(runs)
        row["status"] = "ok" if runs else "failed"
        row["error"] = row["errors"][0].get("error") if row["errors"] else None
        row["failed_seeds"] = len(row.pop("errors"))
        row["metrics"] = {}
        if runs:
            for key in sorted({k for r in runs for k in r["metrics"]}):
                values = [r["metrics"][key] for r in runs if key in r["metrics"]]
                row["metrics"][key] = mean_std(values)
            for key in COST_KEYS:
                row[key] = mean_std([r["cost"][key] for r in runs])[0]
            row["train_seconds"] = mean_std([r["train_seconds"] for r in runs])[0]
            for key in SPEED_KEYS:
                values = [r[key] for r in runs if r.get(key)]
                row[key] = mean_std(values)[0] if values else float("nan")
            row["projector_params"] = runs[0]["projector_params"]
        out.append(row)
    return out


def metric_names(summary: list[dict]) -> list[str]:
    """Metrics in table order: 'overall' first, then the others alphabetically."""
    names = sorted({k for row in summary for k in row["metrics"]})
    return sorted(names, key=lambda k: (k != "overall", k))


def markdown_table(summary: list[dict]) -> str:
    metrics = metric_names(summary)
    head = ["variant", *metrics, "tower params (M)", "GFLOPs/img", "ms/img", "projector params", "train s", "align it/s", "finetune it/s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary:
        if row["status"] != "ok":
            cells = [row["variant"], *(["failed"] * len(metrics)), "", "", "", "", "", "", "", f"0 ({row['error']})"]
        else:
            cells = [row["variant"]]
            for m in metrics:
                mean, std = row["metrics"].get(m, (float("nan"), 0.0))
                cells.append(f"{mean:.3f} ± {std:.3f}")
            cells += [
                f"{row['tower_params_m']:.2f}", f"{row['gflops_per_image']:.3f}", f"{row['ms_per_image']:.2f}",
                f"{row['projector_params']:,}", f"{row['train_seconds']:.0f}",
                f"{row['align_steps_per_s']:.1f}", f"{row['finetune_steps_per_s']:.1f}", str(row["seeds"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading(summary: list[dict]) -> list[str]:
    """Plain sentences: the winner of every metric, and the student against the best single encoder and the ensemble."""
    ok = [r for r in summary if r["status"] == "ok"]
    if not ok:
        return ["Every variant failed; see the table for the errors."]
    lines = []
    for m in metric_names(ok):
        scored = [r for r in ok if m in r["metrics"]]
        best = max(scored, key=lambda r: r["metrics"][m][0])
        lines.append(f"- **{m}**: best is {best['variant']} ({_fmt(best['metrics'][m])}).")
    students = [r for r in ok if r["kind"] == "student"]
    singles = [r for r in ok if r["kind"] == "single"]
    ensembles = [r for r in ok if r["kind"] == "ensemble"]
    for student in students:
        for m in metric_names([student]):
            s = student["metrics"][m]
            parts = []
            best_single = max((r for r in singles if m in r["metrics"]), key=lambda r: r["metrics"][m][0], default=None)
            if best_single:
                parts.append(f"{_delta(s, best_single['metrics'][m])} vs best single encoder {best_single['variant']}")
            for ens in ensembles:
                if m in ens["metrics"]:
                    parts.append(f"{_delta(s, ens['metrics'][m])} vs {ens['variant']}")
            lines.append(f"- {student['variant']} on **{m}**: {_fmt(s)}; " + ", ".join(parts) + ".")
    return lines


def _fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.3f} ± {ms[1]:.3f}"


def _delta(a: tuple[float, float], b: tuple[float, float]) -> str:
    diff = a[0] - b[0]
    verdict = "beats" if diff > math.hypot(a[1], b[1]) else "trails" if -diff > math.hypot(a[1], b[1]) else "ties (within 1 std)"
    return f"{verdict} ({diff:+.3f})"


def write_csv(summary: list[dict], path: Path) -> None:
    metrics = metric_names(summary)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["variant", "kind", "status", "seeds", *[f"{m}_{s}" for m in metrics for s in ("mean", "std")],
                     *COST_KEYS, "projector_params", "train_seconds", *SPEED_KEYS, "error"])
    for row in summary:
        values = [v for m in metrics for v in row["metrics"].get(m, ("", ""))]
        costs = [row.get(k, "") for k in COST_KEYS]
        writer.writerow([row["variant"], row["kind"], row["status"], row["seeds"], *values, *costs,
                         row.get("projector_params", ""), row.get("train_seconds", ""),
                         *[row.get(k, "") for k in SPEED_KEYS], row.get("error") or ""])
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def plot(summary: list[dict], path: Path, title: str = "") -> None:
    """Grouped bars: one group per metric, one bar per variant, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in summary if r["status"] == "ok"]
    metrics = metric_names(ok)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(metrics) + 2), 4))
    width = 0.8 / max(1, len(ok))
    for i, row in enumerate(ok):
        means = [row["metrics"].get(m, (0, 0))[0] for m in metrics]
        stds = [row["metrics"].get(m, (0, 0))[1] for m in metrics]
        xs = [j + (i - (len(ok) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=row["variant"])
    ax.set_xticks(range(len(metrics)), metrics, rotation=30, ha="right")
    ax.set_ylabel("score (mean ± std over seeds)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_report(summary: list[dict], out_dir: Path, header: str) -> Path:
    """results.md (header + table + reading), results.csv and results.png in `out_dir`."""
    out_dir = Path(out_dir)
    text = "\n\n".join([header, markdown_table(summary), "### Reading\n" + "\n".join(reading(summary))]) + "\n"
    atomic_write(out_dir / "results.md", lambda tmp: Path(tmp).write_text(text))
    write_csv(summary, out_dir / "results.csv")
    if any(r["status"] == "ok" for r in summary):
        plot(summary, out_dir / "results.png", title="unitower: LLaVA accuracy by vision tower")
    return out_dir / "results.md"
