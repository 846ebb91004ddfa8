"""scripts/toy_runs.py (the loss and grow benchmarks' runner): its config edits and the paired interval."""

import math
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from toy_runs import paired_ci, toy_config  # noqa: E402

from distill.data import DistillDataModule  # noqa: E402
from distill.module import DistillModule  # noqa: E402


class ParseOnlyCLI(LightningCLI):
    def instantiate_classes(self) -> None:
        pass


def test_paired_ci_hand_computed():
    mean, half = paired_ci([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(paired_ci([0.5])[1])


def test_toy_config_cuts_the_recipe_and_parses(tmp_path):
    config = toy_config(30, 2, model={"init_from": "exports/x", "summary_loss": "angle_balanced"}, teachers=["clip", "dino"])
    trainer = config["trainer"]
    assert (trainer["max_steps"], trainer["val_check_interval"], config["seed_everything"]) == (30, 30, 2)
    assert [t["init_args"]["name"] for t in config["model"]["teachers"]] == ["clip", "dino"]
    bench = next(c for c in trainer["callbacks"] if c["class_path"].endswith("EncoderBenchmarks"))["init_args"]
    assert "sam_miou" not in bench["probes"] and bench["at_start"] is False
    ckpt = next(c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))["init_args"]
    assert ckpt["every_n_train_steps"] == 30
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    model = ParseOnlyCLI(DistillModule, DistillDataModule, run=False, args=["-c", str(path)]).config["model"]
    assert (model["init_from"], model["summary_loss"], model["shift_equivariant"]) == ("exports/x", "angle_balanced", False)
