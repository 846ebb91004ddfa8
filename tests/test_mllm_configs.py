"""Every configs/mllm/*.yaml parses against the `python -m mllm` CLI (types and class paths checked, nothing built).

    /work/venv/bin/pytest tests/test_mllm_configs.py
"""

from pathlib import Path

import pytest

from mllm.cli import LlavaCLI
from mllm.datamodule import LlavaDataModule
from mllm.module import LlavaModule

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "mllm").glob("*.yaml"))


class ParseOnlyCLI(LlavaCLI):
    def instantiate_classes(self) -> None:  # parse and validate only: the recipes name weights absent here
        pass


def test_there_are_recipes_for_every_tower_kind_and_llava15():
    names = {c.stem for c in CONFIGS}
    for tower in ("clip", "dino", "sam", "ensemble", "student"):
        assert {f"toy_{tower}_align", f"toy_{tower}_finetune"} <= names
    assert {"llava15_clip_align", "llava15_clip_finetune"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_recipe_parses(config):
    cli = ParseOnlyCLI(LlavaModule, LlavaDataModule, args=["-c", str(config)], run=False)
    model = cli.config.model
    assert model.stage in config.stem
    assert cli.config.data.tokenizer == model.lm  # linked
    assert model.tower.class_path.startswith("mllm.towers.")
    if model.stage == "finetune":
        assert model.init_from and "align" in model.init_from
