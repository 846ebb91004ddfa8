"""Study report: mean ± std aggregation, failed variants, the reading's verdicts, CSV/plot files; tower cost."""

import csv

import pytest
import torch
from torch import nn

from mllm.study.cost import gflops_per_image, tower_cost
from mllm.study.report import aggregate, markdown_table, mean_std, reading, write_report

COST = {"tower_params_m": 1.0, "gflops_per_image": 0.5, "ms_per_image": 2.0}


def rec(variant, kind, seed, color, status="ok"):
    return {"variant": variant, "kind": kind, "seed": seed, "status": status, "error": None if status == "ok" else "boom",
            "metrics": {"color": color, "overall": color / 2} if status == "ok" else {}, "cost": COST,
            "projector_params": 1234, "train_seconds": 10.0, "align_steps_per_s": 12.0, "finetune_steps_per_s": None}


RECORDS = [
    rec("clip", "single", 0, 0.5), rec("clip", "single", 1, 0.7),
    rec("dino", "single", 0, 0.2), rec("dino", "single", 1, 0.2),
    rec("ensemble_all", "ensemble", 0, 0.9), rec("ensemble_all", "ensemble", 1, 0.9),
    rec("student", "student", 0, 0.9), rec("student", "student", 1, 0.9),
    rec("sam", "single", 0, 0.0, status="failed"),
]


def test_mean_std():
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1414213562))
    assert mean_std([3.0]) == (3.0, 0.0)


def test_aggregate_and_table():
    summary = aggregate(RECORDS)
    by = {r["variant"]: r for r in summary}
    assert by["clip"]["metrics"]["color"] == pytest.approx((0.6, 0.1414213562))
    assert by["sam"]["status"] == "failed" and by["sam"]["error"] == "boom"
    table = markdown_table(summary)
    assert "| clip | 0.300 ± 0.071 | 0.600 ± 0.141 |" in table  # overall first, then color
    assert "failed" in table and "boom" in table


def test_reading_verdicts():
    lines = "\n".join(reading(aggregate(RECORDS)))
    assert "**color**: best is ensemble_all" in lines  # first of the tied best
    assert "beats (+0.300) vs best single encoder clip" in lines
    assert "ties (within 1 std) (+0.000) vs ensemble_all" in lines


def test_write_report_files(tmp_path):
    write_report(aggregate(RECORDS), tmp_path, header="# Study")
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["clip", "dino", "ensemble_all", "student", "sam"]
    assert float(rows[0]["color_mean"]) == pytest.approx(0.6)
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert (tmp_path / "results.md").read_text().startswith("# Study")


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
