"""The study's report: accuracies with CIs, the three gates, probes, paired comparisons, wall time, plot.

Inputs: run records (variant, kind, seed, status, run_dir with eval.json: per-question correctness), the
held-out questions (kind, image id), the text prior's correctness, probe accuracies (including the probe-only
controls `untrained_<variant>` and `pixels`), tower costs and the wall time of each phase.
Outputs in OUT: results.md (gates, tables, claims), results.csv (one row per variant), results.png and
records.json (records, costs, probes, distillation, gates, phases).

Claims are tested, never read off by eye (mllm/study/claims.py): every difference is paired over the same
questions with a bootstrap CI over images and seeds (mllm/study/stats.py); the p-values of all claims are
Holm-corrected together; "comparable to the ensemble" is a TOST equivalence test. A claim that does not hold
names its weak link; the gates are in mllm/study/gates.py.
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

from distill.common.io import atomic_write, save_json
from distill.toy.world import HELDOUT_SEED
from mllm.study.claims import EQUIVALENCE_MARGIN, build_claims, weak_links
from mllm.study.gates import mean_probes, reader_gate, skill_gate, skill_table
from mllm.study.stats import ALPHA, accuracy_ci
GATE_BLIND_SLACK, GATE_ORACLE_MIN = 0.02, 0.90
COST_KEYS = ("tower_params_m", "gflops_per_image", "ms_per_image", "fusion_params_m", "fusion_gflops_per_image")


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
    """The question kinds present, in the order they are first asked (the toy world asks QA_KINDS in order)."""
    return list(dict.fromkeys(item["kind"] for item in items))


def _select(items: list[dict], kind: str | None) -> np.ndarray:
    return np.array([kind is None or item["kind"] == kind for item in items])


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


def toy_build() -> str:
    """'Toy world: build <hash> (version N, built in S s).' from the active cache's manifest (what the toy rows were
    measured on); a note when it cannot be read."""
    import json

    from distill.toy.cache import MANIFEST, default_cache_dir

    try:
        manifest = json.loads((default_cache_dir() / MANIFEST).read_text())
    except (OSError, ValueError):
        return "Toy world: build manifest not found."
    return (f"Toy world: build `{manifest.get('hash')}` (version {manifest.get('version')}, built in "
            f"{manifest.get('build_seconds')} s: {manifest.get('stage_seconds')}).")


def header(study, budget, smoke: bool, seconds: float | None) -> str:
    import yaml

    align = yaml.safe_load(Path(study.align_recipe).read_text())
    grid = f"{study.grid}x{study.grid} = {study.grid ** 2} visual tokens for every tower" if study.grid else "each tower's own grid"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    if study.eval_json:
        data = (f"{budget.align_steps} align + {budget.finetune_steps} finetune steps on the recipes' data, seeds "
                f"0..{budget.seeds - 1}, {grid}, `norm: {study.norm}`. Scored: greedy answers to `{study.eval_json}`, "
                "each by its reference (multiple choice, yes/no, exact match).")
    else:
        data = (f"{budget.align_steps} align + {budget.finetune_steps} finetune steps on the cached tokens of "
                f"{budget.train_images} training images (toy world, at most {study.max_objects} object(s) per image), "
                f"seeds 0..{budget.seeds - 1}, {grid}, feature layer −2 for every tower (the student's too), every "
                f"encoder's tokens normalised by the rule `norm: {study.norm}`. Scored: every question kind for every "
                f"object of {budget.eval_images} held-out images (seed {HELDOUT_SEED}), answered by ranking the candidate "
                f"answers' likelihood (sum of answer-token log-probs). {toy_build()}")
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
                 study, budget, out_dir: Path, smoke: bool = False, seconds: float | None = None,
                 phases: dict[str, float] | None = None) -> Path:
    """results.md, results.csv, results.png and records.json in `out_dir`; returns the results.md path.
    `phases`: wall seconds of each phase of the study (toy build, distillation, features, probes, LLaVA runs)."""
    out_dir = Path(out_dir)
    correct = load_correct(records)
    kinds_of = {r["variant"]: r["kind"] for r in records}
    kinds = kinds_in(items)
    table = accuracy_table(correct, items, prior)
    valid, gate_text = gate(table)
    probe = mean_probes(probes)
    llava = {name: {k: cell[0] for k, cell in row.items()} for name, row in table.items()}
    singles = [v.name for v in study.variants if v.kind == "single"]
    skill = skill_gate(probe, study.owners, singles, study.gates)
    reader = reader_gate(probe, llava, kinds, kinds_of, study.gates)
    claims = build_claims(correct, items, kinds_of, study.owners, study.fusion_kinds)
    for claim in claims:
        if not claim["holds"]:
            claim["why"] = "; ".join(weak_links(claim, probe, llava, study.owners, kinds_of, kinds, study.gates))
    failed = [r for r in records if r["status"] != "ok"]
    parts = [header(study, budget, smoke, seconds),
             "## Instrument gate\n\n" + gate_text, "## Learned-skill gate\n\n" + skill.markdown(),
             "## Reader gate\n\n" + reader.markdown(),
             "## Accuracy by question kind\n\n" + accuracy_markdown(table, costs, records, kinds),
             "## Probes vs LLaVA\n\n" + probe_markdown(probes, table)]
    if skill_table(probe, study.owners, singles):
        parts.append("## Learned skills (probes: trained / untrained tower, raw pixels)\n\n"
                     + skill_table(probe, study.owners, singles))
    parts.append("## Claims (paired, Holm-corrected)\n\n" + claims_markdown(claims, costs))
    if distill:
        parts.append("## Distillation (per seed; students that share a teacher pass share its time)\n\n" + "\n".join(
            f"- {name} seed {s}: {info['steps']} steps in {info['seconds']:.0f} s"
            + (f" (one teacher pass with {', '.join(info['shared_with'])})" if info.get("shared_with") else "")
            + (f", {info['threads']} threads" if info.get("threads", 1) > 1 else "") + "; " + ", ".join(
                f"{k.removeprefix('val/')} {v:.3f}" for k, v in sorted(info["val"].items()))
            for name, seeds in distill.items() for s, info in sorted(seeds.items())))
    if phases:
        overlap = ("\n\nAfter the toy build the phases overlap: the worker processes take the distillations, then the "
                   "LLaVA runs, from one queue while the main process computes features and probes (the towers' without "
                   "a student while the students distil). Distillation and LLaVA runs: wall time from the first job to "
                   "the last; features and probes: the main process's own time." if "distillation" in phases else "")
        parts.append("## Wall time by phase\n\n" + "\n".join(f"- {name}: {sec:.1f} s" for name, sec in phases.items())
                     + overlap)
    if failed:
        parts.append("## Failed runs\n\n" + "\n".join(f"- {r['variant']} seed {r['seed']}: {r['error']}" for r in failed))
    text = "\n\n".join(parts) + "\n"
    atomic_write(out_dir / "results.md", lambda tmp: Path(tmp).write_text(text))
    gates = {"instrument": {"status": "valid" if valid else "NOT valid", "text": gate_text},
             "learned_skill": skill.as_dict(), "reader": reader.as_dict()}
    save_json({"records": records, "costs": costs, "probes": probes, "distill": distill, "phases": phases or {},
               "gates": gates, "claims": claims}, out_dir / "records.json")
    write_csv(table, probes, costs, out_dir / "results.csv", valid, kinds)
    if correct:
        plot(table, out_dir / "results.png", kinds)
    return out_dir / "results.md"


def accuracy_markdown(table: dict, costs: dict, records: list[dict], kinds: list[str]) -> str:
    head = ["variant", "overall", *kinds, "tower params (M)", "GFLOPs/img", "ms/img", "fusion params (M)",
            "fusion GFLOPs/img", "finetune it/s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.items():
        runs = [r for r in records if r["variant"] == name and r["status"] == "ok"]
        cost = costs.get(name, {})
        speed = [r["finetune_steps_per_s"] for r in runs if r.get("finetune_steps_per_s")]
        cells = [name, *(_ci(row.get(k)) for k in ("overall", *kinds))]
        cells += [f"{cost[k]:.4g}" if k.startswith("fusion") and k in cost else f"{cost[k]:.3f}" if k in cost else "–"
                  for k in COST_KEYS]
        cells += [f"{np.mean(speed):.1f}" if speed else "–", str(len(runs)) if runs else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_markdown(probes: dict, table: dict) -> str:
    if not probes:
        return "No probes: they need the toy world's object labels."
    first = next(iter(probes.values()))[0]
    metrics = ["overall", *(k for k in first if k != "overall")]
    head = ["variant", *(f"{k} probe / LLaVA" for k in metrics)]
    lines = ["Ridge probes on the frozen tokens of each object's quadrant (held-out objects); LLaVA = the table "
             "above; ratio = LLaVA / probe (how much of what the tower knows the LLaVA uses). Rows without LLaVA "
             "are probe-only controls: `untrained_<tower>` (every weight re-initialised) and `pixels` (raw pixels).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, mean in mean_probes(probes).items():
        cells = [name]
        for kind in metrics:
            llava = table.get(name, {}).get(kind)
            if kind not in mean:
                cells.append("–")
            elif llava is None:
                cells.append(f"{mean[kind]:.3f}")
            else:
                cells.append(f"{mean[kind]:.3f} / {llava[0]:.3f} ({llava[0] / mean[kind]:.2f})" if mean[kind] else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cost(costs: dict, claim: dict) -> str:
    """GFLOPs and ms per image of a vs b (the student claims' cost columns)."""
    a, b = costs.get(claim["a"]), costs.get(claim["b"])
    if not claim["group"].startswith("(d)") or not a or not b:
        return "–"
    return (f"{a['gflops_per_image']:.3f} vs {b['gflops_per_image']:.3f} GFLOPs; "
            f"{a['ms_per_image']:.2f} vs {b['ms_per_image']:.2f} ms")


def claims_markdown(claims: list[dict], costs: dict | None = None) -> str:
    if not claims:
        return "No comparisons (too few variants ran)."
    head = ["claim", "a", "b", "on", "Δ (a − b)", "95% CI", "p", "p (Holm)", "verdict", "cost a vs b", "why (if it fails)"]
    lines = [f"{len(claims)} comparisons, Holm-corrected together at α = {ALPHA}; equivalence margin ±{EQUIVALENCE_MARGIN}. "
             "A claim that does not hold names its weak links: teacher skill (owner vs untrained probe), student "
             "fidelity (student vs owner probe), reader (LLaVA / probe).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in claims:
        lines.append("| " + " | ".join([c["group"], c["a"], c["b"], c["kind"], f"{c['delta']:+.3f}",
                                        f"[{c['low']:+.3f}, {c['high']:+.3f}]", f"{c['p']:.4f}", f"{c['p_holm']:.4f}",
                                        c["verdict"], _cost(costs or {}, c), c.get("why", "holds")]) + " |")
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
