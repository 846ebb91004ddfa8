"""`unitower` (mllm/command.py): the subcommands reach each part's own command line, the pyproject script
points at it, and the `python -m` forms still work."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from mllm.command import COMMANDS, main

ROOT = Path(__file__).parents[1]


def run(capsys, *argv: str) -> tuple[int, str]:
    """main(argv) in-process: (exit code, stdout)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return code, capsys.readouterr().out


def test_help_lists_each_subcommand_on_one_line(capsys):
    code, out = run(capsys, "--help")
    assert code == 0
    listed = [line.split()[0] for line in out.split("commands:")[1].strip().splitlines()]
    assert listed == ["distill", "toy", "llava", "study"]


def test_unknown_or_missing_command_is_an_error_naming_the_commands(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["distil"])
    assert stop.value.code == 2
    assert "unknown command 'distil'; use one of: distill, toy, llava, study" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])


def test_every_subcommand_module_has_a_main():
    for module, _ in COMMANDS.values():
        assert callable(importlib.import_module(module).main), module


def test_distill_fit_help_is_the_distillation_cli(capsys):
    code, out = run(capsys, "distill", "fit", "--help")
    assert code == 0 and "--model.teachers" in out and "--data.num_workers" in out


def test_llava_fit_print_config_composes_the_recipe_and_a_tower_file(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out = run(capsys, "llava", "fit", "-c", "configs/mllm/toy_finetune.yaml", "--model.tower",
                    "configs/towers/toy_dino.yaml", "--trainer.default_root_dir", "runs/mllm/toy_dino", "--print_config")
    assert code == 0
    config = yaml.safe_load(out)
    encoder = config["model"]["tower"]["init_args"]["encoder"]
    assert encoder["class_path"] == "distill.encoders.TimmEncoder" and encoder["init_args"]["model_name"] == "toy:dino"
    assert config["model"]["lm"] == "toy:lm" and config["model"]["stage"] == "finetune"


def test_toy_and_study_help(capsys):
    code, out = run(capsys, "toy", "--help")
    assert code == 0 and "build" in out and "report" in out and "export" in out
    code, out = run(capsys, "study", "--help")
    assert code == 0 and "--smoke" in out and "--config" in out


def test_pyproject_script_is_this_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["unitower"].partition(":")
    assert getattr(importlib.import_module(module), function) is main


@pytest.mark.parametrize("module", ["distill", "distill.toy", "mllm", "mllm.study"])
def test_python_dash_m_forms_still_work(module):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
