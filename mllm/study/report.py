"""The study's report: accuracies with CIs, the instrument gate, probes, paired comparisons, plot.

Inputs: run records (variant, kind, seed, status, run_dir with eval.json: per-question correctness), the
held-out questions (kind, image id), the text prior's correctness, probe accuracies and tower costs.
Outputs in OUT: results.md (tables + claims), results.csv (one row per variant), results.png.

Claims are tested, never read off by eye: every difference is paired over the same questions with a
bootstrap CI over images and seeds (mllm/study/stats.py); the p-values of all claims in the table are
Holm-corrected together; "comparable to the ensemble" is a TOST equivalence test with margin
EQUIVALENCE_MARGIN. A claim that is not significant says "no difference measured".
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from distill.io import atomic_write
from distill.toy.world import HELDOUT_SEED
from mllm.study.stats import ALPHA, accuracy_ci, holm, paired_difference, tost

KINDS = ("color", "texture", "size", "fusion")
OWNER = {"color": "clip", "texture": "dino", "size": "sam"}  # the family whose teacher skill a kind needs
EQUIVALENCE_MARGIN = 0.02
GATE_BLIND_SLACK, GATE_ORACLE_MIN = 0.02, 0.90
COST_KEYS = ("tower_params_m", "gflops_per_image", "ms_per_image")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where it exists)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_correct(records: list[dict]) -> dict[str, np.ndarray]:
    """{variant: [seeds, questions] 0/1} from the finished runs' eval.json files."""
    by: dict[str, list] = {}
    for rec in records:
        if rec["status"] == "ok":
            by.setdefault(rec["variant"], []).append(json.loads((Path(rec["run_dir"]) / "eval.json").read_text())["correct"])
    return {name: np.asarray(rows, dtype=float) for name, rows in by.items()}


def kinds_in(items: list[dict]) -> list[str]:
    """The question kinds present: the toy world's in their order, then any others sorted."""
    present = {item["kind"] for item in items}
    return [k for k in KINDS if k in present] + sorted(present - set(KINDS))


def _select(items: list[dict], kind: str | None) -> np.ndarray:
    return np.array([kind is None or item["kind"] == kind for item in items])


class Claims:
    """Paired comparisons collected for one Holm correction."""

    def __init__(self, correct: dict[str, np.ndarray], items: list[dict]) -> None:
        self.correct, self.items = correct, items
        self.image_ids = np.array([item["image"] for item in items])
        self.rows: list[dict] = []

    def add(self, group: str, a: str, b: str, kind: str | None, expect: str = "ahead") -> None:
        if a not in self.correct or b not in self.correct:
            return
        mask = _select(self.items, kind)
        if not mask.any():  # e.g. no fusion questions in a real-scale benchmark
            return
        diff = paired_difference(self.correct[a][:, mask], self.correct[b][:, mask], self.image_ids[mask])
        row = {"group": group, "a": a, "b": b, "kind": kind or "overall", "delta": diff.delta, "low": diff.low,
               "high": diff.high, "p": diff.p, "expect": expect, "diff": diff}
        if expect == "equivalent":
            row["p_tost"] = tost(diff, EQUIVALENCE_MARGIN)
        self.rows.append(row)

    def finish(self) -> list[dict]:
        adjusted = holm([r["p"] for r in self.rows]) if self.rows else []
        for row, p_holm in zip(self.rows, adjusted):
            row["p_holm"] = p_holm
            significant = p_holm < ALPHA
            if not significant:
                row["verdict"] = "no difference measured"
            else:
                row["verdict"] = f"{row['a']} ahead" if row["delta"] > 0 else f"{row['b']} ahead"
            if row["expect"] == "equivalent":
                row["verdict"] += ("; equivalent within ±%.2f (TOST p=%.3f)" if row["p_tost"] < ALPHA
                                   else "; equivalence not shown at ±%.2f (TOST p=%.3f)") % (EQUIVALENCE_MARGIN, row["p_tost"])
            row.pop("diff")
        return self.rows


def _ci(cell: tuple[float, float, float] | None) -> str:
    return "–" if cell is None else f"{cell[0]:.3f} [{cell[1]:.3f}, {cell[2]:.3f}]"


def accuracy_table(correct: dict[str, np.ndarray], items: list[dict], prior: list[int] | None) -> dict[str, dict[str, tuple]]:
    """{variant: {kind or 'overall': (mean, low, high)}} including the 'text prior' row when given."""
    image_ids = np.array([item["image"] for item in items])
    rows = ({"text prior": np.asarray([prior], dtype=float)} if prior is not None else {}) | correct
    table = {}
    for name, values in rows.items():
        table[name] = {"overall": accuracy_ci(values, image_ids)}
        for kind in kinds_in(items):
            mask = _select(items, kind)
            table[name][kind] = accuracy_ci(values[:, mask], image_ids[mask])
    return table


def gate(table: dict) -> tuple[bool, str]:
    """The instrument is valid only if blind <= text prior + 0.02 and oracle >= 0.90 overall."""
    if "blind" not in table or "oracle" not in table or "text prior" not in table:
        return False, "the blind and oracle controls were not run, so the instrument is not validated."
    prior, blind, oracle = (table[n]["overall"][0] for n in ("text prior", "blind", "oracle"))
    problems = []
    if blind > prior + GATE_BLIND_SLACK:
        problems.append(f"blind {blind:.3f} > text prior {prior:.3f} + {GATE_BLIND_SLACK} (answers leak from the text)")
    if oracle < GATE_ORACLE_MIN:
        problems.append(f"oracle {oracle:.3f} < {GATE_ORACLE_MIN} (the LLaVA cannot read perfect tokens at this budget)")
    if problems:
        return False, "**Instrument NOT valid**: " + "; ".join(problems) + ". The tower rows below cannot be trusted."
    return True, (f"**Instrument valid**: blind {blind:.3f} ≤ text prior {prior:.3f} + {GATE_BLIND_SLACK}, "
                  f"oracle {oracle:.3f} ≥ {GATE_ORACLE_MIN}.")


def build_claims(correct: dict[str, np.ndarray], items: list[dict], kinds_of: dict[str, str]) -> list[dict]:
    """The study's claims: (b) owner single vs other singles on its kind, (c) ensemble vs singles overall and
    on fusion, (d) student vs best single and vs the ensemble (equivalence), Holm-corrected together."""
    claims = Claims(correct, items)
    singles = [v for v, k in kinds_of.items() if k == "single"]
    for kind, owner in OWNER.items():
        for other in singles:
            if other != owner:
                claims.add("(b) family skill", owner, other, kind)
    ensemble = "ensemble_all" if "ensemble_all" in correct else next((v for v, k in kinds_of.items() if k == "ensemble"), None)
    if ensemble:
        for single in singles:
            claims.add("(c) ensemble", ensemble, single, None)
            claims.add("(c) ensemble", ensemble, single, "fusion")
    for student in (v for v, k in kinds_of.items() if k == "student"):
        ranked = sorted((v for v in singles if v in correct), key=lambda v: -correct[v].mean())
        if ranked:
            claims.add("(d) student", student, ranked[0], None)
        if ensemble:
            claims.add("(d) student", student, ensemble, None, expect="equivalent")
    return claims.finish()


def header(study, budget, smoke: bool, seconds: float | None) -> str:
    import yaml

    align = yaml.safe_load(Path(study.align_recipe).read_text())
    grid = f"{study.grid}x{study.grid} = {study.grid ** 2} visual tokens for every tower" if study.grid else "each tower's own grid"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    if study.eval_json:
        data = (f"{budget.align_steps} align + {budget.finetune_steps} finetune steps on the recipes' data, seeds "
                f"0..{budget.seeds - 1}, {grid}. Scored: greedy answers to `{study.eval_json}`, each by its reference "
                "(multiple choice, yes/no, exact match).")
    else:
        data = (f"{budget.align_steps} align + {budget.finetune_steps} finetune steps on the cached tokens of "
                f"{budget.train_images} training images (toy world, at most {study.max_objects} object(s) per image), "
                f"seeds 0..{budget.seeds - 1}, {grid}, feature layer −2 for every tower (the student's too), tokens "
                f"standardized per channel. Scored: every question kind for every object of {budget.eval_images} "
                f"held-out images (seed {HELDOUT_SEED}), answered by ranking the candidate answers' likelihood (sum of "
                "answer-token log-probs).")
    return "\n".join([
        "# unitower baseline study" + (" (smoke)" if smoke else ""),
        "",
        f"Same for every variant: projector `{align['model'].get('projector')}`, LM `{align['model'].get('lm')}`, "
        + data + " Accuracy: mean over seeds [95% bootstrap CI over images and seeds].",
        "",
        f"Measured {datetime.date.today().isoformat()} on {cpu_model()} ({platform.machine()}, {os.cpu_count()} cores), "
        f"{device}, torch {torch.__version__}" + (f"; study wall time {seconds / 60:.1f} min." if seconds is not None else "."),
    ])


def write_report(records: list[dict], items: list[dict], prior: list[int] | None, probes: dict, costs: dict, distill: dict,
                 study, budget, out_dir: Path, smoke: bool = False, seconds: float | None = None) -> Path:
    """results.md, results.csv and results.png in `out_dir`; returns the results.md path."""
    out_dir = Path(out_dir)
    correct = load_correct(records)
    kinds_of = {r["variant"]: r["kind"] for r in records}
    table = accuracy_table(correct, items, prior)
    valid, gate_text = gate(table)
    claims = build_claims(correct, items, kinds_of)
    failed = [r for r in records if r["status"] != "ok"]
    parts = [header(study, budget, smoke, seconds), "## Instrument gate\n\n" + gate_text,
             "## Accuracy by question kind\n\n" + accuracy_markdown(table, costs, records, kinds_in(items)),
             "## Probes vs LLaVA\n\n" + probe_markdown(probes, table),
             "## Claims (paired, Holm-corrected)\n\n" + claims_markdown(claims)]
    if distill:
        parts.append("## Distillation (one student per seed)\n\n" + "\n".join(
            f"- {name} seed {s}: {info['steps']} steps in {info['seconds']:.0f} s; " + ", ".join(
                f"{k.removeprefix('val/')} {v:.3f}" for k, v in sorted(info["val"].items()))
            for name, seeds in distill.items() for s, info in sorted(seeds.items())))
    if failed:
        parts.append("## Failed runs\n\n" + "\n".join(f"- {r['variant']} seed {r['seed']}: {r['error']}" for r in failed))
    text = "\n\n".join(parts) + "\n"
    atomic_write(out_dir / "results.md", lambda tmp: Path(tmp).write_text(text))
    write_csv(table, probes, costs, out_dir / "results.csv", valid, kinds_in(items))
    if correct:
        plot(table, out_dir / "results.png", kinds_in(items))
    return out_dir / "results.md"


def accuracy_markdown(table: dict, costs: dict, records: list[dict], kinds: list[str]) -> str:
    head = ["variant", "overall", *kinds, "tower params (M)", "GFLOPs/img", "ms/img", "finetune it/s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.items():
        runs = [r for r in records if r["variant"] == name and r["status"] == "ok"]
        cost = costs.get(name, {})
        speed = [r["finetune_steps_per_s"] for r in runs if r.get("finetune_steps_per_s")]
        cells = [name, *(_ci(row.get(k)) for k in ("overall", *kinds))]
        cells += [f"{cost[k]:.3f}" if k in cost else "–" for k in COST_KEYS]
        cells += [f"{np.mean(speed):.1f}" if speed else "–", str(len(runs)) if runs else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_markdown(probes: dict, table: dict) -> str:
    if not probes:
        return "No probes: they need the toy world's object labels."
    head = ["variant", *(f"{k} probe / LLaVA" for k in ("overall", *KINDS))]
    lines = ["Ridge probes on the frozen tokens of each object's quadrant (held-out objects); LLaVA = the table "
             "above; ratio = LLaVA / probe (how much of what the tower knows the LLaVA uses).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in probes.items():
        mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        cells = [name]
        for kind in ("overall", *KINDS):
            llava = table.get(name, {}).get(kind, (float("nan"),))[0]
            cells.append(f"{mean[kind]:.3f} / {llava:.3f} ({llava / mean[kind]:.2f})" if mean[kind] else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_markdown(claims: list[dict]) -> str:
    if not claims:
        return "No comparisons (too few variants ran)."
    head = ["claim", "a", "b", "on", "Δ (a − b)", "95% CI", "p", "p (Holm)", "verdict"]
    lines = [f"{len(claims)} comparisons, Holm-corrected together at α = {ALPHA}; equivalence margin ±{EQUIVALENCE_MARGIN}.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in claims:
        lines.append("| " + " | ".join([c["group"], c["a"], c["b"], c["kind"], f"{c['delta']:+.3f}",
                                        f"[{c['low']:+.3f}, {c['high']:+.3f}]", f"{c['p']:.4f}", f"{c['p_holm']:.4f}",
                                        c["verdict"]]) + " |")
    return "\n".join(lines)


def write_csv(table: dict, probes: dict, costs: dict, path: Path, valid: bool, kinds: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    metrics = ("overall", *kinds)
    writer.writerow(["variant", *[f"{m}_{s}" for m in metrics for s in ("mean", "low", "high")],
                     *[f"probe_{m}" for m in metrics], *COST_KEYS, "instrument_valid"])
    for name, row in table.items():
        runs = probes.get(name)
        probe = [float(np.mean([r[m] for r in runs])) if runs and m in runs[0] else "" for m in metrics]
        writer.writerow([name, *[v for m in metrics for v in row[m]], *probe,
                         *[costs.get(name, {}).get(k, "") for k in COST_KEYS], valid])
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def plot(table: dict, path: Path, kinds: list[str]) -> None:
    """Grouped bars per question kind, one bar per variant, 95% CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("overall", *kinds)
    names = list(table)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.85 / len(names)
    for i, name in enumerate(names):
        means = np.array([table[name][m][0] for m in metrics])
        low = means - np.array([table[name][m][1] for m in metrics])
        high = np.array([table[name][m][2] for m in metrics]) - means
        xs = np.arange(len(metrics)) + (i - (len(names) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=[low, high], capsize=2, label=name)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title("unitower study: LLaVA accuracy by vision tower")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
