"""scripts/skill_probe.py: the study's toy towers at a chosen layer, probed as the study probes them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from distill.toy.world import HELDOUT_SEED, QA_KINDS, TRAIN_SEED

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "skill_probe.py"
spec = importlib.util.spec_from_file_location("skill_probe", SCRIPT)
skill_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(skill_probe)


def test_tower_config_is_the_studys_tower_at_the_asked_layer_and_grid():
    shipped = yaml.safe_load((SCRIPT.parents[1] / "configs" / "towers" / "toy_dino.yaml").read_text())
    config = skill_probe.tower_config("dino", -1, 2)
    assert config["init_args"]["encoder"]["init_args"] == {**shipped["init_args"]["encoder"]["init_args"], "layer": -1}
    assert config["init_args"]["grid"] == 2 and config["class_path"] == shipped["class_path"]
    assert shipped["init_args"]["encoder"]["init_args"]["layer"] == -2  # the file itself is not changed


def test_rows_are_the_studys_probes_of_pixels_trained_and_untrained_towers(smoke_world, tmp_path):
    from mllm.features import pixel_tokens, toy_images
    from mllm.study.probes import object_labels, probe_accuracies

    out = tmp_path / "probes.json"
    rows = skill_probe.main(["--towers", "clip", "--train-images", "60", "--eval-images", "30", "--out", str(out)])
    assert [(r["name"], r["layer"]) for r in rows] == [("pixels", None), ("clip", -2), ("untrained_clip", -2)]
    for row in rows:
        assert all(0.0 <= row[k] <= 1.0 for k in QA_KINDS)
        assert row["overall"] == pytest.approx(sum(row[k] for k in QA_KINDS) / len(QA_KINDS))
    train, test = toy_images(TRAIN_SEED, 60, 64, 1), toy_images(HELDOUT_SEED, 30, 64, 1)
    expected = probe_accuracies(pixel_tokens(train, 2), object_labels(TRAIN_SEED, 60, 64, 1),
                                pixel_tokens(test, 2), object_labels(HELDOUT_SEED, 30, 64, 1), 2)
    assert {k: rows[0][k] for k in expected} == expected
    assert json.loads(out.read_text())["rows"] == rows
