"""Every configs/mllm/*.yaml parses against the `unitower llava` CLI (types and class paths checked, nothing built),
composed with every configs/towers/*.yaml of its scale given the way a user gives it (`--model.tower FILE`).

    pytest tests/test_mllm_configs.py
"""

from pathlib import Path

import pytest
import yaml

from mllm.cli import LlavaCLI
from mllm.datamodule import LlavaDataModule
from mllm.module import LlavaModule
from mllm.recipes import read_recipe

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs" / "mllm").glob("*.yaml"))
TOWERS = sorted((ROOT / "configs" / "towers").glob("*.yaml"))
SCALE = {"toy": "toy_", "llava15": ("llava15_", "large_")}  # recipe prefix -> tower files of that scale


class ParseOnlyCLI(LlavaCLI):
    def instantiate_classes(self) -> None:  # parse and validate only: the recipes name weights absent here
        pass


def parse(*args: str):
    return ParseOnlyCLI(LlavaModule, LlavaDataModule, args=list(args), run=False).config


def test_one_align_and_one_finetune_recipe_per_scale_and_every_tower_file():
    assert {c.stem for c in CONFIGS} == {"toy_align", "toy_finetune", "toy_finetune_lora",
                                         "llava15_align", "llava15_finetune", "llava15_finetune_lora"}
    assert {t.stem for t in TOWERS} >= {"toy_clip", "toy_dino", "toy_sam", "toy_ensemble_all", "toy_ensemble_clip_dino",
                                        "toy_student", "llava15_clip"}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_recipe_parses(config):
    cfg = parse("-c", str(config))
    model = cfg.model
    assert model.stage in config.stem
    assert cfg.data.tokenizer == model.lm  # linked
    assert model.tower.class_path.startswith("mllm.towers.")
    if model.stage == "finetune":  # the placeholder became the run folder's align checkpoint
        assert model.init_from == f"{cfg.trainer.default_root_dir}/align.ckpt"
    # the recipe's tower file, read the way jsonargparse reads it (relative to the recipe)
    assert model.tower.class_path == read_recipe(config)["model"]["tower"]["class_path"]


def _subset(small, big) -> bool:
    if isinstance(small, dict):
        return all(k in big and _subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return len(small) == len(big) and all(_subset(a, b) for a, b in zip(small, big))
    return small == big


CASES = [(c, t) for c in CONFIGS for t in TOWERS if t.stem.startswith(SCALE[c.stem.split("_")[0]])]


@pytest.mark.parametrize("config,tower", CASES, ids=[f"{c.stem}+{t.stem}" for c, t in CASES])
def test_recipe_composes_with_each_tower_file(config, tower, monkeypatch):
    monkeypatch.chdir(ROOT)  # a path on the command line is relative to the working directory
    cfg = parse("-c", str(config.relative_to(ROOT)), "--model.tower", str(tower.relative_to(ROOT)),
                "--trainer.default_root_dir", "runs/mllm/elsewhere")
    parsed = cfg.model.tower.as_dict()
    parsed.pop("__path__", None)
    assert _subset(yaml.safe_load(tower.read_text()), parsed)  # every key of the file, with defaults added
    if cfg.model.stage == "finetune":
        assert cfg.model.init_from == "runs/mllm/elsewhere/align.ckpt"


def test_every_tower_file_is_used_by_a_case():
    assert {t for _, t in CASES} == set(TOWERS)


def test_read_recipe_inlines_the_tower_file(tmp_path):
    recipe = read_recipe(ROOT / "configs/mllm/toy_align.yaml")
    assert recipe["model"]["tower"] == yaml.safe_load((ROOT / "configs/towers/toy_clip.yaml").read_text())
    moved = tmp_path / "align.yaml"  # the inlined recipe parses from anywhere
    moved.write_text(yaml.safe_dump(recipe))
    assert parse("-c", str(moved)).model.tower.init_args.encoder.init_args.model_name == "toy:clip"


def test_missing_tower_file_is_named(tmp_path):
    bad = tmp_path / "align.yaml"
    bad.write_text((ROOT / "configs/mllm/toy_align.yaml").read_text().replace("../towers/toy_clip.yaml", "nope.yaml"))
    with pytest.raises(FileNotFoundError, match=r"model.tower: tower file 'nope.yaml'"):
        read_recipe(bad)
