"""`unitower llava fit` as a log file sees it (distill/common/progress.py, distill/cli.py QUIET_WARNINGS): max_epochs
follows max_steps (no "Epoch 0/-2"), progress lines when stdout is no terminal, and no LightningCLI args notice,
Lightning pytree deprecation or frozen-encoder eval-mode notice."""

import warnings

import yaml

from distill.cli import QUIET_WARNINGS
from llava_configs import cli_trainer, timm_tower
from mllm.cli import make_cli
from tiny_llava import tiny_llava_records, write_llava_json, write_tiny_lm
from tiny_teachers import write_timm_dir


def test_fit_sets_max_epochs_prints_lines_and_filters_the_noise(tmp_path, capsys, monkeypatch):
    lm, vit = write_tiny_lm(tmp_path / "lm", steps=2), write_timm_dir(tmp_path / "vit")
    data = write_llava_json(tiny_llava_records(tmp_path / "img", 8, "finetune"), tmp_path / "d.json")
    trainer = {**cli_trainer(tmp_path / "run", 5, "finetune"), "log_every_n_steps": 2}
    trainer.pop("enable_progress_bar")  # the CLI decides: stdout here (pytest's capture) is no terminal
    config = {"trainer": trainer,
              "model": {"tower": timm_tower(vit), "lm": str(lm), "stage": "finetune", "init_from": None},
              "data": {"train": {"class_path": "mllm.data.LlavaJsonSource",
                                 "init_args": {"json_path": str(data), "image_folder": str(tmp_path / "img")}},
                       "batch_size": 4, "image_size": 32, "max_length": 96}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr("sys.argv", ["unitower", "llava", "fit", "-c", str(tmp_path / "c.yaml")])  # as `unitower` runs
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = make_cli(["fit", "-c", str(tmp_path / "c.yaml")])
    assert cli.trainer.global_step == 5
    assert cli.trainer.progress_bar_callback is None  # no redrawn bar in a file
    assert cli.trainer.max_epochs == 3  # 8 records / batch 4 = 2 steps an epoch; 5 steps need 3 epochs
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[fit] step")]
    assert [line.split(" epoch")[0] for line in lines] == ["[fit] step 2/5 (40%)", "[fit] step 4/5 (80%)",
                                                          "[fit] step 5/5 (100%)"]
    assert "train/loss" in lines[-1] and "steps/s" in lines[-1] and "Epoch 0/" not in out  # no redrawn bar
    import re

    noisy = [str(w.message)[:80] for w in caught if any(re.match(p, str(w.message)) for p, _ in QUIET_WARNINGS)]
    assert noisy == []
