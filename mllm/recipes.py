"""Recipe and tower YAML files (configs/mllm, configs/towers) as plain dicts, for code that edits a recipe
before handing it to the CLI (the study, tests).

A recipe names its tower by file (`model.tower: ../towers/toy_clip.yaml`); jsonargparse reads such a path
relative to the YAML that holds it, and so does `read_recipe`, which puts the tower's dict in its place so
the recipe can be written anywhere else.

    recipe = read_recipe("configs/mllm/toy_align.yaml")       # recipe["model"]["tower"] is a dict
    tower = read_tower("../towers/toy_dino.yaml", Path("configs/study"), "study variant 'dino'")
"""

from __future__ import annotations

from pathlib import Path

import yaml


def read_tower(tower: dict | str, base: Path, what: str) -> dict:
    """A tower config as a class_path/init_args dict: a dict as given, or the YAML file a string names
    (a relative path is relative to `base`, the folder of the YAML that names it). `what` names the
    referring key in errors."""
    if not isinstance(tower, str):
        return tower
    file = base / tower
    if not file.is_file():
        raise FileNotFoundError(f"{what}: tower file '{tower}' (resolved to {file}) does not exist; name one of "
                                "configs/towers/*.yaml, relative to the YAML file that names it.")
    config = yaml.safe_load(file.read_text())
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"{what}: tower file {file} must hold a class_path/init_args mapping.")
    return config


def read_recipe(path: str | Path) -> dict:
    """A configs/mllm recipe as a dict, with a tower given by file replaced by that file's dict."""
    path = Path(path)
    recipe = yaml.safe_load(path.read_text())
    model = recipe.get("model") or {}
    if "tower" in model:
        model["tower"] = read_tower(model["tower"], path.parent, f"{path}: model.tower")
    return recipe
