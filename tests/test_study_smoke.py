"""The whole route in smoke mode: smoke toy world build, distillation + export, cached tower tokens, probes,
LLaVA align/finetune/likelihood evaluation for every variant and control, report files; a second run reuses
the finished runs. No wall-clock limit: a slow machine makes it slower, never failing."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
VARIANTS = ["text prior", "clip", "dino", "sam", "ensemble_all", "ensemble_clip_dino", "ensemble_mousi",
            "ensemble_brave", "ensemble_comm", "student", "student_small", "blind", "oracle"]


def run(args, env):
    return subprocess.run([sys.executable, "scripts/compare_baselines.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def test_smoke_study_end_to_end(tmp_path):
    env = dict(os.environ, UNITOWER_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    out = tmp_path / "study"
    proc = run(["--smoke", "--out", str(out)], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == VARIANTS
    for r in rows:
        assert 0.0 <= float(r["overall_low"]) <= float(r["overall_mean"]) <= float(r["overall_high"]) <= 1.0
    cost = {r["variant"]: float(r["gflops_per_image"]) for r in rows if r["gflops_per_image"]}
    assert cost["ensemble_all"] > max(cost["clip"], cost["dino"], cost["sam"]) > 0  # the ensemble costs the most
    assert cost["student_small"] < cost["student"]  # the overlay's narrower student (configs/distill/overlays)
    fusion = {r["variant"]: float(r["fusion_params_m"]) for r in rows if r["fusion_params_m"]}
    assert fusion["ensemble_all"] == fusion["clip"] == 0 and min(fusion[v] for v in (
        "ensemble_mousi", "ensemble_brave", "ensemble_comm")) > 0  # trainable fusions count in the cost columns
    assert all(rows[i]["probe_shape"] for i in range(1, len(VARIANTS)))  # every variant was probed
    exports = sorted(out.glob("distill-*-seed0/export*/config.json"))
    assert len(exports) == 2 and len({f.parents[1] for f in exports}) == 1  # both students from one teacher pass
    widths = sorted(json.loads(f.read_text())["model_args"]["embed_dim"] for f in exports)
    assert widths == [80, 96]
    text = (out / "results.md").read_text()
    for section in ("Instrument gate", "Learned-skill gate", "Reader gate", "Probes vs LLaVA", "Learned skills",
                    "Claims (paired, Holm-corrected)", "Distillation", "Wall time by phase"):
        assert "## " + section in text
    for row in ("untrained_clip", "untrained_dino", "untrained_sam", "pixels"):  # probe-only rows
        assert f"\n| {row} | " in text
    assert any(f"**Learned-skill gate: {s}**" in text for s in ("valid", "NOT valid", "not measured"))
    assert any(f"**Reader gate: {s}**" in text for s in ("valid", "NOT valid"))
    assert (out / "results.png").stat().st_size > 1000
    assert len(list(out.glob("runs/*/seed0-*/finetune.yaml"))) == len(VARIANTS) - 1
    # train + held-out per variant and per probe-only control (untrained clip, dino, sam; pixels)
    assert len(list(out.glob("features/*.safetensors"))) == 2 * (len(VARIANTS) - 1 + 4)
    stored = json.loads((out / "records.json").read_text())
    assert set(stored["gates"]) == {"instrument", "learned_skill", "reader"}
    assert list(stored["phases"]) == ["toy build", "distillation", "features", "probes", "LLaVA runs"]
    assert all(seconds >= 0 for seconds in stored["phases"].values())
    assert {"untrained_clip", "pixels"} <= set(stored["probes"])
    records = stored["records"]
    assert all(r["status"] == "ok" and r["align_steps_per_s"] > 0 for r in records)
    questions = json.loads((out / "questions.json").read_text())["questions"]
    assert {q["kind"] for q in questions} == {"shape", "texture", "size", "fusion"}

    again = run(["--smoke", "--out", str(out), "--only", "clip", "student"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "distilling" not in again.stdout and "distilling" not in again.stderr  # the exported student is reused
    assert "study runs" in again.stderr
