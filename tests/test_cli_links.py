"""What the LLaVA CLI hands between its parts: the tower's tokens per image reach the data module through a
LightningCLI link (not by the data module reaching into the trainer), the tower's config is kept as a
hyper-parameter only when the module was built from a config, and towers (un)freeze encoders by their methods."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml
from llava_configs import cli_trainer, timm_tower
from tiny_llava import tiny_llava_records, write_llava_json, write_tiny_lm
from tiny_teachers import write_timm_dir

from distill.encoders import TimmEncoder
from mllm.cli import make_cli
from mllm.datamodule import LlavaDataModule
from mllm.module import LlavaModule
from mllm.towers import SingleEncoderTower


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("links")
    return {"tmp": tmp, "lm": str(write_tiny_lm(tmp / "lm", steps=2)), "vit": str(write_timm_dir(tmp / "vit")),
            "json": str(write_llava_json(tiny_llava_records(tmp / "img", 4, "align"), tmp / "align.json"))}


def test_cli_links_the_towers_tokens_per_image_to_the_data_and_keeps_the_tower_config(parts):
    tmp = parts["tmp"]
    config = {"trainer": cli_trainer(tmp / "run", 1, "align"),
              "model": {"tower": timm_tower(parts["vit"], grid=3), "lm": parts["lm"], "stage": "align"},
              "data": {"train": {"class_path": "mllm.data.LlavaJsonSource",
                                 "init_args": {"json_path": parts["json"], "image_folder": str(tmp / "img")}},
                       "batch_size": 2, "image_size": 32, "max_length": 64}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = make_cli(["-c", str(path)], run=False)
    assert cli.datamodule.num_image_tokens == cli.model.model.tower.num_tokens == 9  # grid 3 -> 3 x 3
    tower = cli.model.hparams["tower"]  # the config, so load_from_checkpoint can rebuild the tower
    assert not isinstance(tower, torch.nn.Module) and tower["class_path"] == "mllm.towers.SingleEncoderTower"


def test_directly_built_module_keeps_no_tower_object(parts):
    tower = SingleEncoderTower(TimmEncoder(f"local-dir:{parts['vit']}", pretrained=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*instance of `nn.Module`")  # Lightning's warning for a module hparam
        module = LlavaModule(tower, lm=parts["lm"])
    assert "tower" not in module.hparams and module.hparams["lm"] == parts["lm"]


def test_data_module_without_tokens_per_image_says_how_to_set_it(parts):
    data = LlavaDataModule(tokenizer=parts["lm"])
    with pytest.raises(ValueError, match=r"num_image_tokens is not set.*module.model.tower.num_tokens"):
        data.setup("fit")


@pytest.mark.parametrize("trainable", [False, True])
def test_towers_freeze_or_unfreeze_their_encoders(parts, trainable):
    encoder = TimmEncoder(f"local-dir:{parts['vit']}", pretrained=True).freeze()  # e.g. reused from a frozen tower
    tower = SingleEncoderTower(encoder, trainable=trainable)
    tower.train()
    assert all(p.requires_grad == trainable for p in encoder.parameters())
    assert encoder.training == trainable and encoder.frozen != trainable
