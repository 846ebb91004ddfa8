"""`unitower` (mllm/command.py): the subcommands reach each part's own command line, the pyproject script
points at it, and the `python -m` forms still work; it behaves like a tool from any folder (shipped recipes,
`unitower recipes`, one-line user errors, `--debug` tracebacks) and the wheel carries the recipes.

    python -m pytest -q -p no:cacheprovider tests/test_command.py
"""

from __future__ import annotations

import importlib
import os
import shutil
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
    return run_both(capsys, *argv)[:2]


def run_both(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_each_subcommand_on_one_line(capsys):
    code, out = run(capsys, "--help")
    assert code == 0
    listed = [line.split()[0] for line in out.split("commands:")[1].strip().split("\n\n")[0].splitlines()]
    assert listed == ["distill", "toy", "llava", "study", "recipes"]
    assert "--debug" in out


def test_unknown_or_missing_command_is_an_error_naming_the_commands(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["distil"])
    assert stop.value.code == 2
    assert "unknown command 'distil'; use one of: distill, toy, llava, study, recipes" in capsys.readouterr().err
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


# ---- a tool that runs from any folder -------------------------------------------------------------------------


def test_recipes_lists_the_shipped_recipes_from_any_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run(capsys, "recipes")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == {f"configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert "The toy study: every single toy encoder" in lines["configs/study/toy.yaml"]  # its first comment line
    assert str(ROOT / "configs") in out.splitlines()[0]


def test_config_paths_resolve_in_the_cwd_first_then_in_the_shipped_recipes(tmp_path, monkeypatch):
    from mllm.recipes import resolve_config, shipped_config
    from mllm.study.config import load_study

    monkeypatch.chdir(tmp_path)
    shipped = ROOT / "configs/study/toy.yaml"
    assert resolve_config("configs/study/toy.yaml") == shipped == resolve_config("study/toy.yaml")
    study = load_study(resolve_config("configs/study/toy.yaml"))  # what `unitower study` does with its default
    assert Path(study.align_recipe) == ROOT / "configs/mllm/toy_align.yaml"
    assert Path(study.distill_recipe) == ROOT / "configs/distill/toy.yaml"
    assert shipped_config("../configs/study/toy.yaml") is None and shipped_config(shipped) is None
    with pytest.raises(FileNotFoundError, match=r"study config 'configs/study/nope.yaml' does not exist .*unitower recipes"):
        resolve_config("configs/study/nope.yaml", "study config")
    mine = tmp_path / "configs/study/toy.yaml"  # a file of the same name in the cwd wins
    mine.parent.mkdir(parents=True)
    mine.write_text("# mine\n")
    assert resolve_config("configs/study/toy.yaml") == Path("configs/study/toy.yaml")


def test_yaml_arguments_fall_back_to_the_shipped_recipes(tmp_path, monkeypatch, capsys):
    from mllm.command import with_shipped_recipes

    monkeypatch.chdir(tmp_path)
    argv = ["fit", "-c", "configs/distill/toy.yaml", "--model.tower=configs/towers/toy_dino.yaml", "--x", "mine.yaml"]
    assert with_shipped_recipes(argv) == ["fit", "-c", str(ROOT / "configs/distill/toy.yaml"),
                                          f"--model.tower={ROOT / 'configs/towers/toy_dino.yaml'}", "--x", "mine.yaml"]
    assert "using the shipped recipe" in capsys.readouterr().err
    (tmp_path / "configs/distill").mkdir(parents=True)
    (tmp_path / "configs/distill/toy.yaml").write_text("{}\n")
    assert with_shipped_recipes(["-c", "configs/distill/toy.yaml"]) == ["-c", "configs/distill/toy.yaml"]


def test_user_errors_are_one_line_with_a_nonzero_exit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_both(capsys, "distill", "export", "--ckpt", "missing/last.ckpt", "--out", "exported")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("unitower distill: error: Checkpoint missing/last.ckpt") and str(tmp_path) in err
    assert "--debug shows the traceback" in err and not (tmp_path / "exported").exists()
    code, _, err = run_both(capsys, "study", "--config", "nope.yaml")
    assert code == 1 and err.startswith("unitower study: error: study config 'nope.yaml' does not exist"), err
    (tmp_path / "bad.yaml").write_text((ROOT / "configs/study/toy.yaml").read_text().replace("grid: 2", "gird: 2"))
    code, _, err = run_both(capsys, "study", "--config", "bad.yaml")  # jsonargparse's error, with the file named
    assert code == 1 and "error: study config bad.yaml: Option 'gird' is not accepted" in err, err


def test_debug_keeps_the_traceback_and_programming_errors_keep_theirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        main(["--debug", "distill", "export", "--ckpt", "missing.ckpt", "--out", "x"])
    import mllm.recipes

    def broken(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(mllm.recipes, "main", broken)
    with pytest.raises(KeyError):  # not a user error: the traceback stays
        main(["recipes"])


def test_debug_from_the_installed_entry_point_prints_the_traceback(tmp_path):
    """The real process: one line and exit 1 without --debug; Python's traceback with it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", "from mllm.command import main; main()", "distill", "export", "--ckpt", "nope.ckpt",
            "--out", "x"]
    plain = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert plain.returncode == 1 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr, plain.stderr
    debug = subprocess.run(argv + ["--debug"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "FileNotFoundError: Checkpoint nope.ckpt" in debug.stderr


def test_packages_listed_in_pyproject_are_every_package_plus_the_recipes():
    from setuptools import find_packages

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(tool["packages"]) == sorted(find_packages(str(ROOT), include=["distill*", "mllm*"]) + ["mllm.configs"])
    assert tool["package-dir"] == {"mllm.configs": "configs"}


def test_the_wheel_carries_the_recipes(tmp_path):
    """A non-editable build (what `pip install .` installs) holds every configs/*.yaml as mllm/configs/*.yaml."""
    import zipfile

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} < 68 (pyproject's build requirement)")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "runs", "build", "*.egg-info", "__pycache__", "exports"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist()
    shipped = sorted(n.removeprefix("mllm/") for n in names if n.startswith("mllm/configs/"))
    assert shipped == sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.fixture
def restore_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_flag_and_env_set_torch_threads(capsys, monkeypatch, restore_threads):
    import torch

    monkeypatch.delenv("UNITOWER_THREADS", raising=False)
    torch.set_num_threads(1)
    assert run(capsys, "--threads", "3", "recipes")[0] == 0 and torch.get_num_threads() == 3
    monkeypatch.setenv("UNITOWER_THREADS", "2")
    assert run(capsys, "recipes")[0] == 0 and torch.get_num_threads() == 2
    assert run(capsys, "--threads=1", "recipes")[0] == 0 and torch.get_num_threads() == 1  # the flag wins
    with pytest.raises(SystemExit, match=r"--threads='0' is not a number of threads >= 1"):
        main(["--threads", "0", "recipes"])
    monkeypatch.setenv("UNITOWER_THREADS", "many")
    with pytest.raises(SystemExit, match=r"\$UNITOWER_THREADS='many'"):
        main(["recipes"])
