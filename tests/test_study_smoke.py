"""The whole route in smoke mode: smoke toy world build, distillation + export, LLaVA align/finetune/eval
for every variant, report files; a second run reuses the finished runs."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run(args, env):
    return subprocess.run([sys.executable, "scripts/compare_baselines.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_smoke_study_end_to_end(tmp_path):
    env = dict(os.environ, UNITOWER_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    out = tmp_path / "study"
    proc = run(["--smoke", "--out", str(out)], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["clip", "dino", "sam", "ensemble_all", "ensemble_clip_dino", "student"]
    assert all(r["status"] == "ok" for r in rows), [(r["variant"], r["error"]) for r in rows]
    for r in rows:
        assert 0.0 <= float(r["overall_mean"]) <= 1.0 and float(r["gflops_per_image"]) > 0
    # the ensemble of all three costs more than any single encoder
    cost = {r["variant"]: float(r["gflops_per_image"]) for r in rows}
    assert cost["ensemble_all"] > max(cost["clip"], cost["dino"], cost["sam"])
    assert (out / "results.png").stat().st_size > 1000
    assert "Same for every variant" in (out / "results.md").read_text()
    assert len(list(out.glob("runs/*/seed0-*/finetune.yaml"))) == 6
    records = json.loads((out / "records.json").read_text())["records"]
    assert all(r["align_steps_per_s"] > 0 and r["finetune_steps_per_s"] > 0 for r in records)  # StepTimer measured

    started = time.time()
    again = run(["--smoke", "--out", str(out), "--only", "clip", "student"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "distilling" not in again.stdout  # the exported student is reused
    assert time.time() - started < 60
