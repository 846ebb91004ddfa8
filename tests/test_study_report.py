"""Study report: the instrument gate, claims with Holm correction and TOST, tables, CSV and plot; tower cost."""

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from mllm.study.config import load_study, with_budget
from mllm.study.cost import gflops_per_image, tower_cost
from mllm.study.claims import build_claims
from mllm.study.report import accuracy_table, gate, write_report

KINDS = ("color", "texture", "size", "fusion")


def items(num_images=300):
    return [{"question": f"q{k}", "answer": "a", "kind": k, "image": i} for i in range(num_images) for k in KINDS]


def answers(rng, accuracy_by_kind, questions, seeds=3):
    """0/1 correctness [seeds, questions] with the given accuracy per kind."""
    p = np.array([accuracy_by_kind[q["kind"]] for q in questions])
    return (rng.random((seeds, len(questions))) < p).astype(float)


def write_runs(tmp_path, correct):
    records = []
    kinds = {"clip": "single", "dino": "single", "sam": "single", "ensemble_all": "ensemble", "student": "student",
             "blind": "control", "oracle": "control"}
    for name, values in correct.items():
        for seed, row in enumerate(values):
            run = tmp_path / "runs" / name / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "eval.json").write_text(json.dumps({"correct": row.tolist()}))
            records.append({"variant": name, "kind": kinds[name], "seed": seed, "status": "ok", "run_dir": str(run),
                            "finetune_steps_per_s": 10.0})
    return records


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    questions = items()
    correct = {
        "clip": answers(rng, {"color": 0.95, "texture": 0.4, "size": 0.6, "fusion": 0.4}, questions),
        "dino": answers(rng, {"color": 0.3, "texture": 0.9, "size": 0.6, "fusion": 0.3}, questions),
        "sam": answers(rng, {"color": 0.3, "texture": 0.4, "size": 0.95, "fusion": 0.1}, questions),
        "ensemble_all": answers(rng, {"color": 0.95, "texture": 0.9, "size": 0.95, "fusion": 0.85}, questions),
        "student": answers(rng, {"color": 0.95, "texture": 0.9, "size": 0.95, "fusion": 0.85}, questions),
        "blind": answers(rng, {"color": 0.17, "texture": 0.33, "size": 0.5, "fusion": 0.06}, questions),
        "oracle": np.ones((3, len(questions))),
    }
    prior = answers(rng, {"color": 0.17, "texture": 0.33, "size": 0.5, "fusion": 0.06}, questions, seeds=1)[0]
    return questions, correct, prior


def test_gate_passes_with_good_controls_and_fails_with_bad_ones(world):
    questions, correct, prior = world
    table = accuracy_table(correct, questions, prior)
    valid, text = gate(table)
    assert valid and "Instrument valid" in text
    leaky = dict(correct, blind=correct["clip"])
    valid, text = gate(accuracy_table(leaky, questions, prior))
    assert not valid and "blind" in text and "leak" in text
    weak = dict(correct, oracle=correct["clip"])
    valid, text = gate(accuracy_table(weak, questions, prior))
    assert not valid and "oracle" in text
    assert not gate(accuracy_table({"clip": correct["clip"]}, questions, None))[0]


def test_claims_are_tested_and_holm_corrected(world):
    questions, correct, _ = world
    kinds = {"clip": "single", "dino": "single", "sam": "single", "ensemble_all": "ensemble", "student": "student"}
    claims = build_claims(correct, questions, kinds, owners={"color": "clip", "texture": "dino", "size": "sam"},
                          fusion_kinds=["fusion"])
    by = {(c["group"][:3], c["a"], c["b"], c["kind"]): c for c in claims}
    assert len(claims) == 6 + 6 + 2
    assert all(c["p_holm"] >= c["p"] for c in claims)
    assert by[("(b)", "clip", "dino", "color")]["verdict"] == "clip ahead"
    assert by[("(b)", "dino", "sam", "texture")]["verdict"] == "dino ahead"
    assert by[("(c)", "ensemble_all", "clip", "fusion")]["verdict"] == "ensemble_all ahead"
    equivalence = by[("(d)", "student", "ensemble_all", "overall")]
    assert equivalence["verdict"].startswith("no difference measured") and "TOST" in equivalence["verdict"]


def test_write_report_files(tmp_path, world):
    from pathlib import Path

    questions, correct, prior = world
    root = Path(__file__).parents[1]
    study = load_study(root / "configs/study/toy.yaml")
    study.align_recipe = str(root / study.align_recipe)
    records = write_runs(tmp_path, correct)
    probes = {"clip": [{"overall": 0.8, "color": 1.0, "texture": 0.7, "size": 0.9, "fusion": 0.6}]}
    report = write_report(records, questions, prior.tolist(), probes, {"clip": {"tower_params_m": 1.0,
                          "gflops_per_image": 0.5, "ms_per_image": 2.0}},
                          {"student": {0: {"steps": 300, "seconds": 81.0, "val": {"val/clip/dense_cos": 0.9123}}},
                           "student_small": {0: {"steps": 300, "seconds": 64.0, "val": {"val/clip/dense_cos": 0.8771}}}},
                          study, with_budget(study, False), tmp_path)
    text = report.read_text()
    assert "- student seed 0: 300 steps in 81 s; clip/dense_cos 0.912" in text
    assert "- student_small seed 0: 300 steps in 64 s; clip/dense_cos 0.877" in text
    for section in ("Instrument gate", "Accuracy by question kind", "Probes vs LLaVA", "Claims (paired, Holm-corrected)"):
        assert section in text
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["variant"] for r in rows][:2] == ["text prior", "clip"]
    assert float(rows[1]["color_mean"]) == pytest.approx(correct["clip"][:, 0::4].mean())
    assert float(rows[1]["probe_color"]) == 1.0 and rows[1]["instrument_valid"] == "True"
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_flops_of_a_linear_layer_match_hand_count():
    layer = nn.Linear(10, 20, bias=False)
    # 2 * in * out FLOPs per row: 2 * 10 * 20 = 400 per image
    assert gflops_per_image(layer, torch.rand(4, 10)) == pytest.approx(400 / 1e9)


def test_tower_cost_fields():
    conv = nn.Conv2d(3, 4, 8, stride=8)
    cost = tower_cost(conv, image_size=16, batch_size=2, repeats=2)
    assert cost["tower_params_m"] == pytest.approx((3 * 4 * 64 + 4) / 1e6)
    # 2x2 outputs * 4 channels * (3*8*8) MACs * 2
    assert cost["gflops_per_image"] == pytest.approx(2 * 2 * 4 * 192 * 2 / 1e9)
    assert cost["ms_per_image"] > 0


def test_header_names_the_toy_build_it_measured(tmp_path, monkeypatch):
    from mllm.study.report import toy_build

    monkeypatch.setenv("UNITOWER_CACHE", str(tmp_path / "toyworld"))
    monkeypatch.delenv("UNITOWER_TOY_PROFILE", raising=False)
    assert toy_build() == "Toy world: build manifest not found."
    (tmp_path / "toyworld").mkdir()
    (tmp_path / "toyworld" / "manifest.json").write_text(json.dumps(
        {"hash": "abc123", "version": 4, "build_seconds": 460.5, "stage_seconds": {"clip": 160.0}}))
    assert toy_build() == "Toy world: build `abc123` (version 4, built in 460.5 s: {'clip': 160.0})."
