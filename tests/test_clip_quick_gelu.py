"""OpenAI CLIP weights run with QuickGELU (issue 10, item 1).

open_clip builds nn.GELU for 'ViT-L-14-336' while OpenAI's weights were trained with QuickGELU. Every
OpenClipEncoder in the shipped real-scale recipes is built here exactly as configured, except that open_clip's
architecture config is shrunk (same name, same quick_gelu flag) and the weights are a tiny file the test writes
(or, for the 'openai' tag, open_clip's download is pointed at that file).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import open_clip
import open_clip.factory
import pytest
import torch
import yaml
from open_clip.transformer import QuickGELU

from distill.encoders import OpenClipEncoder
from mllm.recipes import read_recipe
from mllm.study.config import load_study

CONFIGS = Path(__file__).parents[1] / "configs"
RECIPES = ["distill/radio_b16.yaml", "study/llava15.yaml", "mllm/llava15_align.yaml", "mllm/llava15_finetune.yaml",
           "mllm/llava15_finetune_lora.yaml"]


def read(recipe: str):
    """The recipe as a tree, with the tower files it names read in (configs/towers)."""
    if recipe.startswith("mllm/"):
        return read_recipe(CONFIGS / recipe)
    if recipe.startswith("study/"):
        return [variant.tower for variant in load_study(CONFIGS / recipe).variants]
    return yaml.safe_load((CONFIGS / recipe).read_text())


def clip_encoders(node) -> list[dict]:
    """init_args of every OpenClipEncoder anywhere in a parsed YAML tree."""
    found = []
    if isinstance(node, dict):
        if node.get("class_path") == "distill.encoders.OpenClipEncoder":
            found.append(node["init_args"])
        for value in node.values():
            found += clip_encoders(value)
    elif isinstance(node, list):
        for value in node:
            found += clip_encoders(value)
    return found


def shrink(model_name: str, monkeypatch) -> None:
    """Make open_clip's config for `model_name` tiny, keeping every flag (quick_gelu) of the real one."""
    config = copy.deepcopy(open_clip.get_model_config(model_name))
    config.update(embed_dim=24)
    config["vision_cfg"].update(image_size=32, layers=3, width=32, head_width=16, patch_size=8)
    config["text_cfg"].update(context_length=16, width=32, heads=2, layers=1)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, model_name, config)


def write_weights(model_name: str, path: Path, openai_jit_layout: bool = False) -> Path:
    """A state dict for the (shrunk) architecture; optionally in the layout of OpenAI's TorchScript state dicts."""
    torch.manual_seed(0)
    state = open_clip.create_model(model_name).state_dict()
    if openai_jit_layout:  # torch.jit.load("ViT-L-14-336px.pt").state_dict() carries these metadata entries
        state.update(input_resolution=torch.tensor(336), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, path)
    return path


def activations(encoder: OpenClipEncoder) -> set[type]:
    return {type(block.mlp.gelu) for block in encoder.visual.transformer.resblocks}


@pytest.fixture
def fake_openai_download(monkeypatch, tmp_path):
    """open_clip's tag download returns a tiny file of the (shrunk) architecture instead of fetching."""
    calls = []

    def download(cfg, *args, **kwargs):
        calls.append(cfg)
        return str(write_weights(cfg["__model__"], tmp_path / f"openai_{len(calls)}.bin"))

    original = open_clip.factory.get_pretrained_cfg

    def get_pretrained_cfg(model, tag):
        return {**original(model, tag), "__model__": model}

    monkeypatch.setattr(open_clip.factory, "download_pretrained", download)
    monkeypatch.setattr(open_clip.factory, "get_pretrained_cfg", get_pretrained_cfg)
    return calls


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_clip_is_built_with_quick_gelu(recipe, monkeypatch, tmp_path, fake_openai_download):
    encoders = clip_encoders(read(recipe))
    assert encoders, f"{recipe} names no OpenClipEncoder"
    for args in encoders:
        args = dict(args)
        shrink(args["model_name"], monkeypatch)
        if args.get("pretrained") not in (None, "openai"):  # a weights file: write a tiny one in its place
            args["pretrained"] = str(write_weights(args["model_name"], tmp_path / Path(args["pretrained"]).name))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no QuickGELU mismatch warning from open_clip or from us
            encoder = OpenClipEncoder(**args)
        assert encoder.quick_gelu and activations(encoder) == {QuickGELU}, (recipe, args)
        out = encoder(torch.rand(1, 3, 40, 40))
        assert out.dense.shape == (1, 32, 4, 4)
    if any(args.get("pretrained") == "openai" for args in encoders):
        assert fake_openai_download and fake_openai_download[0]["quick_gelu"]


def test_openai_tag_picks_quick_gelu_for_a_gelu_name(monkeypatch, fake_openai_download):
    shrink("ViT-L-14-336", monkeypatch)
    assert not open_clip.get_model_config("ViT-L-14-336").get("quick_gelu")  # open_clip's plain name is GELU
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder = OpenClipEncoder("ViT-L-14-336", pretrained="openai")
    assert activations(encoder) == {QuickGELU}


def test_openai_state_dict_layout_picks_quick_gelu(monkeypatch, tmp_path):
    shrink("ViT-L-14-336", monkeypatch)
    file = write_weights("ViT-L-14-336", tmp_path / "clip_openai.pt", openai_jit_layout=True)
    encoder = OpenClipEncoder("ViT-L-14-336", pretrained=str(file))
    assert activations(encoder) == {QuickGELU}
    saved = torch.load(file, weights_only=True)
    assert torch.equal(encoder.visual.conv1.weight, saved["visual.conv1.weight"])


def test_gelu_with_openai_weights_is_refused(monkeypatch, tmp_path, fake_openai_download):
    shrink("ViT-L-14-336", monkeypatch)
    with pytest.raises(ValueError, match=r"quick_gelu=False \(nn.GELU\) with pretrained tag 'openai'.*quick_gelu: true"):
        OpenClipEncoder("ViT-L-14-336", pretrained="openai", quick_gelu=False)
    file = write_weights("ViT-L-14-336", tmp_path / "clip_openai.pt", openai_jit_layout=True)
    with pytest.raises(ValueError, match=r"quick_gelu=False .*OpenAI TorchScript state-dict layout"):
        OpenClipEncoder("ViT-L-14-336", pretrained=str(file), quick_gelu=False)


def test_gelu_name_with_unrecognised_file_warns(monkeypatch, tmp_path):
    """The pre-fix recipes: 'ViT-L-14-336' + an open_clip state-dict file of OpenAI's weights built GELU silently."""
    shrink("ViT-L-14-336", monkeypatch)
    file = write_weights("ViT-L-14-336", tmp_path / "open_clip_pytorch_model.bin")
    with pytest.warns(UserWarning, match=r"builds nn.GELU, but the only pretrained weights .*\['openai'\].*quick_gelu: true"):
        encoder = OpenClipEncoder("ViT-L-14-336", pretrained=str(file))
    assert activations(encoder) == {torch.nn.GELU}
    forced = OpenClipEncoder("ViT-L-14-336", pretrained=str(file), quick_gelu=True)
    assert activations(forced) == {QuickGELU}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert activations(OpenClipEncoder("ViT-L-14-336", pretrained=str(file), quick_gelu=False)) == {torch.nn.GELU}


def test_torchscript_archive_is_refused_with_conversion_hint(monkeypatch, tmp_path):
    shrink("ViT-L-14-336", monkeypatch)
    archive = tmp_path / "ViT-L-14-336px.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(archive))
    with pytest.raises(ValueError, match=r"TorchScript archive .*torch.jit.load\(PATH"):
        OpenClipEncoder("ViT-L-14-336", pretrained=str(archive))


def test_explicit_quick_gelu_overrides_the_config(monkeypatch, tiny_teacher_files):
    folder = f"local-dir:{tiny_teacher_files['clip']}"  # toy teacher: trained and configured with GELU
    assert activations(OpenClipEncoder(folder)) == {torch.nn.GELU}
    assert activations(OpenClipEncoder(folder, quick_gelu=True)) == {QuickGELU}
    shrink("ViT-L-14-336-quickgelu", monkeypatch)
    assert activations(OpenClipEncoder("ViT-L-14-336-quickgelu")) == {QuickGELU}
    assert activations(OpenClipEncoder("ViT-L-14-336-quickgelu", quick_gelu=False)) == {torch.nn.GELU}
