"""Every YAML recipe in configs/distill parses against the distillation CLI (classes and argument types
checked by jsonargparse; nothing is instantiated, so no checkpoint needs to exist)."""

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from distill.data import DistillDataModule
from distill.module import DistillModule

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "distill").glob("*.yaml"))
OVERLAYS = sorted((Path(__file__).parents[1] / "configs" / "distill" / "overlays").glob("*.yaml"))


class ParseOnlyCLI(LightningCLI):
    def instantiate_classes(self) -> None:  # parsing validates every class_path and init_arg type
        pass


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_distill_config_parses(config):
    cli = ParseOnlyCLI(DistillModule, DistillDataModule, run=False, args=["-c", str(config)])
    model = cli.config["model"]
    names = [t["init_args"]["name"] for t in model["teachers"]]
    assert len(names) == len(set(names)) >= 1
    assert set(model["student"]["init_args"]["summary_names"]) <= set(names)


def test_there_are_toy_and_real_recipes():
    assert {"toy.yaml", "radio_b16.yaml"} <= {p.name for p in CONFIGS}


def test_bad_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIGS[0].read_text().replace("dense_loss:", "dense_los:"))
    with pytest.raises(SystemExit):
        ParseOnlyCLI(DistillModule, DistillDataModule, run=False, args=["-c", str(bad)])


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_overlay_composes_with_every_recipe(config, overlay):
    """`-c RECIPE -c overlays/X.yaml`: the overlay's keys land on top of the recipe and nothing else changes."""
    import yaml

    base = ParseOnlyCLI(DistillModule, DistillDataModule, run=False, args=["-c", str(config)]).config.as_dict()
    both = ParseOnlyCLI(DistillModule, DistillDataModule, run=False, args=["-c", str(config), "-c", str(overlay)])
    both = both.config.as_dict()

    def apply(tree: dict, delta: dict) -> None:
        for key, value in delta.items():
            if isinstance(value, dict) and isinstance(tree.get(key), dict):
                apply(tree[key], value)
            else:
                tree[key] = value

    apply(base, yaml.safe_load(overlay.read_text()))
    base.pop("config"), both.pop("config")
    assert both == base
