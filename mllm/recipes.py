"""Recipe and tower YAML files: where the shipped recipes are, how a config path resolves, and recipes as plain
dicts for code that edits a recipe before handing it to the CLI (the study, tests).

    unitower recipes                                          # list the shipped recipes: path + first comment line
    resolve_config("configs/study/toy.yaml")                  # ./configs/study/toy.yaml if it exists, else the shipped one

The shipped recipes are the repository's top-level configs/ folder (a source checkout or an editable install);
a wheel carries the same files as package data in mllm/configs/ (pyproject.toml maps the package `mllm.configs`
onto configs/). A config path given to `unitower` is read relative to the cwd first; when no such file exists
there, `configs/X.yaml` (or `X.yaml`) names the shipped recipe, so the recipes work from any folder.

A recipe names its tower by file (`model.tower: ../towers/toy_clip.yaml`); jsonargparse reads such a path
relative to the YAML that holds it, and so does `read_recipe`, which puts the tower's dict in its place so
the recipe can be written anywhere else.

    recipe = read_recipe("configs/mllm/toy_align.yaml")       # recipe["model"]["tower"] is a dict
    tower = read_tower("../towers/toy_dino.yaml", Path("configs/study"), "study variant 'dino'")
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

CONFIGS = "configs"  # the folder name users write in front of a recipe: configs/study/toy.yaml


def shipped_configs() -> Path:
    """The folder of the shipped recipes: mllm/configs in an installed wheel, else configs/ beside the packages."""
    here = Path(__file__).resolve().parent
    for folder in (here / CONFIGS, here.parent / CONFIGS):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"the shipped recipes are missing: neither {here / CONFIGS} nor {here.parent / CONFIGS} "
                            "exists; reinstall unitower (`pip install .` from the repository) or pass config files "
                            "by their own paths.")


def shipped_config(path: str | Path) -> Path | None:
    """The shipped recipe a relative `path` names (`configs/study/toy.yaml` or `study/toy.yaml`), None if none."""
    path = Path(path)
    if path.is_absolute() or not path.parts:
        return None
    parts = path.parts[1:] if path.parts[0] == CONFIGS else path.parts
    if not parts or ".." in parts:
        return None
    candidate = shipped_configs() / Path(*parts)
    return candidate if candidate.is_file() else None


def resolve_config(path: str | Path, what: str = "config") -> Path:
    """`path` if that file exists (relative to the cwd), else the shipped recipe it names (see `shipped_config`).
    Raises FileNotFoundError naming both places and `unitower recipes`; `what` names the setting in that error."""
    if Path(path).is_file():
        return Path(path)
    shipped = shipped_config(path)
    if shipped is None:
        raise FileNotFoundError(f"{what} '{path}' does not exist (looked in {Path.cwd()} and among the shipped recipes "
                                f"in {shipped_configs()}); `unitower recipes` lists the shipped ones.")
    return shipped


def first_comment(file: Path) -> str:
    """The first '# ...' line of a YAML file without its '#' ('' when it has none)."""
    for line in file.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def list_recipes() -> list[tuple[str, str]]:
    """(name as `unitower` accepts it from any folder, e.g. 'configs/study/toy.yaml', first comment line) of
    every shipped recipe, sorted by name."""
    root = shipped_configs()
    files = sorted(f for f in root.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file())
    return [(f"{CONFIGS}/{f.relative_to(root).as_posix()}", first_comment(f)) for f in files]


def main(argv: list[str] | None = None) -> None:
    """`unitower recipes`: print every shipped recipe with its first comment line."""
    parser = argparse.ArgumentParser(prog="unitower recipes", description="List the YAML recipes shipped with unitower. "
                                     "Pass one by the name shown (e.g. `-c configs/distill/toy.yaml`) from any folder: "
                                     "a file of that name in the cwd wins, else the shipped one is used.")
    parser.parse_args(argv)
    recipes = list_recipes()
    width = max(len(name) for name, _ in recipes)
    print(f"shipped recipes in {shipped_configs()} (a file of the same name in the cwd takes precedence):")
    for name, comment in recipes:
        print(f"  {name:<{width}}  {comment}")


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
